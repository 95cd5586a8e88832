// The agentwire chat page. Everything it shows is derived from the user's event stream, so two
// tabs of one user show the same conversation, and a reconnect that resumes with `last_seq`
// neither duplicates nor loses anything.

import { AgentwireClient, describeAgUiEvent, describeClose } from "./agentwire-client.js";

const $ = (id) => document.getElementById(id);
const STATE_LABELS = {
  disconnected: "signed out",
  connecting: "connecting",
  accepted: "accepted",
  authenticated: "authenticated",
  services_ready: "services ready",
  processing_ready: "ready",
};
const STORAGE_KEY = "agentwire.session";

let client = null;
let devTokens = true;
let signedInAs = null;
let currentThread = null;
const threads = new Map(); // thread id -> { id, title, items: [item] }
const runs = new Map(); // run id -> run
const pendingByClientId = new Map(); // client_msg_id -> user item not yet echoed

// ----- sign in ---------------------------------------------------------------------------------

async function probeDevTokens() {
  // GET /client.json always answers 200 and says whether dev sign-in is on.
  const response = await fetch("/client.json");
  const info = response.ok ? await response.json() : { dev_tokens: false };
  devTokens = info.dev_tokens === true;
  $("dev-signin").hidden = !devTokens;
  $("jwt-signin").hidden = devTokens;
  $("user-name").required = devTokens;
}

async function mintDevToken(user) {
  const response = await fetch("/dev/token", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ sub: user }),
  });
  const body = await response.json();
  if (!response.ok) throw new Error(body.message || `HTTP ${response.status}`);
  return body.token;
}

function storage(remember) {
  return remember ? window.localStorage : window.sessionStorage;
}

async function onSignIn(event) {
  event.preventDefault();
  $("signin-error").textContent = "";
  try {
    const user = $("user-name").value.trim();
    const token = devTokens ? await mintDevToken(user) : $("jwt").value.trim();
    if (!token) throw new Error("paste a token first");
    const remember = $("remember").checked;
    storage(remember).setItem(STORAGE_KEY, JSON.stringify({ token, user: devTokens ? user : null }));
    start(token, devTokens ? user : null);
  } catch (error) {
    $("signin-error").textContent = `Could not sign in: ${error.message}`;
  }
}

function signOut() {
  window.localStorage.removeItem(STORAGE_KEY);
  window.sessionStorage.removeItem(STORAGE_KEY);
  if (client) client.close();
  client = null;
  threads.clear();
  runs.clear();
  pendingByClientId.clear();
  currentThread = null;
  $("chat").hidden = true;
  $("signin").hidden = false;
  $("sign-out").hidden = true;
  $("who").textContent = "";
  showStatus("disconnected", {});
}

function start(token, user) {
  signedInAs = user;
  $("signin").hidden = true;
  $("chat").hidden = false;
  $("sign-out").hidden = false;
  $("who").textContent = user || "";
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  client = new AgentwireClient({ url: `${scheme}://${location.host}/ws`, token });
  client.addEventListener("state", (e) => showStatus(e.detail.state, e.detail));
  client.addEventListener("resume", (e) => onResume(e.detail));
  client.addEventListener("event", (e) => onEvent(e.detail));
  client.addEventListener("frame", (e) => onFrame(e.detail));
  showStatus("connecting", {});
  client.connect();
  $("input").focus();
}

// ----- connection state ------------------------------------------------------------------------

function showStatus(state, detail) {
  const dot = $("status-dot");
  dot.className = "dot";
  let text = STATE_LABELS[state] || state;
  if (state === "processing_ready") {
    dot.classList.add("ready");
    if (client && client.userId) $("who").textContent = client.userId;
  } else if (state === "reconnecting") {
    dot.classList.add("down");
    text = `reconnecting (${describeClose(detail.code)}) in ${(detail.retryInMs / 1000).toFixed(1)} s`;
  } else if (state === "closed") {
    dot.classList.add("down");
    text = `disconnected: ${describeClose(detail.code)}`;
    if ([4001, 4003].includes(detail.code)) text += " (sign in again)";
  } else if (state !== "disconnected") {
    dot.classList.add("setup");
  }
  $("status-text").textContent = text;
  document.body.dataset.connection = state;
  if (detail.code) {
    // The close codes seen, newest last: the status line only shows the latest.
    const seen = (document.body.dataset.closeCodes || "").split(" ").filter(Boolean);
    document.body.dataset.closeCodes = [...seen, detail.code].slice(-10).join(" ");
  }
}

