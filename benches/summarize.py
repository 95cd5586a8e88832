#!/usr/bin/env python3
"""Turns the load test reports of benches/run.sh (target/bench/*.json) into BENCHMARKS.md."""

import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import datetime, timezone

out_dir, reps = sys.argv[1], int(sys.argv[2])


def reports(name):
    runs = []
    for rep in range(1, reps + 1):
        path = os.path.join(out_dir, f"{name}.{rep}.json")
        if os.path.exists(path):
            with open(path) as f:
                runs.append(json.load(f))
    return runs


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def get(report, *path):
    for key in path:
        if report is None:
            return None
        report = report.get(key)
    return report


def fmt(value, digits=1, unit=""):
    if value is None:
        return "–"
    if isinstance(value, float) and value >= 1000:
        return f"{value:,.0f}{unit}"
    return f"{value:,.{digits}f}{unit}"


def machine():
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    nofile = subprocess.run(["sh", "-c", "ulimit -Hn"], capture_output=True, text=True).stdout.strip()
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": mem_kb / 1024 / 1024,
        "kernel": platform.release(),
        "nofile": nofile,
    }


commands = {}
with open(os.path.join(out_dir, "commands.txt")) as f:
    for line in f:
        name, args = line.rstrip("\n").split("|", 1)
        commands[name] = args

m = machine()
lines = []
w = lines.append
w("# agentwire benchmarks")
w("")
w(f"Written by `benches/run.sh` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Every figure is the")
w(f"median of {reps} runs, each against a freshly started release server on 127.0.0.1.")
w("")
w(f"**Machine:** {m['cores']} cores ({m['cpu']}), {m['memory_gib']:.0f} GiB memory, Linux {m['kernel']},")
w(f"open-files hard limit {m['nofile']} per process. **The server and the load generator share")
w("these cores**: every figure below is for both running at once, so the server alone goes further.")
w("The machine is shared and noisy; medians and ratios are what to compare.")
w("")
w("Server settings for every run: `RUST_LOG=warn`, `agent.step_delay_ms = 0`,")
w("`limits.max_connections = 19800`, `limits.max_sessions_per_user = 1000`,")
w("`limits.max_outbound_bytes = 16 MiB` (fan-out bursts of 2,000 events), everything else default.")
w("")


def scenario(name, title, rows):
    runs = reports(name)
    if not runs:
        return None
    w(f"## {title}")
    w("")
    w(f"`agentwire loadtest {commands.get(name, '')}`")
    w("")
    w("| figure | median | runs |")
    w("| --- | --- | --- |")
    medians = {}
    for label, path, digits, unit in rows:
        values = [get(r, *path) for r in runs]
        med = median(values)
        medians[label] = med
        w(f"| {label} | {fmt(med, digits, unit)} | {', '.join(fmt(v, digits) for v in values)} |")
    failures = sum(sum(r["failed"].values()) for r in runs)
    correctness = [r["correctness"] for r in runs]
    dirty = sum(sum(c.values()) for c in correctness)
    w(f"| failed sessions (all runs) | {failures} | |")
    w(f"| correctness counters (all runs, sum) | {dirty} | |")
    w("")
    return medians


ready = ("sessions ready", ("ready",), 0, "")
rate = ("sessions/s to processing_ready", ("sessions_per_sec",), 0, "")
connect_p99 = ("connect to ready p99 (ms)", ("connect_to_ready", "p99_ms"), 1, "")
rss_session = ("server RSS per ready session (KB)", ("server", "rss_per_session_kb"), 1, "")
rss_ready = ("server RSS, all ready (MB)", ("server", "rss_ready_mb"), 1, "")
cpu_connect = ("server CPU to connect all (s)", ("server", "cpu_connect_secs"), 2, "")
events_s = ("frames delivered per second", ("events_per_sec",), 0, "")
delivery_p50 = ("publish to delivery p50 (ms)", ("delivery", "p50_ms"), 2, "")
delivery_p99 = ("publish to delivery p99 (ms)", ("delivery", "p99_ms"), 2, "")
cpu_scenario = ("server CPU in the scenario (s)", ("server", "cpu_scenario_secs"), 2, "")
scenario_secs = ("scenario wall time (s)", ("scenario_secs",), 2, "")

