// The live dashboard: polls /dashboard/stats.json once a second and turns the server's counters
// into rates, quantiles and charts over the last five minutes.

const $ = (id) => document.getElementById(id);
const WINDOW = 300; // seconds of history kept for the charts
const history = []; // { t, ready, opened, failed, transitions, events, p50, p99 }
let previous = null;

/// A quantile of the observations that fell between two cumulative histogram snapshots.
function quantile(buckets, before, q) {
  const counts = buckets.map((b, i) => b.count - (before ? before[i].count : 0));
  const total = counts[counts.length - 1];
  if (total <= 0) return null;
  const rank = q * total;
  for (let i = 0; i < buckets.length; i++) {
    if (counts[i] >= rank) {
      const lower = i === 0 ? 0 : buckets[i - 1].le;
      const below = i === 0 ? 0 : counts[i - 1];
      const upper = buckets[i].le == null ? lower : buckets[i].le;
      const inBucket = counts[i] - below;
      return inBucket > 0 ? lower + ((upper - lower) * (rank - below)) / inBucket : upper;
    }
  }
  return null;
}

function formatMs(seconds) {
  if (seconds == null) return "–";
  const ms = seconds * 1000;
  return ms < 1 ? `${(ms * 1000).toFixed(0)} µs` : `${ms.toFixed(ms < 10 ? 2 : 0)} ms`;
}

function draw(canvasId, series, { unit = "", colors = ["#2457d6", "#1f8a4c"] } = {}) {
  const canvas = $(canvasId);
  const width = (canvas.width = canvas.clientWidth * devicePixelRatio);
  const height = (canvas.height = 160 * devicePixelRatio);
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, width, height);
  const now = Date.now() / 1000;
  const values = series.flatMap((s) => s.points.map((p) => p[1])).filter((v) => v != null);
  const max = Math.max(1e-9, ...values) * 1.1;
  const x = (t) => ((t - (now - WINDOW)) / WINDOW) * width;
  const y = (v) => height - (v / max) * (height - 24 * devicePixelRatio) - 4;
  g.font = `${11 * devicePixelRatio}px system-ui`;
  series.forEach((s, i) => {
    g.strokeStyle = colors[i % colors.length];
    g.lineWidth = 2 * devicePixelRatio;
    g.beginPath();
    let started = false;
    for (const [t, v] of s.points) {
      if (v == null) continue;
      if (started) g.lineTo(x(t), y(v));
      else g.moveTo(x(t), y(v));
      started = true;
    }
    g.stroke();
    g.fillStyle = colors[i % colors.length];
    const last = s.points.length ? s.points[s.points.length - 1][1] : null;
    g.fillText(`${s.label}: ${last == null ? "–" : s.format ? s.format(last) : Math.round(last) + unit}`, 8 + i * 220 * devicePixelRatio, 14 * devicePixelRatio);
  });
}

function render(stats) {
  const order = ["accepted", "authenticated", "services_ready", "processing_ready", "closing", "failed"];
  const states = order.filter((s) => s in stats.connections).map((s) => [s, stats.connections[s]]);
  $("states").tBodies[0].replaceChildren(
    ...states.map(([state, count]) => {
      const row = document.createElement("tr");
      row.innerHTML = `<td></td><td></td>`;
      row.cells[0].textContent = state.replaceAll("_", " ");
      row.cells[1].textContent = count;
      return row;
    }),
  );
  $("ready").textContent = stats.connections.processing_ready ?? 0;
  $("slow").textContent = stats.slow_consumer_closes_total;
  if (!previous) return;
  const dt = (stats.time_ms - previous.time_ms) / 1000 || 1;
  const rate = (key) => (stats[key] - previous[key]) / dt;
  const point = {
    t: stats.time_ms / 1000,
    ready: stats.connections.processing_ready ?? 0,
    opened: rate("connections_opened_total"),
    failed: rate("connection_failures_total"),
    transitions: rate("state_transitions_total"),
    events: rate("events_published_total"),
    frames: rate("frames_sent_total"),
    p50: quantile(stats.delivery.buckets, previous.delivery.buckets, 0.5),
    p99: quantile(stats.delivery.buckets, previous.delivery.buckets, 0.99),
  };
  history.push(point);
  while (history.length && history[0].t < point.t - WINDOW) history.shift();
  $("opened").textContent = point.opened.toFixed(0);
  $("failed").textContent = point.failed.toFixed(0);
  $("transitions").textContent = point.transitions.toFixed(0);
  $("events").textContent = point.events.toFixed(0);
  $("latency").textContent = `${formatMs(point.p50)} / ${formatMs(point.p99)}`;
  const pts = (key) => history.map((h) => [h.t, h[key]]);
  draw("chart-connections", [{ label: "ready connections", points: pts("ready") }]);
  draw("chart-rates", [
    { label: "events/s", points: pts("events") },
    { label: "connections opened/s", points: pts("opened") },
  ]);
  draw("chart-latency", [
    { label: "delivery p50", points: pts("p50"), format: formatMs },
    { label: "delivery p99", points: pts("p99"), format: formatMs },
  ]);
}

async function poll() {
  try {
    const response = await fetch("/dashboard/stats.json", { cache: "no-store" });
    const stats = await response.json();
    render(stats);
    previous = stats;
    $("live").textContent = "live";
    $("live-dot").className = "dot ready";
  } catch {
    $("live").textContent = "server unreachable, retrying";
    $("live-dot").className = "dot down";
  }
  document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
}

poll();
setInterval(poll, 1000);
