//! The Lua scripts of the Redis broker: each call of the broker is one script, so each is one
//! round trip and atomic in Redis (docs/scale-out.md: "one round trip per publish").
//!
//! Each is sent by its SHA1 (`EVALSHA`), not its text: Redis keeps the scripts it was given by
//! `SCRIPT LOAD`, and the writer loads them again when Redis answers `NOSCRIPT` (a restarted or
//! flushed Redis; `connection.rs`). A 1-event publish sends its frame and keys, not 1.3 KB of Lua.
//!
//! Keys of one user share the hash tag `{user}`, so a Redis Cluster keeps them on one shard.
//! Events are kept in a Redis Stream whose entry ids are `<seq>-1`, so a range of seqs is an
//! `XRANGE`; the stream's `seq` and `epoch` live in the user's `meta` hash.

use std::sync::LazyLock;

/// A script: its text, for `SCRIPT LOAD`, and the SHA1 it is called by.
pub struct Lua {
    pub code: String,
    pub sha: String,
}

impl Lua {
    fn new(code: String) -> Lua {
        let sha = redis::Script::new(&code).get_hash().to_owned();
        Lua { code, sha }
    }
}

/// Appends events: ensures the epoch, assigns seqs, `XADD`s each frame (the frame is the
/// caller's head + seq + tail), follows the runs in progress (`follow`), trims the stream,
/// refreshes the TTL, and publishes the batch to the user's channel as
/// `epoch \n first_seq \n frame \n frame...`.
/// KEYS: meta, stream, live, holders, runs, reaped. ARGV: channel, epoch if new, maxlen, ttl ms, max run
/// text, count, owner (this node's `id@generation` when the events are of its own runs, else
/// ""), then head, tail, op, run, data per event.
/// Returns {epoch, first_seq}, or {"fenced", run} (nothing appended).
const APPEND: &str = r#"
-- The runs in progress, as of the stream's last seq, for a tab that joins one on any node
-- (docs/conversations.md, "Joining a run in progress"): a set of run ids, and per run a hash
-- (thread, started seq, truncated), its text and thinking (APPENDed: no copy per chunk) and
-- its tool calls and results in order. Ops: s start, c text, k thinking, x tool call,
-- r tool result, e end.
local function follow(live, holders, op, run, data, seq, max, ttl)
  if op == '' then return end
  local base = live .. ':' .. run
  if op == 'e' then
    -- The run's end is on the stream: its thread is free for the next run (`CLAIM`).
    if redis.call('HGET', holders, data) == run then redis.call('HDEL', holders, data) end
    redis.call('SREM', live, run)
    redis.call('DEL', base, base .. ':content', base .. ':thinking', base .. ':tools')
    return
  end
  if op == 's' then
    redis.call('SADD', live, run)
    redis.call('HSET', base, 'thread_id', data, 'started_seq', seq)
  elseif redis.call('EXISTS', base) == 0 then
    return
  elseif op == 'c' or op == 'k' then
    -- A joining tab is shown the last agent.max_response_bytes of each (the reader cuts them);
    -- past twice that, the front is dropped in one go, on a character's boundary.
    local key = base .. (op == 'c' and ':content' or ':thinking')
    local len = redis.call('APPEND', key, data)
    if len > 2 * max then
      local kept = redis.call('GETRANGE', key, len - max, -1)
      local from = 1
      while from <= #kept do
        local b = string.byte(kept, from)
        if b < 128 or b >= 192 then break end
        from = from + 1
      end
      redis.call('SET', key, string.sub(kept, from))
      redis.call('HSET', base, 'truncated', '1')
    end
    redis.call('PEXPIRE', key, ttl)
  else
    redis.call('RPUSH', base .. ':tools', op .. data)
    redis.call('PEXPIRE', base .. ':tools', ttl)
  end
  redis.call('PEXPIRE', base, ttl)
  redis.call('PEXPIRE', live, ttl)
  -- A run going on keeps its thread's claim (`CLAIM`) as long as the stream.
  redis.call('PEXPIRE', holders, ttl)
