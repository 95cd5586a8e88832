//! HTTP routes (protocol section 8): the WebSocket upgrade with everything decided before it
//! (origin, capacity, token at upgrade), health and readiness, metrics, the `/api/v1` routes for
//! backends, and `/dev/token` for development.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use log::{debug, info, warn};
use serde::Deserialize;

use crate::admission::{origin_allowed, ConnectionSlots};
use crate::admission::{UnauthenticatedRefusal, UnauthenticatedSlots};
use crate::assets::Assets;
use crate::auth::Minter;
use crate::auth::{is_valid_user_id, USER_ID_RULE};
use crate::broker::{BrokerError, ResumeRequest};
use crate::config::Config;
use crate::metrics::Failure;
use crate::protocol::{
    parse_published_event, ClientInfo, ConnectionsResponse, DevTokenResponse, HttpError, PublishRequest,
    Status, SUBPROTOCOL,
};
use crate::registry::{ListConnections, Probe, ProbeBroker, Publish, PublishError, PublishTicket, Registry};
use crate::ws::{self, Session, SessionEnv};

mod ag_ui;
mod threads;

/// What every route handler can reach.
pub struct AppState {
    pub config: Arc<Config>,
    pub env: Arc<SessionEnv>,
    pub slots: Arc<ConnectionSlots>,
    pub unauthenticated: Arc<UnauthenticatedSlots>,
    /// Present only when `auth.dev_tokens = true`.
    pub dev_minter: Option<Minter>,
    /// Set once shutdown began: new upgrades are refused.
    pub draining: Arc<AtomicBool>,
    pub assets: Assets,
    /// Conversations (docs/conversations.md): the threads API and `/readyz`.
    pub store: crate::store::Store,
}

pub fn routes(cfg: &mut web::ServiceConfig, config: &Config) {
    cfg.route("/ws", web::get().to(upgrade))
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics))
        .route("/api/v1/users/{user_id}/connections", web::get().to(user_connections))
        .route("/api/v1/publish", web::post().to(publish))
        .service(web::resource("/ag-ui").wrap(cors(config)).route(web::post().to(ag_ui::run)))
        .route("/dev/token", web::post().to(dev_token))
        .route("/client.json", web::get().to(client_info))
        .route("/", web::get().to(chat_page))
        .route("/dashboard", web::get().to(dashboard_page))
        .route("/dashboard/stats.json", web::get().to(dashboard_stats))
        .route("/static/{path:.*}", web::get().to(static_file))
        .configure(|cfg| threads::routes(cfg, config));
}

/// CORS for the routes a browser app on another origin calls with the user's token (`POST
/// /ag-ui` from `@ag-ui/client`'s `HttpAgent` or CopilotKit, the threads API; docs/ag-ui.md):
/// the origins of `server.allowed_origins`, every origin when it is empty (as for WebSockets),
/// with `Authorization` and `Content-Type`. The preflight is answered by the middleware.
pub(crate) fn cors(config: &Config) -> actix_cors::Cors {
    let origins = &config.server.allowed_origins;
    let cors = if origins.is_empty() {
        actix_cors::Cors::default().allow_any_origin()
    } else {
        origins.iter().fold(actix_cors::Cors::default(), |cors, origin| cors.allowed_origin(origin))
    };
    cors.allowed_methods(["GET", "POST", "PATCH", "DELETE"])
        .allowed_headers([header::AUTHORIZATION, header::CONTENT_TYPE, header::ACCEPT])
        .max_age(600)
}

/// Serves one file of the frontend with its type, an ETag, and 304 when the client has it.
fn serve_asset(req: &HttpRequest, state: &AppState, path: &str) -> HttpResponse {
    let Some(asset) = state.assets.get(path) else {
        return error_response(StatusCode::NOT_FOUND, "not_found", "no such file");
    };
    let fresh = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| tags.split(',').any(|t| t.trim() == asset.etag));
    let mut response = if fresh { HttpResponse::NotModified() } else { HttpResponse::Ok() };
    response
        .insert_header((header::ETAG, asset.etag.clone()))
        // Revalidate every time: cheap with the ETag, and a new binary is picked up at once.
        .insert_header((header::CACHE_CONTROL, "no-cache"));
    if fresh {
        return response.finish();
    }
    response.insert_header((header::CONTENT_TYPE, asset.content_type)).body(asset.body.into_owned())
}

async fn chat_page(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    serve_asset(&req, &state, "index.html")
}

async fn dashboard_page(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    serve_asset(&req, &state, "dashboard.html")
}

