// agentwire-client.js: a small, dependency-free client for the agentwire protocol
// (docs/protocol.md). It is the reference client: copy it into your frontend.
//
// const client = new AgentwireClient({ url: "ws://host/ws", token });
// client.addEventListener("state", (e) => ...);   // e.detail: { state, code?, reason? }
// client.addEventListener("event", (e) => ...);   // e.detail: one stream event (has `seq`)
// client.addEventListener("frame", (e) => ...);   // e.detail: any other frame (ack, error, pong...)
// client.addEventListener("resume", (e) => ...);  // e.detail: every processing_ready: its `resume`
//                                                 // (complete, from_seq...), epochChanged, lastSeq
//                                                 // and runs (the runs in progress as of lastSeq)
// client.connect();
//
// It resumes after a drop with `last_seq` and `epoch`, with exponential backoff, so the page sees
// every event once and in order. Tokens travel in the `auth` frame, never in the URL.

export const CLOSE_CODES = {
  1000: "closed normally",
  1001: "the server heard nothing from this page for too long",
  1002: "protocol error",
  1003: "the client sent a binary frame",
  1006: "the connection dropped",
  1007: "the client sent text that is not UTF-8",
  1008: "too many messages too fast",
  1009: "message too big",
  1011: "the server could not set up the connection",
  1012: "the server is restarting",
  4001: "the token is invalid",
  4002: "no token was sent in time",
  4003: "the token expired",
  4004: "too many open tabs for this user",
  4008: "this page read too slowly",
};

// Closes after which reconnecting with the same token cannot help.
const FINAL_CODES = new Set([1003, 1007, 1009, 4001, 4002, 4003, 4004]);

export function describeClose(code) {
  return CLOSE_CODES[code] || `closed with code ${code}`;
}

export class AgentwireClient extends EventTarget {
  constructor({ url, token, backoffMs = 500, maxBackoffMs = 15000 }) {
    super();
    this.url = url;
    this.token = token;
    this.backoffMs = backoffMs;
    this.maxBackoffMs = maxBackoffMs;
    this.state = "disconnected";
    // The newest seq seen. It starts at 0, so the first connection replays the history the
    // server still holds: a new tab shows the conversation so far.
    this.lastSeq = 0;
    this.epoch = null;
    this.connectionId = null;
    this.userId = null;
    this.attempt = 0;
    this.stopped = false;
    this.ws = null;
    this.retryTimer = null;
  }

  connect() {
    this.stopped = false;
    clearTimeout(this.retryTimer);
    const ws = new WebSocket(this.url, "agentwire.v1");
    this.ws = ws;
    ws.onopen = () => {
      const auth = { type: "auth", token: this.token, last_seq: this.lastSeq };
      if (this.epoch) auth.epoch = this.epoch;
      ws.send(JSON.stringify(auth));
    };
    ws.onmessage = (message) => this.#onFrame(ws, message.data);
    ws.onclose = (close) => this.#onClose(ws, close.code, close.reason);
    ws.onerror = () => {}; // followed by onclose, which does the work
  }

  // Stops for good: no reconnect.
  close() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    if (this.ws) this.ws.close(1000);
    this.#setState("disconnected", {});
  }

  send(frame) {
    // Frames sent before processing_ready are queued by the server, not lost.
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }

  // `extra`: what the message gives its run's agent (`tools`, `context`, `state`).
  sendMessage(threadId, content, extra = {}) {
    const clientMsgId = `c-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
    const frame = { ...extra, type: "user_message", thread_id: threadId, content, client_msg_id: clientMsgId };
    const sent = this.send(frame);
    return sent ? clientMsgId : null;
  }

  cancelRun(runId) {
    return this.send({ type: "cancel_run", run_id: runId });
  }

  refreshToken(token) {
    this.token = token;
    return this.send({ type: "auth", token });
  }

  #setState(state, detail) {
    this.state = state;
    this.dispatchEvent(new CustomEvent("state", { detail: { state, ...detail } }));
  }

  #onFrame(ws, data) {
    if (ws !== this.ws) return;
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    if (frame.type === "connection_state") {
      this.connectionId = frame.connection_id;
      if (frame.user_id) this.userId = frame.user_id;
      if (frame.state === "processing_ready") {
        this.attempt = 0;
        // A different epoch is a different stream (the server restarted or forgot it).
        const epochChanged = this.epoch !== null && this.epoch !== frame.epoch;
        this.epoch = frame.epoch;
        // `runs`: the user's runs in progress as of `last_seq` (docs/conversations.md); a page
        // that joins one shows it from there and applies only its events after `last_seq`.
        const resume = { complete: true, ...frame.resume, epochChanged, lastSeq: frame.last_seq, runs: frame.runs || [] };
        if (!resume.complete) {
          // Something was lost for good (history too short, or a new stream after a restart):
          // what follows is every event the server still has; the view starts over from it.
          this.lastSeq = 0;
        }
        this.dispatchEvent(new CustomEvent("resume", { detail: resume }));
      }
      this.#setState(frame.state, { connectionId: frame.connection_id });
      return;
    }
    if (typeof frame.seq === "number") {
      if (frame.seq <= this.lastSeq) return; // already seen
      this.lastSeq = frame.seq;
      this.dispatchEvent(new CustomEvent("event", { detail: frame }));
      return;
    }
    this.dispatchEvent(new CustomEvent("frame", { detail: frame }));
  }

  #onClose(ws, code, reason) {
    if (ws !== this.ws) return;
    this.ws = null;
    if (this.stopped) return;
    if (FINAL_CODES.has(code)) {
      this.#setState("closed", { code, reason, final: true });
      return;
    }
    const delay = Math.min(this.maxBackoffMs, this.backoffMs * 2 ** this.attempt) * (0.5 + Math.random() / 2);
    this.attempt += 1;
    this.#setState("reconnecting", { code, reason, retryInMs: Math.round(delay) });
    this.retryTimer = setTimeout(() => this.connect(), delay);
  }
}

// A one-line, human-readable account of an AG-UI event that reached the stream as an
// `agent_event` pass-through (docs/agents.md): steps, state, activity, custom events. Events
// with a native mapping never arrive this way.
export function describeAgUiEvent(event) {
  const e = event || {};
  const json = (value) => {
    const text = JSON.stringify(value);
    return text && text.length > 160 ? `${text.slice(0, 157)}…` : text;
  };
  switch (e.type) {
    case "STEP_STARTED":
      return `step started: ${e.stepName}`;
    case "STEP_FINISHED":
      return `step finished: ${e.stepName}`;
    case "STATE_SNAPSHOT":
      return `state: ${json(e.snapshot)}`;
    case "STATE_DELTA":
      return `state changed: ${(e.delta || []).map((op) => `${op.op} ${op.path}`).join(", ")}`;
    case "MESSAGES_SNAPSHOT":
      return `messages snapshot: ${(e.messages || []).length} messages`;
    case "ACTIVITY_SNAPSHOT":
    case "ACTIVITY_DELTA":
      return `activity (${e.activityType || "update"}): ${json(e.content ?? e.patch)}`;
    case "CUSTOM":
      return `${e.name}: ${json(e.value)}`;
    case "RAW":
      return `raw${e.source ? ` from ${e.source}` : ""}: ${json(e.event)}`;
    default: {
      const { type, timestamp, rawEvent, ...rest } = e;
      return `${String(type || "event").toLowerCase().replaceAll("_", " ")}: ${json(rest)}`;
    }
  }
}