function onResume(resume) {
  const notice = $("notice");
  if (resume.complete) {
    notice.hidden = true;
    return;
  }
  if (resume.epochChanged) {
    // A new stream: nothing replayed can overlap what is shown, so the view stays.
    notice.textContent =
      "The server restarted and could not keep its history: what you see was received before. " +
      "New messages continue below.";
  } else {
    // Events were lost from this stream: rebuild the view from what the server still has.
    threads.clear();
    runs.clear();
    notice.textContent =
      "Some earlier events are no longer available on the server. " +
      "The conversation below is rebuilt from what it still has.";
  }
  notice.hidden = false;
  renderThreads();
  renderMessages();
}

// ----- the stream ------------------------------------------------------------------------------

function thread(id) {
  if (!threads.has(id)) threads.set(id, { id, title: "New thread", items: [] });
  return threads.get(id);
}

function run(runId, threadId) {
  if (!runs.has(runId)) {
    const entry = { kind: "run", runId, threadId, thinking: "", steps: [], tools: new Map(), answer: "", status: "running" };
    runs.set(runId, entry);
    thread(threadId).items.push(entry);
  }
  return runs.get(runId);
}

function onEvent(event) {
  const p = event.payload || {};
  if (!currentThread) {
    // A new tab follows the conversation it joins.
    currentThread = event.thread_id;
    thread(currentThread);
    renderThreads();
  }
  if (event.type === "user_message") {
    const t = thread(event.thread_id);
    if (t.title === "New thread") t.title = p.content.slice(0, 40);
    const pending = p.client_msg_id && pendingByClientId.get(p.client_msg_id);
    if (pending) {
      pendingByClientId.delete(p.client_msg_id);
      pending.pending = false;
      pending.messageId = p.message_id;
    } else {
      t.items.push({ kind: "user", messageId: p.message_id, content: p.content, pending: false });
    }
    renderThreads();
  } else {
    const r = run(event.run_id, event.thread_id);
    switch (event.type) {
      case "agent_started":
        r.agent = p.agent;
        break;
      case "agent_thinking":
        // The demo thinks in one piece; AG-UI agents stream their reasoning in deltas.
        r.thinking += p.text;
        break;
      case "agent_event":
        r.steps.push(describeAgUiEvent(p.ag_ui));
        break;
      case "tool_executing":
        r.tools.set(p.tool_call_id, { tool: p.tool, args: p.args, done: false });
        break;
      case "tool_completed":
        r.tools.set(p.tool_call_id, { ...(r.tools.get(p.tool_call_id) || {}), tool: p.tool, ok: p.ok, result: p.result, durationMs: p.duration_ms, done: true });
        break;
      case "agent_message_chunk":
        r.answer += p.delta;
        break;
      case "agent_completed":
        r.status = p.status;
        r.durationMs = p.duration_ms;
        if (!r.answer && p.response) r.answer = p.response.content || "";
        break;
      case "agent_error":
        r.status = "error";
        r.error = `${p.code}: ${p.message}`;
        break;
    }
  }
  if (event.thread_id === currentThread) renderMessages();
  updateCancel();
}

function onFrame(frame) {
  if (frame.type === "error") {
    const where = currentThread ? thread(currentThread) : null;
    const text = `${frame.message}${frame.ref ? ` (${frame.ref})` : ""}`;
    if (where) where.items.push({ kind: "system", text: `Error ${frame.code}: ${text}` });
    renderMessages();
  } else if (frame.type === "token_expiring" && devTokens && signedInAs) {
    mintDevToken(signedInAs).then((token) => client && client.refreshToken(token)).catch(() => {});
  }
}

// ----- rendering -------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function renderThreads() {
  const list = $("thread-list");
  list.replaceChildren(
    ...[...threads.values()].map((t) => {
      const button = el("button", { type: "button", textContent: t.title, title: t.title });
      button.setAttribute("aria-current", String(t.id === currentThread));
      button.addEventListener("click", () => selectThread(t.id));
      return el("li", {}, button);
    }),
  );
}

