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
