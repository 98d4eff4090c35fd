"""CallMatching's key layout in etcd.

cm/apps/{application_id}          Application
cm/sessions/{session_id}          StoredSession       (the reservation's lease)
cm/idempotency/{sha256}           HandoffIdempotency  (the reservation's lease)
cm/outcomes/{session_id}          StoredOutcome       (retention lease)
cm/calls/{sha256(call_id)}        MatchedCall         (kept 5 minutes)
cm/failures/...                   failure buckets     (see failures.py)
"""

from __future__ import annotations

import hashlib

APPS = "cm/apps/"
SESSIONS = "cm/sessions/"
IDEMPOTENCY = "cm/idempotency/"
OUTCOMES = "cm/outcomes/"
CALLS = "cm/calls/"


def app(application_id: str) -> str:
    return APPS + application_id


def session(session_id: str) -> str:
    return SESSIONS + session_id


def idempotency(application_id: str, key: str) -> str:
    return IDEMPOTENCY + hashlib.sha256(f"{application_id}\0{key}".encode()).hexdigest()


def outcome(session_id: str) -> str:
    return OUTCOMES + session_id


def matched_call(call_id: str) -> str:
    return CALLS + hashlib.sha256(call_id.encode()).hexdigest()