idle10 = scenario("idle-10k", "1. Idle: 10,000 sessions (1,000 users)",
                  [ready, rate, connect_p99, rss_session, rss_ready, cpu_connect])
idle19 = scenario("idle-19k", "1. Idle: 19,000 sessions (2,000 users, 20 source addresses)",
                  [ready, rate, connect_p99, rss_session, rss_ready, cpu_connect])
fan1 = scenario("fanout-1x1000", "2. Fan-out: one user with 1,000 sessions, 2,000 events (batches of 100)",
                [events_s, delivery_p50, delivery_p99, cpu_scenario, scenario_secs])
fan2 = scenario("fanout-10000x1", "2. Fan-out: 10,000 users with one session each, 200 events each",
                [events_s, delivery_p50, delivery_p99, cpu_scenario, scenario_secs])
paced = scenario("paced-1x1000", "2. Paced delivery: one user with 1,000 sessions, 50 events/s for 10 s",
                 [events_s, delivery_p50, delivery_p99, cpu_scenario])
chat = scenario("chat-10000", "3. Chat: 10,000 sessions over 2,500 users, 5 messages each",
                [ready, events_s, ("ack p50 (ms)", ("ack", "p50_ms"), 1, ""),
                 ("message to completed p50 (ms)", ("message_to_completed", "p50_ms"), 1, ""),
                 ("message to completed p99 (ms)", ("message_to_completed", "p99_ms"), 1, ""),
                 cpu_scenario, scenario_secs])


def hostile_section():
    base, unauth, mix = reports("hostile-baseline"), reports("hostile-unauth-1000"), reports("hostile-mix")
    if not base:
        return {}
    w("## 4. Hostile clients: real users' chats while other connections attack")
    w("")
    w("100 real sessions over 25 users send 3 messages each to the demo agent at its real pace")
    w("(`agent.step_delay_ms = 120`, about 1 s a run), 2 s after the attacks began; the server")
    w("has the default `limits.max_outbound_bytes` (1 MiB) here. Commands:")
    w("")
    for name in ("hostile-baseline", "hostile-unauth-1000", "hostile-mix"):
        w(f"- {name}: `agentwire loadtest {commands.get(name, '')}`")
    w("")
    p = lambda r, q: get(r, "message_to_completed", q)
    growth = lambda r: (max(mb for _, mb in r["rss_timeline"]) - r["server"]["rss_ready_mb"]) if r.get("rss_timeline") else None
    w("| figure | unloaded | 1,000 unauthenticated senders | every attack at once |")
    w("| --- | --- | --- | --- |")
    figures = {}
    for label, fn, digits in [
        ("message to agent_completed p50 (ms)", lambda r: p(r, "p50_ms"), 0),
        ("message to agent_completed p99 (ms)", lambda r: p(r, "p99_ms"), 0),
        ("server RSS growth, peak over all-ready (MB)", growth, 1),
        ("server CPU in the scenario (s)", lambda r: get(r, "server", "cpu_scenario_secs"), 2),
        ("error frames to real users (all runs)", lambda r: r["error_frames"], 0),
    ]:
        row = [median([fn(r) for r in runs]) if runs else None for runs in (base, unauth, mix)]
        if label.startswith("error"):
            row = [sum(fn(r) for r in runs) if runs else None for runs in (base, unauth, mix)]
        figures[label] = row
        w(f"| {label} | " + " | ".join(fmt(v, digits) for v in row) + " |")
    w("")
    for title, runs in (("1,000 unauthenticated senders", unauth), ("every attack at once", mix)):
        if not runs:
            continue
        w(f"How the server ended each attack's attempts ({title}, all runs; `open_at_end`: still")
        w("going when the scenario ended):")
        w("")
        w("| attack | attempts, by how they ended |")
        w("| --- | --- |")
        totals = {}
        for r in runs:
            for attack, endings in r.get("attacks", {}).items():
                for how, n in endings.items():
                    totals.setdefault(attack, {}).setdefault(how, 0)
                    totals[attack][how] += n
        for attack, endings in totals.items():
            w(f"| {attack} | " + ", ".join(f"{n:,} x {how}" for how, n in sorted(endings.items())) + " |")
        w("")
    if unauth and unauth[0].get("rss_timeline"):
        w("Server RSS over the first run with 1,000 unauthenticated senders (s: MB): " +
          ", ".join(f"{t:.0f}: {mb:.0f}" for t, mb in unauth[0]["rss_timeline"][::2]))
        w("")
    return figures


