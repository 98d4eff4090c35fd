"""Limits of the context an app sends (documented on accessline.common.v1.ContextData):
at most 32 attributes, keys of 1 to 64 bytes of [A-Za-z0-9_.-], values and typed fields
of at most 1,024 bytes, 16 KiB serialized. Shared: CallMatching checks the context of a
handoff, Routing the context a callback or a notify request carries."""

from __future__ import annotations

import math
import re

from accessline.common.v1 import common_pb2
from accessline_server.runtime.validation import Violations

MAX_ATTRIBUTES = 32
MAX_KEY_BYTES = 64
MAX_VALUE_BYTES = 1024
MAX_CONTEXT_BYTES = 16 * 1024
KEY = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
TYPED_FIELDS = (
    "subject",
    "language",
    "customer_segment",
    "service_request_id",
    "auth_token_ref",
    "app_screen",
    "service_request_owner",
)


MAX_OPEN_TRANSACTIONS = 3
MAX_JOURNEY_TEXT = 128


def check_context(context: common_pb2.ContextData, v: Violations, field: str = "context") -> None:
    """Adds a violation to `v` for each limit `context` (at `field`) breaks."""
    if context.HasField("location"):
        loc = context.location
        if not (math.isfinite(loc.latitude) and -90 <= loc.latitude <= 90):
            v.add(f"{field}.location.latitude", "must be between -90 and 90")
        if not (math.isfinite(loc.longitude) and -180 <= loc.longitude <= 180):
            v.add(f"{field}.location.longitude", "must be between -180 and 180")
    for name in TYPED_FIELDS:
        if len(getattr(context, name).encode()) > MAX_VALUE_BYTES:
            v.add(f"{field}.{name}", f"must be at most {MAX_VALUE_BYTES} bytes")
    if len(context.attributes) > MAX_ATTRIBUTES:
        v.add(f"{field}.attributes", f"must have at most {MAX_ATTRIBUTES} entries")
    for key in sorted(context.attributes)[: MAX_ATTRIBUTES + 1]:
        if not KEY.match(key) or len(key.encode()) > MAX_KEY_BYTES:
            v.add(
                f"{field}.attributes",
                f"key {key[:70]!r} must be 1 to 64 characters of [A-Za-z0-9_.-]",
            )
        elif len(context.attributes[key].encode()) > MAX_VALUE_BYTES:
            v.add(f"{field}.attributes[{key}]", f"must be at most {MAX_VALUE_BYTES} bytes")
    # Set by CallMatching from the journey; what a client sends is replaced, within limits.
    if len(context.open_transactions) > MAX_OPEN_TRANSACTIONS:
        v.add(f"{field}.open_transactions", f"must have at most {MAX_OPEN_TRANSACTIONS} entries")
    for i, found in enumerate(context.open_transactions[:MAX_OPEN_TRANSACTIONS]):
        for name in ("transaction_id", "topic"):
            if len(getattr(found, name)) > MAX_JOURNEY_TEXT:
                v.add(
                    f"{field}.open_transactions[{i}].{name}",
                    f"must be at most {MAX_JOURNEY_TEXT} characters",
                )
    if context.ByteSize() > MAX_CONTEXT_BYTES:
        v.add(field, f"must be at most {MAX_CONTEXT_BYTES} bytes serialized")
