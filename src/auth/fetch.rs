//! Keeps each identity provider's keys fresh (docs/protocol.md section 2, "Identity providers"),
//! on a thread of its own: no fetch ever runs on the registry's thread or in a session's path.
//!
//! Per provider, one task fetches the key set (after discovery, for an `oidc_issuer`) at start,
//! then every `auth.jwks_refresh_secs` (sooner when the response's `Cache-Control: max-age`
//! says so), at once when `key_sets.rs` asks for an unknown `kid`, and again with a growing
//! delay while the provider cannot be reached. A failed fetch keeps the keys held: a provider
//! that is down does not log anyone out. HTTP is reqwest's, with timeouts; each response is
//! read within [`MAX_DOCUMENT_BYTES`].

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_channel::{mpsc, oneshot};
use futures_util::future::join_all;
use futures_util::StreamExt;
use jsonwebtoken::jwk::Jwk;
use log::{debug, info, warn};
use serde::Deserialize;

use super::key_sets::{Issuer, Key, KeySet, Source};
use crate::config::same_issuer;
use crate::metrics::Metrics;

/// A discovery document or key set larger than this is refused.
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;
/// Keys taken from one set; providers publish a handful (the current key, the next, the last).
pub const MAX_KEYS: usize = 100;
/// Redirects followed per request; never from https to http.
const MAX_REDIRECTS: usize = 5;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The whole of one request, body included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A provider's `max-age` is followed down to this, not below.
const MIN_REFRESH: Duration = Duration::from_secs(5);
/// Retries after failures wait 1 s, 2 s, 4 s ... up to this.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// How long a starting server waits for the first fetches; a provider slower than that is
/// waited for in the background, its tokens refused until its keys arrive.
const START_WAIT: Duration = Duration::from_secs(5);

/// Starts the fetcher thread for `issuers` and returns once each one's first fetch ended, or
/// after [`START_WAIT`].
pub fn start(
    issuers: Vec<(Arc<Issuer>, mpsc::UnboundedReceiver<oneshot::Sender<()>>)>,
    refresh: Duration,
    metrics: Arc<Metrics>,
) -> Result<(), String> {
    // reqwest is built without a TLS crypto provider of its own; rustls's ring provider is the
    // process's (installing it twice is harmless).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .user_agent(concat!("agentwire/", env!("CARGO_PKG_VERSION")))
        // Keys fetched over https must not be swapped on the way by a redirect to plain http.
        .redirect(reqwest::redirect::Policy::custom(|attempt| {
            let downgrade = attempt.url().scheme() == "http"
                && attempt.previous().iter().any(|url| url.scheme() == "https");
            if downgrade {
                attempt.error("a redirect from https to http")
            } else if attempt.previous().len() > MAX_REDIRECTS {
                attempt.error("too many redirects")
            } else {
                attempt.follow()
            }
        }))
        .build()
        .map_err(|e| format!("auth.jwks_url: cannot build the HTTP client: {e}"))?;
    let count = issuers.len();
    let (first_done, first) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("agentwire-jwks".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(e) => return log::error!("auth: cannot start the key fetcher: {e}"),
            };
            let tasks = issuers.into_iter().map(|(issuer, requests)| {
                let fetcher = Fetcher {
                    client: client.clone(),
                    // Weak: the verifier owns its providers, and dropping it (a server stopped
                    // in-process) closes their channels, which ends these tasks and the thread.
                    issuer: Arc::downgrade(&issuer),
                    label: issuer.label.clone(),
                    source: issuer.source.clone(),
                    refresh,
                    metrics: Arc::clone(&metrics),
                };
                fetcher.run(requests, first_done.clone())
            });
            runtime.block_on(join_all(tasks));
            debug!("auth: the key fetcher stopped");
        })
        .map_err(|e| format!("auth: cannot start the key fetcher thread: {e}"))?;
    let deadline = std::time::Instant::now() + START_WAIT;
    for _ in 0..count {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if first.recv_timeout(left).is_err() {
            break;
        }
    }
    Ok(())
}

