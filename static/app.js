// The agentwire chat page. The sidebar lists the user's threads from the store
// (`GET /api/v1/threads`, docs/conversations.md); an open thread shows its stored messages
// (`GET /api/v1/threads/{id}/messages`) with what the user's event stream adds live. Every tab of
// the user sees every event, so two tabs show the same conversations and the same sidebar, and a
// reconnect that resumes with `last_seq` neither duplicates nor loses anything. A run in progress
// when the page (re)connects is shown from `processing_ready.runs` and continued by its live
// events.

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
const THREADS_PAGE = 50;
const MESSAGES_PAGE = 100;

let client = null;
let devTokens = true;
let signedInAs = null;
let currentThread = null;
// Until the user opens a thread (or the first listing opens one), a new tab follows the
// conversation whose events it sees first.
let autoFollow = true;
let listLoaded = false; // the first page of threads was answered (or failed)
let threadsNext = null; // the cursor of the next page of threads; null: none
let readyOnce = false; // processing_ready was reached once since sign-in
let epochNo = 0; // stream epochs seen: seqs of a later epoch order after those of an earlier one
let lastSeen = 0; // the newest seq seen in this epoch
// Events up to this seq were replayed as history when the page (re)built its view: the store's
// listing, asked for after them, already has what they did to the sidebar.
let historyUpTo = 0;
const threads = new Map(); // thread id -> thread (see thread())
const deleted = new Set(); // threads deleted while this page is open
const runs = new Map(); // run id -> run item
const pendingByClientId = new Map(); // client_msg_id -> user item not yet echoed
const sentByThisTab = new Set(); // message ids of this tab's messages: their runs' frontend tools run here
const answeredCalls = new Set(); // frontend tool calls this tab answered
const answeredInterrupts = new Set(); // interrupts this tab answered

// The page's frontend tools (docs/agents.md, v2): declared with every message, run in the
// browser when the agent calls one (`tool_executing` with `client_tool: true`), answered with a
// `tool_result`. One small example: the user's local time, which only the browser knows.
const FRONTEND_TOOLS = {
  get_local_time: {
    description: "The user's local date, time and time zone, as their browser knows them",
    parameters: { type: "object", properties: {} },
    run: () => {
      const zone = Intl.DateTimeFormat().resolvedOptions().timeZone;
      return `${new Date().toLocaleString()} (${zone})`;
    },
  },
};
const TOOL_DECLARATIONS = Object.entries(FRONTEND_TOOLS).map(([name, tool]) => ({
  name,
  description: tool.description,
  parameters: tool.parameters,
}));

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

function resetState() {
  threads.clear();
  deleted.clear();
  runs.clear();
  pendingByClientId.clear();
  rows.clear();
  openTools.clear();
  $("thread-list").replaceChildren();
  currentThread = null;
  autoFollow = true;
  listLoaded = false;
  threadsNext = null;
  readyOnce = false;
  epochNo = 0;
  lastSeen = 0;
  historyUpTo = 0;
}

function signOut() {
  window.localStorage.removeItem(STORAGE_KEY);
  window.sessionStorage.removeItem(STORAGE_KEY);
  if (client) client.close();
  client = null;
  resetState();
  setHash(null);
  $("notice").hidden = true;
  renderThreads();
  renderMessages();
  $("chat").hidden = true;
  $("signin").hidden = false;
  $("sign-out").hidden = true;
  $("who").textContent = "";
  showStatus("disconnected", {});
}

function start(token, user) {
  signedInAs = user;
  resetState();
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

// ----- the threads API -------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super((body && (body.message || body.error)) || `HTTP ${status}`);
    this.status = status;
  }
}

// A request with the user's JWT. A dev token that expired is minted again once.
async function api(path, { method = "GET", body } = {}, retried = false) {
  if (!client) throw new ApiError(0, { message: "signed out" });
  const headers = { authorization: `Bearer ${client.token}` };
  if (body !== undefined) headers["content-type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (response.status === 401 && !retried && devTokens && signedInAs) {
    const token = await mintDevToken(signedInAs);
    if (!client) throw new ApiError(0, { message: "signed out" });
    client.refreshToken(token);
    return api(path, { method, body }, true);
  }
  const answer = response.status === 204 ? null : await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, answer);
  return answer;
}

