"""Request checks shared by the servicers: collect every field violation of a request,
then refuse it whole with INVALID_ARGUMENT, before anything is written."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from google.protobuf import duration_pb2

from services.runtime.errors import FieldViolation, InvalidArgument

ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
LONG_ID = re.compile(r"^[A-Za-z0-9_.\-:@]{1,128}$")
REGION = re.compile(r"^[A-Z]{2}$")


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
