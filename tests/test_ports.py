"""The free ports the tests and the benchmarks start servers on: taken from below the
kernel's range of ephemeral ports, so that no outgoing connection (the tests make
thousands) can be given one between its pick and its server's bind; and never handed
out twice by one process, however close together the picks."""

from __future__ import annotations

import socket
from pathlib import Path

from accessline_server.runtime.embedded_etcd import free_port


def ephemeral_range() -> tuple[int, int]:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(low), int(high)


def test_a_free_port_is_never_one_an_outgoing_connection_could_be_given() -> None:
    low, high = ephemeral_range()
    picked = [free_port() for _ in range(200)]
    assert not [p for p in picked if low <= p <= high]


def test_a_free_port_is_handed_out_once_and_is_bindable() -> None:
    picked = [free_port() for _ in range(300)]
    assert len(set(picked)) == len(picked)
    for port in picked[:20]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
