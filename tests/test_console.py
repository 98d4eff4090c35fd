"""The agent console in a real browser (Debian's Chromium, headless, driven by
Playwright) against the real services: sign in with a token, set presence per channel
with a reason, receive the offer of a matched call with its context and map, accept it on
another channel, see the whole context, lose the network and come back to the same
session, wrap up. Screenshots go to build/test-artifacts/console/."""

from __future__ import annotations

import asyncio
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright import async_api as playwright_api

from accessline.journey.v1 import journey_pb2 as jn
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from tests.conftest import ROOT, free_port, identity, spawn_service, wait_serving
from tests.support.journey import journey
from tests.support.proxy import Proxy
from tests.support.stack import (
    C,
    Call,
    Stack,
    handoff,
    in_app,
    new_group,
    pool_subject,
    setup_numbers,
    start_stack,
    stop_stack,
)

CHROMIUM = Path("/usr/bin/chromium")
INSTALLED = CHROMIUM.exists()
ARTIFACTS = ROOT / "build" / "test-artifacts" / "console"
# Long enough for a loaded machine; the wait ends as soon as the page shows it.
SHOWN = 30_000


FORMS = "https://forms.example.test"


@pytest.fixture(scope="module")
async def network() -> AsyncIterator[Proxy]:
    """The agent's network to Presence's web port (the test can cut it)."""
    proxy = Proxy("")
    await proxy.start()
    yield proxy
    await proxy.close()


@pytest.fixture(scope="module")
async def stack(
    etcd: EmbeddedEtcd, tmp_path_factory: pytest.TempPathFactory, network: Proxy
) -> AsyncIterator[Stack]:
    notification_port = free_port()
    started = await start_stack(
        etcd,
        f"/console-{uuid.uuid4().hex[:8]}",
        tmp_path_factory.mktemp("console"),
        # The console (on the proxy's origin) calls Notification's web port to send links.
        web={"ACCESSLINE_WEB_CORS_ORIGINS": f"https://{network.address}"},
        web_ports={"notification": notification_port},
        presence_env={
            "ACCESSLINE_PRESENCE_CONSOLE_NOTIFICATION_URL": f"https://127.0.0.1:{notification_port}"
        },
        notification_env={"ACCESSLINE_NOTIFICATION_LINK_ORIGINS": FORMS},
        # The agent in the browser takes their time.
        ACCESSLINE_ROUTING_OFFER_TIMEOUT_SECONDS="60",
    )
    network.upstream = started.web["presence"]
    yield started
    await stop_stack(started)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    assert INSTALLED, "Debian's chromium is missing (tools/ensure-test-deps.sh)"
    async with playwright_api.async_playwright() as driver:
        launched = await driver.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            # This machine's network is closed: no background calls to the outside.
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield launched
        await launched.close()


async def register_agent(stack: Stack, group: str, subject: str) -> str:
    agent_id = f"agent-{uuid.uuid4().hex[:6]}"
    await stack.pr.RegisterAgent(
        pr_pb2.RegisterAgentRequest(
            agent=pr_pb2.Agent(
                agent_id=agent_id,
                display_name="Camille Durand",
                skills=[pr_pb2.Skill(name=subject, level=8)],
                languages=["fr-FR"],
                resource_groups=[group],
                channels=[
                    pr_pb2.ChannelConfig(
                        channel=C.CHANNEL_DESK_VOICE, address="4021", available_on_login=True
                    ),
                    pr_pb2.ChannelConfig(channel=C.CHANNEL_MOBILE_VOICE, address="+33612345678"),
                ],
            )
        )
    )
    return agent_id


expect = playwright_api.expect
CUSTOMER = C.ContextData(
    language="fr-FR",
    customer_segment="gold",
    service_request_id="SR-7",
    auth_token_ref="session-4711",
    app_screen="claims/new",
    location=C.GeoPoint(latitude=45.76, longitude=4.84),
    attributes={"display_name": "Ms Martin", "policy": "P-12"},
)


async def sign_in_and_set_presence(page: Any, stack: Stack, agent_id: str) -> None:
    """Signs in with the agent's token; mobile on (ready), then the desk phone off for
    a break (partly ready, with the reason, as supervisors see it too)."""
    await page.get_by_label("Your access token").fill(identity().token(agent_id, "agent"))
    async with page.expect_request(lambda r: "PresenceService/OpenSession" in r.url) as opened:
        await page.get_by_test_id("sign-in-button").click()
    # The agent is named on every call, for a gateway that keeps an agent on one replica.
    assert (await opened.value).headers["accessline-agent"] == agent_id
    await expect(page.get_by_test_id("connection")).to_have_text("Online", timeout=SHOWN)
    await expect(page.get_by_test_id("agent-name")).to_have_text("Camille Durand")
    overall = page.get_by_test_id("overall")
    await expect(overall).to_have_text("Partly ready", timeout=SHOWN)
    await page.get_by_test_id("channel-MOBILE_VOICE").check()
    await expect(overall).to_have_text("Ready", timeout=SHOWN)
    await page.get_by_test_id("reason").select_option("break")
    await page.get_by_test_id("channel-DESK_VOICE").uncheck()
    await expect(page.get_by_test_id("reason-shown")).to_have_text(
        "Not ready: break", timeout=SHOWN
    )
    await expect(overall).to_have_text("Partly ready")
    shown = await stack.pr.GetPresence(pr_pb2.GetPresenceRequest(agent_ids=[agent_id]))
    assert shown.agents[0].not_ready_reason == "break"


