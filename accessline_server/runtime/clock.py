"""Time as the contracts carry it: protobuf Timestamps and Durations to and from epoch
seconds (floats, as `time.time()` gives them). The one place these conversions live."""

from __future__ import annotations

import time

from google.protobuf import duration_pb2, timestamp_pb2


def timestamp(epoch: float) -> timestamp_pb2.Timestamp:
    """The Timestamp of `epoch` seconds."""
    out = timestamp_pb2.Timestamp()
    out.FromNanoseconds(int(epoch * 1e9))
    return out


def now_timestamp() -> timestamp_pb2.Timestamp:
    """The Timestamp of now."""
    out = timestamp_pb2.Timestamp()
    out.FromNanoseconds(time.time_ns())
    return out


def seconds(value: timestamp_pb2.Timestamp | duration_pb2.Duration) -> float:
    """Epoch seconds of a Timestamp, or the length in seconds of a Duration."""
    return float(value.ToNanoseconds()) / 1e9