end

-- Fencing (docs/scale-out.md): a run taken over from a node that was gone (ended `node_lost`
-- by another, `REAP_RUN`) leaves a tombstone naming that node (generation included) in the
-- user's `reaped` hash; events of the run from that node are refused from then on. A node that
-- was paused past its lease appends nothing more of its runs. (A run merely unknown, after Redis
-- lost its data, is not fenced.) Returns the first fenced run, or nil.
local function fenced(reaped, owner, count, at)
  if owner == '' then return nil end
  for i = 0, count - 1 do
    local run = ARGV[at + 5 * i + 3]
    if run ~= '' and redis.call('HGET', reaped, run) == owner then return run end
  end
  return nil
end

local function append(meta, stream, live, holders, channel, new_epoch, maxlen, ttl, max, count, at)
  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then
    epoch = new_epoch
    redis.call('HSET', meta, 'epoch', epoch)
  end
  local last = redis.call('HINCRBY', meta, 'seq', count)
  local first = last - count + 1
  local frames = {}
  for i = 0, count - 1 do
    local seq = string.format('%d', first + i)
    local n = at + 5 * i
    local frame = ARGV[n] .. seq .. ARGV[n + 1]
    frames[#frames + 1] = frame
    redis.call('XADD', stream, 'MAXLEN', maxlen, seq .. '-1', 'f', frame)
    follow(live, holders, ARGV[n + 2], ARGV[n + 3], ARGV[n + 4], seq, max, ttl)
  end
  redis.call('PEXPIRE', meta, ttl)
  redis.call('PEXPIRE', stream, ttl)
  redis.call('PUBLISH', channel, epoch .. '\n' .. string.format('%d', first) .. '\n' .. table.concat(frames, '\n'))
  return {epoch, first}
end
"#;

pub static APPEND_EVENTS: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(format!(
        "{APPEND}
local lost = fenced(KEYS[6], ARGV[7], tonumber(ARGV[6]), 8)
if lost then return {{'fenced', lost}} end
local r = append(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), 8)
-- A run's end takes its record with it, in the same step: no reaper can end it again.
for i = 0, tonumber(ARGV[6]) - 1 do
  if ARGV[8 + 5 * i + 2] == 'e' then redis.call('HDEL', KEYS[5], ARGV[8 + 5 * i + 3]) end
end
return {{r[1], string.format('%d', r[2])}}"
    ))
});

/// `APPEND_EVENTS` once per key of the user (`Broker::publish_once`): a key seen before answers
/// the seqs it was given then and appends nothing. KEYS: those of `APPEND_EVENTS`, then dedupe
/// hash, dedupe order list. ARGV: those of `APPEND_EVENTS` up to owner, then key, dedupe cap,
/// then the events. Returns {"again", "first count"} or {epoch, first_seq}.
pub static PUBLISH_ONCE: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(format!(
        "{APPEND}
local id = 'publish:' .. ARGV[8]
local seen = redis.call('HGET', KEYS[7], id)
if seen then return {{'again', seen}} end
local lost = fenced(KEYS[6], ARGV[7], tonumber(ARGV[6]), 10)
if lost then return {{'fenced', lost}} end
local r = append(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), 10)
for i = 0, tonumber(ARGV[6]) - 1 do
  if ARGV[10 + 5 * i + 2] == 'e' then redis.call('HDEL', KEYS[5], ARGV[10 + 5 * i + 3]) end
end
redis.call('HSET', KEYS[7], id, string.format('%d', r[2]) .. ' ' .. ARGV[6])
redis.call('RPUSH', KEYS[8], id)
while redis.call('LLEN', KEYS[8]) > tonumber(ARGV[9]) do
  redis.call('HDEL', KEYS[7], redis.call('LPOP', KEYS[8]))
end
redis.call('PEXPIRE', KEYS[7], ARGV[4])
redis.call('PEXPIRE', KEYS[8], ARGV[4])
return {{r[1], string.format('%d', r[2])}}"
    ))
});

