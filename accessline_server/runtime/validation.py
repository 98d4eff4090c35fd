"""Request checks shared by the servicers: collect every field violation of a request,
then refuse it whole with INVALID_ARGUMENT, before anything is written."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message

from accessline_server.runtime.errors import FieldViolation, InvalidArgument

ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
LONG_ID = re.compile(r"^[A-Za-z0-9_.\-:@]{1,128}$")
REGION = re.compile(r"^[A-Z]{2}$")
# The ranges protobuf defines for its time types (0001-01-01 to 9999-12-31; ±10,000 years).
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799
MAX_DURATION_SECONDS = 315_576_000_000
MAX_NANOS = 999_999_999


class Violations:
    """Collects field violations; `raise_if_any` refuses the request with all of them."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)

    def id(self, field: str, value: str, *, required: bool = True, long: bool = False) -> None:
        if not value:
            if required:
                self.add(field, "is required")
            return
        pattern, limit = (LONG_ID, 128) if long else (ID, 64)
        if not pattern.match(value):
            allowed = "[A-Za-z0-9_.-:@]" if long else "[A-Za-z0-9_.-]"
            self.add(field, f"must be 1 to {limit} characters of {allowed}")

    def text(self, field: str, value: str, max_length: int, *, required: bool = False) -> None:
        if required and not value:
            self.add(field, "is required")
        elif len(value) > max_length:
            self.add(field, f"must be at most {max_length} characters")

    def items_list(
        self, field: str, values: Sequence[str], max_items: int, max_length: int
    ) -> None:
        if len(values) > max_items:
            self.add(field, f"must have at most {max_items} entries")
            return
        for i, value in enumerate(values):
            if not value:
                self.add(f"{field}[{i}]", "must not be empty")
            elif len(value) > max_length:
                self.add(f"{field}[{i}]", f"must be at most {max_length} characters")

    def latitude_longitude(self, field: str, latitude: float, longitude: float) -> None:
        if not (math.isfinite(latitude) and -90 <= latitude <= 90):
            self.add(f"{field}.latitude", "must be between -90 and 90")
        if not (math.isfinite(longitude) and -180 <= longitude <= 180):
            self.add(f"{field}.longitude", "must be between -180 and 180")

    def duration(
        self, field: str, value: duration_pb2.Duration, minimum: float, maximum: float
    ) -> float:
        seconds = value.ToNanoseconds() / 1e9
        if not minimum <= seconds <= maximum:
            self.add(field, f"must be between {minimum:g} and {maximum:g} seconds")
        return seconds

    def dtmf(self, field: str, digits: str) -> None:
        if len(digits) > 32 or any(c not in "0123456789*#" for c in digits):
            self.add(field, "must be at most 32 characters of 0-9, * and #")

    def region(self, field: str, value: str) -> None:
        if value and not REGION.match(value):
            self.add(field, "must be an ISO 3166-1 alpha-2 code in capitals, for example FR")

    def page(self, size_field: str, size: int, maximum: int, default: int) -> int:
        if size < 0 or size > maximum:
            self.add(size_field, f"must be between 0 and {maximum}")
            return default
        return size or default


def _time_violation(value: Message) -> str:
    if isinstance(value, timestamp_pb2.Timestamp):
        if not MIN_TIMESTAMP_SECONDS <= value.seconds <= MAX_TIMESTAMP_SECONDS:
            return "must be between 0001-01-01 and 9999-12-31"
        if not 0 <= value.nanos <= MAX_NANOS:
            return "nanos must be between 0 and 999,999,999"
    elif isinstance(value, duration_pb2.Duration):
        if not -MAX_DURATION_SECONDS <= value.seconds <= MAX_DURATION_SECONDS:
            return "must be within 10,000 years"
        if not -MAX_NANOS <= value.nanos <= MAX_NANOS or value.seconds * value.nanos < 0:
            return "nanos must be within ±999,999,999 and of the sign of seconds"
    return ""


def invalid_times(message: Message, path: str = "") -> list[FieldViolation]:
    """Every Timestamp and Duration of a request (at any depth) outside the range
    protobuf defines for it: such values cannot be converted and are refused whole."""
    out: list[FieldViolation] = []
    for field, value in message.ListFields():
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        name = f"{path}{field.name}"
        items = list(enumerate(value)) if field.is_repeated else [(None, value)]
        for index, item in items:
            at = name if index is None else f"{name}[{index}]"
            problem = _time_violation(item)
            if problem:
                out.append(FieldViolation(at, problem))
            elif not field.message_type.full_name.startswith("google.protobuf."):
                out += invalid_times(item, f"{at}.")
    return out