struct Fetcher {
    client: reqwest::Client,
    issuer: Weak<Issuer>,
    label: String,
    source: Source,
    refresh: Duration,
    metrics: Arc<Metrics>,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

#[derive(Deserialize)]
struct KeySetDocument {
    keys: Vec<serde_json::Value>,
}

/// A fetched document and how long the provider says it may be kept.
struct Fetched {
    body: Vec<u8>,
    max_age: Option<Duration>,
}

impl Fetcher {
    async fn run(
        self,
        mut requests: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
        first_done: std::sync::mpsc::Sender<()>,
    ) {
        let mut first_done = Some(first_done);
        let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
        // Found by discovery once, and again after a fetch from it failed.
        let mut jwks_uri = match &self.source {
            Source::KeySet(url) => Some(url.clone()),
            Source::Discovery(_) => None,
        };
        let mut failures = 0u32;
        loop {
            let next = match self.fetch(&mut jwks_uri).await {
                Ok(max_age) => {
                    failures = 0;
                    self.outcome("ok");
                    max_age.map_or(self.refresh, |age| age.clamp(MIN_REFRESH, self.refresh.max(MIN_REFRESH)))
                }
                Err(why) => {
                    failures = failures.saturating_add(1);
                    self.outcome("error");
                    let held = self.held().by_kid.len();
                    warn!("auth: cannot fetch the keys of {} ({why}); {held} keys held", self.label);
                    if matches!(self.source, Source::Discovery(_)) {
                        jwks_uri = None;
                    }
                    let retry = Duration::from_secs(1u64 << failures.min(6).saturating_sub(1));
                    retry.min(MAX_RETRY).min(self.refresh)
                }
            };
            for waiter in waiting.drain(..) {
                let _ = waiter.send(());
            }
            if let Some(done) = first_done.take() {
                let _ = done.send(());
            }
            match tokio::time::timeout(next, requests.next()).await {
                Ok(Some(waiter)) => {
                    waiting.push(waiter);
                    while let Ok(waiter) = requests.try_recv() {
                        waiting.push(waiter);
                    }
                    debug!("auth: fetching the keys of {} for an unknown kid", self.label);
                }
                Ok(None) => return,
                Err(_elapsed) => {}
            }
        }
    }

    /// The keys its provider holds now (none once the verifier is gone).
    fn held(&self) -> Arc<KeySet> {
        self.issuer.upgrade().map(|issuer| issuer.keys()).unwrap_or_default()
    }

    fn outcome(&self, outcome: &str) {
        self.metrics.jwks_fetches.with_label_values(&[&self.label, outcome]).inc();
    }

    /// One refresh: discovery when needed, then the key set, which replaces the keys held.
    async fn fetch(&self, jwks_uri: &mut Option<String>) -> Result<Option<Duration>, String> {
        let url = match jwks_uri {
            Some(url) => url.clone(),
            None => {
                let found = self.discover().await?;
                *jwks_uri = Some(found.clone());
                found
            }
        };
        let fetched = self.get(&url).await?;
        let document: KeySetDocument = serde_json::from_slice(&fetched.body)
            .map_err(|e| format!("{url} is not a JSON Web Key Set: {e}"))?;
        if document.keys.len() > MAX_KEYS {
            warn!("auth: {url} publishes {} keys; the first {MAX_KEYS} are taken", document.keys.len());
        }
        let mut keys = HashMap::with_capacity(document.keys.len().min(MAX_KEYS));
        for value in document.keys.into_iter().take(MAX_KEYS) {
            let kid = value.get("kid").and_then(|k| k.as_str()).map(str::to_owned);
            let parsed = serde_json::from_value::<Jwk>(value).map_err(|e| format!("it does not parse: {e}"));
            match (kid, parsed.and_then(|jwk| Key::from_jwk(&jwk))) {
                (Some(kid), Ok(key)) => {
                    keys.insert(kid, Arc::new(key));
                }
                // Tokens name their key by `kid`: a key without one could never be chosen.
                (None, _) => debug!("auth: a key of {} has no kid; left out", self.label),
                (Some(kid), Err(why)) => debug!("auth: key {kid:?} of {} left out: {why}", self.label),
            }
        }
        let held = self.held();
        let changed = !held.fetched
            || held.by_kid.len() != keys.len()
            || keys.keys().any(|kid| !held.by_kid.contains_key(kid));
        let mut kids: Vec<&String> = keys.keys().collect();
        kids.sort();
        if changed {
            info!("auth: keys of {} are now {kids:?}", self.label);
        } else {
            debug!("auth: keys of {} unchanged", self.label);
        }
        self.metrics.jwks_keys.with_label_values(&[&self.label]).set(keys.len() as i64);
        if let Some(issuer) = self.issuer.upgrade() {
            issuer.replace_keys(keys);
        }
        Ok(fetched.max_age)
    }