async def see_the_offer(page: Any, subject: str) -> None:
    """The offer shows who, why, where and how long, with its countdown."""
    await expect(page.get_by_test_id("offer")).to_be_visible(timeout=SHOWN)
    await expect(page.get_by_test_id("customer")).to_have_text("Ms Martin")
    await expect(page.get_by_test_id("subject")).to_have_text(subject)
    await expect(page.get_by_test_id("service-request")).to_have_text("SR-7")
    await expect(page.get_by_test_id("match")).to_have_text("matched")
    await expect(page.get_by_test_id("waiting")).to_have_text(re.compile(r"^\d+:\d\d$"))
    await expect(page.get_by_test_id("customer-marker")).to_be_attached()
    await expect(page.get_by_test_id("offer-countdown")).not_to_have_text("0")
    await page.screenshot(path=ARTIFACTS / "offer.png")


async def left_a_claim_half_filled(stack: Stack, app_id: str, customer: str) -> None:
    """The claims system posts the customer's unfinished claim to their journey."""
    await journey(stack).RecordInteraction(
        jn.RecordInteractionRequest(
            interaction=jn.Interaction(
                interaction_id="claim-form-9",
                application_id=app_id,
                transaction_id="CLAIM-9",
                channel=jn.INTERACTION_CHANNEL_CHAT,
                topic="claim form",
                status=jn.INTERACTION_STATUS_PENDING,
            ),
            correlation=jn.Correlation(customer_id=customer),
        )
    )


async def work_and_send_a_link(page: Any, inbox: Any) -> Any:
    """The whole context of the accepted call, and a link to the customer: refused from
    an origin not allowed, sent from one that is. The interaction's element."""
    await expect(page.get_by_test_id("offer")).to_be_hidden(timeout=SHOWN)
    work = page.get_by_test_id("interaction")
    await expect(work.get_by_test_id("attribute-policy")).to_have_text("P-12", timeout=SHOWN)
    await expect(work.get_by_test_id("context-auth")).to_have_text("session-4711")
    await expect(work.get_by_test_id("context-app-screen")).to_have_text("claims/new")
    # The claim the customer left half-filled, open in their journey.
    await expect(work.get_by_test_id("context-open-transactions")).to_have_text(
        "CLAIM-9 (claim form)"
    )
    await work.get_by_test_id("link-url").fill("https://elsewhere.example.test/form")
    await work.get_by_test_id("send-link").click()
    await expect(work.get_by_test_id("link-status")).to_contain_text("not sent")
    await work.get_by_test_id("link-url").fill(f"{FORMS}/claims/17")
    await work.get_by_test_id("link-title").fill("Your claim form")
    await work.get_by_test_id("send-link").click()
    await expect(work.get_by_test_id("link-status")).to_have_text("sent to 1 device", timeout=SHOWN)
    received = (await asyncio.wait_for(inbox.read(), 15)).notification
    assert (received.link_url, received.title) == (f"{FORMS}/claims/17", "Your claim form")
    await page.screenshot(path=ARTIFACTS / "interaction.png")
    return work


async def drop_and_come_back(page: Any, network: Proxy) -> None:
    """The network drops: the console says it is offline, then comes back by itself to
    the same session (the desk phone still off for its reason)."""
    network.cut()
    await expect(page.get_by_test_id("connection")).to_have_text(
        "Offline — reconnecting…", timeout=SHOWN
    )
    await page.screenshot(path=ARTIFACTS / "offline.png")
    network.restore()
    await expect(page.get_by_test_id("connection")).to_have_text("Online", timeout=SHOWN)
    await expect(page.get_by_test_id("events")).to_contain_text(
        "reconnected; session resumed", timeout=SHOWN
    )
    await expect(page.get_by_test_id("reason-shown")).to_have_text("Not ready: break")
    await expect(page.get_by_test_id("channel-MOBILE_VOICE")).to_be_checked()
    await expect(page.get_by_test_id("channel-DESK_VOICE")).not_to_be_checked()


