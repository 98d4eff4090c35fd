"""What tracing costs on the call path: StartHandoff then MatchCall (CallMatching and
NumberDistribution, one gRPC hop between them), CPU milliseconds per handoff of the two
services, with no trace recorded (OTEL_TRACES_SAMPLER=always_off: the spans exist but
are neither recorded nor exported; metrics as usual), at the default sampling
(`ACCESSLINE_TRACE_SAMPLE_RATIO` 0.1, parent-based) and with every trace recorded (1.0),
both exporting over OTLP to a receiver in this process; all three in this run, on fresh
processes, the first as the baseline.

    python -m bench.tracing_bench [--count N] [--concurrency C] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from accessline_server.runtime.embedded_etcd import free_port
from bench.match_bench import call_matching_round


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP receiver that counts the spans it is sent."""

    def __init__(self) -> None:
        self.spans = 0

    async def Export(self, request: Any, context: Any) -> Any:
        self.spans += sum(
            len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans
        )
        return trace_service_pb2.ExportTraceServiceResponse()


async def main(count: int, concurrency: int, rounds: int) -> None:
    server = grpc.aio.server()
    sink = Sink()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    await server.start()
    exporting = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_METRICS_EXPORTER": "none",
    }
    runs = [
        ("no trace recorded", {**exporting, "OTEL_TRACES_SAMPLER": "always_off"}),
        ("default sampling (0.1)", {**exporting, "ACCESSLINE_TRACE_SAMPLE_RATIO": "0.1"}),
        ("every trace (1.0)", {**exporting, "ACCESSLINE_TRACE_SAMPLE_RATIO": "1"}),
    ]
    print(
        f"\ntracing cost, {count} handoffs (StartHandoff + MatchCall), {concurrency} at once,"
        f" {rounds} rounds interleaved (medians)"
    )
    print(f"{'tracing':<30}{'CPU ms/handoff':>16}{'vs off':>8}{'MatchCall p50 ms':>18}{'spans':>8}")
    cpu_ms: dict[str, list[float]] = {name: [] for name, _ in runs}
    p50s: dict[str, list[float]] = {name: [] for name, _ in runs}
    spans: dict[str, int] = dict.fromkeys(cpu_ms, 0)
    for _ in range(rounds):
        for name, settings in runs:
            cpu: dict[str, float] = {}
            before = sink.spans
            results = await call_matching_round(count, concurrency, settings=settings, cpu=cpu)
            cpu_ms[name].append(sum(cpu.values()) * 1000 / count)
            p50s[name].append(results[1].p50_ms)
            await asyncio.sleep(1.0)  # the last batch of spans leaves within its delay
            spans[name] += sink.spans - before
    off = statistics.median(cpu_ms[runs[0][0]])
    for name, _ in runs:
        per = statistics.median(cpu_ms[name])
        p50 = statistics.median(p50s[name])
        print(f"{name:<30}{per:>16.2f}{per / off:>8.2f}{p50:>18.2f}{spans[name] // rounds:>8}")
    await server.stop(None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.count, args.concurrency, args.rounds))