/// A `user_message`: appended unless its `client_msg_id` was seen, and remembered with its ids.
/// The run it starts is recorded as its node's (`owner`), as `RUN_STARTED` does, and claims its
/// thread, as `CLAIM` does, in the same step.
/// KEYS: meta, stream, dedupe hash, dedupe order list, live, holders, runs. ARGV: channel, epoch if new,
/// maxlen, ttl ms, client_msg_id or "", message_id, run_id, dedupe cap, head, tail, then an
/// empty op, run and data (an echo follows no run), then the call's attempt id, the owner
/// (this node's member, or "" when it starts no run) and the thread.
/// Returns {"seen", "message_id run_id seq attempt"} or {"appended", epoch, seq, holder}: the
/// thread's holder when another run holds it, "" when the run does (or starts none).
pub static SUBMIT: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(format!(
        "{APPEND}
local cmid = ARGV[5]
if cmid ~= '' then
  local seen = redis.call('HGET', KEYS[3], cmid)
  if seen then return {{'seen', seen}} end
end
local r = append(KEYS[1], KEYS[2], KEYS[5], KEYS[6], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 0, 1, 9)
if cmid ~= '' then
  redis.call('HSET', KEYS[3], cmid, ARGV[6] .. ' ' .. ARGV[7] .. ' ' .. string.format('%d', r[2]) .. ' ' .. ARGV[14])
  redis.call('RPUSH', KEYS[4], cmid)
  while redis.call('LLEN', KEYS[4]) > tonumber(ARGV[8]) do
    redis.call('HDEL', KEYS[3], redis.call('LPOP', KEYS[4]))
  end
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
  redis.call('PEXPIRE', KEYS[4], ARGV[4])
end
local claim = ''
if ARGV[15] ~= '' then
  redis.call('HSET', KEYS[7], ARGV[7], ARGV[15] .. '\\n' .. ARGV[16])
  redis.call('PEXPIRE', KEYS[7], ARGV[4])
  -- The run claims its thread as `CLAIM` does, in the same step: one round trip a message.
  local holder = redis.call('HGET', KEYS[6], ARGV[16])
  if holder and holder ~= ARGV[7] and redis.call('HEXISTS', KEYS[7], holder) == 1 then
    claim = holder
  else
    redis.call('HSET', KEYS[6], ARGV[16], ARGV[7])
    redis.call('PEXPIRE', KEYS[6], ARGV[4])
  end
end
return {{'appended', r[1], string.format('%d', r[2]), claim}}"
    ))
});

/// A session attaching: the stream's epoch (made when new) and last seq, the first seq still
/// kept, the runs in progress as of that seq, and the kept frames after `after` (0: all).
/// KEYS: meta, stream, live. ARGV: epoch if new, ttl ms, after.
/// Returns {epoch, last_seq, oldest_seq or "", {run, thread, started_seq, truncated, content,
/// thinking, {tool...}}..., frames...} with the runs in one table.
pub static ATTACH: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[1], 'epoch', epoch)
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local last = redis.call('HGET', KEYS[1], 'seq') or '0'
local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
local runs = {}
for _, run in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  local base = KEYS[3] .. ':' .. run
  local meta = redis.call('HMGET', base, 'thread_id', 'started_seq', 'truncated')
  if meta[1] then
    runs[#runs + 1] = {run, meta[1], meta[2], meta[3] or '',
      redis.call('GET', base .. ':content') or '', redis.call('GET', base .. ':thinking') or '',
      redis.call('LRANGE', base .. ':tools', 0, -1)}
  end
end
local reply = {epoch, last, '', runs}
if #oldest > 0 then
  reply[3] = string.match(oldest[1][1], '^(%d+)')