hostile = hostile_section()


def agents_section():
    unloaded, loaded = reports("agents-unloaded"), reports("agents-loaded")
    if not unloaded or not loaded:
        return {}
    opened = reports("agents-open")
    w("## 6. AG-UI agents: upstream work never blocks the registry")
    w("")
    w("`agent.kind = \"ag-ui\"` against `examples/bench_agent.rs`, which answers at once (a tool call")
    w("and three text chunks) unless the message says \"slow\", then holds the run open 10 s. 1,000")
    w("sessions over 250 users chat (5 messages each, a ping with each), first alone, then while")
    w("1,000 other users' runs are all open on the same agent (counted by the agent before the")
    w("measured chat starts and after it ends). Commands:")
    w("")
    for name in ("agents-unloaded", "agents-loaded"):
        w(f"- {name}: `agentwire loadtest {commands.get(name, '')}`")
    w("")
    w("| figure | unloaded | 1,000 runs of 10 s open | ratio |")
    w("| --- | --- | --- | --- |")
    figures = {}
    for label, path, digits in [
        ("ack p50 (ms)", ("ack", "p50_ms"), 1),
        ("ack p99 (ms)", ("ack", "p99_ms"), 1),
        ("ping to pong p99 (ms)", ("pong", "p99_ms"), 1),
        ("message to agent_completed p50 (ms)", ("message_to_completed", "p50_ms"), 0),
        ("message to agent_completed p99 (ms)", ("message_to_completed", "p99_ms"), 0),
        ("server CPU in the scenario (s)", ("server", "cpu_scenario_secs"), 2),
    ]:
        row = [median([get(r, *path) for r in runs]) for runs in (unloaded, loaded)]
        ratio = row[1] / row[0] if row[0] and row[1] is not None else None
        figures[label] = ratio
        w(f"| {label} | {fmt(row[0], digits)} | {fmt(row[1], digits)} | {fmt(ratio, 2, 'x')} |")
    dirty = sum(sum(r["correctness"].values()) + sum(r["failed"].values()) + r["error_frames"] for r in unloaded + loaded)
    w(f"| failed sessions, error frames and correctness counters (all runs, sum) | | {dirty} | |")
    w("")
    if opened:
        w("Slow runs open on the agent, before and after each measured run: " +
          ", ".join(f"{o['open_slow_runs_before']} / {o['open_slow_runs_after']}" for o in opened) + ".")
        w("")
    return figures




def memory_return():
    runs = reports("idle-19k")
    returns = []
    for rep in range(1, reps + 1):
        path = os.path.join(out_dir, f"idle-19k.{rep}.return.json")
        if os.path.exists(path) and rep <= len(runs):
            with open(path) as f:
                returns.append((runs[rep - 1], json.load(f)["rss_kb_each_second"]))
    if not returns:
        return None
    w("## 5. Memory after 19,000 sessions close")
    w("")
    w("The server's RSS each second after the idle-19k load generator closed every session.")
    w("")
    w("| run | idle before (MB) | all ready (MB) | after 5 s | after 30 s | ratio to idle at 30 s |")
    w("| --- | --- | --- | --- | --- | --- |")
    ratios = []
    for i, (r, samples) in enumerate(returns, 1):
        idle = r["server"]["rss_before_mb"]
        at = lambda s: samples[min(s, len(samples)) - 1] / 1024
        ratios.append(at(30) / idle)
        w(f"| {i} | {idle:.1f} | {r['server']['rss_ready_mb']:.1f} | {at(5):.1f} | {at(30):.1f} | {at(30) / idle:.2f} |")
    w("")
    return median(ratios)


