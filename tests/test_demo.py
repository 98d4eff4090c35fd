"""The demo plays the whole flow against real services: every simulated customer gets a
number, every call gets a match decision and ends connected or refused, and the summary
says so."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from services.demo import Access, Addresses, play
from tests.conftest import ServiceProcess, identity, wait_serving


async def test_the_demo_plays_the_whole_flow(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    nd = service_factory("services.numberdistribution")
    pr = service_factory("services.presence")
    await wait_serving(nd)
    cm = service_factory(
        "services.callmatching",
        ACCESSLINE_NUMBERDISTRIBUTION_ADDRESS=nd.address,
        ACCESSLINE_HISTORY_DSN=f"sqlite+aiosqlite:///{tmp_path / 'h.db'}",
    )
    await wait_serving(pr)
    await wait_serving(cm)
    rt = service_factory(
        "services.routing",
        ACCESSLINE_CALLMATCHING_ADDRESS=cm.address,
        ACCESSLINE_PRESENCE_ADDRESS=pr.address,
        ACCESSLINE_ROUTING_OFFER_TIMEOUT_SECONDS="2",
    )
    await wait_serving(rt)
    output = io.StringIO()
    tally = await play(
        Addresses(nd.address, cm.address, rt.address, pr.address),
        calls=20,
        agents=4,
        concurrency=4,
        live=False,
        wrong_code_share=0.3,
        access=Access(identity().files),
        console=Console(file=output, width=120),
    )
    assert tally.handoffs == 20
    assert tally.calls_started == 20
    assert tally.connected + tally.failed == 20
    assert sum(tally.outcomes.values()) == 20
    assert set(tally.outcomes) <= {"MATCH_OUTCOME_MATCHED", "MATCH_OUTCOME_CODE_MISMATCH"}
    assert tally.outcomes["MATCH_OUTCOME_MATCHED"] > 0
    assert tally.connected > 0
    assert tally.in_progress == 0
    assert tally.waiting == 0
    assert 0 <= tally.queued_calls <= 20
    assert "waiting in the queue now" in output.getvalue()
    assert f"summary: 20 handoffs, {tally.connected} calls connected" in output.getvalue()
