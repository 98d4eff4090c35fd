"""What a CallMatching replica keeps in memory never decides against etcd.

The applications it read: a StartHandoff follows its application as it is when the
session is stored, on every replica (the session's transaction holds only while the
application is still the version used). An application changed through another replica
is obeyed at the next handoff: a newly required context key is asked for, one no longer
required is not, a new match schema issues a code, a changed flag reaches the match.

Where its sessions wait: MatchCall reads the session this replica stored on the dialled
number in its first read, and takes it only when the number's reservation names it; a
number's next session stored through another replica is matched all the same.

Real NumberDistribution and two CallMatching processes on etcd."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from tests.conftest import violated_fields
from tests.support.callmatching import (
    CODE_POLICY,
    MARKER,
    S,
    System,
    call,
    context,
    make_pool,
    register,
    seconds,
)


@pytest.fixture
def system(callmatching_system: System) -> System:
    """The session's CallMatching system (tests/support/callmatching.py)."""
    return callmatching_system


async def changed(system: System, app_id: str, **fields: Any) -> None:
    """The application changed through the first replica, the fields named only."""
    await system.cm.UpdateApplication(
        cm_pb2.UpdateApplicationRequest(
            application=cm_pb2.Application(application_id=app_id, **fields),
            update_mask=field_mask_pb2.FieldMask(paths=list(fields)),
        )
    )


async def on_second(
    system: System, app_id: str, subject: str, **attributes: str
) -> cm_pb2.StartHandoffResponse:
    """A handoff through the second replica, with the context's attributes given."""
    return await system.cm2.StartHandoff(
        cm_pb2.StartHandoffRequest(
            application_id=app_id,
            customer_id="customer-1",
            context=context(subject, **attributes),
            device_can_dial=True,
        )
    )


async def test_a_replica_follows_an_application_changed_through_another(
    system: System,
) -> None:
    # One number: a handoff refused after its number was reserved must give it back,
    # or the next one finds none.
    subject, numbers = await make_pool(
        system, 1, access_code_policy=CODE_POLICY, quarantine=seconds(0)
    )
    app_id = await register(system, S.MATCH_SCHEMA_NUMBER, required_context_keys=["policy"])

    async def matched(started: cm_pb2.StartHandoffResponse) -> cm_pb2.MatchCallResponse:
        answer = await call(system.cm, started.access_number, dtmf=started.access_code)
        assert answer.outcome == cm_pb2.MATCH_OUTCOME_MATCHED
        return answer

    # The second replica has read the application once.
    first = await on_second(system, app_id, subject, policy="P-1", note=MARKER)
    assert (await matched(first)).skip_ivr

    # A key no longer required and a flag turned off: obeyed there at once.
    await changed(system, app_id, required_context_keys=[], skip_ivr_on_match=False)
    second = await on_second(system, app_id, subject, note=MARKER)
    assert second.access_number == numbers[0]
    assert not (await matched(second)).skip_ivr

    # A key newly required: asked for there, and the number reserved meanwhile given back.
    await changed(system, app_id, required_context_keys=["account"])
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await on_second(system, app_id, subject, note=MARKER)
    assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(missing.value) == {"context.attributes[account]"}
    third = await on_second(system, app_id, subject, account="A-9")
    assert third.access_number == numbers[0]
    await matched(third)

    # Another match schema: the next handoff there gets a code, and only it matches.
    await changed(system, app_id, required_context_keys=[], match_schema=S.MATCH_SCHEMA_NUMBER_CODE)
    fourth = await on_second(system, app_id, subject)
    assert fourth.access_code
    assert (await call(system.cm, fourth.access_number)).outcome != cm_pb2.MATCH_OUTCOME_MATCHED
    assert (await matched(fourth)).match_schema == S.MATCH_SCHEMA_NUMBER_CODE


async def test_a_refusal_on_a_replica_follows_the_application_registered_again(
    system: System,
) -> None:
    subject, numbers = await make_pool(system, 1, quarantine=seconds(0))
    app_id = await register(system, S.MATCH_SCHEMA_NUMBER)
    first = await on_second(system, app_id, subject)
    await system.cm.CancelHandoff(cm_pb2.CancelHandoffRequest(session_id=first.session_id))
    # Registered again with another schema the number's pool cannot serve (no codes):
    # refused on the second replica, which read the first version, and the number
    # is free again after.
    await system.cm.RegisterApplication(
        cm_pb2.RegisterApplicationRequest(
            application=cm_pb2.Application(
                application_id=app_id, match_schema=S.MATCH_SCHEMA_NUMBER_CODE
            )
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await on_second(system, app_id, subject)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await changed(system, app_id, match_schema=S.MATCH_SCHEMA_NUMBER)
    assert (await on_second(system, app_id, subject)).access_number == numbers[0]


async def test_a_call_matches_the_numbers_session_stored_through_another_replica(
    system: System,
) -> None:
    subject, numbers = await make_pool(system, 1, quarantine=seconds(0))
    app_id = await register(system, S.MATCH_SCHEMA_NUMBER)
    # The first replica stores a session on the number, which is then cancelled; the
    # second stores the number's next one. The first replica's guess is the old session.
    first = await system.cm.StartHandoff(
        cm_pb2.StartHandoffRequest(
            application_id=app_id, customer_id="customer-1", context=context(subject)
        )
    )
    await system.cm.CancelHandoff(cm_pb2.CancelHandoffRequest(session_id=first.session_id))
    second = await on_second(system, app_id, subject)
    assert second.access_number == first.access_number == numbers[0]
    answer = await call(system.cm, numbers[0])
    assert (answer.outcome, answer.session_id) == (
        cm_pb2.MATCH_OUTCOME_MATCHED,
        second.session_id,
    )
    # And a session stored through the replica the call reaches, matched from its guess.
    third = await system.cm.StartHandoff(
        cm_pb2.StartHandoffRequest(
            application_id=app_id, customer_id="customer-3", context=context(subject)
        )
    )
    answer = await call(system.cm, numbers[0])
    assert (answer.outcome, answer.session_id, answer.customer_id) == (
        cm_pb2.MATCH_OUTCOME_MATCHED,
        third.session_id,
        "customer-3",
    )