returned = memory_return()
agents = agents_section()


def verbose_section():
    runs, peaks, afters = reports("agents-verbose"), reports("agents-verbose-peak"), reports("agents-verbose-after")
    if not runs or not peaks or not afters:
        return None
    w("### A verbose agent: what a run holds")
    w("")
    w("Ten runs at once of `examples/bench_agent.rs`'s \"verbose\" answer: 3,000")
    w("`TEXT_MESSAGE_CONTENT` events of 30 KB each (90 MB a run, 900 MB in all), as fast as the")
    w("server reads them, each to one WebSocket tab. What a run keeps (its answer, its transcript")
    w("for the thread) is bounded by `agent.max_response_bytes`, the stream's history by")
    w("`history.max_bytes_per_user`, and freed memory is given back (`src/memory.rs`) once no run")
    w("is in progress. Command:")
    w("")
    w(f"- agents-verbose: `agentwire loadtest {commands.get('agents-verbose', '')}`")
    w("")
    w("| run | idle (MB) | peak (VmHWM, MB) | after 5 s (MB) | after 30 s (MB) | events/s |")
    w("| --- | --- | --- | --- | --- | --- |")
    for i, (r, peak, after) in enumerate(zip(runs, peaks, afters), 1):
        samples = after["rss_kb_each_second"]
        at = lambda s: samples[min(s, len(samples)) - 1] / 1024
        w(f"| {i} | {r['server']['rss_before_mb']:.1f} | {peak['peak_rss_kb'] / 1024:.1f} | {at(5):.1f} | {at(30):.1f} | "
          f"{fmt(get(r, 'events_per_sec'), 0)} |")
    w("")
    return median([p["peak_rss_kb"] / 1024 for p in peaks])


verbose_peak = verbose_section()


def chaos_section():
    path = os.path.join(out_dir, "chaos.txt")
    if not os.path.exists(path):
        return
    w("### The randomized fault run")
    w("")
    w("`tests/chaos.rs` for `AGENTWIRE_CHAOS_SECS` (600 here; 20 in the test suite): three node")
    w("processes, each behind a fault proxy, on a Redis of its own kept on disk; users chat from two")
    w("tabs each and a backend publishes with `Idempotency-Key`s while faults are drawn at random (a")
    w("node paused past its lease or briefly, killed, its link cut, blackholed or delayed past the")
    w("command timeout, Redis restarted with its data). The checker verifies docs/scale-out.md's")
    w("invariants for every tab and every acked run. Command: `ONLY=chaos benches/run.sh`.")
    w("")
    w("```")
    with open(path) as f:
        w(f.read().rstrip())
    w("```")
    w("")


