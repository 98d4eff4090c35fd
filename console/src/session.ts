// The agent's session with Presence as a browser holds it: the OpenSession stream brings
// the session's events, each message goes up by SendSessionMessage. The session comes
// back by itself after a network drop or a Presence restart, resuming the last one with
// its id (its channels, do-not-disturb and reason are kept), and says meanwhile that it
// is offline.

import { create, type MessageInitShape } from "@bufbuild/protobuf";
import {
  Code,
  ConnectError,
  createClient,
  type Client,
  type Interceptor,
  type Transport,
} from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-web";
import {
  ConnectRequestSchema,
  PresenceService,
  type ConnectResponse,
} from "./gen/accessline/presence/v1/presence_pb";

// A heartbeat at this interval; Presence logs out an app silent for 30 s by default.
const HEARTBEAT_MS = 10_000;
// No answer to two heartbeats in a row: the stream is taken for dead and opened again.
const SILENCE_MS = 2 * HEARTBEAT_MS + 5_000;
const RETRY_FIRST_MS = 500;
const SESSION_KEY = "accessline.session";
const RETRY_MAX_MS = 10_000;

export type Message = ConnectResponse["message"];
type Outgoing = MessageInitShape<typeof ConnectRequestSchema>["message"];

export interface SessionEvents {
  message(message: Message): void;
  online(online: boolean): void;
  // The session cannot go on: the token was refused, or another login took over.
  ended(why: string): void;
}

function bearer(token: string): Interceptor {
  return (next) => async (request) => {
    request.header.set("authorization", `Bearer ${token}`);
    return next(request);
  };
}

/** Names the agent on every call, for a gateway that keeps one agent's calls on one
 * Presence replica (the one holding the session) by hashing this header. */
function agentHeader(agentId: string): Interceptor {
  return (next) => async (request) => {
    request.header.set("accessline-agent", agentId);
    return next(request);
  };
}

/** Connect over HTTP to a service's web port, every call with the agent's token. */
export function transport(baseUrl: string, token: string, agentId = ""): Transport {
  const interceptors = agentId ? [bearer(token), agentHeader(agentId)] : [bearer(token)];
  return createConnectTransport({ baseUrl, useBinaryFormat: true, interceptors });
}

export class AgentSession {
  private readonly client: Client<typeof PresenceService>;
  private running = false;
  private stream: AbortController | null = null;
  private heartbeat: ReturnType<typeof setInterval> | undefined;
  private lastHeard = 0;
  private retryMs = RETRY_FIRST_MS;
  private wake: (() => void) | null = null;
  private live = false;
  // The last session's id: the live one, or the one to resume (kept in the tab, so a
  // reload resumes it too).
  sessionId = window.sessionStorage.getItem(SESSION_KEY) ?? "";

  constructor(
    readonly agentId: string,
    token: string,
    private readonly events: SessionEvents,
    baseUrl: string = window.location.origin,
  ) {
    this.client = createClient(PresenceService, transport(baseUrl, token, agentId));
  }

  start(): void {
    if (!this.running) {
      this.running = true;
      void this.run();
    }
  }

  stop(): void {
    this.running = false;
    this.stream?.abort();
    this.wake?.();
  }

  /** Sends one message of the session; refusals (a bad reason code, say) are thrown. */
  async send(message: Outgoing): Promise<void> {
    const sessionId = this.sessionId;
    if (!this.live) {
      throw new Error("offline: the message was not sent");
    }
    try {
      await this.client.sendSessionMessage({
        agentSessionId: sessionId,
        message: create(ConnectRequestSchema, { message }),
      });
    } catch (error) {
      const code = ConnectError.from(error).code;
      if (code === Code.NotFound || code === Code.Unavailable || code === Code.Unknown) {
        // The server holding the session is gone or was switched: open it again.
        this.reconnect();
      }
      throw error;
    }
  }

  /** Drops the current stream (it is opened again, resuming). */
  reconnect(): void {
    this.stream?.abort();
  }

  private async run(): Promise<void> {
    while (this.running) {
      this.stream = new AbortController();
      try {
        await this.listen(this.stream.signal);
      } catch (error) {
        const failure = ConnectError.from(error);
        // A token refused, or an agent Presence does not know: trying again cannot help.
        const fatal = [Code.Unauthenticated, Code.PermissionDenied, Code.NotFound, Code.InvalidArgument];
        if (fatal.includes(failure.code)) {
          this.running = false;
          this.events.ended(`signed out: ${failure.rawMessage}`);
        }
      } finally {
        this.live = false;
        clearInterval(this.heartbeat);
        this.events.online(false);
      }
      if (this.running) {
        await new Promise<void>((resolve) => {
          this.wake = resolve;
          setTimeout(resolve, this.retryMs);
        });
        this.retryMs = Math.min(this.retryMs * 2, RETRY_MAX_MS);
      }
    }
  }

  private async listen(signal: AbortSignal): Promise<void> {
    const login = {
      agentId: this.agentId,
      // Resumes the last session: the agent's choices are kept across the drop.
      resumeToken: this.sessionId,
      device: { deviceId: deviceId(), platform: "web", appVersion: "console" },
    };
    for await (const response of this.client.openSession({ login }, { signal })) {
      const message = response.message?.message;
      if (message === undefined) {
        continue;
      }
      this.lastHeard = Date.now();
      if (message.case === "snapshot") {
        this.sessionId = message.value.agentSessionId;
        window.sessionStorage.setItem(SESSION_KEY, this.sessionId);
        this.live = true;
        this.retryMs = RETRY_FIRST_MS;
        this.events.online(true);
        this.beat();
      }
      if (message.case === "sessionReplaced") {
        this.running = false;
        this.events.ended("signed in on another device");
      }
      this.events.message(message);
    }
  }

  private beat(): void {
    clearInterval(this.heartbeat);
    this.heartbeat = setInterval(() => {
      if (Date.now() - this.lastHeard > SILENCE_MS) {
        this.reconnect();
        return;
      }
      this.send({ case: "heartbeat", value: {} }).catch(() => undefined);
    }, HEARTBEAT_MS);
  }
}

function deviceId(): string {
  let id = window.localStorage.getItem("accessline.device");
  if (!id) {
    id = `web-${crypto.randomUUID()}`;
    window.localStorage.setItem("accessline.device", id);
  }
  return id;
}