async def test_an_agent_works_a_matched_call_in_the_console_and_survives_a_network_drop(
    stack: Stack, browser: Any, network: Proxy
) -> None:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    group = new_group()
    app_id, numbers = await setup_numbers(stack, group)
    subject = await pool_subject(stack, group)
    agent_id = await register_agent(stack, group, subject)
    # The customer's app listens in-app (for the link the agent sends).
    inbox = await in_app(stack, "customer-1", app_id)
    context = await browser.new_context(
        ignore_https_errors=True,  # the development CA of the test identity
        viewport={"width": 1200, "height": 900},
    )
    page = await context.new_page()
    try:
        await page.goto(f"https://{network.address}/console/")
        await sign_in_and_set_presence(page, stack, agent_id)
        customer = C.ContextData()
        customer.CopyFrom(CUSTOMER)
        customer.subject = subject
        await left_a_claim_half_filled(stack, app_id, "customer-1")
        started = await handoff(stack, app_id, "customer-1", customer)
        call = Call(stack.routers[0], numbers[0])
        await see_the_offer(page, subject)
        # Accepted on the mobile phone: the call is connected there.
        await page.get_by_test_id("accept-channel").select_option(label="Mobile phone")
        await page.get_by_test_id("accept").click()
        connect = (await call.until("connect")).connect
        assert (connect.agent_id, connect.address) == (agent_id, "+33612345678")
        assert connect.session_id == started.session_id
        work = await work_and_send_a_link(page, inbox)
        await drop_and_come_back(page, network)
        # A reload during the call: signed in again from the tab, the call shown again.
        await page.reload()
        await expect(page.get_by_test_id("events")).to_contain_text(
            "reconnected; session resumed", timeout=SHOWN
        )
        await expect(work.get_by_test_id("attribute-policy")).to_have_text("P-12", timeout=SHOWN)
        await expect(work.locator("h3")).to_have_text(f"Ms Martin — {subject}")
        # Wrap-up done: the mobile channel has room again.
        await work.get_by_test_id("wrap-up").click()
        await expect(work).to_have_count(0, timeout=SHOWN)
        await expect(page.get_by_test_id("events")).to_contain_text("interaction ended")
        after = await stack.pr.GetPresence(pr_pb2.GetPresenceRequest(agent_ids=[agent_id]))
        mobile = next(c for c in after.agents[0].channels if c.channel == C.CHANNEL_MOBILE_VOICE)
        assert (mobile.presence, mobile.active_interactions) == (C.CHANNEL_PRESENCE_AVAILABLE, 0)
        await page.screenshot(path=ARTIFACTS / "after.png")
        call.hang_up()
    finally:
        await context.close()
        inbox.cancel()


async def test_the_console_is_served_with_a_policy_that_keeps_it_to_its_origin(
    stack: Stack, browser: Any
) -> None:
    context = await browser.new_context(ignore_https_errors=True)
    page = await context.new_page()
    answer = await page.goto(f"https://{stack.web['presence']}/console")
    assert answer is not None
    assert answer.url.endswith("/console/")  # redirected to the folder
    assert "script-src 'self'" in answer.headers["content-security-policy"]
    assert answer.headers["x-content-type-options"] == "nosniff"
    missing = await page.goto(f"https://{stack.web['presence']}/console/..%2F..%2Fetc%2Fpasswd")
    assert missing is not None
    assert missing.status == 404
    # A bad token is refused by Presence, and the console says so.
    await page.goto(f"https://{stack.web['presence']}/console/")
    await page.get_by_label("Your access token").fill("not-a-token")
    await page.get_by_test_id("sign-in-button").click()
    await expect(page.get_by_test_id("sign-in-error")).to_contain_text("JWT")
    await context.close()


async def test_the_console_comes_back_to_another_replica_when_its_replica_stops(
    stack: Stack, browser: Any, etcd: EmbeddedEtcd
) -> None:
    group = new_group()
    agent_id = await register_agent(stack, group, "mortgage")
    # A Presence replica of its own, which the test stops; the agent's load balancer
    # (the proxy) then sends the console to the stack's replica.
    web_port = free_port()
    replica = spawn_service(
        "accessline_server.presence", etcd.endpoint, stack.prefix, ACCESSLINE_WEB_PORT=str(web_port)
    )
    await wait_serving(replica)
    balancer = Proxy(f"127.0.0.1:{web_port}")
    await balancer.start()
    context = await browser.new_context(ignore_https_errors=True)
    page = await context.new_page()
    try:
        await page.goto(f"https://{balancer.address}/console/")
        await page.get_by_label("Your access token").fill(identity().token(agent_id, "agent"))
        await page.get_by_test_id("sign-in-button").click()
        await expect(page.get_by_test_id("connection")).to_have_text("Online", timeout=SHOWN)
        await page.get_by_test_id("reason").select_option("lunch")
        await page.get_by_test_id("dnd").check()
        await expect(page.get_by_test_id("overall")).to_have_text("Do not disturb", timeout=SHOWN)

        await replica.stop_async()  # a rolling restart takes this replica away
        balancer.upstream = stack.web["presence"]
        balancer.cut()
        balancer.restore()
        await expect(page.get_by_test_id("events")).to_contain_text(
            "reconnected; session resumed", timeout=SHOWN
        )
        await expect(page.get_by_test_id("connection")).to_have_text("Online")
        await expect(page.get_by_test_id("overall")).to_have_text("Do not disturb")
        await expect(page.get_by_test_id("reason-shown")).to_have_text("Not ready: lunch")
        shown = await stack.pr.GetPresence(pr_pb2.GetPresenceRequest(agent_ids=[agent_id]))
        assert shown.agents[0].overall == C.OVERALL_PRESENCE_DO_NOT_DISTURB
    finally:
        await context.close()
        await balancer.close()
        await replica.stop_async()
