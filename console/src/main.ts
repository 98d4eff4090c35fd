// The agent console: sign in with a token, set presence per channel (with a not-ready
// reason), see an offered interaction with its context and a countdown, accept it on
// one of the agent's channels or decline it, then work and wrap up the interaction with
// its whole context. Everything goes through Presence's session (session.ts).

import { timestampDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import { ConnectError, createClient, type Client } from "@connectrpc/connect";
import { MatchOutcome } from "./gen/accessline/callmatching/v1/call_matching_pb";
import {
  Channel,
  ChannelPresence,
  OverallPresence,
  type ContextData,
} from "./gen/accessline/common/v1/common_pb";
import {
  OfferCancelReason,
  OfferDecision,
  OfferRefusal,
  type Agent,
  type AgentPresence,
  type Offer,
} from "./gen/accessline/presence/v1/presence_pb";
import { NotificationService } from "./gen/accessline/notification/v1/notification_pb";
import { drawMap } from "./map";
import { AgentSession, transport, type Message } from "./session";

const TOKEN_KEY = "accessline.token";

const CHANNEL_NAMES: Record<number, string> = {
  [Channel.DESK_VOICE]: "Desk phone",
  [Channel.MOBILE_VOICE]: "Mobile phone",
  [Channel.CHAT]: "Chat",
  [Channel.EXTERNAL_PHONE]: "External phone",
  [Channel.EMAIL]: "E-mail",
};

const OVERALL: Record<number, [string, string]> = {
  [OverallPresence.READY]: ["Ready", "ready"],
  [OverallPresence.PARTIALLY_READY]: ["Partly ready", "partly"],
  [OverallPresence.NOT_READY]: ["Not ready", "not-ready"],
  [OverallPresence.DO_NOT_DISTURB]: ["Do not disturb", "dnd"],
  [OverallPresence.OFFLINE]: ["Offline", "offline"],
};

function $(id: string): HTMLElement {
  const found = document.getElementById(id);
  if (found === null) {
    throw new Error(`the page has no #${id}`);
  }
  return found;
}

function channelName(channel: Channel): string {
  return CHANNEL_NAMES[channel] ?? Channel[channel] ?? String(channel);
}

function words(name: string | undefined): string {
  return (name ?? "").toLowerCase().replaceAll("_", " ");
}

function seconds(at: Timestamp | undefined): number {
  return at === undefined ? 0 : timestampDate(at).getTime() / 1000;
}

function clock(total: number): string {
  const s = Math.max(0, Math.floor(total));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

/** The subject of a JWT (the agent's id), read without checking it: Presence checks. */
function subjectOf(token: string): string {
  const payload = token.split(".")[1];
  if (!payload) {
    throw new Error("this is not an access token (a JWT)");
  }
  const json = atob(payload.replaceAll("-", "+").replaceAll("_", "/"));
  const subject = (JSON.parse(json) as { sub?: unknown }).sub;
  if (typeof subject !== "string" || !subject) {
    throw new Error("the token names no agent (no subject)");
  }
  return subject;
}

interface Working {
  offerId: string;
  // The offer as shown, when this page saw it (not after a reload).
  offer: Offer | undefined;
  context: ContextData | undefined;
}

/** What the server tells the page (config.json): where Notification's web port is. */
async function notificationUrl(): Promise<string> {
  try {
    const answer = await fetch("config.json", { cache: "no-store" });
    const config = (await answer.json()) as { notificationUrl?: string };
    return config.notificationUrl || window.location.origin;
  } catch {
    return window.location.origin;
  }
}

class Console {
  private session: AgentSession | null = null;
  private notifications: Client<typeof NotificationService> | null = null;
  private agent: Agent | undefined;
  private presence: AgentPresence | undefined;
  private readonly offers = new Map<string, Offer>();
  private readonly working = new Map<string, Working>();
  private readonly answered = new Map<string, Offer>();

  start(): void {
    $("sign-in-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.signIn(($("token") as HTMLTextAreaElement).value.trim());
    });
    $("sign-out").addEventListener("click", () => this.signOut("signed out"));
    $("dnd").addEventListener("change", () => {
      const enabled = ($("dnd") as HTMLInputElement).checked;
      this.send({
        case: "setDoNotDisturb",
        value: { enabled, reasonCode: enabled ? this.reason() : "" },
      });
    });
    $("accept").addEventListener("click", () => this.answer(OfferDecision.ACCEPT));
    $("decline").addEventListener("click", () => this.answer(OfferDecision.DECLINE));
    setInterval(() => this.tick(), 250);
    // A link may carry the token in its fragment (never sent to a server).
    const fragment = new URLSearchParams(window.location.hash.slice(1)).get("token");
    if (fragment) {
      window.history.replaceState(null, "", window.location.pathname);
    }
    const token = fragment ?? window.sessionStorage.getItem(TOKEN_KEY);
    if (token) {
      this.signIn(token);
    }
  }

  private signIn(token: string): void {
    let agentId: string;
    try {
      agentId = subjectOf(token);
    } catch (error) {
      $("sign-in-error").textContent = (error as Error).message;
      return;
    }
    window.sessionStorage.setItem(TOKEN_KEY, token);
    $("sign-in-error").textContent = "";
    void notificationUrl().then((url) => {
      this.notifications = createClient(NotificationService, transport(url, token));
    });
    this.session = new AgentSession(agentId, token, {
      message: (message) => this.on(message),
      online: (online) => this.online(online),
      ended: (why) => this.signOut(why),
    });
    $("agent-name").textContent = agentId;
    this.session.start();
  }

  private signOut(why: string): void {
    this.session?.stop();
    this.session = null;
    window.sessionStorage.removeItem(TOKEN_KEY);
    window.sessionStorage.removeItem("accessline.session");
    $("work").hidden = true;
    $("sign-in").hidden = false;
    $("sign-out").hidden = true;
    $("sign-in-error").textContent = why === "signed out" ? "" : why;
    this.setBadge("overall", "Signed out", "offline");
    this.log(why);
  }

  private online(online: boolean): void {
    this.setBadge(
      "connection",
      online ? "Online" : "Offline — reconnecting…",
      online ? "online" : "offline",
    );
    if (!online && this.presence !== undefined) {
      this.log("connection lost; reconnecting");
    }
  }

  private setBadge(id: string, text: string, kind: string): void {
    const badge = $(id);
    badge.textContent = text;
    badge.className = `badge ${kind}`;
  }

  private async send(message: Parameters<AgentSession["send"]>[0]): Promise<boolean> {
    try {
      await this.session?.send(message);
      return true;
    } catch (error) {
      this.log(`not done: ${ConnectError.from(error).rawMessage}`);
      return false;
    }
  }

  private reason(): string {
    return ($("reason") as HTMLSelectElement).value;
  }

  private on(message: Message): void {
    switch (message.case) {
      case "snapshot": {
        const snapshot = message.value;
        this.agent = snapshot.agent;
        $("agent-name").textContent = snapshot.agent?.displayName || snapshot.agent?.agentId || "";
        this.reasons(snapshot.notReadyReasons);
        $("sign-in").hidden = true;
        $("work").hidden = false;
        $("sign-out").hidden = false;
        this.log(snapshot.resumed ? "reconnected; session resumed" : "signed in");
        this.showPresence(snapshot.presence);
        // The interactions the agent is on, as Presence knows them (after a reload too).
        for (const ongoing of snapshot.interactions) {
          const known = this.working.get(ongoing.interactionId);
          this.working.set(ongoing.interactionId, {
            offerId: ongoing.offerId,
            offer: known?.offer,
            context: ongoing.context ?? known?.context,
          });
        }
        this.showWork();
        break;
      }
      case "presenceConfirmed":
        this.showPresence(message.value.presence);
        break;
      case "offer":
        this.offers.set(message.value.offerId, message.value);
        this.log(`offer: ${message.value.summary?.subject ?? ""}`);
        this.showOffer();
        break;
      case "offerCancelled": {
        const { offerId, reason } = message.value;
        this.offers.delete(offerId);
        for (const [id, work] of this.working) {
          if (work.offerId === offerId) {
            this.working.delete(id);
          }
        }
        this.log(`offer withdrawn: ${words(OfferCancelReason[reason])}`);
        this.showOffer();
        this.showWork();
        break;
      }
      case "offerResponseRecorded": {
        const { offerId, decision, context } = message.value;
        const offer = this.offers.get(offerId) ?? this.answered.get(offerId);
        this.offers.delete(offerId);
        if (decision === OfferDecision.ACCEPT && offer !== undefined) {
          this.working.set(offer.interactionId, { offerId, offer, context });
        }
        this.log(`${decision === OfferDecision.ACCEPT ? "accepted" : "declined"}`);
        this.showOffer();
        this.showWork();
        break;
      }
      case "offerResponseRefused":
        this.log(`answer refused: ${words(OfferRefusal[message.value.reason])}`);
        this.offers.delete(message.value.offerId);
        this.showOffer();
        break;
      case "sessionReplaced":
        this.log("signed in on another device");
        break;
      default:
        break;
    }
  }

  private reasons(codes: string[]): void {
    const select = $("reason") as HTMLSelectElement;
    const keep = select.value;
    select.replaceChildren(new Option("(none)", ""));
    for (const code of codes) {
      select.add(new Option(code.replaceAll("-", " "), code));
    }
    select.value = codes.includes(keep) ? keep : "";
  }

  private showPresence(presence: AgentPresence | undefined): void {
    if (presence === undefined) {
      return;
    }
    this.presence = presence;
    const [text, kind] = OVERALL[presence.overall] ?? ["Unknown", "offline"];
    this.setBadge("overall", text, kind);
    ($("dnd") as HTMLInputElement).checked = presence.doNotDisturb;
    $("reason-shown").textContent = presence.notReadyReason
      ? `Not ready: ${presence.notReadyReason.replaceAll("-", " ")}`
      : "";
    const list = $("channels");
    list.replaceChildren();
    for (const state of presence.channels) {
      const item = document.createElement("li");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.id = `channel-${state.channel}`;
      box.dataset.testid = `channel-${Channel[state.channel]}`;
      box.checked = state.presence !== ChannelPresence.UNAVAILABLE;
      box.disabled = presence.doNotDisturb;
      box.addEventListener("change", () => {
        const available = box.checked;
        this.send({
          case: "setChannelPresence",
          value: { channel: state.channel, available, reasonCode: available ? "" : this.reason() },
        });
      });
      const label = document.createElement("label");
      label.htmlFor = box.id;
      label.textContent = channelName(state.channel);
      const shown = document.createElement("span");
      shown.className = "state";
      shown.textContent = `${words(ChannelPresence[state.presence])} ${state.activeInteractions}/${state.capacity}`;
      item.append(box, label, shown);
      list.append(item);
    }
  }

  private current(): Offer | undefined {
    return this.offers.values().next().value;
  }

  private showOffer(): void {
    const offer = this.current();
    $("offer").hidden = offer === undefined;
    if (offer === undefined) {
      return;
    }
    const summary = offer.summary;
    $("offer-channel").textContent = channelName(offer.channel);
    const rows: [string, string, string][] = [
      ["Customer", summary?.customerDisplayName || "(not identified)", "customer"],
      ["Subject", summary?.subject ?? "", "subject"],
      ["Language", summary?.language ?? "", "language"],
      ["Segment", summary?.customerSegment ?? "", "segment"],
      ["Service request", summary?.serviceRequestId ?? "", "service-request"],
      ["Match", words(MatchOutcome[summary?.matchOutcome ?? 0]).replace("match outcome ", ""), "match"],
      ["Waiting", "", "waiting"],
      ...(summary?.lines ?? []).map((line, i): [string, string, string] => ["", line, `line-${i}`]),
    ];
    this.fill($("offer-context"), rows);
    const map = $("offer-map");
    map.replaceChildren();
    if (summary?.location !== undefined) {
      map.append(drawMap(summary.location.latitude, summary.location.longitude));
    }
    const choose = $("accept-channel") as HTMLSelectElement;
    choose.replaceChildren();
    for (const config of this.agent?.channels ?? []) {
      const option = new Option(channelName(config.channel), String(config.channel));
      option.selected = config.channel === offer.channel;
      choose.add(option);
    }
    this.tick();
  }

  private fill(list: HTMLElement, rows: [string, string, string][]): void {
    list.replaceChildren();
    for (const [name, value, testid] of rows) {
      if (!value && testid !== "waiting") {
        continue;
      }
      const term = document.createElement("dt");
      term.textContent = name;
      const detail = document.createElement("dd");
      detail.textContent = value;
      detail.dataset.testid = testid;
      list.append(term, detail);
    }
  }

  private tick(): void {
    const offer = this.current();
    if (offer === undefined) {
      return;
    }
    const now = Date.now() / 1000;
    $("offer-countdown").textContent = String(Math.max(0, Math.ceil(seconds(offer.deadline) - now)));
    const waiting = document.querySelector<HTMLElement>('[data-testid="waiting"]');
    if (waiting !== null && offer.summary?.waitingSince !== undefined) {
      waiting.textContent = clock(now - seconds(offer.summary.waitingSince));
    }
  }

  private async answer(decision: OfferDecision): Promise<void> {
    const offer = this.current();
    if (offer === undefined) {
      return;
    }
    const acceptChannel = Number(($("accept-channel") as HTMLSelectElement).value) as Channel;
    this.answered.set(offer.offerId, offer);
    await this.send({
      case: "offerResponse",
      value: {
        offerId: offer.offerId,
        decision,
        acceptChannel: decision === OfferDecision.ACCEPT ? acceptChannel : Channel.UNSPECIFIED,
      },
    });
  }

  private showWork(): void {
    $("no-interaction").hidden = this.working.size > 0;
    const list = $("interaction-list");
    list.replaceChildren();
    for (const [interactionId, work] of this.working) {
      const item = document.createElement("li");
      item.dataset.testid = "interaction";
      const title = document.createElement("h3");
      const summary = work.offer?.summary;
      const name = summary?.customerDisplayName || work.context?.attributes["display_name"];
      const subject = summary?.subject || work.context?.subject || "";
      title.textContent = `${name || "Customer"} — ${subject}`;
      const details = document.createElement("dl");
      const context = work.context;
      const rows: [string, string, string][] = [
        ["Language", context?.language ?? summary?.language ?? "", "context-language"],
        ["Segment", context?.customerSegment ?? "", "context-segment"],
        ["Service request", context?.serviceRequestId ?? "", "context-service-request"],
        // Open in the customer's journey: the agent may offer to resume one.
        [
          "Open transactions",
          (context?.openTransactions ?? [])
            .map((t) => (t.topic ? `${t.transactionId} (${t.topic})` : t.transactionId))
            .join(", "),
          "context-open-transactions",
        ],
        ["App screen", context?.appScreen ?? "", "context-app-screen"],
        ["Signed in as", context?.authTokenRef ?? "", "context-auth"],
        ...Object.entries(context?.attributes ?? {})
          .sort(([a], [b]) => a.localeCompare(b))
          .map(([key, value]): [string, string, string] => [key, value, `attribute-${key}`]),
      ];
      this.fill(details, rows);
      const done = document.createElement("button");
      done.type = "button";
      done.textContent = "Wrap-up done";
      done.dataset.testid = "wrap-up";
      done.addEventListener("click", async () => {
        if (await this.send({ case: "endInteraction", value: { interactionId } })) {
          this.working.delete(interactionId);
          this.log("interaction ended");
          this.showWork();
        }
      });
      item.append(title, details, this.linkForm(interactionId), done);
      list.append(item);
    }
  }

  /** "Send a link to the customer": a URL (of an allowed origin) and what to call it. */
  private linkForm(interactionId: string): HTMLFormElement {
    const form = document.createElement("form");
    form.className = "link";
    const url = document.createElement("input");
    url.type = "url";
    url.required = true;
    url.placeholder = "https://… (a form, a document to sign)";
    url.setAttribute("aria-label", "Link to send");
    url.dataset.testid = "link-url";
    const title = document.createElement("input");
    title.type = "text";
    title.maxLength = 256;
    title.placeholder = "What it is";
    title.setAttribute("aria-label", "Link title");
    title.dataset.testid = "link-title";
    const send = document.createElement("button");
    send.type = "submit";
    send.textContent = "Send link to the customer";
    send.dataset.testid = "send-link";
    const status = document.createElement("p");
    status.dataset.testid = "link-status";
    form.append(url, title, send, status);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      if (this.notifications === null) {
        status.textContent = "not sent: not connected yet";
        return;
      }
      try {
        const sent = await this.notifications.sendLink({
          interactionId,
          url: url.value,
          title: title.value,
        });
        status.textContent = sent.duplicate
          ? "already sent"
          : `sent to ${sent.deviceCount} device${sent.deviceCount === 1 ? "" : "s"}`;
        this.log(`link sent: ${url.value}`);
      } catch (error) {
        status.textContent = `not sent: ${ConnectError.from(error).rawMessage}`;
      }
    });
    return form;
  }

  private log(text: string): void {
    const entry = document.createElement("li");
    entry.textContent = `${new Date().toLocaleTimeString()} ${text}`;
    $("event-list").prepend(entry);
  }
}

new Console().start();
