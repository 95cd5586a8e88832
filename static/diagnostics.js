// Loaded first by every page, as a classic script: keeps the errors raised by the page's code in
// `window.__errors`, where automated checks (tests/browser.rs) read them.
window.__errors = [];
addEventListener("error", (e) => __errors.push(String(e.message || (e.target && e.target.src) || e.type)), true);
addEventListener("unhandledrejection", (e) => __errors.push(String(e.reason)));
const consoleError = console.error.bind(console);
console.error = (...args) => {
  __errors.push(args.map(String).join(" "));
  consoleError(...args);
};
// A failed request (a 4xx/5xx answer to fetch or a resource) is a console error in the browser
// but raises no JS event; the Resource Timing entries carry its status where the browser has it.
if (typeof PerformanceObserver === "function") {
  try {
    new PerformanceObserver((list) => {
      for (const entry of list.getEntries()) {
        if (entry.responseStatus >= 400) __errors.push(`HTTP ${entry.responseStatus} ${entry.name}`);
      }
    }).observe({ type: "resource", buffered: true });
  } catch (_) {
    // Older browsers: no resource observer, no check.
  }
}