const threadPath = (id) => `/api/v1/threads/${encodeURIComponent(id)}`;

function showNotice(text) {
  const notice = $("notice");
  notice.textContent = text;
  notice.hidden = false;
}

// The first page of threads (`more`: the next one). A listing merges into what the page knows:
// events may have told it newer things while the request was on its way.
async function loadThreads(more = false) {
  const query = `?limit=${THREADS_PAGE}${more && threadsNext ? `&before=${encodeURIComponent(threadsNext)}` : ""}`;
  const asked = client;
  const listed = new Set();
  try {
    const page = await api(`/api/v1/threads${query}`);
    if (client !== asked) return listed;
    for (const view of page.threads) {
      if (deleted.has(view.thread_id)) continue;
      const t = thread(view.thread_id);
      t.inStore = true;
      t.shown = true;
      t.listedRunning = view.running;
      t.interrupts = view.interrupted ? view.interrupts || [] : [];
      setTitle(t, view.title, view.updated_at);
      touch(t, view.updated_at);
      listed.add(view.thread_id);
    }
    threadsNext = page.next || null;
    // The open thread, chosen before the store said it has it.
    const open = currentThread && threads.get(currentThread);
    if (open && listed.has(open.id) && !open.stored && !open.loading) loadMessages(open.id);
  } catch (error) {
    if (client !== asked) return listed;
    showNotice(`Could not load the conversations: ${error.message}`);
  }
  if (!more) {
    listLoaded = true;
    openFirst();
  }
  renderThreads();
  return listed;
}

// A fresh page opens the thread named in the address, else the most recent one.
function openFirst() {
  if (currentThread || !autoFollow) return;
  const wanted = hashThread();
  const top = sortedThreads()[0];
  if (wanted && !deleted.has(wanted)) selectThread(wanted);
  else if (top) selectThread(top.id);
}

// The stored messages of a thread (`older`: the page before those loaded).
async function loadMessages(id, older = false) {
  const t = thread(id);
  if (t.loading) return;
  t.loading = true;
  if (id === currentThread) renderMessages();
  const before = older && t.storedNext ? `&before=${encodeURIComponent(t.storedNext)}` : "";
  const asked = client;
  try {
    const page = await api(`${threadPath(id)}/messages?limit=${MESSAGES_PAGE}${before}`);
    if (client !== asked) return;
    t.storedMessages = older ? [...page.messages, ...t.storedMessages] : page.messages;
    t.stored = storedItems(t.storedMessages, id);
    t.storedNext = page.next || null;
  } catch (error) {
    if (client !== asked) return;
    if (error.status === 404) {
      if (!t.stored) t.stored = [];
    } else if (id === currentThread) {
      showNotice(`Could not load this conversation: ${error.message}`);
    }
  } finally {
    t.loading = false;
  }
  if (id === currentThread) renderMessages();
}

// Stored messages (AG-UI shape, oldest first) as the page's items: a user message each, and one
// run item for what each run produced (its text, its tool calls with their results).
function storedItems(messages, threadId) {
  const items = [];
  let current = null;
  for (const m of messages) {
    if (m.role === "user") {
      items.push({ kind: "user", messageId: m.id, content: textOf(m.content), stored: true });
      current = null;
      continue;
    }
    // A frontend tool's result (a turn of its own) belongs with the call an earlier run made.
    const caller = m.role === "tool" && items.find((item) => item.kind === "run" && item.tools.has(m.toolCallId));
    if (caller && caller !== current) {
      const call = caller.tools.get(m.toolCallId);
      caller.tools.set(m.toolCallId, { ...call, done: true, result: parseMaybe(textOf(m.content)) });
      continue;
    }
    const runId = m.run_id || `stored-${m.id}`;
    if (!current || current.runId !== runId) {
      current = newRunItem(runId, threadId, 0);
      current.status = "ok";
      current.stored = true;
      items.push(current);
    }
    if (m.run_status) current.status = m.run_status;
    if (m.role === "assistant") {
      current.answer += textOf(m.content);
      for (const call of m.toolCalls || []) {
        const fn = call.function || {};
        current.tools.set(call.id, { tool: fn.name, args: parseMaybe(fn.arguments), done: false });
      }
    } else if (m.role === "tool") {
      const call = current.tools.get(m.toolCallId) || { tool: "tool", args: undefined };
      current.tools.set(m.toolCallId, { ...call, done: true, result: parseMaybe(textOf(m.content)) });
    } else {
      current.steps.push(`${m.role}: ${textOf(m.content)}`);
    }
  }
  return items;
}

