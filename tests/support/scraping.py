"""Reading a service's Prometheus endpoint: the metric and label names, or one metric's
samples with their labels."""

from __future__ import annotations

import re
import urllib.request

_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _lines(port: int) -> list[str]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def scrape(port: int) -> tuple[set[str], set[str]]:
    """(metric names, label names) the endpoint exports."""
    metrics, labels = set(), set()
    for line in _lines(port):
        name = re.match(r"[a-zA-Z_:][\w:]*", line)
        assert name is not None
        metrics.add(name.group(0))
        labels |= set(re.findall(r"(\w+)=\"", line))
    return metrics, labels


def scrape_samples(port: int, metric: str) -> list[tuple[dict[str, str], float]]:
    """The samples of one metric: (labels, value) each."""
    found = []
    for line in _lines(port):
        match = _SAMPLE.match(line)
        if match is None or match.group(1) != metric:
            continue
        found.append((dict(_LABEL.findall(match.group(2) or "")), float(match.group(3))))
    return found
