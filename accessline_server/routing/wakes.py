"""Which changes under `rt/` can give the dispatch leader work, so that it reads and plans
again only for those: a call waiting (or no longer waiting), a claim gone by itself, a
request, a hold, a callback or a dial. A call's own progress is not work: the offer the
leader just wrote, its accept, its connect, and what those transactions drop with it (the
claim, the agent's unanswered mark) or keep beside it (places, redirects). A change taken
for no work wrongly only delays a pass to the next timed one (the dispatch interval)."""

from __future__ import annotations

from accessline.routing.storage.v1 import storage_pb2 as rt_store
from accessline_server.routing import keys
from accessline_server.runtime.store import EventKind, WatchEvent, decode

QI = rt_store.QueuedInteraction
QUEUED = rt_store.INTERACTION_STATE_QUEUED
# Bookkeeping beside a call's entries: never work by itself.
_NEVER = (f"{keys.ROOT}places/", f"{keys.ROOT}redirects/", keys.LEADER, "rt/callback-owners/")
# Dropped by the transaction that moves a call on (its accept): work only on their own.
_WITH_PROGRESS = (keys.CLAIMS, "rt/no-answer/")


def _waiting(event: WatchEvent) -> bool | None:
    """Whether the queue entry of `event` is (PUT) or was (DELETE) a waiting call; None
    when its value is not known."""
    value = event.value if event.kind == EventKind.PUT else event.prev_value
    if value is None:
        return None
    return decode(QI, event.key, value).state == QUEUED


class Wakes:
    """Follows a watch of `rt/`, event by event, and says which events are work. Within
    one transaction, a call's progress is written before what it drops."""

    def __init__(self) -> None:
        self._revision = 0
        self._progress = False  # the current revision moved a call on

    def work(self, event: WatchEvent) -> bool:
        if event.revision != self._revision:
            self._revision, self._progress = event.revision, False
        key = event.key
        if key.startswith(keys.QUEUE):
            waiting = _waiting(event)
            if waiting is False:
                self._progress = True
                return False
            return True
        if key.startswith(_NEVER):
            return False
        if key.startswith(keys.CLAIMS) and event.kind == EventKind.PUT:
            return False  # the leader's own offer
        if key.startswith(_WITH_PROGRESS):
            return not self._progress
        return True