def scale_section():
    pairs = [("1 user x 1,000 sessions", "scale-memory-1x1000", "scale-redis-1x1000", 2, 2000),
             ("1,000 users x 10 sessions", "scale-memory-1000x10", "scale-redis-1000x10", 3, 100 * 1000)]
    if not any(reports(r) for _, _, r, _, _ in pairs):
        return {}
    w("## 7. Scale-out: users' streams in Redis, sessions over several nodes")
    w("")
    w("The same fan-out with the memory broker on one node and with `[broker] kind = \"redis\"` on")
    w("the machine's Redis with the sessions spread over the nodes (`--url` once per node), in the")
    w("same run. A publish is one round trip to Redis (one script) whatever the batch; Redis commands")
    w("per event are Redis's `total_commands_processed` over the whole run (sessions' setup and the")
    w("nodes' heartbeats included, and each command a script runs: one `XADD` per event) divided by")
    w("the events published. Commands:")
    w("")
    for _, memory, redis, _, _ in pairs:
        w(f"- {memory}: `agentwire loadtest {commands.get(memory, '')}`")
        w(f"- {redis}: `agentwire loadtest {commands.get(redis, '')}`")
    w("")
    w("| figure | memory, 1 node | Redis, over nodes | ratio |")
    w("| --- | --- | --- | --- |")
    figures = {}
    for title, memory, redis, nodes, events in pairs:
        m, r = reports(memory), reports(redis)
        if not m or not r:
            continue
        for label, path, digits in [("frames delivered per second", ("events_per_sec",), 0),
                                    ("publish to delivery p50 (ms)", ("delivery", "p50_ms"), 2),
                                    ("publish to delivery p99 (ms)", ("delivery", "p99_ms"), 2)]:
            row = [median([get(x, *path) for x in runs]) for runs in (m, r)]
            ratio = row[1] / row[0] if row[0] and row[1] is not None else None
            figures[(title, label)] = ratio
            w(f"| {title}, {label} ({nodes} nodes) | {fmt(row[0], digits)} | {fmt(row[1], digits)} | {fmt(ratio, 2, 'x')} |")
        per_event = median([x["redis_commands"] / events for x in reports(redis + "-redis") if events])
        w(f"| {title}, Redis commands per event published | – | {fmt(per_event, 3)} | |")
        dirty = sum(sum(x["correctness"].values()) + sum(x["failed"].values()) for x in m + r)
        w(f"| {title}, failed sessions and correctness counters (all runs) | | {dirty} | |")
    w("")
    return figures


scale = scale_section()
chaos_section()


def cpu_per_frame_us(report):
    cpu, frames = get(report, "server", "cpu_scenario_secs"), report.get("events_received")
    return cpu / frames * 1e6 if cpu is not None and frames else None


def raw_section():
    pairs = [("fan-out, 1 user x 1,000 sessions, 2,000 events in batches of 10", "fanout"),
             ("paced 50 events/s x 1,000 sessions", "paced"),
             ("19,000 idle sessions", "idle")]
    if not any(reports(f"raw-baseline-{key}") for _, key in pairs):
        return {}
    w("## 8. Against a raw WebSocket server in the same run")
    w("")
    w("`benches/raw_ws.rs`: a bare tokio-tungstenite broadcast server (no auth, limits, history or")
    w("resume; one queue per connection, frames serialised once per publish, one flush per batch)")
    w("under the same `agentwire loadtest` load, one after the other in the same run. Each figure is")
    w("the median of the runs; the ratio is agentwire's over raw's.")
    w("")
    w("| figure | agentwire | raw | agentwire / raw |")
    w("| --- | --- | --- | --- |")
    figures = {}
    rows = {
        "fanout": [("frames delivered per second", lambda x: x.get("events_per_sec"), 0),
                   ("server CPU per delivered frame (µs)", cpu_per_frame_us, 3),
                   ("publish to delivery p50 (ms)", lambda x: get(x, "delivery", "p50_ms"), 2)],
        "paced": [("publish to delivery p99 (ms)", lambda x: get(x, "delivery", "p99_ms"), 2)],
        "idle": [("sessions/s to processing_ready", lambda x: x.get("sessions_per_sec"), 0),
                 ("server RSS per ready session (KB)", lambda x: get(x, "server", "rss_per_session_kb"), 1)],
    }
    for title, key in pairs:
        a, r = reports(f"raw-agentwire-{key}"), reports(f"raw-baseline-{key}")
        if not a or not r:
            continue
        for label, pick, digits in rows[key]:
            row = [median([pick(x) for x in runs]) for runs in (a, r)]
            ratio = row[0] / row[1] if row[1] and row[0] is not None else None
            figures[(key, label)] = (row[0], ratio)
            w(f"| {title}: {label} | {fmt(row[0], digits)} | {fmt(row[1], digits)} | {fmt(ratio, 2, 'x')} |")
    dirty = sum(sum(x["correctness"].values()) + sum(x["failed"].values())
                for _, key in pairs for x in reports(f"raw-agentwire-{key}"))
    w(f"| agentwire's failed sessions and correctness counters (all runs) | {dirty} | | |")
    w("")
    return figures


