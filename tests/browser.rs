//! The chat page and the dashboard in a real headless Chromium (through chromedriver), against
//! the real server: sign in, a streamed answer with its tool call, cancel, two tabs in sync, a
//! server restart the page resumes from, a phone-width layout, the live dashboard and its charts'
//! axes, units and current values, and signing in with a pasted JWT when dev tokens are off. The
//! sidebar of stored conversations (docs/conversations.md): threads and their messages across a
//! reload and a server restart, renames and deletes followed by another tab, long titles cut
//! with an ellipsis, and a run in progress joined after a reload.
//! Screenshots go to `target/browser-screenshots/`; errors raised by the pages' code fail the test.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them). Without them the
//! test fails with an install hint, unless `AGENTWIRE_SKIP_BROWSER=1` is set on purpose.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use fantoccini::{Client as Browser, ClientBuilder, Locator};
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One browser at a time: the tests of this file run side by side, and several Chromiums on a
/// small machine make the bounded waits race the machine instead of the page.
async fn one_browser_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static BROWSERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    BROWSERS.lock().await
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn start_browser(profile: &Path) -> (Driver, Browser) {
    let port = free_port();
    let driver = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let driver = Driver(driver);
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--window-size=1200,900",
                     format!("--user-data-dir={}", profile.display())],
        }),
    );
    let url = format!("http://127.0.0.1:{port}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        match ClientBuilder::new(connector).capabilities(capabilities.clone()).connect(&url).await {
            Ok(browser) => return (driver, browser),
            Err(e) if tokio::time::Instant::now() > deadline => panic!("cannot start a browser session: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn screenshots_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(browser: &Browser, name: &str) {
    let png = browser.screenshot().await.expect("screenshot");
    std::fs::write(screenshots_dir().join(name), png).unwrap();
}

/// Waits (bounded) until `script` (a JS expression) is truthy in the page.
async fn wait_until(browser: &Browser, what: &str, script: &str) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let value = browser.execute(&format!("return ({script});"), vec![]).await.expect("script runs");
        if !(value.is_null() || value == json!(false) || value == json!(0) || value == json!("")) {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            let status = browser.execute("return document.body.innerText", vec![]).await.unwrap_or_default();
            panic!("timed out waiting for {what}; page says:\n{}", status.as_str().unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn page_errors(browser: &Browser) -> Vec<String> {
    let errors = browser.execute("return window.__errors || ['no error hook']", vec![]).await.unwrap();
    serde_json::from_value(errors).unwrap()
}

async fn sign_in(browser: &Browser, base: &str, user: &str) {
    browser.goto(base).await.unwrap();
    wait_until(browser, "the page to load", "document.body.dataset.loaded === 'true'").await;
    browser.find(Locator::Css("#user-name")).await.unwrap().send_keys(user).await.unwrap();
    browser.find(Locator::Css("#signin-form button[type=submit]")).await.unwrap().click().await.unwrap();
    wait_until(browser, "processing_ready", "document.body.dataset.connection === 'processing_ready'").await;
}

async fn send_message(browser: &Browser, text: &str) {
    let input = browser.find(Locator::Css("#input")).await.unwrap();
    input.send_keys(text).await.unwrap();
    input.send_keys("\u{E007}").await.unwrap(); // Enter
}

/// False only when `AGENTWIRE_SKIP_BROWSER=1` says so; a missing browser fails the test.
fn browser_wanted() -> bool {
    if std::env::var("AGENTWIRE_SKIP_BROWSER").as_deref() == Ok("1") {
        eprintln!("AGENTWIRE_SKIP_BROWSER=1: browser test skipped on purpose");
        return false;
    }
    assert!(
        Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists(),
        "the browser test needs Chromium and ChromeDriver: apt-get install -y chromium chromium-driver \
         (or set AGENTWIRE_SKIP_BROWSER=1 to skip it on purpose)"
    );
    true
}

fn runs_with_status(status: &str) -> String {
    format!("document.querySelectorAll('#messages li.run[data-status=\"{status}\"]').length")
}

#[actix_web::test]
async fn chat_page_and_dashboard_in_chromium() {
    if !browser_wanted() {
        return;
    }
    let _one = one_browser_at_a_time().await;
    let server = TestServer::with(|c| c.agent.step_delay_ms = 60);
    let addr = server.addr;
    let base = format!("http://{addr}/");
    let profile = tempfile::tempdir().unwrap();
    let (_driver, browser) = start_browser(profile.path()).await;

    // Sign in; the connection's state is shown.
    sign_in(&browser, &base, "browser-alice").await;
    let status = browser.find(Locator::Css("#status-text")).await.unwrap().text().await.unwrap();
    assert_eq!(status, "ready");
    screenshot(&browser, "01-signed-in.png").await;

    // A message: the streamed answer and the tool call, collapsible.
    send_message(&browser, "what is 12 * (3 + 4)?").await;
    wait_until(&browser, "the run to complete", &format!("{} === 1", runs_with_status("ok"))).await;
    // The new thread's `thread_updated` before the echo is no run of its own.
    let shown = browser.execute("return document.querySelectorAll('#messages li.run').length", vec![]).await;
    assert_eq!(shown.unwrap(), json!(1), "one run shown");
    let answer = browser.find(Locator::Css("li.run .answer")).await.unwrap().text().await.unwrap();
    assert!(answer.contains("84"), "{answer}");
    let summary = browser.find(Locator::Css("li.run details summary")).await.unwrap();
    assert!(summary.text().await.unwrap().contains("calculator"));
    summary.click().await.unwrap();
    wait_until(&browser, "the tool call to open", "document.querySelector('li.run details').open").await;
    let user_bubble = browser.find(Locator::Css("li.msg.user")).await.unwrap().text().await.unwrap();
    assert_eq!(user_bubble, "what is 12 * (3 + 4)?");
    screenshot(&browser, "02-answer-with-tool-call.png").await;

    // Cancel a run while it streams.
    send_message(&browser, "count the words of this fairly long message please").await;
    wait_until(&browser, "the cancel button", "!document.getElementById('cancel').hidden").await;
    browser.find(Locator::Css("#cancel")).await.unwrap().click().await.unwrap();
    wait_until(&browser, "the run to be cancelled", &format!("{} === 1", runs_with_status("cancelled")))
        .await;
    wait_until(&browser, "the cancel button to go", "document.getElementById('cancel').hidden").await;
    screenshot(&browser, "03-cancelled.png").await;

    // A second tab of the same user: it replays the conversation and stays in sync.
    let first_tab = browser.window().await.unwrap();
    let second_tab = browser.new_window(true).await.unwrap().handle;
    browser.switch_to_window(second_tab.clone()).await.unwrap();
    sign_in(&browser, &base, "browser-alice").await;
    wait_until(&browser, "the replayed conversation", &format!("{} === 1", runs_with_status("ok"))).await;
    send_message(&browser, "hello from the second tab").await;
    wait_until(&browser, "the second tab's run", &format!("{} === 2", runs_with_status("ok"))).await;
    screenshot(&browser, "04-second-tab.png").await;
    let second_view = browser.find(Locator::Css("#messages")).await.unwrap().text().await.unwrap();
    assert!(page_errors(&browser).await.is_empty(), "second tab: {:?}", page_errors(&browser).await);
    browser.switch_to_window(first_tab).await.unwrap();
    wait_until(&browser, "the first tab to follow", &format!("{} === 2", runs_with_status("ok"))).await;
    // Which tool calls are expanded is each tab's own business; compare them collapsed.
    browser
        .execute("document.querySelectorAll('details').forEach((d) => (d.open = false))", vec![])
        .await
        .unwrap();
    let first_view = browser.find(Locator::Css("#messages")).await.unwrap().text().await.unwrap();
    assert_eq!(first_view, second_view, "two tabs of one user show the same conversation");

    // The server restarts: the page says so, reconnects, and carries on.
    server.shutdown().await;
    wait_until(&browser, "the page to notice", "document.body.dataset.connection === 'reconnecting'").await;
    screenshot(&browser, "05-reconnecting.png").await;
    // The first close the page saw is the server's 1012 (later retries fail while it is down).
    let codes = browser.execute("return document.body.dataset.closeCodes", vec![]).await.unwrap();
    assert_eq!(codes.as_str().and_then(|c| c.split(' ').next()), Some("1012"), "{codes}");
    let restarted = TestServer::with(|c| {
        c.server.bind = addr;
        c.agent.step_delay_ms = 60;
    });
    wait_until(&browser, "the page to resume", "document.body.dataset.connection === 'processing_ready'")
        .await;
    wait_until(&browser, "the restart notice", "!document.getElementById('notice').hidden").await;
    send_message(&browser, "are you back?").await;
    wait_until(&browser, "an answer after the restart", &format!("{} === 3", runs_with_status("ok"))).await;
    screenshot(&browser, "06-after-restart.png").await;
    assert!(page_errors(&browser).await.is_empty(), "first tab: {:?}", page_errors(&browser).await);

    // Phone width.
    browser.set_window_size(390, 844).await.unwrap();
    screenshot(&browser, "07-phone.png").await;
    browser.set_window_size(1200, 900).await.unwrap();

    // The dashboard, live.
    browser.goto(&format!("http://{addr}/dashboard")).await.unwrap();
    wait_until(&browser, "three polls", "Number(document.body.dataset.polls || 0) >= 3").await;
    let ready = browser.find(Locator::Css("#ready")).await.unwrap().text().await.unwrap();
    assert!(ready.parse::<u32>().is_ok(), "{ready}");
    screenshot(&browser, "08-dashboard.png").await;
    assert!(page_errors(&browser).await.is_empty(), "dashboard: {:?}", page_errors(&browser).await);

    // Without dev tokens the page asks for a JWT, and a pasted one signs in.
    let locked = TestServer::with(|c| c.auth.dev_tokens = false);
    browser.goto(&format!("http://{}/", locked.addr)).await.unwrap();
    wait_until(&browser, "the page to load", "document.body.dataset.loaded === 'true'").await;
    wait_until(&browser, "the JWT field", "!document.getElementById('jwt-signin').hidden").await;
    let dev_field_hidden =
        browser.execute("return document.getElementById('dev-signin').hidden", vec![]).await.unwrap();
    assert_eq!(dev_field_hidden, json!(true));
    browser.find(Locator::Css("#jwt")).await.unwrap().send_keys(&locked.token("pasted-jwt")).await.unwrap();
    browser.find(Locator::Css("#signin-form button[type=submit]")).await.unwrap().click().await.unwrap();
    wait_until(&browser, "processing_ready", "document.body.dataset.connection === 'processing_ready'").await;
    let who = browser.find(Locator::Css("#who")).await.unwrap().text().await.unwrap();
    assert_eq!(who, "pasted-jwt");
    screenshot(&browser, "09-jwt-sign-in.png").await;
    assert!(page_errors(&browser).await.is_empty(), "JWT sign-in: {:?}", page_errors(&browser).await);

    browser.close().await.unwrap();
    drop(restarted);
}

/// An AG-UI agent's run in the chat page: its tool call with arguments and result, its streamed
/// text, and its pass-through steps in readable form.
#[actix_web::test]
async fn an_ag_ui_run_in_the_chat_page() {
    if !browser_wanted() {
        return;
    }
    let _one = one_browser_at_a_time().await;
    use common::fake_agent::{sse, FakeAgent};
    let agent = FakeAgent::start(|input| {
        let ids = json!({"threadId": input["threadId"], "runId": input["runId"]});
        let with = |mut event: Value| {
            event.as_object_mut().unwrap().extend(ids.as_object().unwrap().clone());
            event
        };
        sse(&[
            with(json!({"type": "RUN_STARTED"})),
            json!({"type": "STEP_STARTED", "stepName": "look it up"}),
            json!({"type": "REASONING_MESSAGE_CONTENT", "messageId": "r", "delta": "Checking the weather. "}),
            json!({"type": "TOOL_CALL_START", "toolCallId": "c1", "toolCallName": "weather", "parentMessageId": "a"}),
            json!({"type": "TOOL_CALL_ARGS", "toolCallId": "c1", "delta": "{\"city\": \"Paris\"}"}),
            json!({"type": "TOOL_CALL_END", "toolCallId": "c1"}),
            json!({"type": "TOOL_CALL_RESULT", "messageId": "t", "toolCallId": "c1", "content": "sunny"}),
            json!({"type": "STATE_SNAPSHOT", "snapshot": {"city": "Paris"}}),
            json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": "a", "delta": "It is sunny "}),
            json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": "a", "delta": "in Paris."}),
            with(json!({"type": "RUN_FINISHED"})),
        ])
    });
    let url = agent.url.clone();
    let server = TestServer::with(move |c| {
        c.agent.kind = agentwire::config::AgentKind::AgUi;
        c.agent.url = url;
        c.agent.name = "weather-bot".into();
    });
    let base = format!("http://{}/", server.addr);
    let profile = tempfile::tempdir().unwrap();
    let (_driver, browser) = start_browser(profile.path()).await;
    sign_in(&browser, &base, "browser-ag-ui").await;
    send_message(&browser, "weather in Paris?").await;
    wait_until(&browser, "the run to complete", &format!("{} === 1", runs_with_status("ok"))).await;
    let text = |css: &'static str| {
        let browser = browser.clone();
        async move { browser.find(Locator::Css(css)).await.unwrap().text().await.unwrap() }
    };
    assert_eq!(text("li.run .answer").await, "It is sunny in Paris.");
    assert_eq!(text("li.run .thinking").await, "Checking the weather.");
    assert_eq!(text("li.run details summary").await, "✓ weather({\"city\":\"Paris\"})");
    let steps = text("li.run .steps").await;
    assert_eq!(steps, "step started: look it up\nstate: {\"city\":\"Paris\"}");
    screenshot(&browser, "09-ag-ui-run.png").await;
    assert_eq!(page_errors(&browser).await, Vec::<String>::new());
    browser.close().await.unwrap();
}

/// What the test reads of each chart of the dashboard: uPlot draws axes on a canvas, so their
/// labels and ticks come from the text the page keeps beside it (`data-*` of the figure), and
/// the canvas is checked for ink where that text is drawn, outside the plot area and its tick
/// marks.
const READ_CHARTS: &str = r#"
return [...document.querySelectorAll("figure.chart")].map((figure) => {
  const canvas = figure.querySelector("canvas");
  const over = figure.querySelector(".u-over");
  const scale = canvas.width / canvas.getBoundingClientRect().width;
  const context = canvas.getContext("2d");
  const ink = (x, y, w, h) => {
    if (w <= 0 || h <= 0) return 0;
    const pixels = context.getImageData(x, y, w, h).data;
    let inked = 0;
    for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) inked++;
    return inked;
  };
  const left = Math.floor((over.offsetLeft - 8) * scale);
  const below = Math.ceil((over.offsetTop + over.offsetHeight + 8) * scale);
  const texts = (css) => [...figure.querySelectorAll(css)].map((e) => e.textContent.trim());
  return {
    id: figure.id,
    axes: figure.querySelectorAll(".u-axis").length,
    x_label: figure.dataset.xLabel,
    y_label: figure.dataset.yLabel,
    x_ticks: JSON.parse(figure.dataset.xTicks || "[]"),
    y_ticks: JSON.parse(figure.dataset.yTicks || "[]"),
    values: texts(".legend .value"),
    units: texts(".legend .unit"),
    ink_left: ink(0, 0, left, canvas.height),
    ink_below: ink(0, below, canvas.width, canvas.height - below),
  };
});
"#;

/// A number as the dashboard shows it (en-US in the test browser: `1,234.5`).
fn shown_number(text: &str) -> Option<f64> {
    text.replace(',', "").parse().ok()
}

/// Every chart of the dashboard has a time axis with wall-clock ticks, a value axis with ticks
/// and its unit, and a legend with each series' current value and unit.
#[actix_web::test]
async fn dashboard_charts_have_axes_units_and_current_values() {
    if !browser_wanted() {
        return;
    }
    let _one = one_browser_at_a_time().await;
    let server = TestServer::start();
    // Something to chart: a session, and an event for it every 50 ms, so that each second the
    // dashboard polls has deliveries and a latency to show.
    let session = server.ready_client("dashboard-charts").await;
    let publish_url = server.http("/api/v1/publish");
    let traffic = actix_web::rt::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(50));
        loop {
            every.tick().await;
            let body = json!({"user_id": "dashboard-charts", "events": [thinking("tick")]}).to_string();
            http_post(&publish_url, Some(API_KEY), &body).await;
        }
    });
    let profile = tempfile::tempdir().unwrap();
    let (_driver, browser) = start_browser(profile.path()).await;
    // Tall enough for the screenshot to show every chart.
    browser.set_window_size(1200, 1400).await.unwrap();
    browser.goto(&server.http("/dashboard")).await.unwrap();

    // (chart, unit of its value axis, units of its series)
    let expected = [
        ("chart-connections", "connections", ["connections", "connections"]),
        ("chart-churn", "connections/s", ["connections/s", "connections/s"]),
        ("chart-events", "per second", ["events/s", "frames/s"]),
        ("chart-latency", "ms", ["ms", "ms"]),
    ];
    for (id, _, _) in expected {
        // Drawn with a line (two points at least), and every current value known.
        let ready = format!("#{id}[data-drawn]:not(:has(.legend .value[data-missing]))");
        browser
            .wait()
            .at_most(WAIT)
            .every(Duration::from_millis(50))
            .for_element(Locator::Css(&ready))
            .await
            .unwrap_or_else(|e| panic!("{id} was not drawn with current values: {e}"));
    }
    screenshot(&browser, "10-dashboard-charts.png").await;

    let charts: Vec<Value> =
        serde_json::from_value(browser.execute(READ_CHARTS, vec![]).await.unwrap()).unwrap();
    let ids: Vec<&str> = charts.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids, expected.map(|(id, _, _)| id), "every chart of the page is checked");
    for (chart, (id, unit, series_units)) in charts.iter().zip(expected) {
        let strings = |key: &str| -> Vec<String> { serde_json::from_value(chart[key].clone()).unwrap() };
        assert_eq!(chart["axes"], 2, "{id}: a time axis and a value axis: {chart}");
        assert_eq!(chart["x_label"], "local time", "{id}: {chart}");
        assert_eq!(chart["y_label"], unit, "{id}: the value axis names its unit: {chart}");
        let x_ticks = strings("x_ticks");
        assert!(x_ticks.len() >= 2, "{id}: time ticks: {chart}");
        for t in &x_ticks {
            let (hours, rest) = t.split_once(':').unwrap_or_else(|| panic!("{id}: {t:?} is no time of day"));
            assert!(hours.parse::<u8>().is_ok_and(|h| h < 24), "{id}: {t:?}");
            assert!(rest.get(..2).and_then(|m| m.parse::<u8>().ok()).is_some_and(|m| m < 60), "{id}: {t:?}");
        }
        let y_ticks = strings("y_ticks");
        assert!(y_ticks.len() >= 2, "{id}: value ticks: {chart}");
        let y_values: Vec<f64> =
            y_ticks.iter().map(|t| shown_number(t).unwrap_or_else(|| panic!("{id}: {t:?}"))).collect();
        assert_eq!(y_values[0], 0.0, "{id}: the value axis starts at zero: {chart}");
        assert!(y_values.windows(2).all(|w| w[0] < w[1]), "{id}: {chart}");
        let values = strings("values");
        assert_eq!(values.len(), series_units.len(), "{id}: one current value per series: {chart}");
        for v in &values {
            assert!(shown_number(v).is_some_and(|n| n >= 0.0), "{id}: current value {v:?} is no number");
        }
        let units = strings("units");
        assert_eq!(units.len(), series_units.len(), "{id}: each current value has its unit: {chart}");
        for ((shown, want), value) in units.iter().zip(series_units).zip(&values) {
            // A count of one has its unit in the singular ("1 connection").
            let singular = shown_number(value) == Some(1.0) && format!("{shown}s") == want;
            assert!(shown == want || singular, "{id}: {value} {shown}, expected the unit {want}");
        }
        assert!(chart["ink_left"].as_u64().unwrap() > 0, "{id}: nothing drawn beside the value axis");
        assert!(chart["ink_below"].as_u64().unwrap() > 0, "{id}: nothing drawn below the time axis");
    }
    let ready = charts[0]["values"][0].as_str().unwrap();
    assert!(shown_number(ready).is_some_and(|n| n >= 1.0), "the open session is counted: {ready}");
    assert!(page_errors(&browser).await.is_empty(), "dashboard: {:?}", page_errors(&browser).await);

    traffic.abort();
    browser.close().await.unwrap();
    drop(session);
}

