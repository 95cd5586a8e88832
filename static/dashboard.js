// The live dashboard: polls /dashboard/stats.json once a second and turns the server's counters
// into rates, quantiles and charts over the last five minutes. The charts are uPlot's
// (static/vendor/, loaded before this module as the global `uPlot`).

const $ = (id) => document.getElementById(id);
const WINDOW = 300; // seconds of history kept for the charts
const PLOT_HEIGHT = 180; // CSS pixels, axes included
const history = []; // { t, ready, open, opened, failed, transitions, events, frames, p50, p99 }
let previous = null;

const count = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
const rate = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });
const fine = new Intl.NumberFormat(undefined, { maximumSignificantDigits: 3 });
// Three decimals at most: enough for the finest tick step a chart asks for (0.001 ms), and it
// hides the binary floating-point noise of steps like 0.1 + 0.2.
const tick = new Intl.NumberFormat(undefined, { maximumFractionDigits: 3 });
const clockSeconds = new Intl.DateTimeFormat(undefined, { hour: "numeric", minute: "2-digit", second: "2-digit" });
const clockMinutes = new Intl.DateTimeFormat(undefined, { hour: "numeric", minute: "2-digit" });

// A unit is a string, or its forms by plural category (the page is in English).
const CONNECTIONS = { one: "connection", other: "connections" };
const plural = new Intl.PluralRules("en");
const unitOf = (unit, value) => (typeof unit === "string" ? unit : unit[plural.select(value ?? 0)] ?? unit.other);

// Every chart, its series (keys of `history`) and the unit of its value axis.
const CHARTS = [
  {
    id: "chart-connections",
    unit: "connections",
    whole: true,
    series: [
      { key: "ready", label: "ready", unit: CONNECTIONS, format: count, color: "#2457d6" },
      { key: "open", label: "open, any state", unit: CONNECTIONS, format: count, color: "#8a94a3" },
    ],
  },
  {
    id: "chart-churn",
    unit: "connections/s",
    series: [
      { key: "opened", label: "opened", unit: "connections/s", format: rate, color: "#1f8a4c" },
      { key: "failed", label: "failed", unit: "connections/s", format: rate, color: "#c53030" },
    ],
  },
  {
    // Both series count per second, but different things: one published event becomes one frame
    // for each of its user's sessions, so the axis says "per second" and each value its unit.
    id: "chart-events",
    unit: "per second",
    series: [
      { key: "events", label: "published", unit: "events/s", format: rate, color: "#2457d6" },
      { key: "frames", label: "sent to sessions", unit: "frames/s", format: rate, color: "#b7791f" },
    ],
  },
  {
    id: "chart-latency",
    unit: "ms",
    // Below this top the line of a fast server would fill the chart with noise of microseconds.
    minTop: 0.1,
    series: [
      { key: "p50", label: "p50", unit: "ms", format: fine, color: "#2457d6" },
      { key: "p99", label: "p99", unit: "ms", format: fine, color: "#c53030" },
    ],
  },
];

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

// Tick steps of the time axis, in seconds. uPlot's own go from one minute to five, which leaves a
// phone-wide chart of five minutes with a single tick.
const TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600];
// Tick steps of an axis that counts things: never a tick between two integers.
const WHOLE_STEPS = [1, 2, 5]
  .flatMap((m) => [1, 10, 100, 1e3, 1e4, 1e5, 1e6].map((e) => m * e))
  .sort((a, b) => a - b);

const measure = document.createElement("canvas").getContext("2d");
const AXIS_FONT = "12px system-ui, sans-serif";

/// uPlot gives a value axis a fixed width by default; ticks like "12,500" would be clipped. The
/// floor keeps the time axes of the stacked charts aligned while their ticks are short.
function valueAxisSize(u, values) {
  measure.font = AXIS_FONT;
  const widest = Math.max(0, ...(values || []).map((v) => measure.measureText(v).width));
  return Math.max(52, Math.ceil(widest) + 20);
}

