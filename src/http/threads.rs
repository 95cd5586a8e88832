//! The threads API (docs/conversations.md, "Reading conversations"): a user's threads and their
//! messages from the store, with the user's JWT under `/api/v1/threads`, or with an API key
//! under `/api/v1/users/{user_id}/threads`. Renames and deletes are also told to every tab of
//! the user through the registry (`thread_updated`, `thread_deleted`).

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use log::info;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{api_key_ok, bad_field, bearer, error_response, unauthorized, AppState};
use crate::auth::is_valid_user_id;
use crate::protocol::{now_ms, MAX_THREAD_ID_CHARS};
use crate::registry::ThreadChanged;
use crate::store::{StoreError, ThreadView};

pub fn routes(cfg: &mut web::ServiceConfig, config: &crate::config::Config) {
    use super::cors;
    for base in ["/api/v1/threads", "/api/v1/users/{user_id}/threads"] {
        cfg.service(web::resource(base).wrap(cors(config)).route(web::get().to(list)))
            .service(
                web::resource(format!("{base}/{{thread_id}}"))
                    .wrap(cors(config))
                    .route(web::get().to(one))
                    .route(web::patch().to(rename))
                    .route(web::delete().to(delete)),
            )
            .service(
                web::resource(format!("{base}/{{thread_id}}/messages"))
                    .wrap(cors(config))
                    .route(web::get().to(messages)),
            );
    }
}

/// Whose threads a request may see: the user of its JWT, or with an API key the user the path
/// names. `Err` is the answer (401, 400).
async fn caller(req: &HttpRequest, state: &AppState) -> Result<String, Refused> {
    match req.match_info().get("user_id") {
        Some(user_id) => {
            if !api_key_ok(req, state) {
                return Err(Box::new(unauthorized()));
            }
            if !is_valid_user_id(user_id) {
                return Err(Box::new(bad_field("user_id", "is not a valid user id")));
            }
            Ok(user_id.to_owned())
        }
        None => {
            let Some(token) = bearer(req) else {
                return Err(Box::new(invalid_token("a token is required (Authorization: Bearer <JWT>)")));
            };
            match state.env.verifier.verify(token).await {
                Ok(identity) => Ok(identity.user_id),
                Err(failure) => {
                    state.env.metrics.auth_failed(failure.reason());
                    Err(Box::new(invalid_token(failure.message())))
                }
            }
        }
    }
}

/// An answer a request gets instead of going on (boxed: a response is large).
type Refused = Box<HttpResponse>;

/// The caller and the thread the path names.
async fn caller_and_thread(req: &HttpRequest, state: &AppState) -> Result<(String, String), Refused> {
    Ok((caller(req, state).await?, thread_id(req)?))
}

fn invalid_token(message: &str) -> HttpResponse {
    error_response(StatusCode::UNAUTHORIZED, "invalid_token", message)
}

fn not_found() -> HttpResponse {
    error_response(StatusCode::NOT_FOUND, "not_found", "no such thread")
}

fn store_failed(e: &StoreError) -> HttpResponse {
    match e {
        StoreError::Unavailable(_) => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "the conversation store does not answer",
        ),
        StoreError::Failed(_) => {
            error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the store failed")
        }
    }
}

/// The thread id of the path, checked as a `user_message`'s is.
fn thread_id(req: &HttpRequest) -> Result<String, Refused> {
    let id = req.match_info().get("thread_id").unwrap_or_default();
    if id.is_empty() || id.chars().count() > MAX_THREAD_ID_CHARS {
        return Err(Box::new(bad_field("thread_id", "must be 1 to 128 characters")));
    }
    Ok(id.to_owned())
}

#[derive(Deserialize)]
struct PageQuery {
    limit: Option<String>,
    before: Option<String>,
}