#[actix_web::test]
async fn static_files_have_types_etags_and_304s() {
    let server = TestServer::start();
    let client = awc::Client::default();
    for (path, kind) in [
        ("/", "text/html"),
        ("/dashboard", "text/html"),
        ("/static/app.js", "javascript"),
        ("/static/style.css", "text/css"),
        // A subfolder: the vendored chart library and its licence.
        ("/static/vendor/uPlot.iife.min.js", "javascript"),
        ("/static/vendor/uPlot.min.css", "text/css"),
        ("/static/vendor/LICENSE", "text/plain"),
    ] {
        let response = client.get(server.http(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let content_type = response.headers().get("content-type").unwrap().to_str().unwrap().to_owned();
        assert!(content_type.contains(kind), "{path}: {content_type}");
        let etag = response.headers().get("etag").unwrap().to_str().unwrap().to_owned();
        let again = client
            .get(server.http(path))
            .insert_header(("If-None-Match", etag.as_str()))
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 304, "{path}");
    }
    assert_eq!(client.get(server.http("/static/nope.js")).send().await.unwrap().status(), 404);
    let (status, stats) = http_get(&server.http("/dashboard/stats.json"), None).await;
    assert_eq!(status, 200);
    assert!(stats["connections"]["processing_ready"].is_number(), "{stats}");
    assert!(stats["delivery"]["buckets"].as_array().is_some_and(|b| !b.is_empty()));
}

// ----- the sidebar of stored conversations (docs/conversations.md) ------------------------------

/// The sidebar's entries, top first: `[thread id, title]`.
const SIDEBAR: &str = "[...document.querySelectorAll('#thread-list li')]\
    .map((li) => [li.dataset.thread, (li.querySelector('.thread-title') || {}).textContent])";

async fn sidebar(browser: &Browser) -> Vec<(String, String)> {
    let rows = browser.execute(&format!("return {SIDEBAR};"), vec![]).await.unwrap();
    serde_json::from_value(rows).unwrap()
}

/// Waits until the sidebar is exactly `titles`, top first.
async fn wait_for_sidebar(browser: &Browser, what: &str, titles: &[&str]) -> Vec<(String, String)> {
    let want = serde_json::to_string(titles).unwrap();
    wait_until(browser, what, &format!("JSON.stringify({SIDEBAR}.map((row) => row[1])) === {want:?}")).await;
    sidebar(browser).await
}

/// The open conversation as text: one line per item, `user: ...` or `run <status>: <answer>`,
/// with `*` after the role for an item the page has from the store (`data-stored`: loaded with
/// the thread's messages, possibly shown with what the stream added).
const CONVERSATION: &str = "[...document.querySelectorAll('#messages > li.msg')].map((li) => {\
      const stored = li.dataset.stored === 'true' ? '*' : '';\
      if (li.classList.contains('user')) return `user${stored}: ${li.textContent}`;\
      if (li.classList.contains('run')) return `run${stored} ${li.dataset.status}: ${li.querySelector('.answer').textContent}`;\
      return `other: ${li.textContent}`;\
    })";

async fn wait_for_conversation(browser: &Browser, what: &str, lines: &[&str]) {
    let want = serde_json::to_string(lines).unwrap();
    wait_until(browser, what, &format!("JSON.stringify({CONVERSATION}) === {want:?}")).await;
}

const TWO_TIMES_21: &str = "I worked it out with the calculator: 2 * 21 = 42.";

/// A conversation lasts: it is listed in the sidebar with its title, a reload shows it from the
/// store, and so does a new server on the same SQLite file after the first one stopped.
#[actix_web::test]
async fn conversations_survive_a_reload_and_a_server_restart() {
    if !browser_wanted() {
        return;
    }
    let _one = one_browser_at_a_time().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("x.db");
    let sqlite = |db: PathBuf| {
        move |c: &mut agentwire::config::Config| {
            c.store.kind = agentwire::config::StoreKind::Sqlite;
            c.store.path = db;
            c.agent.step_delay_ms = 20;
            // A short history: after the reload the stream replays only the run's end (its
            // start is gone); the conversation is the store's.
            c.history.events_per_user = std::num::NonZeroUsize::new(5).unwrap();
        }
    };
    let server = TestServer::with(sqlite(db.clone()));
    let profile = tempfile::tempdir().unwrap();
    let (_driver, browser) = start_browser(profile.path()).await;
    sign_in(&browser, &format!("http://{}/", server.addr), "browser-carol").await;
    send_message(&browser, "what is 2 * 21").await;
    wait_until(&browser, "the run to complete", &format!("{} === 1", runs_with_status("ok"))).await;
    let rows = wait_for_sidebar(&browser, "the thread in the sidebar", &["what is 2 * 21"]).await;
    let thread_id = rows[0].0.clone();
    let current = browser.execute("return document.querySelector('#thread-list li').dataset.current", vec![]);
    assert_eq!(current.await.unwrap(), json!("true"), "the open thread is marked in the sidebar");
    screenshot(&browser, "11-thread-in-sidebar.png").await;

    // A reload: the conversation is the store's (and the stream's replay adds nothing to it).
    browser.refresh().await.unwrap();
    wait_until(&browser, "processing_ready", "document.body.dataset.connection === 'processing_ready'").await;
    let stored = ["user*: what is 2 * 21", &format!("run* ok: {TWO_TIMES_21}")];
    wait_for_conversation(&browser, "the stored conversation after the reload", &stored).await;
    assert_eq!(sidebar(&browser).await, rows, "the same sidebar after the reload");
    let summary = browser.find(Locator::Css("li.run details summary")).await.unwrap().text().await.unwrap();
    assert_eq!(summary, "✓ calculator({\"expression\":\"2 * 21\"})", "the stored tool call, whole");
    let url = browser.current_url().await.unwrap();
    assert_eq!(
        url.fragment(),
        Some(format!("thread={thread_id}").as_str()),
        "the open thread is in the address"
    );
    screenshot(&browser, "12-after-reload.png").await;
    assert!(page_errors(&browser).await.is_empty(), "after the reload: {:?}", page_errors(&browser).await);

    // The server stops; a new one on the same file (and another port) has it all.
    server.shutdown().await;
    let restarted = TestServer::with(sqlite(db.clone()));
    sign_in(&browser, &format!("http://{}/", restarted.addr), "browser-carol").await;
    assert_eq!(wait_for_sidebar(&browser, "the sidebar from the store", &["what is 2 * 21"]).await, rows);
    wait_for_conversation(&browser, "the stored conversation after the restart", &stored).await;
    // The stored tool call reads like a live one: name, arguments, result.
    let summary = browser.find(Locator::Css("li.run details summary")).await.unwrap().text().await.unwrap();
    assert_eq!(summary, "✓ calculator({\"expression\":\"2 * 21\"})");
    let result = browser
        .execute("return document.querySelector('li.run details pre:last-child').textContent", vec![])
        .await
        .unwrap();
    assert!(result.as_str().is_some_and(|r| r.starts_with("result: ") && r.contains("42")), "{result}");
    screenshot(&browser, "13-after-server-restart.png").await;

    // The conversation goes on, on the same thread.
    send_message(&browser, "and what is 3 * 3").await;
    wait_until(&browser, "the second run", &format!("{} === 2", runs_with_status("ok"))).await;
    let answer = "I worked it out with the calculator: 3 * 3 = 9.";
    let lines = [stored[0], stored[1], "user: and what is 3 * 3", &format!("run ok: {answer}")];
    wait_for_conversation(&browser, "the conversation going on", &lines).await;
    let (status, page) = http_get(
        &restarted.http(&format!("/api/v1/threads/{thread_id}/messages")),
        Some(&restarted.token("browser-carol")),
    )
    .await;
    assert_eq!(status, 200, "{page}");
    let users: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["what is 2 * 21", "and what is 3 * 3"], "both on the thread the page had open");
    assert_eq!(sidebar(&browser).await.len(), 1);
    assert!(page_errors(&browser).await.is_empty(), "after the restart: {:?}", page_errors(&browser).await);
    browser.close().await.unwrap();
}