async fn static_file(req: HttpRequest, path: web::Path<String>, state: web::Data<AppState>) -> HttpResponse {
    serve_asset(&req, &state, &path)
}

async fn dashboard_stats(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(state.env.metrics.dashboard_stats())
}

/// A 400 naming the field: `{"error":"bad_request","field":"threadId","message":"..."}`.
#[derive(serde::Serialize)]
struct FieldErrorBody<'a> {
    error: &'static str,
    field: &'a str,
    message: &'a str,
}

pub(crate) fn bad_field(field: &str, message: &str) -> HttpResponse {
    HttpResponse::BadRequest().json(FieldErrorBody { error: "bad_request", field, message })
}

pub(crate) fn error_response(status: StatusCode, error: &str, message: &str) -> HttpResponse {
    HttpResponse::build(status).json(HttpError { error, message })
}

pub(crate) fn bearer(req: &HttpRequest) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The upgrade URL's query: a browser's token and a reconnecting client's position.
#[derive(Deserialize)]
struct UpgradeQuery {
    access_token: Option<String>,
    last_seq: Option<u64>,
    epoch: Option<String>,
}

async fn upgrade(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> actix_web::Result<HttpResponse> {
    let env = &state.env;
    let peer = req.peer_addr().map_or_else(|| "-".to_owned(), |a| a.to_string());
    let origin = req.headers().get(header::ORIGIN).map(|o| o.to_str().unwrap_or("<invalid>"));
    if !origin_allowed(origin, &state.config.server.allowed_origins) {
        env.metrics.fail(Failure::OriginRefused);
        info!("upgrade from {peer} refused: origin {origin:?} is not allowed");
        return Ok(error_response(StatusCode::FORBIDDEN, "forbidden", "this Origin may not connect"));
    }
    if state.draining.load(Ordering::Acquire) {
        return Ok(error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        ));
    }
    // A registry that is behind takes no new setups: a quick 503 with a spread-out Retry-After
    // instead of sockets that hang in `accepted`, and no herd of clients retrying in step.
    let backlog = env.setup_backlog.waiting();
    if backlog >= state.config.limits.max_registry_backlog.get() {
        env.metrics.fail(Failure::RegistryBehind);
        info!("upgrade from {peer} refused: {backlog} setups wait for the registry (limits.max_registry_backlog)");
        let retry_after = rand::random_range(1..=10u32).to_string();
        return Ok(HttpResponse::ServiceUnavailable()
            .insert_header((header::RETRY_AFTER, retry_after))
            .json(HttpError { error: "over_capacity", message: "the server is catching up; retry later" }));
    }
    let Some(slot) = state.slots.try_acquire() else {
        env.metrics.fail(Failure::OverCapacity);
        info!("upgrade from {peer} refused: limits.max_connections reached");
        return Ok(error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "over_capacity",
            "the server is at capacity",
        ));
    };
    let query = match web::Query::<UpgradeQuery>::from_query(req.query_string()) {
        Ok(query) => query.into_inner(),
        Err(e) => return Ok(error_response(StatusCode::BAD_REQUEST, "bad_request", &e.to_string())),
    };
    let token = bearer(&req).or(query.access_token.as_deref());
    let verdict = match token {
        Some(token) => Some(env.verifier.verify(token).await),
        None => None,
    };
    let identity = match verdict {
        None => None,
        Some(Ok(identity)) => Some(identity),
        Some(Err(failure)) => {
            env.metrics.auth_failed(failure.reason());
            env.metrics.fail(Failure::InvalidToken);
            info!("upgrade from {peer} refused: {}", failure.reason());
            return Ok(error_response(StatusCode::UNAUTHORIZED, "invalid_token", failure.message()));
        }
    };
    // An epoch names a stream but not a position in it: without `last_seq` it resumes nothing.
    if query.epoch.is_some() && query.last_seq.is_none() {
        return Ok(bad_request("epoch is given without last_seq"));
    }
    let resume = query.last_seq.map(|last_seq| ResumeRequest { last_seq, epoch: query.epoch });
    // Without a token at the upgrade the connection must prove itself in an `auth` frame; until
    // then it holds a place under the unauthenticated caps.
    let unauthenticated = match identity {
        Some(_) => None,
        None => {
            let ip = req.peer_addr().map_or(std::net::IpAddr::from([0, 0, 0, 0]), |a| a.ip());
            match state.unauthenticated.try_acquire(ip) {
                Ok(place) => Some(place),
                Err(refusal) => {
                    let (reason, key) = match refusal {
                        UnauthenticatedRefusal::ServerWide => {
                            (Failure::UnauthenticatedCap, "limits.max_unauthenticated")
                        }
                        UnauthenticatedRefusal::PerIp => {
                            (Failure::UnauthenticatedIpCap, "limits.max_unauthenticated_per_ip")
                        }
                    };
                    env.metrics.fail(reason);
                    info!("upgrade from {peer} refused: {key} reached");
                    return Ok(error_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "over_capacity",
                        "too many connections waiting to authenticate",
                    ));
                }
            }
        }
    };
    let session = Session::new(Arc::clone(env), identity, resume, slot, unauthenticated);
    let id = session.id();
    let response = ws::start(session, &req, payload)?;
    debug!("{id}: upgraded from {peer}");
    Ok(response)
}