/// One uPlot chart and its legend, which shows the newest values, or those under the pointer.
class Chart {
  constructor(spec) {
    this.spec = spec;
    this.figure = $(spec.id);
    this.plot = this.figure.querySelector(".plot");
    this.legend = this.figure.querySelector(".legend");
    this.ticks = [[], []];
    this.cells = spec.series.map((s) => {
      const item = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = s.color;
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = s.label;
      const value = document.createElement("output");
      value.className = "value";
      const unit = document.createElement("span");
      unit.className = "unit";
      unit.textContent = unitOf(s.unit);
      item.append(swatch, name, " ", value, " ", unit);
      this.legend.append(item);
      return { value, unit };
    });
    this.when = document.createElement("li");
    this.when.className = "when";
    this.legend.append(this.when);

    const axis = {
      font: AXIS_FONT,
      labelFont: AXIS_FONT,
      labelSize: 18,
      stroke: "#5f6b7a",
      grid: { stroke: "#eef1f4", width: 1 },
      ticks: { stroke: "#dde2e8", width: 1, size: 5 },
    };
    this.uplot = new uPlot(
      {
        width: this.plot.clientWidth || 600,
        height: PLOT_HEIGHT,
        legend: { show: false },
        // Zooming would be undone by the next second's data; the pointer only reads values.
        cursor: { drag: { x: false, y: false }, points: { size: 6 } },
        scales: {
          // The time axis always spans the whole window, so a fresh page fills from the right
          // instead of stretching its first few seconds over the chart.
          x: {
            time: true,
            range: (u, min, max) => {
              const end = max ?? Date.now() / 1000;
              return [end - WINDOW, end];
            },
          },
          y: { range: (u, min, max) => [0, Math.max(spec.minTop ?? 1, (max ?? 0) * 1.15)] },
        },
        axes: [
          {
            ...axis,
            label: "local time",
            size: 32,
            space: 80,
            incrs: TIME_STEPS,
            values: (u, splits, i, space, incr) => this.timeTicks(splits, incr),
          },
          {
            ...axis,
            label: spec.unit,
            size: valueAxisSize,
            incrs: spec.whole ? WHOLE_STEPS : undefined,
            values: (u, splits) => this.valueTicks(splits),
          },
        ],
        series: [{}, ...spec.series.map((s) => ({ label: s.label, stroke: s.color, width: 2 }))],
        hooks: {
          // uPlot may draw before its constructor returns, so the hooks use the instance given.
          setCursor: [(u) => this.showValues(u)],
          draw: [(u) => this.describe(u)],
        },
      },
      [[], ...spec.series.map(() => [])],
      this.plot,
    );
    new ResizeObserver(() => {
      const width = this.plot.clientWidth;
      if (width > 0 && width !== this.uplot.width) this.uplot.setSize({ width, height: PLOT_HEIGHT });
    }).observe(this.plot);
    this.showValues();
  }

  timeTicks(splits, incr) {
    const clock = incr < 60 ? clockSeconds : clockMinutes;
    return (this.ticks[0] = splits.map((t) => clock.format(t * 1000)));
  }

  valueTicks(splits) {
    return (this.ticks[1] = splits.map((v) => tick.format(v)));
  }

  update() {
    this.uplot.setData([history.map((h) => h.t), ...this.spec.series.map((s) => history.map((h) => h[s.key]))]);
    this.showValues();
  }

  showValues(u = this.uplot) {
    const hovered = u.cursor.idx;
    const index = hovered ?? history.length - 1;
    const point = history[index];
    this.spec.series.forEach((s, i) => {
      const value = point?.[s.key];
      this.cells[i].value.textContent = value == null ? "–" : s.format.format(value);
      this.cells[i].value.toggleAttribute("data-missing", value == null);
      this.cells[i].unit.textContent = unitOf(s.unit, value);
    });
    this.when.textContent =
      point == null ? "" : hovered == null ? "now" : `at ${clockSeconds.format(point.t * 1000)}`;
  }

  // The axes are drawn on a canvas, out of reach of screen readers and of tests; the figure
  // carries what they show as text.
  describe(u) {
    const [x, y] = this.ticks;
    const { dataset } = this.figure;
    dataset.xLabel = u.axes[0].label;
    dataset.yLabel = u.axes[1].label;
    dataset.xTicks = JSON.stringify(x);
    dataset.yTicks = JSON.stringify(y);
    const title = this.figure.querySelector("h3").textContent;
    this.plot.setAttribute(
      "aria-label",
      `${title}: ${y[0] ?? ""} to ${y.at(-1) ?? ""} ${this.spec.unit}, ${x[0] ?? ""} to ${x.at(-1) ?? ""} local time`,
    );
    // A line needs two points.
    this.figure.toggleAttribute("data-drawn", history.length >= 2);
  }
}

const charts = CHARTS.map((spec) => new Chart(spec));

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
  const perSecond = (key) => (stats[key] - previous[key]) / dt;
  const ms = (seconds) => (seconds == null ? null : seconds * 1000);
  const p50 = quantile(stats.delivery.buckets, previous.delivery.buckets, 0.5);
  const p99 = quantile(stats.delivery.buckets, previous.delivery.buckets, 0.99);
  const point = {
    t: stats.time_ms / 1000,
    ready: stats.connections.processing_ready ?? 0,
    open: Object.values(stats.connections).reduce((sum, n) => sum + n, 0),
    opened: perSecond("connections_opened_total"),
    failed: perSecond("connection_failures_total"),
    transitions: perSecond("state_transitions_total"),
    events: perSecond("events_published_total"),
    frames: perSecond("frames_sent_total"),
    p50: ms(p50),
    p99: ms(p99),
  };
  history.push(point);
  while (history.length && history[0].t < point.t - WINDOW) history.shift();
  $("opened").textContent = point.opened.toFixed(0);
  $("failed").textContent = point.failed.toFixed(0);
  $("transitions").textContent = point.transitions.toFixed(0);
  $("events").textContent = point.events.toFixed(0);
  $("latency").textContent = `${formatMs(p50)} / ${formatMs(p99)}`;
  charts.forEach((chart) => chart.update());
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