/// Two tabs of one user: a new thread, a rename and a delete in one show in the other's sidebar;
/// the other tab, which had the deleted thread open, clears its conversation.
#[actix_web::test]
async fn renames_and_deletes_reach_every_tab() {
    if !browser_wanted() {
        return;
    }
    let _one = one_browser_at_a_time().await;
    let server = TestServer::with(|c| c.agent.step_delay_ms = 20);
    let base = format!("http://{}/", server.addr);
    let profile = tempfile::tempdir().unwrap();
    let (_driver, browser) = start_browser(profile.path()).await;
    let first_tab = browser.window().await.unwrap();
    sign_in(&browser, &base, "browser-erin").await;
    send_message(&browser, "the first conversation").await;
    wait_until(&browser, "the first run", &format!("{} === 1", runs_with_status("ok"))).await;
    browser.find(Locator::Css("#new-thread")).await.unwrap().click().await.unwrap();
    wait_until(&browser, "an empty conversation", "document.querySelectorAll('#messages > li').length === 0")
        .await;
    send_message(&browser, "the second conversation").await;
    wait_until(&browser, "the second run", &format!("{} === 1", runs_with_status("ok"))).await;
    let rows = wait_for_sidebar(
        &browser,
        "two threads, newest first",
        &["the second conversation", "the first conversation"],
    )
    .await;
    let first_id = rows[1].0.clone();

    // The second tab lists both and opens the first.
    let second_tab = browser.new_window(true).await.unwrap().handle;
    browser.switch_to_window(second_tab.clone()).await.unwrap();
    sign_in(&browser, &base, "browser-erin").await;
    assert_eq!(wait_for_sidebar(&browser, "the second tab's sidebar", &[&rows[0].1, &rows[1].1]).await, rows);
    let first_row = format!("#thread-list li[data-thread='{first_id}']");
    browser.find(Locator::Css(&format!("{first_row} .thread-title"))).await.unwrap().click().await.unwrap();
    wait_for_conversation(&browser, "the first conversation", &["user*: the first conversation", "run* ok: Your message has 3 words and 22 characters. Ask me some arithmetic, like 12 * (3 + 4), and I will use my calculator."]).await;

    // Renamed in the first tab (in place: Ctrl+A, the new title, Enter).
    browser.switch_to_window(first_tab.clone()).await.unwrap();
    browser.find(Locator::Css(&format!("{first_row} .rename"))).await.unwrap().click().await.unwrap();
    let field = browser.find(Locator::Css(&format!("{first_row} .thread-rename"))).await.unwrap();
    field.send_keys("\u{E009}a\u{E000}Renamed in the first tab\u{E007}").await.unwrap();
    let renamed = ["Renamed in the first tab", "the second conversation"];
    wait_for_sidebar(&browser, "the rename (and the renamed thread on top)", &renamed).await;
    screenshot(&browser, "14-renamed.png").await;
    browser.switch_to_window(second_tab.clone()).await.unwrap();
    wait_for_sidebar(&browser, "the rename in the other tab", &renamed).await;
    let (_, listed) = http_get(&server.http("/api/v1/threads"), Some(&server.token("browser-erin"))).await;
    assert_eq!(listed["threads"][0]["title"], "Renamed in the first tab", "{listed}");

    // Deleted in the first tab, after a confirmation.
    browser.switch_to_window(first_tab.clone()).await.unwrap();
    browser.find(Locator::Css(&format!("{first_row} .delete"))).await.unwrap().click().await.unwrap();
    let question = browser.get_alert_text().await.unwrap();
    assert!(question.contains("Renamed in the first tab"), "{question}");
    browser.accept_alert().await.unwrap();
    wait_for_sidebar(&browser, "the thread to go", &["the second conversation"]).await;
    browser.switch_to_window(second_tab.clone()).await.unwrap();
    wait_for_sidebar(&browser, "the thread to go from the other tab", &["the second conversation"]).await;
    wait_until(
        &browser,
        "the deleted conversation to clear",
        "document.querySelectorAll('#messages > li').length === 0",
    )
    .await;
    let notice = browser.find(Locator::Css("#notice")).await.unwrap().text().await.unwrap();
    assert_eq!(notice, "This conversation was deleted.");
    screenshot(&browser, "15-deleted-in-the-other-tab.png").await;
    let (status, _) =
        http_get(&server.http(&format!("/api/v1/threads/{first_id}")), Some(&server.token("browser-erin")))
            .await;
    assert_eq!(status, 404);
    assert!(page_errors(&browser).await.is_empty(), "second tab: {:?}", page_errors(&browser).await);
    browser.switch_to_window(first_tab).await.unwrap();
    assert!(page_errors(&browser).await.is_empty(), "first tab: {:?}", page_errors(&browser).await);
    browser.close().await.unwrap();
}

