"""Where a call to a number most likely goes: the session this replica stored on the
number at StartHandoff, and the number's pool. MatchCall reads that session and the
pool's group in its first etcd read, with the number's reservations, instead of in a
second one. A hint is only a guess: it is taken only when the reservation read in that
same snapshot names the hinted session and the number is in the hinted pool (a handoff
on another replica, or a number moved, reads them as before)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from accessline_server.callmatching import keys
from accessline_server.numberdistribution.dialled import pool_read
from accessline_server.runtime.store import Op, RawKV

# Numbers hinted at most (the oldest hint goes first): a replica's handoffs of a few
# minutes at a high rate.
MAX_HINTS = 20_000


@dataclass(frozen=True)
class Hint:
    session_id: str
    pool_id: str

    def reads(self) -> list[Op]:
        """The gets of the session and the pool, in that order (for `Prefetched`)."""
        return [Op.get(keys.session(self.session_id)), pool_read(self.pool_id)]


@dataclass(frozen=True)
class Prefetched:
    """The rows of a hint's reads, read with the number's reservations."""

    hint: Hint
    session_rows: list[RawKV]
    pool_rows: list[RawKV]

    @staticmethod
    def split(hint: Hint | None, rows: Sequence[list[RawKV]]) -> tuple[Prefetched | None, int]:
        """The hint's rows at the end of `rows` (None without a hint), and how many
        rows come before them."""
        if hint is None:
            return None, len(rows)
        return Prefetched(hint, rows[-2], rows[-1]), len(rows) - 2

    def pool(self, pool_id: str) -> list[RawKV] | None:
        """The pool's rows if it is the hinted pool (else None: read it)."""
        return self.pool_rows if pool_id == self.hint.pool_id else None

    def session_and_pool(self, session_id: str, pool_id: str) -> list[list[RawKV]] | None:
        """The session's and the pool's rows if both are the hinted ones (else None)."""
        if session_id != self.hint.session_id or pool_id != self.hint.pool_id:
            return None
        return [self.session_rows, self.pool_rows]


class NumberHints:
    """The session and pool last stored on each number by this replica."""

    def __init__(self, limit: int = MAX_HINTS) -> None:
        self._limit = limit
        self._hints: dict[str, Hint] = {}

    def note(self, number: str, session_id: str, pool_id: str) -> None:
        self._hints.pop(number, None)
        if len(self._hints) >= self._limit:
            del self._hints[next(iter(self._hints))]
        self._hints[number] = Hint(session_id, pool_id)

    def get(self, number: str) -> Hint | None:
        return self._hints.get(number)

    def drop(self, number: str) -> None:
        self._hints.pop(number, None)

    def __len__(self) -> int:
        return len(self._hints)