end
local entries = redis.call('XRANGE', KEYS[2], '(' .. ARGV[3] .. '-1', '+')
for _, entry in ipairs(entries) do
  reply[#reply + 1] = entry[2][2]
end
return reply
"#
        .to_owned(),
    )
});

/// The kept events from `from` on (up to `to`, when given: a resume's replay ends at the seq
/// its attach read, the live events take over from there), for filling a gap.
/// KEYS: stream. ARGV: from, to or "". Returns {seq, frame, seq, frame...}.
pub static RANGE: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
local reply = {}
local to = '+'
if ARGV[2] and ARGV[2] ~= '' then to = ARGV[2] .. '-1' end
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], ARGV[1] .. '-1', to)) do
  reply[#reply + 1] = string.match(entry[1], '^(%d+)')
  reply[#reply + 1] = entry[2][2]
end
return reply
"#
        .to_owned(),
    )
});

/// A session against the user's cap across all nodes, recorded for the connections API (its
/// node's set, for the reaper, is written before it, by its own command: a Redis Cluster keeps
/// it in another slot). KEYS: sessions hash. ARGV: session, record, cap, ttl ms. Returns 1
/// (admitted) or 0.
pub static ADMIT: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"#
        .to_owned(),
    )
});

/// A session given back. The last one leaving starts the stream's TTL: a stream never expires
/// while a session on any node has it (`KEEP`), and its TTL counts from the later of its last
/// event and its last session leaving (docs/scale-out.md).
/// (The node's set lets go of it after, by its own command.)
/// KEYS: sessions hash, meta, stream, dedupe, dedupe order. ARGV: session, ttl ms.
pub static LEAVE: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('HLEN', KEYS[1]) == 0 then
  for i = 2, 5 do redis.call('PEXPIRE', KEYS[i], ARGV[2]) end
end
return 1
"#
        .to_owned(),
    )
});

/// A user with sessions on this node: their stream, dedupe and session slots are kept a TTL
/// longer (sent every quarter TTL). KEYS: sessions hash, meta, stream, dedupe, dedupe order.
/// ARGV: ttl ms.
pub static KEEP: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
for i = 1, 5 do redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
return 1
"#
        .to_owned(),
    )
});

/// A run started on this node: its owner and thread in the user's runs (the node's set, for the
/// reaper, is written before it by its own command). KEYS: runs hash. ARGV: run, node, thread,
/// ttl ms.
pub static RUN_STARTED: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '\n' .. ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"#
        .to_owned(),
    )
});

/// A run of a thread may start: the thread's holder is the run whose events it carries now
/// (`agent.on_busy` across nodes, docs/conversations.md). Free, or held by a run that no node runs
/// any more (its record gone), it is taken, and the run recorded as `RUN_STARTED` does, in the
/// same step (so no other node's claim can find the holder without its record); else the holder
/// is answered. The holder lets go when its run's terminal event is appended (`follow`).
/// (The node's set, for the reaper, is written before it by its own command; a claim refused
/// leaves a member there that the reaper finds no record for.)
/// KEYS: holders hash, runs hash. ARGV: thread, run, ttl ms, node. Returns "" (taken) or the
/// holder's run id.
pub static CLAIM: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
local holder = redis.call('HGET', KEYS[1], ARGV[1])
if holder and holder ~= ARGV[2] and redis.call('HEXISTS', KEYS[2], holder) == 1 then
  return holder
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[4] .. '\n' .. ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return ''
"#
        .to_owned(),
    )
});

/// A run ended (its node's set lets go of it after, by its own command). KEYS: runs hash.
/// ARGV: run.
pub static RUN_ENDED: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"#
        .to_owned(),
    )
});

/// The node that runs a run, for a cancel sent to its control channel (by the caller: the
/// channel is no key of this slot). KEYS: runs hash. ARGV: run. Returns the owner or "".
pub static CANCEL_ELSEWHERE: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
local owner = redis.call('HGET', KEYS[1], ARGV[1])
if not owner then return '' end
return string.match(owner, '^(.-)\n') or ''
"#
        .to_owned(),
    )
});