/// How a sidebar title fits: cut with an ellipsis by CSS, inside the sidebar, and the page no
/// wider than the window.
const TITLE_FIT: &str = r##"
const nav = document.querySelector("nav.threads");
const li = document.querySelector("#thread-list li");
const title = li.querySelector(".thread-title");
const style = getComputedStyle(title);
const right = (e) => e.getBoundingClientRect().right;
return {
  text: title.textContent,
  text_overflow: style.textOverflow, white_space: style.whiteSpace, overflow: style.overflowX,
  scroll_width: title.scrollWidth, client_width: title.clientWidth,
  title_right: right(title), row_right: right(li), delete_right: right(li.querySelector(".delete")),
  nav_right: right(nav), nav_scroll_width: nav.scrollWidth, nav_client_width: nav.clientWidth,
  page_width: document.documentElement.scrollWidth, window_width: window.innerWidth,
};
"##;

fn assert_title_fits(fit: &Value, at: &str) {
    let n = |key: &str| fit[key].as_f64().unwrap_or_else(|| panic!("{at}: {key} in {fit}"));
    assert_eq!(
        (&fit["text_overflow"], &fit["white_space"], &fit["overflow"]),
        (&json!("ellipsis"), &json!("nowrap"), &json!("hidden")),
        "{at}: {fit}"
    );
    assert!(n("scroll_width") > n("client_width"), "{at}: the title is cut: {fit}");
    assert!(n("title_right") <= n("row_right") + 0.5, "{at}: {fit}");
    assert!(n("delete_right") <= n("nav_right") + 0.5, "{at}: the row's buttons stay in the sidebar: {fit}");
    assert!(
        n("nav_scroll_width") <= n("nav_client_width"),
        "{at}: the sidebar does not scroll sideways: {fit}"
    );
    assert!(n("page_width") <= n("window_width"), "{at}: the page is no wider than the window: {fit}");
}