/// `limit` within 1..=`max` (`default` when absent); `before` a cursor this API gave.
fn page(req: &HttpRequest, default: usize, max: usize) -> Result<(usize, Option<String>), Refused> {
    let query = web::Query::<PageQuery>::from_query(req.query_string())
        .map_err(|_| Box::new(bad_field("query", "is not a valid query string")))?
        .into_inner();
    let limit = match query.limit {
        None => default,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => n,
            _ => {
                return Err(Box::new(bad_field("limit", &format!("must be a whole number from 1 to {max}"))))
            }
        },
    };
    if let Some(before) = &query.before {
        let valid =
            before.split_once('.').is_some_and(|(n, rest)| n.parse::<i64>().is_ok() && !rest.is_empty());
        if !valid {
            return Err(Box::new(bad_field("before", "is not a cursor this API gave")));
        }
    }
    Ok((limit, query.before))
}

#[derive(Serialize)]
struct Threads {
    threads: Vec<ThreadView>,
    next: Option<String>,
}

async fn list(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let user_id = match caller(&req, &state).await {
        Ok(user_id) => user_id,
        Err(answer) => return *answer,
    };
    let (limit, before) = match page(&req, 50, 200) {
        Ok(page) => page,
        Err(answer) => return *answer,
    };
    match state.store.threads(&user_id, limit, before).await {
        Ok(page) => HttpResponse::Ok().json(Threads { threads: page.items, next: page.next }),
        Err(e) => store_failed(&e),
    }
}

async fn one(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let (user_id, thread_id) = match caller_and_thread(&req, &state).await {
        Ok(ids) => ids,
        Err(answer) => return *answer,
    };
    match state.store.thread(&user_id, &thread_id).await {
        Ok(Some(thread)) => HttpResponse::Ok().json(thread),
        Ok(None) => not_found(),
        Err(e) => store_failed(&e),
    }
}

#[derive(Serialize)]
struct Messages {
    messages: Vec<Box<RawValue>>,
    next: Option<String>,
}

async fn messages(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let (user_id, thread_id) = match caller_and_thread(&req, &state).await {
        Ok(ids) => ids,
        Err(answer) => return *answer,
    };
    let (limit, before) = match page(&req, 100, 500) {
        Ok(page) => page,
        Err(answer) => return *answer,
    };
    match state.store.messages(&user_id, &thread_id, limit, before).await {
        Ok(Some(page)) => HttpResponse::Ok().json(Messages { messages: page.items, next: page.next }),
        Ok(None) => not_found(),
        Err(e) => store_failed(&e),
    }
}

#[derive(Deserialize)]
struct Rename {
    title: Option<serde_json::Value>,
}

async fn rename(req: HttpRequest, body: web::Bytes, state: web::Data<AppState>) -> HttpResponse {
    let (user_id, thread_id) = match caller_and_thread(&req, &state).await {
        Ok(ids) => ids,
        Err(answer) => return *answer,
    };
    let Ok(Rename { title }) = serde_json::from_slice::<Rename>(&body) else {
        return bad_field("body", "must be a JSON object {\"title\": \"...\"}");
    };
    let title = match title {
        Some(serde_json::Value::String(title)) if (1..=200).contains(&title.chars().count()) => title,
        _ => return bad_field("title", "must be a string of 1 to 200 characters"),
    };
    match state.store.rename(&user_id, &thread_id, &title, now_ms()).await {
        Ok(Some(thread)) => {
            let changed =
                ThreadChanged { user_id, thread_id, title: Some(thread.title.clone()), cancel: None };
            state.env.registries.for_user(&changed.user_id).do_send(changed);
            HttpResponse::Ok().json(thread)
        }
        Ok(None) => not_found(),
        Err(e) => store_failed(&e),
    }
}

async fn delete(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let (user_id, thread_id) = match caller_and_thread(&req, &state).await {
        Ok(ids) => ids,
        Err(answer) => return *answer,
    };
    match state.store.delete(&user_id, &thread_id).await {
        Ok(Some(running)) => {
            info!("thread {thread_id} of user {user_id} deleted");
            let changed = ThreadChanged { user_id, thread_id, title: None, cancel: running };
            state.env.registries.for_user(&changed.user_id).do_send(changed);
            HttpResponse::NoContent().finish()
        }
        Ok(None) => not_found(),
        Err(e) => store_failed(&e),
    }
}