/// This node is alive, and what nodes that are not left behind is handed to this caller: their
/// runs, to end each with `agent_error` `node_lost` (`REAP_RUN`), and their session slots, to
/// free (`REAP_SESSION`); both are scripts of the user's own slot, so a Redis Cluster runs them.
/// Every key here is of the node registry (hash tag `{nodes}`, one slot). A node is a member
/// `id@generation`: a process restarted under the same `node_id` is a new member and takes over
/// its previous generation at once, without waiting for its lease. A node that is no longer a
/// member was reaped while it was away (paused past its lease; a tombstone says so) is fenced,
/// and stops; one that is not a member without a tombstone (Redis lost its data) joins again.
/// KEYS: nodes set. ARGV: prefix, this member, lease ms, this node_id.
/// Returns {"fenced"} or {"ok", {member, node...}, {member, node...}}: each left run
/// (`user\nrun\nthread`) and session (`user\nsession`) of a dead node, with that node.
pub static HEARTBEAT: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
local nodes, prefix, me, lease, id = KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local function key(node, what) return prefix .. ':{nodes}:' .. node .. ':' .. what end
-- Reaped while it was away: fenced, whatever the registry says now.
if redis.call('EXISTS', key(me, 'reaped')) == 1 then return {'fenced'} end
-- Not reaped but not a member: Redis lost the registry (restarted empty); it joins again.
redis.call('SADD', nodes, me)
redis.call('SET', key(me, 'alive'), '1', 'PX', lease)
-- Nothing of a deployment outlives its last node for long: every beat pushes these back.
local keep = tonumber(lease) * 12
local reaping = prefix .. ':{nodes}:reaping'
redis.call('PEXPIRE', nodes, keep)
redis.call('PEXPIRE', key(me, 'runs'), keep)
redis.call('PEXPIRE', key(me, 'sessions'), keep)
for _, node in ipairs(redis.call('SMEMBERS', nodes)) do
  local earlier = string.sub(node, 1, #id + 1) == id .. '@'
  if node ~= me and (earlier or redis.call('EXISTS', key(node, 'alive')) == 0) then
    redis.call('SET', key(node, 'reaped'), '1', 'PX', keep)
    redis.call('DEL', key(node, 'alive'))
    redis.call('SREM', nodes, node)
    redis.call('SADD', reaping, node)
  end
end
-- What the dead left is handed out at every beat until the callers have taken it all over
-- (each taken over is removed from the dead node's sets by the caller, after it is done): a
-- reap that failed (Redis away a moment) is tried again, by whichever node beats next.
redis.call('PEXPIRE', reaping, keep)
local runs, sessions = {}, {}
for _, node in ipairs(redis.call('SMEMBERS', reaping)) do
  local left_runs = redis.call('SMEMBERS', key(node, 'runs'))
  local left_sessions = redis.call('SMEMBERS', key(node, 'sessions'))
  -- Kept while its tombstone lasts: what a fenced node writes late (before it stops) is
  -- still taken over.
  if #left_runs == 0 and #left_sessions == 0 and redis.call('EXISTS', key(node, 'reaped')) == 0 then
    redis.call('SREM', reaping, node)
  end
  for _, member in ipairs(left_runs) do
    runs[#runs + 1] = member
    runs[#runs + 1] = node
  end
  for _, member in ipairs(left_sessions) do
    sessions[#sessions + 1] = member
    sessions[#sessions + 1] = node
  end
  redis.call('PEXPIRE', key(node, 'runs'), keep)
  redis.call('PEXPIRE', key(node, 'sessions'), keep)
end
return {'ok', runs, sessions}
"#
        .to_owned(),
    )
});

/// This node, registered before it serves: a node killed before its first beat is still reaped.
/// KEYS: nodes set. ARGV: prefix, this member, lease ms.
pub static REGISTER: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
redis.call('SADD', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 12)
redis.call('SET', ARGV[1] .. ':{nodes}:' .. ARGV[2] .. ':alive', '1', 'PX', ARGV[3])
return 1
"#
        .to_owned(),
    )
});

