"""Partial updates with versions for every resource a client changes (AIP-134/154):
UpdateAgent and UpdateApplication change the fields their mask names and keep the
others, apply only to the version read when an etag is given, and name a bad path or a
bad value; two writers racing on one version, one wins. Against real services."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.callmatching.v1 import call_matching_pb2_grpc as cm_grpc
from accessline.common.v1 import common_pb2 as C
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.presence.v1 import presence_pb2_grpc as pr_grpc
from tests.conftest import ServiceProcess, connect, error_details, violated_fields
from tests.support.stack import call_path_services


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_an_agent_is_changed_field_by_field_at_the_version_read(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    services = await call_path_services(service_factory, tmp_path)
    stub: Any = pr_grpc.PresenceServiceStub(connect(services.pr.address))
    agent_id = f"agent-{uuid.uuid4().hex[:6]}"
    registered = (
        await stub.RegisterAgent(
            pr_pb2.RegisterAgentRequest(
                agent=pr_pb2.Agent(
                    agent_id=agent_id,
                    display_name="Camille",
                    skills=[pr_pb2.Skill(name="mortgage", level=5)],
                    languages=["fr-FR"],
                    resource_groups=["g1"],
                    channels=[pr_pb2.ChannelConfig(channel=C.CHANNEL_DESK_VOICE, address="4021")],
                )
            )
        )
    ).agent
    assert registered.etag
    read = (await stub.GetAgent(pr_pb2.GetAgentRequest(agent_id=agent_id))).agent
    assert read.etag == registered.etag

    # Only the skills change; the rest is kept (the request's other fields are ignored).
    change = pr_pb2.Agent(
        agent_id=agent_id,
        etag=read.etag,
        display_name="ignored",
        skills=[pr_pb2.Skill(name="mortgage", level=9), pr_pb2.Skill(name="loans", level=3)],
    )
    updated = (
        await stub.UpdateAgent(pr_pb2.UpdateAgentRequest(agent=change, update_mask=mask("skills")))
    ).agent
    assert [(s.name, s.level) for s in updated.skills] == [("mortgage", 9), ("loans", 3)]
    assert (updated.display_name, list(updated.languages)) == ("Camille", ["fr-FR"])
    assert updated.channels[0].address == "4021"
    assert updated.etag != read.etag

    # The version read before is gone: the same change is refused, nothing written.
    stale = pr_pb2.Agent(agent_id=agent_id, etag=read.etag, display_name="Camille D.")
    again = await refused(
        stub.UpdateAgent(pr_pb2.UpdateAgentRequest(agent=stale, update_mask=mask("display_name")))
    )
    assert again.code() == grpc.StatusCode.ABORTED
    assert error_details(again)["ErrorInfo"].reason == "ETAG_MISMATCH"
    current = (await stub.GetAgent(pr_pb2.GetAgentRequest(agent_id=agent_id))).agent
    assert current.display_name == "Camille"

    # Bad paths and bad values are named; an unknown agent is NOT_FOUND.
    bad = await refused(
        stub.UpdateAgent(
            pr_pb2.UpdateAgentRequest(
                agent=pr_pb2.Agent(agent_id=agent_id, skills=[pr_pb2.Skill(name="x", level=42)]),
                update_mask=mask("agent_id", "colour", "skills"),
            )
        )
    )
    assert violated_fields(bad) == {
        "update_mask.paths[0]",
        "update_mask.paths[1]",
        "agent.skills[0].level",
    }
    # Emptying what an agent needs (its channels) is refused as a whole.
    empty = await refused(
        stub.UpdateAgent(
            pr_pb2.UpdateAgentRequest(
                agent=pr_pb2.Agent(agent_id=agent_id), update_mask=mask("channels")
            )
        )
    )
    assert violated_fields(empty) == {"agent.channels"}
    missing = await refused(
        stub.UpdateAgent(
            pr_pb2.UpdateAgentRequest(
                agent=pr_pb2.Agent(agent_id="agent-nobody"), update_mask=mask("display_name")
            )
        )
    )
    assert missing.code() == grpc.StatusCode.NOT_FOUND


async def test_an_application_is_changed_by_one_of_two_racing_writers(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    services = await call_path_services(service_factory, tmp_path)
    stub: Any = cm_grpc.CallMatchingServiceStub(connect(services.cm.address))
    app_id = f"app-{uuid.uuid4().hex[:6]}"
    registered = (
        await stub.RegisterApplication(
            cm_pb2.RegisterApplicationRequest(
                application=cm_pb2.Application(
                    application_id=app_id,
                    display_name="Bank",
                    match_schema=C.MATCH_SCHEMA_NUMBER,
                    required_context_keys=["policy"],
                )
            )
        )
    ).application
    listed = await stub.ListApplications(cm_pb2.ListApplicationsRequest())
    assert registered.etag in {a.etag for a in listed.applications}

    def change(**fields: Any) -> cm_pb2.UpdateApplicationRequest:
        paths = list(fields)
        return cm_pb2.UpdateApplicationRequest(
            application=cm_pb2.Application(application_id=app_id, etag=registered.etag, **fields),
            update_mask=mask(*paths),
        )

    # Two operators change the version they read at once: one wins, one is told.
    answers = await asyncio.gather(
        stub.UpdateApplication(change(skip_ivr_on_match=True)),
        stub.UpdateApplication(change(default_session_ttl=duration_pb2.Duration(seconds=60))),
        return_exceptions=True,
    )
    won = [a for a in answers if not isinstance(a, BaseException)]
    lost = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
    assert (len(won), len(lost)) == (1, 1)
    assert lost[0].code() == grpc.StatusCode.ABORTED
    stored = (
        await stub.GetApplication(cm_pb2.GetApplicationRequest(application_id=app_id))
    ).application
    assert stored.etag == won[0].application.etag
    assert list(stored.required_context_keys) == ["policy"]  # kept
    assert stored.display_name == "Bank"
    # Without an etag and with no mask, the whole application is replaced.
    whole = await stub.UpdateApplication(
        cm_pb2.UpdateApplicationRequest(
            application=cm_pb2.Application(
                application_id=app_id, display_name="Bank 2", match_schema=C.MATCH_SCHEMA_NUMBER
            )
        )
    )
    assert (whole.application.display_name, list(whole.application.required_context_keys)) == (
        "Bank 2",
        [],
    )
    assert whole.application.max_code_attempts == 3  # the default filled in