def shards_section():
    base_idle, percore_idle = reports("raw-agentwire-idle"), reports("shards-percore-idle")
    base_many, percore_many = reports("shards-default-many"), reports("shards-percore-many")
    if not percore_idle and not percore_many:
        return {}
    cores = os.cpu_count() or 1
    w("## 9. The registry on its default shards and on one shard per core")
    w("")
    w(f"The default (`server.registry_shards = 0`: one shard per four cores, here {max(1, cores // 4)}) against")
    w(f"`server.registry_shards = {cores}` (one per core), same load, same run.")
    w("")
    w("| figure | default | 1 per core | per core / default |")
    w("| --- | --- | --- | --- |")
    figures = {}
    rows = [("19,000 idle sessions: sessions/s to processing_ready", base_idle, percore_idle,
             lambda x: x.get("sessions_per_sec"), 0),
            ("19,000 idle sessions: server CPU to connect them (s)", base_idle, percore_idle,
             lambda x: get(x, "server", "cpu_connect_secs"), 2),
            ("1,000 users x 10 sessions: frames delivered per second", base_many, percore_many,
             lambda x: x.get("events_per_sec"), 0),
            ("1,000 users x 10 sessions: server CPU per delivered frame (µs)", base_many, percore_many,
             cpu_per_frame_us, 3),
            ("1,000 users x 10 sessions: publish to delivery p99 (ms)", base_many, percore_many,
             lambda x: get(x, "delivery", "p99_ms"), 2)]
    for label, base, percore, pick, digits in rows:
        if not base or not percore:
            continue
        row = [median([pick(x) for x in runs]) for runs in (base, percore)]
        ratio = row[1] / row[0] if row[0] and row[1] is not None else None
        figures[label] = ratio
        w(f"| {label} | {fmt(row[0], digits)} | {fmt(row[1], digits)} | {fmt(ratio, 2, 'x')} |")
    dirty = sum(sum(x["correctness"].values()) + sum(x["failed"].values()) for x in base_idle + percore_idle + base_many + percore_many)
    w(f"| failed sessions and correctness counters (all runs) | {dirty} | | |")
    w("")
    return figures


raw = raw_section()
shards = shards_section()


def store_section():
    kinds = [("memory", "store-memory"), ("SQLite (default)", "store-sqlite"), ("PostgreSQL", "store-postgres")]
    runs = {name: reports(name) for _, name in kinds}
    if not all(runs.values()):
        return {}
    w("## 11. Conversations: the store's cost on a chat")
    w("")
    w("The same chat (1,000 sessions over 250 users, 5 messages each, the demo agent at full speed)")
    w("with conversations in memory, in SQLite and in PostgreSQL (the machine's, a fresh database per")
    w("run), one after the other in one run. Every user message is stored before its ack and every")
    w("run's messages before its `agent_completed` (docs/conversations.md); waiting writes are")
    w("committed together. Store size: the SQLite files, or the database's growth, after the run,")
    w("per 1,000 user messages (each with its run's answer). Command:")
    w(f"`agentwire loadtest {commands.get('store-sqlite', '')}`")
    w("")
    w("| figure | memory | SQLite | PostgreSQL | SQLite / memory | PostgreSQL / memory |")
    w("| --- | --- | --- | --- | --- | --- |")
    figures = {}
    rows = [("message to ack p50 (ms)", ("ack", "p50_ms"), 2), ("message to ack p99 (ms)", ("ack", "p99_ms"), 2),
            ("message to completed p99 (ms)", ("message_to_completed", "p99_ms"), 1),
            ("runs completed per second", None, 0)]
    for label, path, digits in rows:
        if path is None:
            meds = [median([5000 / r["scenario_secs"] for r in runs[name]]) for _, name in kinds]
        else:
            meds = [median([get(r, *path) for r in runs[name]]) for _, name in kinds]
        ratios = [m / meds[0] if meds[0] and m is not None else None for m in meds[1:]]
        figures[label] = ratios
        w(f"| {label} | " + " | ".join(fmt(m, digits) for m in meds) + " | "
          + " | ".join(fmt(x, 2, "x") for x in ratios) + " |")
    sizes = []
    for name in ("store-sqlite", "store-postgres"):
        size = median([r["store_bytes"] for r in reports(name + "-size")])
        sizes.append(fmt(size / 5 / 1024 if size else None, 0, " KB"))
    w(f"| store size per 1,000 user messages | – | {sizes[0]} | {sizes[1]} | | |")
    dirty = sum(sum(r["correctness"].values()) + sum(r["failed"].values()) for v in runs.values() for r in v)
    w(f"| failed sessions and correctness counters (all runs) | | {dirty} | | | |")
    w("")
    return figures