/// A run of a node that is gone, ended in one step: its record goes, its thread is let go, and
/// its `agent_error` `node_lost` is appended, only if the dead node still owns it (so a run is
/// ended once, and never after its own end). The events are the append script's.
pub static REAP_RUN: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(format!(
        "{APPEND}
local record = redis.call('HGET', KEYS[5], ARGV[8])
if not record or string.sub(record, 1, #ARGV[9] + 1) ~= ARGV[9] .. '\\n' then return {{}} end
redis.call('HDEL', KEYS[5], ARGV[8])
-- Recorded again by its fenced node after it was ended (a late claim): ended once only.
if redis.call('HEXISTS', KEYS[6], ARGV[8]) == 1 then return {{}} end
redis.call('HSET', KEYS[6], ARGV[8], ARGV[9])
redis.call('PEXPIRE', KEYS[6], ARGV[4])
local r = append(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), 10)
return {{r[1], string.format('%d', r[2])}}"
    ))
});

/// The scripts that publish, as a Redis Cluster needs them: sharded Pub/Sub (`SPUBLISH`, Redis 7),
/// whose channel lives in the slot of the user's keys.
fn sharded(script: &Lua) -> Lua {
    Lua::new(script.code.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',"))
}

pub static APPEND_EVENTS_SHARDED: LazyLock<Lua> = LazyLock::new(|| sharded(&APPEND_EVENTS));
pub static PUBLISH_ONCE_SHARDED: LazyLock<Lua> = LazyLock::new(|| sharded(&PUBLISH_ONCE));
pub static SUBMIT_SHARDED: LazyLock<Lua> = LazyLock::new(|| sharded(&SUBMIT));
pub static REAP_RUN_SHARDED: LazyLock<Lua> = LazyLock::new(|| sharded(&REAP_RUN));

/// The scripts that publish, for one Redis (`PUBLISH`) or a Redis Cluster (`SPUBLISH`).
#[derive(Clone, Copy)]
pub struct Publishing {
    pub append_events: &'static Lua,
    pub publish_once: &'static Lua,
    pub submit: &'static Lua,
    pub reap_run: &'static Lua,
}

impl Publishing {
    pub fn new(cluster: bool) -> Publishing {
        if cluster {
            Publishing {
                append_events: &APPEND_EVENTS_SHARDED,
                publish_once: &PUBLISH_ONCE_SHARDED,
                submit: &SUBMIT_SHARDED,
                reap_run: &REAP_RUN_SHARDED,
            }
        } else {
            Publishing {
                append_events: &APPEND_EVENTS,
                publish_once: &PUBLISH_ONCE,
                submit: &SUBMIT,
                reap_run: &REAP_RUN,
            }
        }
    }
}

/// Every script the writer calls, loaded when it connects (`connection.rs`): a call's first
/// `EVALSHA` finds its script, so only a Redis that lost them (restarted, flushed) answers
/// `NOSCRIPT`, and an answer that times out was never a refusal in disguise.
pub fn all() -> [&'static Lua; 18] {
    [
        &APPEND_EVENTS,
        &PUBLISH_ONCE,
        &SUBMIT,
        &APPEND_EVENTS_SHARDED,
        &PUBLISH_ONCE_SHARDED,
        &SUBMIT_SHARDED,
        &REAP_RUN_SHARDED,
        &ATTACH,
        &RANGE,
        &ADMIT,
        &LEAVE,
        &KEEP,
        &RUN_STARTED,
        &CLAIM,
        &RUN_ENDED,
        &CANCEL_ELSEWHERE,
        &REGISTER,
        &REAP_RUN,
    ]
}