    /// `jwks_uri` from `{oidc_issuer}/.well-known/openid-configuration`, whose `issuer` must be
    /// the one configured (OpenID Connect Discovery 1.0, section 4.3).
    async fn discover(&self) -> Result<String, String> {
        let Source::Discovery(base) = &self.source else {
            return Err("no discovery for a jwks_url".to_owned());
        };
        let url = format!("{}/.well-known/openid-configuration", base.trim_end_matches('/'));
        let fetched = self.get(&url).await?;
        let document: Discovery = serde_json::from_slice(&fetched.body)
            .map_err(|e| format!("{url} is not a discovery document: {e}"))?;
        if !same_issuer(&document.issuer, base) {
            return Err(format!("{url} names the issuer {:?}, not {base:?}", shown(&document.issuer)));
        }
        // An https issuer's keys come over https: plain http could be swapped on the way.
        let https = base.starts_with("https://");
        let allowed =
            document.jwks_uri.starts_with("https://") || (!https && document.jwks_uri.starts_with("http://"));
        if !allowed {
            return Err(format!(
                "{url} gives the jwks_uri {:?}, not an https URL",
                shown(&document.jwks_uri)
            ));
        }
        Ok(document.jwks_uri)
    }

    async fn get(&self, url: &str) -> Result<Fetched, String> {
        let mut response =
            self.client.get(url).send().await.map_err(|e| format!("GET {url}: {}", causes(&e)))?;
        if !response.status().is_success() {
            return Err(format!("GET {url}: HTTP {}", response.status()));
        }
        let max_age = response
            .headers()
            .get(reqwest::header::CACHE_CONTROL)
            .and_then(|value| value.to_str().ok())
            .and_then(max_age);
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| format!("GET {url}: {}", causes(&e)))? {
            if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
                return Err(format!("GET {url}: larger than {MAX_DOCUMENT_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Fetched { body, max_age })
    }
}

/// At most 200 characters of what a provider sent, for a log line.
fn shown(text: &str) -> &str {
    text.char_indices().nth(200).map_or(text, |(end, _)| &text[..end])
}

/// An error and its causes on one line: reqwest's own says only "error sending request".
fn causes(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

/// `max-age` of a `Cache-Control` value (RFC 9111 section 5.2.2.1).
fn max_age(cache_control: &str) -> Option<Duration> {
    cache_control
        .split(',')
        .find_map(|directive| {
            let (name, value) = directive.trim().split_once('=')?;
            name.eq_ignore_ascii_case("max-age").then(|| value.trim_matches('"').parse().ok()).flatten()
        })
        .map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::max_age;
    use std::time::Duration;

    #[test]
    fn max_age_is_read_among_other_directives() {
        assert_eq!(max_age("public, max-age=15, stale-while-revalidate=15"), Some(Duration::from_secs(15)));
        assert_eq!(max_age("Max-Age=\"60\""), Some(Duration::from_secs(60)));
        assert_eq!(max_age("no-cache"), None);
        assert_eq!(max_age("max-age=soon"), None);
    }
}
