"""Business hours of a resource group: a weekly calendar in the group's time zone with
exceptions for dates, kept in etcd (`rt/hours/{group}`) and set by operators. The
calendar answers whether the group is open at a moment, when it opens or closes next,
and where a callback or a snooze may fall: never outside the hours. Local times are
turned into instants by the time zone's rules (zoneinfo), so a daylight-saving change
moves the instants, not the local hours."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from accessline.routing.v1 import hours_pb2
from accessline_server.routing import keys
from accessline_server.runtime.errors import FailedPrecondition
from accessline_server.runtime.store import Store
from accessline_server.runtime.validation import Violations

MAX_WEEKLY = 28
MAX_EXCEPTIONS = 400
MAX_RANGES = 4
# How far ahead a next opening is looked for (a group closed longer is "not opening").
HORIZON_DAYS = 32
HHMM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$|^24:00$")
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

Interval = tuple[float, float]


def _minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


def _check_range(v: Violations, field: str, r: hours_pb2.TimeRange) -> None:
    if not HHMM.match(r.opens) or r.opens == "24:00":
        v.add(f"{field}.opens", 'must be "HH:MM", 00:00 to 23:59')
    elif not HHMM.match(r.closes):
        v.add(f"{field}.closes", 'must be "HH:MM", up to 24:00')
    elif _minutes(r.closes) <= _minutes(r.opens):
        v.add(f"{field}.closes", "must be after opens")


def check_hours(v: Violations, field: str, hours: hours_pb2.BusinessHours) -> None:
    """A violation for each limit `hours` breaks."""
    try:
        if len(hours.time_zone) > 64 or not hours.time_zone:
            raise ValueError(hours.time_zone)
        ZoneInfo(hours.time_zone)
    except (ValueError, ZoneInfoNotFoundError):
        v.add(f"{field}.time_zone", 'must be an IANA time zone, for example "Europe/Paris"')
    if len(hours.weekly) > MAX_WEEKLY:
        v.add(f"{field}.weekly", f"must have at most {MAX_WEEKLY} entries")
    for i, weekly in enumerate(hours.weekly[:MAX_WEEKLY]):
        if not 1 <= weekly.day_of_week <= 7:
            v.add(f"{field}.weekly[{i}].day_of_week", "must be 1 (Monday) to 7 (Sunday)")
        _check_range(v, f"{field}.weekly[{i}].hours", weekly.hours)
    if len(hours.exceptions) > MAX_EXCEPTIONS:
        v.add(f"{field}.exceptions", f"must have at most {MAX_EXCEPTIONS} entries")
    for i, exception in enumerate(hours.exceptions[:MAX_EXCEPTIONS]):
        at = f"{field}.exceptions[{i}]"
        try:
            if not DATE.match(exception.date):
                raise ValueError(exception.date)
            dt.date.fromisoformat(exception.date)
        except ValueError:
            v.add(f"{at}.date", 'must be a date "YYYY-MM-DD"')
        if len(exception.hours) > MAX_RANGES:
            v.add(f"{at}.hours", f"must have at most {MAX_RANGES} entries")
        for j, r in enumerate(exception.hours[:MAX_RANGES]):
            _check_range(v, f"{at}.hours[{j}]", r)


class Calendar:
    """The opening intervals of valid business hours, as instants (seconds)."""

    def __init__(self, hours: hours_pb2.BusinessHours) -> None:
        self._zone = ZoneInfo(hours.time_zone)
        self._weekly: dict[int, list[hours_pb2.TimeRange]] = {}
        for weekly in hours.weekly:
            self._weekly.setdefault(weekly.day_of_week, []).append(weekly.hours)
        self._exceptions = {e.date: list(e.hours) for e in hours.exceptions}

    def _instant(self, day: dt.date, minutes: int) -> float:
        local = dt.datetime.combine(day, dt.time()) + dt.timedelta(minutes=minutes)
        return local.replace(tzinfo=self._zone).timestamp()

    def _day(self, day: dt.date) -> Iterator[Interval]:
        ranges = self._exceptions.get(day.isoformat())
        if ranges is None:
            ranges = self._weekly.get(day.isoweekday(), [])
        for r in ranges:
            yield self._instant(day, _minutes(r.opens)), self._instant(day, _minutes(r.closes))

    def intervals(self, start: float, days: int = HORIZON_DAYS) -> list[Interval]:
        """Opening intervals from the local day before `start` for `days` days, merged
        where they touch (a day open to 24:00 and the next from 00:00)."""
        first = dt.datetime.fromtimestamp(start, self._zone).date() - dt.timedelta(days=1)
        found = sorted(i for n in range(days + 1) for i in self._day(first + dt.timedelta(n)))
        merged: list[Interval] = []
        for opens, closes in found:
            if merged and opens <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], closes))
            else:
                merged.append((opens, closes))
        return [i for i in merged if i[1] > start]

    def state(self, now: float) -> tuple[bool, float | None, float | None]:
        """(open now, next opening when closed, next closing when open); None: not within
        the horizon."""
        for opens, closes in self.intervals(now):
            if opens <= now < closes:
                return True, None, closes
            if opens > now:
                return False, opens, None
        return False, None, None

    def first_open(self, earliest: float, latest: float) -> Interval | None:
        """The first open part of [earliest, latest), or None when it has none."""
        for opens, closes in self.intervals(earliest):
            start, end = max(opens, earliest), min(closes, latest)
            if start >= latest:
                return None
            if start < end:
                return start, end
        return None


async def get(store: Store, group: str) -> hours_pb2.BusinessHours | None:
    entry = await store.get(keys.hours(group), hours_pb2.BusinessHours)
    return entry.value if entry is not None else None


async def calendar(store: Store, group: str) -> Calendar | None:
    """The group's calendar; None when it has no hours (always open)."""
    hours = await get(store, group)
    return Calendar(hours) if hours is not None else None


async def put(store: Store, group: str, hours: hours_pb2.BusinessHours | None) -> None:
    if hours is None:
        await store.delete(keys.hours(group))
    else:
        await store.put(keys.hours(group), hours)


async def callback_window(
    store: Store, group: str, earliest: float, latest: float
) -> tuple[float, float]:
    """A callback's window narrowed to the group's first opening within it: an agent
    never calls outside the group's business hours."""
    found = await calendar(store, group)
    if found is None:
        return earliest, latest
    window = found.first_open(earliest, latest)
    if window is None:
        raise FailedPrecondition(
            f"group {group} is closed for the whole window asked",
            reason="OUTSIDE_BUSINESS_HOURS",
        )
    return window
