"""The demo plays the whole flow against real services: every simulated customer gets a
number, every call gets a match decision and ends connected or refused, and the summary
says so."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from accessline_server.demo import Access, Addresses, play
from tests.conftest import ServiceProcess, identity
from tests.support.stack import call_path_services


async def test_the_demo_plays_the_whole_flow(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    services = await call_path_services(
        service_factory, tmp_path, ACCESSLINE_ROUTING_OFFER_TIMEOUT_SECONDS="2"
    )
    nd, cm, pr, rt = services.nd, services.cm, services.pr, services.rt
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
    # The demo ends on one connected customer's journey and their rating of the call.
    shown = tally.journey
    assert shown is not None
    assert any(r.agent_id and r.outcome == "MATCHED" for r in shown.records)
    assert f"journey of {shown.customer}" in output.getvalue()
    assert shown.rated in output.getvalue()
    assert [r.count for r in shown.ratings] == [1]