store = store_section()


def auth_section():
    path = os.path.join(out_dir, "auth.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        r = json.load(f)
    w("## 12. Identity providers: a token's cost, and a flood of made-up kids")
    w("")
    w("`benches/auth_verify.rs` (`ONLY=auth benches/run.sh`): the verifier alone, in one process, against")
    w("a real provider over HTTP on 127.0.0.1 publishing the test fixtures' keys. Median of 5 rounds of")
    w(f"{r['tokens per round']:,} distinct tokens each (signature and claims checked), per algorithm, with")
    w("a provider's key set (the token's `iss` picks the provider, its `kid` the key) beside the HS256")
    w("secret and an RS256 key file. Then three seconds of tokens naming made-up `kid`s, and how often")
    w("the provider was asked for its keys meanwhile (docs/protocol.md section 2: at most once per 30 s).")
    w("")
    w("| verifier | µs per token | / HS256 secret |")
    w("| --- | --- | --- |")
    base = r.get("HS256 secret")
    for label in ["HS256 secret", "RS256 key file", "RS256 key set", "PS256 key set", "ES256 key set",
                  "ES384 key set", "EdDSA key set"]:
        value = r.get(label)
        ratio = value / base if value and base else None
        w(f"| {label} | {fmt(value, 1)} | {fmt(ratio, 1, 'x')} |")
    w("")
    w(f"Flood: {r['flood tokens']:,} tokens with made-up kids refused in 3 s "
      f"({fmt(r['flood refused per s'], 0)} per second); the provider was fetched from "
      f"**{r['flood fetches']}** time(s) for all of them.")
    w("")


auth_section()


def per_frame_us(medians, frames):
    if not medians or medians.get(cpu_scenario[0]) is None:
        return None
    return medians[cpu_scenario[0]] / frames * 1e6


w("## Targets")
w("")
w("| target | measured (median) | met |")
w("| --- | --- | --- |")


def target(label, value, goal, higher_is_better, unit):
    if value is None:
        w(f"| {label} | not measured | – |")
        return
    ok = value >= goal if higher_is_better else value <= goal
    w(f"| {label} | {fmt(value, 1, unit)} | {'yes' if ok else 'no'} |")


target("RSS per ready session <= 16 KB (19,000 sessions)", idle19 and idle19[rss_session[0]], 16, False, " KB")
target("sessions to processing_ready >= 10,000/s (19,000)", idle19 and idle19[rate[0]], 10000, True, "/s")
target("fan-out >= 1.5 M frames/s (1 user x 1,000 sessions)", fan1 and fan1[events_s[0]], 1.5e6, True, "/s")
target("19,000 ready sessions, no failure", idle19 and idle19[ready[0]], 19000, True, "")
target("paced delivery p99 <= 10 ms", paced and paced[delivery_p99[0]], 10, False, " ms")
if hostile:
    growth = hostile["server RSS growth, peak over all-ready (MB)"][1]
    target("1,000 unauthenticated senders raise RSS by <= 64 MB", growth, 64, False, " MB")
    p50, p99 = hostile["message to agent_completed p50 (ms)"], hostile["message to agent_completed p99 (ms)"]
    if p50[0] and p50[1]:
        target("real users' p50 under that attack <= 1.5x unloaded", p50[1] / p50[0], 1.5, False, "x")
    if p99[0] and p99[1]:
        target("real users' p99 under that attack <= 1.5x unloaded", p99[1] / p99[0], 1.5, False, "x")
target("RSS 30 s after 19,000 sessions closed <= 2x idle", returned, 2, False, "x")
if agents:
    target("chat p99 (message to completed) with 1,000 slow agent runs <= 1.5x unloaded",
           agents["message to agent_completed p99 (ms)"], 1.5, False, "x")
    target("ack p99 with 1,000 slow agent runs <= 1.5x unloaded", agents["ack p99 (ms)"], 1.5, False, "x")
if raw:
    def raw_target(label, key, row, goal, higher_is_better, use_ratio=True):
        value = raw.get((key, row))
        target(label, value and (value[1] if use_ratio else value[0]), goal, higher_is_better, "x" if use_ratio else " KB")
    raw_target("fan-out: server CPU per frame <= 2x raw", "fanout", "server CPU per delivered frame (µs)", 2, False)
    raw_target("fan-out: frames/s >= 0.5x raw", "fanout", "frames delivered per second", 0.5, True)
    raw_target("RSS per ready session <= 10 KB (19,000)", "idle", "server RSS per ready session (KB)", 10, False, False)
    raw_target("sessions/s to processing_ready >= 0.9x raw's connections/s", "idle", "sessions/s to processing_ready", 0.9, True)
    raw_target("paced p99 <= 1.1x raw", "paced", "publish to delivery p99 (ms)", 1.1, False)
if store:
    p99 = store["message to ack p99 (ms)"]
    target("chat ack p99 with SQLite <= 1.5x memory", p99[0], 1.5, False, "x")
    target("chat ack p99 with PostgreSQL <= 1.5x memory", p99[1], 1.5, False, "x")
w("")

w("## What the numbers mean")
w("")
fan_cpu = per_frame_us(fan1, 2_000_000)
if fan_cpu:
    w(f"- Fan-out to one user's 1,000 sessions cost the server {fan_cpu:.2f} µs of CPU per delivered")
    w(f"  frame, i.e. about {1 / fan_cpu:.1f} M frames per second per core. The delivered rate above is")
    w("  capped by the load generator, which parses every frame to check seqs and shares the cores.")
paced_cpu = per_frame_us(paced, 500_000)
if paced_cpu:
    w(f"- Paced single events cost {paced_cpu:.1f} µs per frame: each event is one socket write per")
    w("  session (nothing to coalesce), and on loopback the kernel's receive work for the load")
    w("  generator runs inside that write. Batched events share one write per session.")
if idle19 and idle19.get(rss_session[0]):
    kb = idle19[rss_session[0]]
    cpu = idle19[cpu_connect[0]]
    w(f"- Memory: {kb:.1f} KB per idle ready session. A machine with 64 GiB for sessions would hold")
    w(f"  about {64 * 1024 * 1024 / kb / 1e6:.1f} M idle sessions by memory; per process the open-files")
    w("  limit decides first (raise it, or run one process per 20,000 sessions on these machines).")
    if cpu:
        w(f"- Connecting cost {cpu / 19000 * 1e6:.0f} µs of server CPU per session (TCP, HTTP upgrade, JWT,")
        w(f"  four state transitions): one core sets up about {19000 / cpu:,.0f} sessions per second.")
w("")
# Profiles and the projection are written by hand (benches/profiles.md), kept with the figures.
profiles = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles.md")
if os.path.exists(profiles):
    with open(profiles) as f:
        lines.extend(["", f.read().rstrip()])
print("\n".join(lines))