const openTools = new Set(); // tool call ids the user expanded; kept across re-renders

function renderRun(r) {
  const tools = [...r.tools.entries()].map(([id, call]) => {
    const summary = `${call.done ? (call.ok ? "✓" : "✗") : "…"} ${call.tool}(${JSON.stringify(call.args)})`;
    const details = el(
      "details",
      { "data-tool-call": id },
      el("summary", { textContent: summary }),
      el("pre", { textContent: `arguments: ${JSON.stringify(call.args, null, 2)}` }),
      call.done ? el("pre", { textContent: `result (${call.durationMs} ms): ${JSON.stringify(call.result, null, 2)}` }) : null,
    );
    details.open = openTools.has(id);
    details.addEventListener("toggle", () => (details.open ? openTools.add(id) : openTools.delete(id)));
    return details;
  });
  let meta = "running…";
  if (r.status === "ok") meta = `completed in ${r.durationMs} ms`;
  if (r.status === "cancelled") meta = "cancelled";
  if (r.status === "error") meta = `failed: ${r.error}`;
  return el(
    "li",
    { class: "msg run", "data-run": r.runId, "data-status": r.status },
    r.thinking ? el("p", { class: "thinking", textContent: r.thinking }) : null,
    r.steps.length ? el("ul", { class: "steps" }, ...r.steps.map((step) => el("li", { textContent: step }))) : null,
    ...tools,
    el("div", { class: "answer", textContent: r.answer }),
    el("div", { class: `meta${r.status === "error" ? " bad" : ""}`, textContent: meta }),
  );
}

function renderMessages() {
  const list = $("messages");
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  const items = currentThread ? thread(currentThread).items : [];
  list.replaceChildren(
    ...items.map((item) => {
      if (item.kind === "user") {
        return el("li", { class: `msg user${item.pending ? " pending" : ""}`, textContent: item.content });
      }
      if (item.kind === "system") return el("li", { class: "msg system", role: "alert", textContent: item.text });
      return renderRun(item);
    }),
  );
  if (atBottom) list.scrollTop = list.scrollHeight;
}

function runningRun() {
  return [...runs.values()].reverse().find((r) => r.threadId === currentThread && r.status === "running");
}

function updateCancel() {
  $("cancel").hidden = !runningRun();
}

function newThreadId() {
  return `t-${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`;
}

function selectThread(id) {
  currentThread = id;
  thread(id);
  renderThreads();
  renderMessages();
  updateCancel();
}

// ----- actions ---------------------------------------------------------------------------------

function send(event) {
  event.preventDefault();
  const input = $("input");
  const content = input.value.trim();
  if (!content || !client) return;
  if (!currentThread) selectThread(newThreadId());
  const clientMsgId = client.sendMessage(currentThread, content);
  if (!clientMsgId) {
    thread(currentThread).items.push({ kind: "system", text: "Not connected: the message was not sent." });
    renderMessages();
    return;
  }
  const item = { kind: "user", content, pending: true };
  pendingByClientId.set(clientMsgId, item);
  const t = thread(currentThread);
  if (t.title === "New thread") t.title = content.slice(0, 40);
  t.items.push(item);
  input.value = "";
  renderThreads();
  renderMessages();
}

function cancel() {
  const r = runningRun();
  if (r && client) client.cancelRun(r.runId);
}

window.addEventListener("DOMContentLoaded", async () => {
  $("signin-form").addEventListener("submit", onSignIn);
  $("sign-out").addEventListener("click", signOut);
  $("composer").addEventListener("submit", send);
  $("cancel").addEventListener("click", cancel);
  $("new-thread").addEventListener("click", () => {
    selectThread(newThreadId());
    $("input").focus();
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) send(e);
  });
  await probeDevTokens();
  const saved = window.sessionStorage.getItem(STORAGE_KEY) || window.localStorage.getItem(STORAGE_KEY);
  if (saved) {
    const { token, user } = JSON.parse(saved);
    start(token, user);
  }
  document.body.dataset.loaded = "true";
});