function textOf(content) {
  if (typeof content === "string") return content;
  if (Array.isArray(content)) return content.map((part) => (part && part.text) || "").join("");
  return content == null ? "" : JSON.stringify(content);
}

function parseMaybe(text) {
  if (typeof text !== "string") return text;
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

// The thread's interrupts as the store has them (`GET /api/v1/threads/{id}`).
async function refreshInterrupts(id) {
  const asked = client;
  try {
    const view = await api(threadPath(id));
    if (client !== asked) return;
    thread(id).interrupts = view.interrupted ? view.interrupts || [] : [];
    if (id === currentThread) renderMessages();
  } catch {
    // A thread the store does not have waits for nothing.
  }
}

async function renameThread(id, title) {
  try {
    const view = await api(threadPath(id), { method: "PATCH", body: { title } });
    const t = threads.get(id);
    if (t) {
      setTitle(t, view.title, view.updated_at);
      touch(t, view.updated_at);
    }
  } catch (error) {
    showNotice(`Could not rename the conversation: ${error.message}`);
  }
  renderThreads();
}

async function deleteThread(id) {
  const t = threads.get(id);
  if (!window.confirm(`Delete “${titleOf(t)}”? Its messages are deleted too.`)) return;
  try {
    await api(threadPath(id), { method: "DELETE" });
    removeThread(id);
  } catch (error) {
    if (error.status === 404) removeThread(id);
    else showNotice(`Could not delete the conversation: ${error.message}`);
  }
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

// Every processing_ready: the first of a page, a resume after a drop, or a new stream.
function onResume(resume) {
  const first = !readyOnce;
  readyOnce = true;
  let rebuild = false;
  if (resume.epochChanged) {
    // A new stream: its seqs start over, after everything seen so far.
    epochNo += 1;
    lastSeen = 0;
    for (const r of runs.values()) r.after = 0;
  }
  if (first) {
    // Nothing shown yet: the store has the conversations, what the stream replays only adds to
    // them (even when it could not replay everything).
  } else if (resume.complete) {
    $("notice").hidden = true;
  } else if (resume.epochChanged) {
    // A new stream: nothing replayed can overlap what is shown, so the view stays.
    showNotice(
      "The server restarted and could not keep its event history: what you see was received before. " +
        "New messages continue below.",
    );
    rebuild = true;
  } else {
    // Events were lost from this stream: rebuild the view from the store and what the stream
    // still has. Messages not yet echoed stay.
    for (const t of threads.values()) t.live = t.live.filter((item) => item.pending);
    runs.clear();
    showNotice(
      "Some earlier events are no longer available on the server. " +
        "The conversation below is rebuilt from what it still has.",
    );
    rebuild = true;
  }
  // Runs in progress: shown as they are at `last_seq`, then continued by their events after it.
  // A run this page already follows is continued by the replay instead.
  for (const snapshot of resume.runs || []) {
    if (resume.complete && !first && runs.has(snapshot.run_id)) continue;
    joinRun(snapshot, resume.lastSeq);
  }
  // The sidebar comes from the store, asked once the stream is attached, so that the listing
  // has everything the replayed events did: those only add to the conversations' items.
  historyUpTo = first || rebuild ? resume.lastSeq : 0;
  if (first) loadThreads();
  if (rebuild) {
    loadThreads().then((listed) => {
      if (currentThread && listed.has(currentThread)) loadMessages(currentThread);
    });
  }
  renderThreads();
  renderMessages();
  updateCancel();
}

function joinRun(snapshot, lastSeq) {
  if (deleted.has(snapshot.thread_id)) return;
  const r = run(snapshot.run_id, snapshot.thread_id, order(snapshot.started_seq || lastSeq));
  r.thinking = snapshot.thinking || "";
  // Past agent.max_response_bytes the snapshot holds the answer's last part: the live events
  // carry on from it (docs/conversations.md, "Joining a run in progress").
  r.answer = (snapshot.truncated ? "…" : "") + (snapshot.content || "");
  r.tools = new Map(
    (snapshot.tool_calls || []).map((call) => [
      call.tool_call_id,
      { tool: call.tool, args: call.args, done: "result" in call, result: call.result },
    ]),
  );
  r.status = "running";
  r.truncated = snapshot.truncated === true;
  r.after = lastSeq;
  r.joined = true;
  r.whole = true;
}

// ----- the stream ------------------------------------------------------------------------------

function order(seq) {
  return epochNo * 1e10 + seq;
}

function thread(id) {
  if (!threads.has(id)) {
    threads.set(id, {
      id,
      title: null, // the store's title, once known
      titleAt: -1, // updated_at of the title
      updatedAt: 0,
      shown: false, // in the sidebar: it has a message, or the store lists it
      inStore: false, // the store has it (listed, or told by thread_updated)
      fresh: false, // made by "New chat" on this page: nothing stored yet
      listedRunning: null,
      live: [], // items this page saw on the stream (or sent), in any order; see viewItems()
      stored: null, // items from the store, oldest first; null: not loaded
      storedMessages: [],
      storedNext: null,
      loading: false,
    });
  }
  return threads.get(id);
}

function setTitle(t, title, at) {
  if (title && at >= t.titleAt) {
    t.title = title;
    t.titleAt = at;
  }
}

// A thread was updated at `at`; `show`: it belongs in the sidebar (if not there yet).
function touch(t, at, show = true) {
  if (typeof at === "number" && at > t.updatedAt) t.updatedAt = at;
  if (show) t.shown = true;
}

// A title until the store's arrives: its rule (white space collapsed, 80 characters at most).
function provisionalTitle(content) {
  const text = content.replace(/\s+/g, " ").trim();
  const chars = [...text];
  return chars.length > 80 ? `${chars.slice(0, 79).join("")}…` : text;
}

function titleOf(t) {
  return (t && t.title) || "New chat";
}

function newRunItem(runId, threadId, at) {
  return { kind: "run", runId, threadId, at, thinking: "", steps: [], tools: new Map(), answer: "", status: "running", after: 0 };
}

function run(runId, threadId, at) {
  if (!runs.has(runId)) {
    const entry = newRunItem(runId, threadId, at);
    runs.set(runId, entry);
    thread(threadId).live.push(entry);
  }
  return runs.get(runId);
}

function removeThread(id) {
  deleted.add(id);
  threads.delete(id);
  for (const [runId, r] of runs) if (r.threadId === id) runs.delete(runId);
  if (id === currentThread) {
    currentThread = null;
    setHash(null);
    showNotice("This conversation was deleted.");
    renderMessages();
    updateCancel();
  }
  renderThreads();
}

function onEvent(event) {
  const p = event.payload || {};
  lastSeen = event.seq;
  const at = order(event.seq);
  const live = event.seq > historyUpTo;
  if (event.type === "thread_updated") {
    const id = p.thread_id || event.thread_id;
    deleted.delete(id);
    const t = thread(id);
    t.inStore = true;
    setTitle(t, p.title, p.updated_at);
    touch(t, p.updated_at, live);
    renderThreads();
    return;
  }
  if (event.type === "thread_deleted") {
    const id = p.thread_id || event.thread_id;
    if (threads.has(id) || !deleted.has(id)) removeThread(id);
    return;
  }
  // Nothing else that belongs to no run (a kind this page does not know) shows as an empty run,
  // and nothing of a deleted thread (its cancelled run's end) brings it back.
  if (event.type !== "user_message" && !event.run_id) return;
  if (deleted.has(event.thread_id)) return;
  if (!currentThread && autoFollow && listLoaded) {
    // A new tab with no stored conversation follows the one it joins.
    selectThread(event.thread_id);
  }
  const t = thread(event.thread_id);
  // The run that goes on from this tab's answer (a tool's result, an interrupt's) is this tab's
  // too: a frontend tool it calls runs here.
  if (event.type === "user_message" && (answeredCalls.has(p.tool_call_id) || answeredInterrupts.has(p.interrupt_id))) {
    sentByThisTab.add(p.message_id);
  }
  if (event.type === "user_message" && p.role === "tool") {
    // A frontend tool's result: shown with its call, not as the user's words.
    for (const r of runs.values()) {
      const call = r.threadId === event.thread_id && r.tools.get(p.tool_call_id);
      if (call) r.tools.set(p.tool_call_id, { ...call, done: true, ok: true, result: parseMaybe(p.content) });
    }
    if (event.thread_id === currentThread) renderMessages();
    return;
  }
  if (event.type === "user_message" && p.interrupt_id) {
    // The interrupt is answered (from this tab or another): the question goes.
    t.interrupts = (t.interrupts || []).filter((i) => i.id !== p.interrupt_id);
  }
  if (event.type === "user_message") {
    touch(t, event.ts, live);
    if (!t.title) setTitle(t, provisionalTitle(p.content), -1);
    const pending = p.client_msg_id && pendingByClientId.get(p.client_msg_id);
    if (pending) {
      pendingByClientId.delete(p.client_msg_id);
      sentByThisTab.add(p.message_id);
      pending.pending = false;
      pending.messageId = p.message_id;
      pending.at = at;
    } else if (!t.live.some((item) => item.kind === "user" && item.messageId === p.message_id)) {
      t.live.push({ kind: "user", messageId: p.message_id, content: p.content, pending: false, at });
    }
    renderThreads();
  } else {
    const r = run(event.run_id, event.thread_id, at);
    // A run joined from processing_ready.runs already shows its events up to `after`.
    if (event.seq <= r.after) return;
    switch (event.type) {
      case "agent_started":
        r.agent = p.agent;
        r.whole = true; // seen from its start
        r.messageId = p.message_id;
        break;
      case "agent_thinking":
        // The demo thinks in one piece; AG-UI agents stream their reasoning in deltas.
        r.thinking += p.text;
        break;
      case "agent_event":
        r.steps.push(describeAgUiEvent(p.ag_ui));
        break;
      case "tool_executing":
        r.tools.set(p.tool_call_id, { tool: p.tool, args: p.args, done: false, client: !!p.client_tool });
        if (p.client_tool && live) runFrontendTool(r, event.thread_id, p);
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
        // A run that stopped to ask leaves its questions on the thread until they are answered;
        // one that answered and was cancelled leaves them too (the store says which).
        if (p.status === "interrupted") t.interrupts = p.interrupts || [];
        else if (p.status === "ok") t.interrupts = [];
        else refreshInterrupts(event.thread_id);
        break;
      case "agent_error":
        r.status = "error";
        r.error = `${p.code}: ${p.message}`;
        refreshInterrupts(event.thread_id);
        break;
    }
    if (event.type === "agent_started" || event.type === "agent_completed" || event.type === "agent_error") {
      // The store moves a thread up when its run ends; the sidebar shows which ones run.
      if (event.type !== "agent_started") touch(t, event.ts, live);
      renderThreads();
    }
  }
  if (event.thread_id === currentThread) renderMessages();
  updateCancel();
}

function onFrame(frame) {
  if (frame.type === "error") {
    const text = `${frame.message}${frame.ref ? ` (${frame.ref})` : ""}`;
    if (currentThread) addSystem(currentThread, `Error ${frame.code}: ${text}`);
    // The thread waits for an answer this page may not show yet: ask the store.
    if (frame.code === "thread_interrupted" && currentThread) refreshInterrupts(currentThread);
  } else if (frame.type === "token_expiring" && devTokens && signedInAs) {
    mintDevToken(signedInAs).then((token) => client && client.refreshToken(token)).catch(() => {});
  }
}

// Runs a frontend tool the agent called and sends its result, from the tab whose message started
// the run only (every tab sees the call; one answer is wanted).
function runFrontendTool(r, threadId, p) {
  const tool = FRONTEND_TOOLS[p.tool];
  if (!tool || !sentByThisTab.has(r.messageId) || answeredCalls.has(p.tool_call_id) || !client) return;
  answeredCalls.add(p.tool_call_id);
  let content;
  try {
    content = tool.run(p.args);
  } catch (error) {
    content = `the tool failed: ${error.message}`;
  }
  if (!client.send({ type: "tool_result", thread_id: threadId, tool_call_id: p.tool_call_id, content, tools: TOOL_DECLARATIONS })) {
    answeredCalls.delete(p.tool_call_id);
  }
}

// The questions an interrupted run asked (docs/agents.md, v2): its options as buttons, else a
// text answer; the answer goes as `resume_run`.
function renderInterrupt(threadId, interrupt) {
  const value = interrupt.value;
  const question =
    (value && typeof value === "object" && (value.question || value.message || value.prompt)) ||
    (typeof value === "string" ? value : JSON.stringify(value));
  const box = el("li", { class: "msg interrupt", "data-interrupt": interrupt.id });
  const answer = (answerValue) => {
    const frame = { type: "resume_run", thread_id: threadId, interrupt_id: interrupt.id, value: answerValue, tools: TOOL_DECLARATIONS };
    if (!client || !client.send(frame)) return;
    answeredInterrupts.add(interrupt.id);
    // One answer: the controls go quiet until the echo takes the question away.
    for (const control of box.querySelectorAll("button, input")) control.disabled = true;
  };
  const options = value && Array.isArray(value.options) ? value.options : null;
  let controls;
  if (options) {
    controls = options.map((option) => {
      const button = el("button", { type: "button", class: "secondary", textContent: String(option) });
      button.dataset.option = String(option);
      button.addEventListener("click", () => answer(option));
      return button;
    });
  } else {
    const input = el("input", { type: "text", "aria-label": "Your answer" });
    const button = el("button", { type: "button", textContent: "Answer" });
    button.addEventListener("click", () => input.value.trim() && answer(input.value.trim()));
    controls = [input, button];
  }
  box.append(el("p", { class: "question", textContent: question }), el("div", { class: "options" }, ...controls));
  return box;
}

function addSystem(threadId, text) {
  thread(threadId).live.push({ kind: "system", text, at: order(lastSeen) + 0.5 });
  renderMessages();
}

// ----- what a thread shows ---------------------------------------------------------------------

function keyOf(item) {
  if (item.kind === "user" && item.messageId) return `m:${item.messageId}`;
  if (item.kind === "run") return `r:${item.runId}`;
  return null;
}

// The stored items in the store's order, each replaced by the page's own when it saw it live
// from its start (that one has the thinking and the durations; a run whose start was no longer
// in the replayed history is the store's), then what the store does not have yet (a run in
// progress, a message on its way) in stream order. A note (an error) stays after the item it
// followed.
function viewItems(t) {
  const live = [...t.live].sort((a, b) => a.at - b.at);
  if (!t.stored) return live;
  const storedKeys = new Set(t.stored.map(keyOf).filter(Boolean));
  const firstAnchor = live.find((item) => storedKeys.has(keyOf(item)));
  const liveByKey = new Map();
  const after = new Map(); // stored key -> live items that came after it
  const end = [];
  let slot = end;
  for (const item of live) {
    const key = keyOf(item);
    if (key && storedKeys.has(key)) {
      item.inStore = true;
      if (item.kind !== "run" || item.whole) liveByKey.set(key, item);
      if (!after.has(key)) after.set(key, []);
      slot = after.get(key);
    } else if (key) {
      // Older than the stored messages loaded so far: "Load earlier messages" brings it.
      if (t.storedNext && firstAnchor && item.at < firstAnchor.at) continue;
      end.push(item);
      slot = end;
    } else {
      slot.push(item);
    }
  }
  const items = [];
  for (const s of t.stored) {
    const key = keyOf(s);
    items.push(liveByKey.get(key) || s);
    items.push(...(after.get(key) || []));
  }
  items.push(...end);
  return items;
}

// ----- rendering -------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-") || key.startsWith("aria-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function sortedThreads() {
  return [...threads.values()]
    .filter((t) => t.shown)
    .sort((a, b) => b.updatedAt - a.updatedAt || (a.id < b.id ? 1 : a.id > b.id ? -1 : 0));
}

function threadRunning(t) {
  for (const r of runs.values()) if (r.threadId === t.id && r.status === "running") return true;
  return Boolean(t.listedRunning && !runs.has(t.listedRunning));
}

// The sidebar, updated in place: an entry moves only when its place changes, so one being
// renamed keeps its field and focus while others move around it.
const rows = new Map(); // thread id -> li

function renderThreads() {
  const list = $("thread-list");
  const sorted = sortedThreads();
  const wanted = new Set(sorted.map((t) => t.id));
  for (const [id, li] of rows) {
    if (!wanted.has(id)) {
      li.remove();
      rows.delete(id);
    }
  }
  sorted.forEach((t, index) => {
    let li = rows.get(t.id);
    if (!li) {
      li = threadRow(t.id);
      rows.set(t.id, li);
    }
    updateRow(li, t);
    const there = list.children[index];
    if (there !== li) list.insertBefore(li, there || null);
  });
  $("more-threads").hidden = !threadsNext;
  $("no-threads").hidden = sorted.length > 0 || !listLoaded;
}

function threadRow(id) {
  const open = el("button", { type: "button", class: "thread-title" });
  open.addEventListener("click", () => selectThread(id));
  const rename = el("button", { type: "button", class: "thread-action rename", textContent: "✎", title: "Rename", "aria-label": "Rename" });
  rename.addEventListener("click", () => startRename(id));
  const remove = el("button", { type: "button", class: "thread-action delete", textContent: "✕", title: "Delete", "aria-label": "Delete" });
  remove.addEventListener("click", () => deleteThread(id));
  const li = el("li", { "data-thread": id }, open, rename, remove);
  // The title button is out of the row while the title is being edited.
  li.parts = { open, rename, remove };
  return li;
}

function updateRow(li, t) {
  const title = titleOf(t);
  const { open, rename, remove } = li.parts;
  if (open.textContent !== title) open.textContent = title;
  open.title = title;
  open.setAttribute("aria-current", String(t.id === currentThread));
  li.dataset.current = String(t.id === currentThread);
  li.dataset.running = String(threadRunning(t));
  rename.setAttribute("aria-label", `Rename “${title}”`);
  remove.setAttribute("aria-label", `Delete “${title}”`);
}

// Rename in place: Enter (or leaving the field) saves, Escape does not.
function startRename(id) {
  const li = rows.get(id);
  const t = threads.get(id);
  if (!li || !t || li.querySelector(".thread-rename")) return;
  const { open } = li.parts;
  const input = el("input", { class: "thread-rename", value: titleOf(t), maxLength: 200, "aria-label": "New title" });
  let done = false;
  const finish = (save) => {
    if (done) return;
    done = true;
    const title = input.value.trim();
    input.replaceWith(open);
    if (save && title && title !== titleOf(threads.get(id))) renameThread(id, title);
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") {
      e.preventDefault();
      finish(true);
    } else if (e.key === "Escape") {
      e.preventDefault();
      finish(false);
      open.focus();
    }
  });
  input.addEventListener("blur", () => finish(true));
  open.replaceWith(input);
  input.focus();
  input.select();
}