/// `GET /client.json`: what a frontend needs to know before it signs in, always 200, so a page
/// can ask without an error in its console.
async fn client_info(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(ClientInfo { dev_tokens: state.dev_minter.is_some(), subprotocol: SUBPROTOCOL })
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Status { status: "ok" })
}

/// How long an HTTP request waits for the registry before it answers 503: a registry that is
/// behind must not hold request handlers (and their clients) without bound.
pub const REGISTRY_WAIT: Duration = Duration::from_secs(5);

/// Asks a registry shard and waits at most [`REGISTRY_WAIT`]; `None` when it did not answer.
async fn ask_registry<M>(shard: &actix::Addr<Registry>, message: M) -> Option<M::Result>
where
    M: actix::Message + Send + 'static,
    M::Result: Send,
    Registry: actix::Handler<M>,
{
    let answer = shard.send(message);
    match actix_web::rt::time::timeout(REGISTRY_WAIT, answer).await {
        Ok(Ok(result)) => Some(result),
        _ => None,
    }
}

fn registry_unavailable() -> HttpResponse {
    error_response(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "the registry does not answer")
}

/// Ready when every registry shard answers, each one's broker does, and so does the store.
async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    for shard in state.env.registries.all() {
        if ask_registry(shard, Probe).await.is_none() {
            return registry_unavailable();
        }
        match ask_registry(shard, ProbeBroker).await {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                return error_response(StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable", &e.to_string())
            }
            None => return registry_unavailable(),
        }
    }
    if let Err(e) = state.store.ping().await {
        return error_response(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", &e.to_string());
    }
    HttpResponse::Ok().json(Status { status: "ready" })
}

async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        ))
        .body(state.env.metrics.render())
}

/// `Authorization: Bearer <api key>` against `api.keys`, compared in constant time.
pub(crate) fn api_key_ok(req: &HttpRequest, state: &AppState) -> bool {
    let Some(given) = bearer(req) else {
        return false;
    };
    state
        .config
        .api
        .keys
        .iter()
        .any(|key| constant_time_eq::constant_time_eq(key.as_bytes(), given.as_bytes()))
}

pub(crate) fn unauthorized() -> HttpResponse {
    error_response(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "a valid API key is required (Authorization: Bearer <key>)",
    )
}

