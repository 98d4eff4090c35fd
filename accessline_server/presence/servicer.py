"""gRPC methods of PresenceService: validate the request, call the domain, map the
answer. Domain errors become statuses in the runtime's error interceptor."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from accessline.common.v1 import common_pb2
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.presence.v1 import presence_pb2_grpc as pr_grpc
from accessline_server.presence.directory import Directory
from accessline_server.presence.sessions import Sessions, check_login, check_message
from accessline_server.runtime.masks import check_given, check_mask, updatable
from accessline_server.runtime.server import ServicerContext
from accessline_server.runtime.validation import Violations


def _check_agent(agent: pr_pb2.Agent, v: Violations) -> None:
    v.id("agent.agent_id", agent.agent_id)
    v.text("agent.display_name", agent.display_name, 128)
    v.text("agent.etag", agent.etag, 64)
    if len(agent.skills) > 32:
        v.add("agent.skills", "must have at most 32 entries")
    for i, skill in enumerate(agent.skills):
        v.text(f"agent.skills[{i}].name", skill.name, 64, required=True)
        if not 1 <= skill.level <= 10:
            v.add(f"agent.skills[{i}].level", "must be 1 to 10")
    v.items_list("agent.languages", agent.languages, 16, 35)
    v.text("agent.site.name", agent.site.name, 128)
    v.region("agent.site.country_code", agent.site.country_code)
    if agent.site.HasField("location"):
        v.latitude_longitude(
            "agent.site.location", agent.site.location.latitude, agent.site.location.longitude
        )
    if len(agent.resource_groups) > 16:
        v.add("agent.resource_groups", "must have at most 16 entries")
    for i, group in enumerate(agent.resource_groups):
        v.id(f"agent.resource_groups[{i}]", group)
    if not agent.channels:
        v.add("agent.channels", "must configure at least one channel")
    if len(agent.channels) > 8:
        v.add("agent.channels", "must have at most 8 entries")
    seen: set[int] = set()
    for i, config in enumerate(agent.channels):
        if config.channel not in common_pb2.Channel.values() or not config.channel:
            v.add(f"agent.channels[{i}].channel", "must be one of the CHANNEL_ values")
        elif config.channel in seen:
            v.add(f"agent.channels[{i}].channel", "is configured twice")
        seen.add(config.channel)
        v.text(f"agent.channels[{i}].address", config.address, 256, required=True)
        if not 0 <= config.capacity <= 100:
            v.add(f"agent.channels[{i}].capacity", "must be 0 (one) to 100")


AGENT_UPDATABLE = updatable(pr_pb2.Agent.DESCRIPTOR, ("agent_id", "etag"))


class PresenceServicer(pr_grpc.PresenceServiceServicer):
    """The PresenceService contract on top of the domain."""

    def __init__(self, directory: Directory, sessions: Sessions, stopping: asyncio.Event) -> None:
        self._directory = directory
        self._sessions = sessions
        self._stopping = stopping

    async def RegisterAgent(
        self, request: pr_pb2.RegisterAgentRequest, context: ServicerContext
    ) -> pr_pb2.RegisterAgentResponse:
        v = Violations()
        _check_agent(request.agent, v)
        v.raise_if_any()
        return pr_pb2.RegisterAgentResponse(agent=await self._directory.register(request.agent))

    async def UpdateAgent(
        self, request: pr_pb2.UpdateAgentRequest, context: ServicerContext
    ) -> pr_pb2.UpdateAgentResponse:
        v = Violations()
        paths = list(request.update_mask.paths)
        check_mask(paths, pr_pb2.Agent.DESCRIPTOR, AGENT_UPDATABLE, v)
        check_given(_check_agent, request.agent, paths, "agent", v, ("agent_id", "etag"))
        v.raise_if_any()
        updated = await self._directory.update(request.agent, paths, _check_agent)
        return pr_pb2.UpdateAgentResponse(agent=updated)

    async def GetAgent(
        self, request: pr_pb2.GetAgentRequest, context: ServicerContext
    ) -> pr_pb2.GetAgentResponse:
        v = Violations()
        v.id("agent_id", request.agent_id)
        v.raise_if_any()
        return pr_pb2.GetAgentResponse(agent=await self._directory.get(request.agent_id))

    async def ListAgents(
        self, request: pr_pb2.ListAgentsRequest, context: ServicerContext
    ) -> pr_pb2.ListAgentsResponse:
        v = Violations()
        v.id("resource_group", request.resource_group, required=False)
        size = v.page("page_size", request.page_size, 500, 100)
        v.id("page_token", request.page_token, required=False)
        v.raise_if_any()
        agents, token = await self._directory.list_agents(
            request.resource_group, size, request.page_token
        )
        return pr_pb2.ListAgentsResponse(agents=agents, next_page_token=token)

    async def UnregisterAgent(
        self, request: pr_pb2.UnregisterAgentRequest, context: ServicerContext
    ) -> pr_pb2.UnregisterAgentResponse:
        v = Violations()
        v.id("agent_id", request.agent_id)
        v.raise_if_any()
        await self._directory.unregister(request.agent_id)
        return pr_pb2.UnregisterAgentResponse()

    async def Connect(
        self, request_iterator: AsyncIterator[pr_pb2.ConnectRequest], context: ServicerContext
    ) -> AsyncIterator[pr_pb2.ConnectResponse]:
        async for message in self._sessions.connect(request_iterator, self._stopping):
            yield message

    async def OpenSession(
        self, request: pr_pb2.OpenSessionRequest, context: ServicerContext
    ) -> AsyncIterator[pr_pb2.OpenSessionResponse]:
        v = Violations()
        check_login(request.login, v)
        v.raise_if_any()
        async for message in self._sessions.open_session(request.login, self._stopping):
            yield pr_pb2.OpenSessionResponse(message=message)

    async def SendSessionMessage(
        self, request: pr_pb2.SendSessionMessageRequest, context: ServicerContext
    ) -> pr_pb2.SendSessionMessageResponse:
        v = Violations()
        v.id("agent_session_id", request.agent_session_id)
        kind = request.message.WhichOneof("message")
        if kind is None or kind == "login":
            v.add("message", "must be one of the ConnectRequest messages after the login")
        check_message(request.message, v, "message")
        v.raise_if_any()
        await self._sessions.send(request.agent_session_id, request.message)
        return pr_pb2.SendSessionMessageResponse()

    async def WatchPresence(
        self, request: pr_pb2.WatchPresenceRequest, context: ServicerContext
    ) -> AsyncIterator[pr_pb2.WatchPresenceResponse]:
        v = Violations()
        if len(request.agent_ids) > 1000:
            v.add("agent_ids", "must have at most 1,000 entries")
        for i, agent_id in enumerate(request.agent_ids[:1000]):
            v.id(f"agent_ids[{i}]", agent_id)
        if len(request.resource_groups) > 100:
            v.add("resource_groups", "must have at most 100 entries")
        for i, group in enumerate(request.resource_groups[:100]):
            v.id(f"resource_groups[{i}]", group)
        if len(request.channels) > len(common_pb2.Channel.values()):
            v.add("channels", "must name each channel at most once")
        for i, channel in enumerate(request.channels[:16]):
            if channel not in common_pb2.Channel.values() or not channel:
                v.add(f"channels[{i}]", "must be one of the CHANNEL_ values")
        v.text("resume_token", request.resume_token, 32)
        v.raise_if_any()
        async for message in self._directory.watch(request, self._stopping):
            yield message

    async def GetPresence(
        self, request: pr_pb2.GetPresenceRequest, context: ServicerContext
    ) -> pr_pb2.GetPresenceResponse:
        v = Violations()
        if not request.agent_ids:
            v.add("agent_ids", "must name at least one agent")
        if len(request.agent_ids) > 1000:
            v.add("agent_ids", "must have at most 1,000 entries")
        for i, agent_id in enumerate(request.agent_ids[:1000]):
            v.id(f"agent_ids[{i}]", agent_id)
        v.raise_if_any()
        found, missing = await self._directory.presence(request.agent_ids)
        return pr_pb2.GetPresenceResponse(agents=found, missing_agent_ids=missing)

    async def GetGroupAvailability(
        self, request: pr_pb2.GetGroupAvailabilityRequest, context: ServicerContext
    ) -> pr_pb2.GetGroupAvailabilityResponse:
        v = Violations()
        if len(request.resource_groups) > 100:
            v.add("resource_groups", "must have at most 100 entries")
        for i, group in enumerate(request.resource_groups[:100]):
            v.id(f"resource_groups[{i}]", group)
        v.raise_if_any()
        return pr_pb2.GetGroupAvailabilityResponse(
            groups=await self._directory.group_availability(list(request.resource_groups))
        )