const openTools = new Set(); // tool call ids the user expanded; kept across re-renders

function renderRun(r) {
  const tools = [...r.tools.entries()].map(([id, call]) => {
    // A stored result does not say whether the tool failed; its text does.
    const summary = `${call.done ? (call.ok === false ? "✗" : "✓") : "…"} ${call.tool}(${JSON.stringify(call.args)})`;
    const took = call.durationMs != null ? ` (${call.durationMs} ms)` : "";
    const details = el(
      "details",
      { "data-tool-call": id },
      el("summary", { textContent: summary }),
      el("pre", { textContent: `arguments: ${JSON.stringify(call.args, null, 2)}` }),
      call.done ? el("pre", { textContent: `result${took}: ${JSON.stringify(call.result, null, 2)}` }) : null,
    );
    details.open = openTools.has(id);
    details.addEventListener("toggle", () => (details.open ? openTools.add(id) : openTools.delete(id)));
    return details;
  });
  let meta = "running…";
  if (r.status === "ok") meta = r.durationMs != null ? `completed in ${r.durationMs} ms` : "completed";
  if (r.status === "cancelled") meta = "cancelled";
  if (r.status === "interrupted") meta = "interrupted";
  if (r.status === "error") meta = r.error ? `failed: ${r.error}` : "failed";
  if (r.truncated) meta += " (its beginning is not shown: it was too long to keep)";
  const attrs = { class: "msg run", "data-run": r.runId, "data-status": r.status };
  if (r.joined) attrs["data-joined"] = "true";
  if (r.stored || r.inStore) attrs["data-stored"] = "true";
  return el(
    "li",
    attrs,
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
  const t = currentThread ? threads.get(currentThread) : null;
  const rendered = (t ? viewItems(t) : []).map((item) => {
    if (item.kind === "user") {
      const attrs = { class: `msg user${item.pending ? " pending" : ""}`, textContent: item.content };
      if (item.stored || item.inStore) attrs["data-stored"] = "true";
      return el("li", attrs);
    }
    if (item.kind === "system") return el("li", { class: "msg system", role: "alert", textContent: item.text });
    return renderRun(item);
  });
  if (t && t.storedNext) {
    const older = el("button", { type: "button", class: "secondary", id: "older", textContent: "Load earlier messages" });
    older.addEventListener("click", () => loadMessages(t.id, true));
    rendered.unshift(el("li", { class: "older" }, older));
  }
  if (t && t.loading) rendered.unshift(el("li", { class: "loading", textContent: "Loading the conversation…" }));
  for (const interrupt of (t && t.interrupts) || []) rendered.push(renderInterrupt(t.id, interrupt));
  list.replaceChildren(...rendered);
  list.dataset.thread = currentThread || "";
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

function hashThread() {
  const match = /^#thread=(.+)$/.exec(location.hash);
  if (!match) return null;
  try {
    return decodeURIComponent(match[1]);
  } catch {
    return null;
  }
}

function setHash(id) {
  const url = id ? `#thread=${encodeURIComponent(id)}` : `${location.pathname}${location.search}`;
  history.replaceState(null, "", url);
}

function selectThread(id, { fresh = false } = {}) {
  currentThread = id;
  autoFollow = false;
  const t = thread(id);
  if (fresh) {
    t.fresh = true;
    t.stored = [];
  } else if (!t.stored && !t.loading) {
    // Only a thread the store may have is asked for: a 404 is an error in the page's console.
    if (t.inStore || threadsNext) loadMessages(id);
    else if (listLoaded) t.stored = [];
  }
  setHash(id);
  $("notice").hidden = true;
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
  if (!currentThread) selectThread(newThreadId(), { fresh: true });
  const clientMsgId = client.sendMessage(currentThread, content, { tools: TOOL_DECLARATIONS });
  if (!clientMsgId) {
    addSystem(currentThread, "Not connected: the message was not sent.");
    return;
  }
  const item = { kind: "user", content, pending: true, at: order(lastSeen) + 0.5 };
  pendingByClientId.set(clientMsgId, item);
  const t = thread(currentThread);
  if (!t.title) setTitle(t, provisionalTitle(content), -1);
  // To the top of the sidebar at once; the echo's time follows.
  const newest = Math.max(0, ...[...threads.values()].map((other) => other.updatedAt));
  touch(t, Math.max(t.updatedAt, newest + 1));
  t.live.push(item);
  input.value = "";
  renderThreads();
  renderMessages();
}

function cancel() {
  const r = runningRun();
  if (r && client) client.cancelRun(r.runId);
}

function newChat() {
  selectThread(newThreadId(), { fresh: true });
  $("input").focus();
}

window.addEventListener("DOMContentLoaded", async () => {
  $("signin-form").addEventListener("submit", onSignIn);
  $("sign-out").addEventListener("click", signOut);
  $("composer").addEventListener("submit", send);
  $("cancel").addEventListener("click", cancel);
  $("new-thread").addEventListener("click", newChat);
  $("more-threads").addEventListener("click", () => loadThreads(true));
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