/// A long title is cut with an ellipsis and never overflows the sidebar, on a desktop width and
/// on a phone's, where the sidebar sits above the conversation.
#[actix_web::test]
async fn a_long_title_is_cut_with_an_ellipsis() {
    if !browser_wanted() {
        return;
    }
    let _one = one_browser_at_a_time().await;
    let server = TestServer::with(|c| c.agent.step_delay_ms = 0);
    let profile = tempfile::tempdir().unwrap();
    let (_driver, browser) = start_browser(profile.path()).await;
    sign_in(&browser, &format!("http://{}/", server.addr), "browser-frank").await;
    let long = "please summarise the minutes of the quarterly planning meeting about the new \
                warehouse in Rotterdam and the delivery schedule for the spring";
    send_message(&browser, long).await;
    wait_until(&browser, "the run to complete", &format!("{} === 1", runs_with_status("ok"))).await;
    // The store's title: the first 79 characters and an ellipsis.
    let title = format!("{}…", &long[..79]);
    wait_for_sidebar(&browser, "the store's title", &[&title]).await;
    let fit = browser.execute(TITLE_FIT, vec![]).await.unwrap();
    assert_eq!(fit["text"], title.as_str());
    assert_title_fits(&fit, "desktop");
    screenshot(&browser, "16-long-title.png").await;

    browser.set_window_size(390, 844).await.unwrap();
    wait_until(&browser, "the phone layout", "window.innerWidth < 400").await;
    let fit = browser.execute(TITLE_FIT, vec![]).await.unwrap();
    assert_title_fits(&fit, "phone");
    let above = browser
        .execute(
            "return document.querySelector('nav.threads').getBoundingClientRect().bottom \
             <= document.querySelector('section.conversation').getBoundingClientRect().top + 1",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(above, json!(true), "on a phone the sidebar is above the conversation");
    screenshot(&browser, "17-long-title-phone.png").await;
    assert!(page_errors(&browser).await.is_empty(), "{:?}", page_errors(&browser).await);
    browser.close().await.unwrap();
}

/// A reload while an answer streams: the page shows the run in progress from
/// `processing_ready.runs`, then its live events up to the completed answer, each piece once.
#[actix_web::test]
async fn a_reload_joins_the_run_in_progress() {
    if !browser_wanted() {
        return;
    }
    let _one = one_browser_at_a_time().await;
    let server = TestServer::with(|c| c.agent.step_delay_ms = 300);
    let profile = tempfile::tempdir().unwrap();
    let (_driver, browser) = start_browser(profile.path()).await;
    sign_in(&browser, &format!("http://{}/", server.addr), "browser-grace").await;
    send_message(&browser, "what is 2 * 21").await;
    // The run has started and thought (its second step of eight, 300 ms apart).
    wait_until(
        &browser,
        "the run's thinking",
        "document.querySelector('li.run[data-status=running] .thinking')",
    )
    .await;
    screenshot(&browser, "18-before-reload.png").await;
    browser.refresh().await.unwrap();

    // The run in progress, joined: what it had so far (its thinking at least).
    let joined = wait_until(
        &browser,
        "the joined run",
        "(() => { const run = document.querySelector('#messages li.run[data-joined]'); \
         return run && { status: run.dataset.status, thinking: run.querySelector('.thinking')?.textContent }; })()",
    )
    .await;
    assert_eq!(joined["status"], "running", "the run is shown in progress: {joined}");
    assert_eq!(joined["thinking"], "Reading your message and picking a tool: calculator.", "{joined}");
    screenshot(&browser, "19-joined-run.png").await;

    // Then its completed answer, from its live events: every piece once.
    wait_until(&browser, "the joined run to complete", &format!("{} === 1", runs_with_status("ok"))).await;
    wait_for_conversation(
        &browser,
        "the completed run",
        &["user*: what is 2 * 21", &format!("run ok: {TWO_TIMES_21}")],
    )
    .await;
    let tools = browser.find_all(Locator::Css("li.run details summary")).await.unwrap();
    assert_eq!(tools.len(), 1, "one tool call");
    assert_eq!(tools[0].text().await.unwrap(), "✓ calculator({\"expression\":\"2 * 21\"})");
    let thinking = browser.find(Locator::Css("li.run .thinking")).await.unwrap().text().await.unwrap();
    assert_eq!(thinking, "Reading your message and picking a tool: calculator.");
    screenshot(&browser, "20-joined-run-completed.png").await;
    assert!(page_errors(&browser).await.is_empty(), "{:?}", page_errors(&browser).await);
    browser.close().await.unwrap();
}

/// More threads than one page of the listing: "Load more" brings the rest, in order. More
/// messages than one page of a thread: "Load earlier messages" brings the older ones.
#[actix_web::test]
async fn the_sidebar_and_a_thread_load_more_in_pages() {
    if !browser_wanted() {
        return;
    }
    let _one = one_browser_at_a_time().await;
    let server = TestServer::with(|c| {
        use std::num::NonZeroU32;
        c.agent.kind = agentwire::config::AgentKind::None;
        c.limits.messages_per_second = NonZeroU32::new(1000).unwrap();
        c.limits.burst = NonZeroU32::new(1000).unwrap();
        c.limits.user_messages_per_second = NonZeroU32::new(1000).unwrap();
    });
    // 55 threads (the page asks for 50 at a time), the newest with 111 messages (100 a page).
    let mut tab = server.ready_client("browser-heidi").await;
    for i in 0..55 {
        tab.say(&format!("t-{i:02}"), &format!("thread {i:02}"), None).await;
    }
    for j in 1..=110 {
        tab.say("t-54", &format!("more {j:03}"), None).await;
    }
    let profile = tempfile::tempdir().unwrap();
    let (_driver, browser) = start_browser(profile.path()).await;
    sign_in(&browser, &format!("http://{}/", server.addr), "browser-heidi").await;
    let first_page: Vec<String> = (5..55).rev().map(|i| format!("thread {i:02}")).collect();
    let first_page: Vec<&str> = first_page.iter().map(String::as_str).collect();
    wait_for_sidebar(&browser, "the first page of threads", &first_page).await;
    wait_until(
        &browser,
        "the newest thread open",
        "document.getElementById('messages').dataset.thread === 't-54'",
    )
    .await;
    let shown = "document.querySelectorAll('#messages > li.msg.user').length";
    wait_until(&browser, "its newest 100 messages", &format!("{shown} === 100")).await;
    let first_shown =
        browser.execute("return document.querySelector('#messages > li.msg.user').textContent", vec![]);
    assert_eq!(first_shown.await.unwrap(), json!("more 011"));
    screenshot(&browser, "21-pages.png").await;

    browser.find(Locator::Css("#more-threads")).await.unwrap().click().await.unwrap();
    let all: Vec<String> = (0..55).rev().map(|i| format!("thread {i:02}")).collect();
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    wait_for_sidebar(&browser, "every thread", &all).await;
    wait_until(&browser, "no more to load", "document.getElementById('more-threads').hidden").await;

    browser.find(Locator::Css("#older")).await.unwrap().click().await.unwrap();
    wait_until(&browser, "every message", &format!("{shown} === 111")).await;
    let texts = browser
        .execute(
            "return [...document.querySelectorAll('#messages > li.msg.user')].map((li) => li.textContent)",
            vec![],
        )
        .await
        .unwrap();
    let mut want = vec!["thread 54".to_owned()];
    want.extend((1..=110).map(|j| format!("more {j:03}")));
    assert_eq!(texts, json!(want), "oldest first, each once");
    assert!(browser.find(Locator::Css("#older")).await.is_err(), "nothing older");
    assert!(page_errors(&browser).await.is_empty(), "{:?}", page_errors(&browser).await);
    browser.close().await.unwrap();
}

/// A LangGraph agent behind the chat page (docs/agents.md, v2): the page's frontend tool (the
/// user's local time) runs in the browser when the agent calls it, and an interrupt shows as a
/// question with the agent's options; clicking one answers it and the graph goes on.
#[actix_web::test]
async fn frontend_tools_and_interrupts_in_the_chat_page() {
    if !browser_wanted() {
        return;
    }
    let _one = one_browser_at_a_time().await;
    let agent = common::python_agent::PythonAgent::start("langgraph-agent", &[]);
    let url = agent.url.clone();
    let server = TestServer::with(move |c| {
        c.agent.kind = agentwire::config::AgentKind::AgUi;
        c.agent.url = url;
    });
    let base = format!("http://{}/", server.addr);
    let profile = tempfile::tempdir().unwrap();
    let (_driver, browser) = start_browser(profile.path()).await;
    sign_in(&browser, &base, "browser-langgraph").await;

    send_message(&browser, "what is my local time?").await;
    let answer = wait_until(
        &browser,
        "the answer with the browser's time",
        "[...document.querySelectorAll('li.run .answer')].map((a) => a.textContent).find((t) => t.startsWith('Your local time is'))",
    )
    .await;
    // The time the browser gave, with its time zone.
    let zone =
        browser.execute("return Intl.DateTimeFormat().resolvedOptions().timeZone", vec![]).await.unwrap();
    assert!(answer.as_str().unwrap().contains(zone.as_str().unwrap()), "{answer}");
    // The call shows with its result, not as a message of the user's.
    wait_until(&browser, "the tool call's result", "[...document.querySelectorAll('li.run details summary')].some((s) => s.textContent.startsWith('✓ get_local_time'))").await;
    let users = browser
        .execute("return document.querySelectorAll('#messages li.user').length", vec![])
        .await
        .unwrap();
    assert_eq!(users, json!(1));

    send_message(&browser, "please confirm the order").await;
    wait_until(
        &browser,
        "the question",
        "document.querySelector('li.interrupt button[data-option=\"yes\"]')",
    )
    .await;
    let question = browser.find(Locator::Css("li.interrupt .question")).await.unwrap().text().await.unwrap();
    assert!(question.starts_with("Do you want me to go ahead"), "{question}");
    screenshot(&browser, "12-interrupt.png").await;
    browser
        .find(Locator::Css("li.interrupt button[data-option=\"yes\"]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_until(
        &browser,
        "the answer after the interrupt",
        "[...document.querySelectorAll('li.run .answer')].some((a) => a.textContent === 'You said: yes.') && !document.querySelector('li.interrupt')",
    )
    .await;
    screenshot(&browser, "13-interrupt-answered.png").await;
    assert_eq!(page_errors(&browser).await, Vec::<String>::new());
    browser.close().await.unwrap();
}

/// CORS (docs/ag-ui.md): a page on another origin calls `POST /ag-ui` and the threads API with
/// the user's token, as `@ag-ui/client` and CopilotKit do from an app's own origin; an origin
/// `server.allowed_origins` does not name is refused by the browser.
#[actix_web::test]
async fn a_page_on_another_origin_calls_ag_ui_and_the_threads_api() {
    if !browser_wanted() {
        return;
    }
    let _one = one_browser_at_a_time().await;
    let open = TestServer::start();
    let app = TestServer::start(); // the page's own origin, another port
    let app_origin = format!("http://{}", app.addr);
    let strict = TestServer::with(|c| c.server.allowed_origins = vec!["http://example.com".into()]);
    let profile = tempfile::tempdir().unwrap();
    let (_driver, browser) = start_browser(profile.path()).await;
    browser.goto(&format!("{app_origin}/")).await.unwrap();
    const CALL: &str = r#"
const [api, token, done] = arguments;
(async () => {
  const input = {threadId: "cors", messages: [{id: "u1", role: "user", content: "what is 2 + 3?"}],
                 state: {}, tools: [], context: [], forwardedProps: {}};
  const run = await fetch(`${api}/ag-ui`, {method: "POST", body: JSON.stringify(input),
    headers: {"Authorization": `Bearer ${token}`, "Content-Type": "application/json"}});
  const events = await run.text();
  const list = await fetch(`${api}/api/v1/threads`, {headers: {"Authorization": `Bearer ${token}`}});
  return {run: run.status, finished: events.includes("RUN_FINISHED"), threads: list.status,
          listed: (await list.json()).threads.map((t) => t.thread_id)};
})().then(done, (e) => done({error: String(e)}));
"#;
    let api = format!("http://{}", open.addr);
    let answer = browser.execute_async(CALL, vec![json!(api), json!(open.token("cors-user"))]).await.unwrap();
    assert_eq!(answer, json!({"run": 200, "finished": true, "threads": 200, "listed": ["cors"]}));
    let api = format!("http://{}", strict.addr);
    let answer =
        browser.execute_async(CALL, vec![json!(api), json!(strict.token("cors-user"))]).await.unwrap();
    assert!(answer["error"].as_str().is_some_and(|e| e.contains("Failed to fetch")), "{answer}");
    browser.close().await.unwrap();
}