async fn user_connections(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> HttpResponse {
    if !api_key_ok(&req, &state) {
        return unauthorized();
    }
    let user_id = path.into_inner();
    let shard = state.env.registries.for_user(&user_id);
    match ask_registry(shard, ListConnections { user_id: user_id.clone() }).await {
        Some(Ok(connections)) => HttpResponse::Ok().json(ConnectionsResponse { user_id, connections }),
        Some(Err(e)) => error_response(StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable", &e.to_string()),
        None => registry_unavailable(),
    }
}

/// Reads a request body of at most `limit` bytes (`expected` is its declared length, to size the
/// buffer once); `None` when it is larger.
pub(crate) async fn read_body(
    mut payload: web::Payload,
    limit: usize,
    expected: usize,
) -> Result<Option<web::BytesMut>, actix_web::Error> {
    use futures_util::StreamExt;
    let mut body = web::BytesMut::with_capacity(expected.min(limit));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk?;
        if body.len() + chunk.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

fn bad_request(message: &str) -> HttpResponse {
    error_response(StatusCode::BAD_REQUEST, "bad_request", message)
}

/// `POST /api/v1/publish`: a batch of events onto one user's stream, all or nothing.
async fn publish(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> actix_web::Result<HttpResponse> {
    if !api_key_ok(&req, &state) {
        return Ok(unauthorized());
    }
    let limit = state.config.api.max_body_bytes.get();
    let too_large = || {
        error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the body is over api.max_body_bytes",
        )
    };
    let declared =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Ok(too_large());
    }
    let Some(body) = read_body(payload, limit, declared.unwrap_or(0)).await? else { return Ok(too_large()) };
    let request: PublishRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return Ok(bad_request(&e.to_string())),
    };
    if !is_valid_user_id(&request.user_id) {
        return Ok(bad_request(&format!("user_id must match {USER_ID_RULE}")));
    }
    if request.events.is_empty() {
        return Ok(bad_request("events must not be empty"));
    }
    let mut events = Vec::with_capacity(request.events.len());
    for (index, event) in request.events.into_iter().enumerate() {
        match parse_published_event(index, event) {
            Ok(event) => events.push(event),
            Err(message) => return Ok(bad_request(&message)),
        }
    }
    // `Idempotency-Key`: the same key again (per user) publishes nothing twice and answers the
    // seqs given the first time (docs/scale-out.md, ambiguous failures).
    let idempotency_key = match req.headers().get("idempotency-key").map(|v| v.to_str()) {
        None => None,
        Some(Ok(key)) if !key.is_empty() && key.len() <= 200 && key.bytes().all(|b| b.is_ascii_graphic()) => {
            Some(key.to_owned())
        }
        Some(_) => return Ok(bad_request("Idempotency-Key must be 1 to 200 visible ASCII characters")),
    };
    let count = events.len();
    let ticket = PublishTicket::new();
    let message =
        Publish { user_id: request.user_id.clone(), events, ticket: ticket.clone(), idempotency_key };
    let answer = state.env.registries.for_user(&request.user_id).send(message);
    futures_util::pin_mut!(answer);
    let published = match actix_web::rt::time::timeout(REGISTRY_WAIT, &mut answer).await {
        Ok(answer) => answer.ok().flatten(),
        // Abandoned before the registry took it: it will publish nothing, so 503 is the truth.
        Err(_) if ticket.abandon() => None,
        // The registry took it at this very moment: its answer is on the way.
        Err(_) => answer.await.ok().flatten(),
    };
    match published {
        Some(Ok(published)) => {
            info!("published {count} events to user {} ({} sessions)", request.user_id, published.sessions);
            Ok(HttpResponse::Ok().json(published))
        }
        Some(Err(PublishError::Broker(e @ BrokerError::Unknown(_)))) => {
            warn!("publish to user {}: the broker did not answer in time: {e}", request.user_id);
            Ok(error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "outcome_unknown",
                "the stream store did not answer in time: the events may or may not have been published; \
                 send them again with the same Idempotency-Key",
            ))
        }
        Some(Err(PublishError::Broker(e))) => {
            warn!("publish to user {} failed in the broker: {e}", request.user_id);
            Ok(error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "broker_unavailable",
                "the stream store did not take the events; nothing was published",
            ))
        }
        Some(Err(PublishError::Store(e))) => {
            warn!("publish to user {}: the answer was not stored: {e}", request.user_id);
            Ok(error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the conversation store did not take the answer; nothing was published",
            ))
        }
        None => Ok(registry_unavailable()),
    }
}

#[derive(Deserialize)]
struct DevTokenRequest {
    sub: String,
    #[serde(default)]
    name: Option<String>,
}

const DEV_TOKEN_TTL_SECS: u64 = 3600;

/// Headers a reverse proxy adds: a request carrying one came from beyond this machine even
/// though its socket is on loopback.
const PROXY_HEADERS: [&str; 4] = ["forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip"];

async fn dev_token(req: HttpRequest, body: web::Bytes, state: web::Data<AppState>) -> HttpResponse {
    let Some(minter) = &state.dev_minter else {
        return error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            "dev tokens are disabled (auth.dev_tokens)",
        );
    };
    // Minting tokens for anyone is for the developer's own machine: never through a proxy that
    // was put in front of a loopback bind.
    let local = req.peer_addr().is_some_and(|a| a.ip().is_loopback());
    let proxied = PROXY_HEADERS.iter().any(|h| req.headers().contains_key(*h));
    if !local || proxied {
        state.env.metrics.fail(Failure::DevTokenRefused);
        info!("dev token refused: request from beyond this machine (peer loopback: {local}, proxied: {proxied})");
        return error_response(
            StatusCode::FORBIDDEN,
            "forbidden",
            "dev tokens are served to this machine only, never through a proxy",
        );
    }
    let request: DevTokenRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, "bad_request", &e.to_string()),
    };
    match minter.mint(&request.sub, request.name.as_deref(), DEV_TOKEN_TTL_SECS) {
        Ok((token, expires_at)) => HttpResponse::Ok().json(DevTokenResponse { token, expires_at }),
        Err(message) => error_response(StatusCode::BAD_REQUEST, "bad_request", &message),
    }
}
