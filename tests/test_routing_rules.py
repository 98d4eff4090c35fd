"""The pure rules of routing's queue: business value rules read from the operator's
configuration (any text either loads or is refused with a message, never a crash),
priority that rises past the SLA, the order of a queue and the wait estimate."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from accessline.common.v1 import common_pb2
from accessline.routing.storage.v1 import storage_pb2 as rt_store
from accessline_server.routing.queue import Rules, estimate, order, parse_value_rules, priority
from accessline_server.routing.settings import RoutingSettings
from accessline_server.runtime.clock import timestamp
from accessline_server.runtime.settings import SettingsError, load_settings

QI = rt_store.QueuedInteraction
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=12,
)


@given(st.text(max_size=200) | json_values.map(json.dumps))
def test_any_configured_text_loads_or_is_refused_with_a_value_error(text: str) -> None:
    try:
        rules = parse_value_rules(text)
    except ValueError as exc:
        assert str(exc)
    else:
        assert all(0 < r.sla_seconds <= 86_400 and 0 <= r.value <= 1_000_000 for r in rules)


def test_the_first_matching_rule_sets_value_and_sla() -> None:
    rules = Rules(
        value_rules=parse_value_rules(
            json.dumps(
                [
                    {"segment": "gold", "subject": "mortgage", "value": 50, "sla_seconds": 20},
                    {"segment": "gold", "value": 30, "sla_seconds": 30},
                    {"kind": "CALLBACK", "channel": "MOBILE_VOICE", "value": 5, "sla_seconds": 600},
                ]
            )
        ),
        default_value=10,
        default_sla=60,
    )
    call, callback = rt_store.INTERACTION_KIND_CALL, rt_store.INTERACTION_KIND_CALLBACK
    desk, mobile = common_pb2.CHANNEL_DESK_VOICE, common_pb2.CHANNEL_MOBILE_VOICE
    assert rules.value_of(desk, "gold", "mortgage", call) == (50, 20)
    assert rules.value_of(desk, "gold", "loans", call) == (30, 30)
    assert rules.value_of(mobile, "", "", callback) == (5, 600)
    assert rules.value_of(desk, "", "", callback) == (10, 60)


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("{", "not JSON"),
        ('{"value": 1}', "JSON list"),
        ('[{"value": 1}]', "sla_seconds"),
        ('[{"value": -1, "sla_seconds": 5}]', "value"),
        ('[{"value": 1, "sla_seconds": 5, "colour": "red"}]', "unknown fields"),
        ('[{"value": 1, "sla_seconds": 5, "channel": "FAX"}]', "unknown channel"),
        ('[{"value": 1, "sla_seconds": 5, "kind": "EMAIL"}]', "CALL or CALLBACK"),
    ],
)
def test_bad_rules_are_refused_saying_what_is_wrong(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_value_rules(text)


def test_bad_rules_stop_routing_at_start_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ACCESSLINE_ROUTING_VALUE_RULES", '[{"value": "high"}]')
    with pytest.raises(SettingsError, match="ACCESSLINE_ROUTING_VALUE_RULES"):
        load_settings(RoutingSettings)


def item(name: str, value: float, sla: float, created: float) -> QI:
    return QI(
        interaction_id=name,
        business_value=value,
        sla_target_seconds=sla,
        created_at=timestamp(created),
        state=rt_store.INTERACTION_STATE_QUEUED,
    )


def test_priority_rises_past_the_sla_and_overtakes_a_higher_value() -> None:
    rules = Rules(priority_per_second=2)
    plain = item("plain", 10, 5, created=1000)
    gold = item("gold", 50, 600, created=1010)
    ids: Any = lambda now: [i.interaction_id for i in order([gold, plain], rules, now)]  # noqa: E731
    assert priority(plain, rules, 1005) == 10  # within its SLA
    assert ids(1010) == ["gold", "plain"]
    # 10 + 2 * (waited - 5) passes 50 after 25 s of waiting.
    assert ids(1026) == ["plain", "gold"]
    # Equal priority: the older first.
    twin = item("twin", 10, 5, created=1001)
    assert [i.interaction_id for i in order([twin, plain], rules, 1002)] == ["plain", "twin"]


def test_the_wait_estimate_counts_rounds_of_staffed_agents() -> None:
    rules = Rules(average_handle=100)
    assert estimate(position=2, available=3, staffed=5, rules=rules) == 0
    assert estimate(position=4, available=0, staffed=2, rules=rules) == 200
    assert estimate(position=1, available=0, staffed=0, rules=rules) == 100
