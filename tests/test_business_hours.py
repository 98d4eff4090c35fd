"""Business hours and what the app may offer now: the calendar across a daylight-saving
change and a holiday (pure), then against the five services: hours set and read, the
contact options of an open and of a closed group, a callback never scheduled outside the
hours, a snooze that would end in closed hours."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import pytest

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.routing.v1 import hours_pb2 as hr
from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline.routing.v1 import routing_pb2_grpc
from accessline_server.routing.hours import Calendar, check_hours
from accessline_server.runtime.validation import Violations
from tests.conftest import connect, error_details, identity, violated_fields
from tests.support.stack import Stack, agent, new_group, window

PARIS = ZoneInfo("Europe/Paris")
UTC = dt.UTC


def weekdays(opens: str, closes: str, *days: int) -> list[hr.WeeklyHours]:
    return [
        hr.WeeklyHours(day_of_week=d, hours=hr.TimeRange(opens=opens, closes=closes))
        for d in days or range(1, 8)
    ]


def at(zone: ZoneInfo | dt.timezone, *fields: int) -> float:
    return dt.datetime(*fields, tzinfo=zone).timestamp()  # type: ignore[misc]


def test_hours_follow_local_time_across_a_daylight_saving_change() -> None:
    # Paris moves from UTC+1 to UTC+2 on Sunday 29 March 2026.
    paris = Calendar(hr.BusinessHours(time_zone="Europe/Paris", weekly=weekdays("09:00", "18:00")))
    # 16:30 UTC is 17:30 in Paris before the change (open), 18:30 after (closed).
    assert paris.state(at(UTC, 2026, 3, 27, 16, 30))[0]
    open_now, opens, _ = paris.state(at(UTC, 2026, 3, 30, 16, 30))
    assert not open_now
    assert opens == at(PARIS, 2026, 3, 31, 9, 0) == at(UTC, 2026, 3, 31, 7, 0)
    # The day of the change itself opens at 09:00 local, an hour earlier in UTC.
    assert paris.state(at(UTC, 2026, 3, 28, 23, 0))[1] == at(UTC, 2026, 3, 29, 7, 0)
    assert paris.state(at(UTC, 2026, 3, 27, 23, 0))[1] == at(UTC, 2026, 3, 28, 8, 0)


def test_a_holiday_closes_its_date_and_the_next_opening_follows() -> None:
    calendar = Calendar(
        hr.BusinessHours(
            time_zone="Europe/Paris",
            weekly=weekdays("08:00", "20:00", 1, 2, 3, 4, 5),
            exceptions=[
                hr.HoursException(date="2026-12-25"),  # Christmas, a Friday: closed
                hr.HoursException(  # Christmas Eve: closes early
                    date="2026-12-24", hours=[hr.TimeRange(opens="08:00", closes="12:00")]
                ),
            ],
        )
    )
    assert calendar.state(at(PARIS, 2026, 12, 24, 11, 0))[2] == at(PARIS, 2026, 12, 24, 12, 0)
    open_now, opens, _ = calendar.state(at(PARIS, 2026, 12, 24, 15, 0))
    assert not open_now
    # Not the holiday, not the weekend: Monday the 28th.
    assert opens == at(PARIS, 2026, 12, 28, 8, 0)


def test_a_window_is_narrowed_to_its_first_opening_and_days_open_to_midnight_join() -> None:
    calendar = Calendar(
        hr.BusinessHours(
            time_zone="UTC",
            weekly=[
                *weekdays("18:00", "24:00", 1),
                *weekdays("00:00", "02:00", 2),
                *weekdays("09:00", "10:00", 2),
            ],
        )
    )
    monday = at(UTC, 2026, 12, 7, 12, 0)
    # 18:00 Monday to 02:00 Tuesday is one opening, across midnight.
    assert calendar.first_open(monday, monday + 86400) == (
        at(UTC, 2026, 12, 7, 18, 0),
        at(UTC, 2026, 12, 8, 2, 0),
    )
    # A window ending before the opening has none.
    assert calendar.first_open(monday, at(UTC, 2026, 12, 7, 17, 0)) is None
    # A window starting inside an opening keeps its start.
    late = at(UTC, 2026, 12, 8, 9, 30)
    assert calendar.first_open(late, late + 86400) == (late, at(UTC, 2026, 12, 8, 10, 0))


def test_bad_hours_name_each_field() -> None:
    v = Violations()
    check_hours(
        v,
        "hours",
        hr.BusinessHours(
            time_zone="Mars/Olympus",
            weekly=[
                hr.WeeklyHours(day_of_week=8, hours=hr.TimeRange(opens="10:00", closes="09:00"))
            ],
            exceptions=[hr.HoursException(date="2026-02-30")],
        ),
    )
    assert {f.field for f in v.items} == {
        "hours.time_zone",
        "hours.weekly[0].day_of_week",
        "hours.weekly[0].hours.closes",
        "hours.exceptions[0].date",
    }


def closed_around_today() -> tuple[hr.BusinessHours, float]:
    """Hours open every day, all day, but closed yesterday, today and tomorrow (UTC): the
    group is closed whenever the test runs, and opens the day after tomorrow."""
    today = dt.datetime.now(UTC).date()
    closed = [
        hr.HoursException(date=(today + dt.timedelta(days=n)).isoformat()) for n in (-1, 0, 1)
    ]
    opens = dt.datetime.combine(today + dt.timedelta(days=2), dt.time(), UTC).timestamp()
    return hr.BusinessHours(
        time_zone="UTC", weekly=weekdays("00:00", "24:00"), exceptions=closed
    ), opens


async def test_contact_options_follow_the_hours_and_the_agents(stack: Stack) -> None:
    group = new_group()
    _, app = await agent(stack, group)
    customer = f"cust-{uuid.uuid4().hex[:6]}"
    # The customer's own app may ask for themselves.
    own = rt_pb2_stub(stack, identity().token(customer, "customer", applications=["bank"]))
    ask = rt_pb2.GetContactOptionsRequest(
        application_id="bank", customer_id=customer, resource_group=group
    )
    answer = await own.GetContactOptions(ask)
    assert answer.open_now
    offered = {o.channel: (o.offered, o.reason) for o in answer.options}
    assert offered == {
        hr.CONTACT_CHANNEL_VOICE_NOW: (True, ""),
        hr.CONTACT_CHANNEL_CALLBACK: (True, ""),
        hr.CONTACT_CHANNEL_NOTIFY_WHEN_AVAILABLE: (True, ""),
        hr.CONTACT_CHANNEL_CHAT: (False, "NO_AGENTS"),
    }
    hours, opens = closed_around_today()
    await stack.routers[0].SetBusinessHours(
        rt_pb2.SetBusinessHoursRequest(resource_group=group, hours=hours)
    )
    read = await stack.routers[1].GetBusinessHours(
        rt_pb2.GetBusinessHoursRequest(resource_group=group)
    )
    assert read.hours == hours
    assert (read.open_now, read.opens_at.seconds) == (False, opens)
    closed = await own.GetContactOptions(ask)
    assert (closed.open_now, closed.opens_at.seconds) == (False, opens)
    by_channel = {o.channel: o for o in closed.options}
    assert by_channel[hr.CONTACT_CHANNEL_VOICE_NOW].reason == "CLOSED"
    assert by_channel[hr.CONTACT_CHANNEL_NOTIFY_WHEN_AVAILABLE].reason == "CLOSED"
    callback = by_channel[hr.CONTACT_CHANNEL_CALLBACK]
    assert (callback.offered, callback.earliest.seconds) == (True, opens)
    # Another customer's options are not this customer's to ask.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await own.GetContactOptions(
            rt_pb2.GetContactOptionsRequest(
                application_id="bank", customer_id="someone-else", resource_group=group
            )
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    app.call.cancel()


async def test_a_callback_is_never_scheduled_outside_the_hours(stack: Stack) -> None:
    group = new_group()
    hours, opens = closed_around_today()
    await stack.routers[0].SetBusinessHours(
        rt_pb2.SetBusinessHoursRequest(resource_group=group, hours=hours)
    )
    request = rt_pb2.RequestCallbackRequest(
        application_id="bank",
        customer_id=f"cust-{uuid.uuid4().hex[:6]}",
        phone_number="+33612345682",
        latest=window(3600),
        resource_group=group,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.routers[0].RequestCallback(request)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(caught.value)["ErrorInfo"].reason == "OUTSIDE_BUSINESS_HOURS"
    # A window reaching into the next opening starts there.
    request.latest.FromSeconds(int(opens) + 3600)
    later = await stack.routers[0].RequestCallback(request)
    assert later.callback.earliest.seconds == opens
    await stack.routers[0].CancelCallback(
        rt_pb2.CancelCallbackRequest(callback_id=later.callback.callback_id)
    )
    # Removing the hours opens the group again.
    await stack.routers[0].SetBusinessHours(rt_pb2.SetBusinessHoursRequest(resource_group=group))
    assert (
        await stack.routers[0].GetBusinessHours(
            rt_pb2.GetBusinessHoursRequest(resource_group=group)
        )
    ).open_now


async def test_bad_hours_are_refused_with_their_fields(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.routers[0].SetBusinessHours(
            rt_pb2.SetBusinessHoursRequest(
                resource_group=new_group(),
                hours=hr.BusinessHours(time_zone="Nowhere/Here", weekly=weekdays("9", "18:00")),
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {"hours.time_zone", "hours.weekly[0].hours.opens"} <= violated_fields(caught.value)


def rt_pb2_stub(stack: Stack, token: str) -> Any:
    """Routing (its first replica) called with `token`."""
    return routing_pb2_grpc.RoutingServiceStub(connect(stack.processes[4].address, token))


async def test_a_snooze_ending_in_closed_hours_waits_for_the_opening(stack: Stack) -> None:
    group = new_group()
    hours, _ = closed_around_today()
    await stack.routers[0].SetBusinessHours(
        rt_pb2.SetBusinessHoursRequest(resource_group=group, hours=hours)
    )
    asked = await stack.routers[0].RequestNotifyWhenAvailable(
        rt_pb2.RequestNotifyWhenAvailableRequest(
            customer_id=f"cust-{uuid.uuid4().hex[:6]}",
            resource_group=group,
            handoff=cm_pb2.StartHandoffRequest(application_id="bank"),
        )
    )
    snooze = rt_pb2.SnoozeNotifyWhenAvailableRequest(request_id=asked.request_id)
    snooze.snooze.FromSeconds(60)
    # The group opens again only after the request's expiry (4 hours): refused.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.routers[1].SnoozeNotifyWhenAvailable(snooze)
    assert error_details(caught.value)["ErrorInfo"].reason == "SNOOZE_PAST_EXPIRY"
    # Open all day, every day: the snooze ends when asked.
    await stack.routers[0].SetBusinessHours(
        rt_pb2.SetBusinessHoursRequest(
            resource_group=group,
            hours=hr.BusinessHours(time_zone="UTC", weekly=weekdays("00:00", "24:00")),
        )
    )
    snoozed = await stack.routers[1].SnoozeNotifyWhenAvailable(snooze)
    assert snoozed.active_again_at.seconds == pytest.approx(time.time() + 60, abs=30)
    await stack.routers[0].CancelNotifyWhenAvailable(
        rt_pb2.CancelNotifyWhenAvailableRequest(request_id=asked.request_id)
    )
