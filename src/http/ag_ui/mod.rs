//! `POST /ag-ui`: agentwire as an AG-UI server (docs/ag-ui.md). An AG-UI
//! client (`@ag-ui/client`'s `HttpAgent`, CopilotKit) posts a `RunAgentInput` with the user's
//! JWT; the message of its input the thread does not have yet (by id: a user's words, a frontend
//! tool's result) or its `resume` goes onto the user's thread like a WebSocket `user_message`
//! (every tab sees its run), and the response is that run as AG-UI Server-Sent Events.
//!
//! The request holds no registry state of its own: it follows the run through a channel the
//! registry feeds (`registry/ag_ui_clients.rs`), bounded in steps and in bytes not taken. A client
//! that goes away mid-run cancels it.

pub mod input;
pub mod render;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use futures_util::StreamExt;
use log::{debug, info};

use super::{bad_field, bearer, error_response, read_body, AppState, REGISTRY_WAIT};
use crate::config::AgentKind;
use crate::protocol::ErrorCode;
use crate::registry::{CancelRunOf, Follower, Registry, RunStep, StartHttpRun};
use render::Renderer;
use std::sync::atomic::Ordering;

/// Steps a following client may be behind by before it stops following (see `observe`).
const STEPS_BUFFERED: usize = 256;

/// Counts the request by its answer's status, and gives the answer back.
fn counted(state: &AppState, response: HttpResponse) -> HttpResponse {
    state.env.metrics.ag_ui_requests.with_label_values(&[response.status().as_str()]).inc();
    response
}

pub async fn run(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> actix_web::Result<HttpResponse> {
    Ok(counted(&state, answer(req, payload, &state).await?))
}

async fn answer(
    req: HttpRequest,
    payload: web::Payload,
    state: &AppState,
) -> actix_web::Result<HttpResponse> {
    let env = &state.env;
    let Some(token) = bearer(&req) else {
        let message = "a user token is required: Authorization: Bearer <JWT>";
        return Ok(error_response(StatusCode::UNAUTHORIZED, "invalid_token", message));
    };
    let identity = match env.verifier.verify(token).await {
        Ok(identity) => identity,
        Err(failure) => {
            env.metrics.auth_failed(failure.reason());
            let message = format!("the token was refused: {}", failure.reason());
            return Ok(error_response(StatusCode::UNAUTHORIZED, "invalid_token", &message));
        }
    };
    if state.config.agent.kind == AgentKind::None {
        let message = "agent.kind = \"none\": this server starts no runs";
        return Ok(error_response(StatusCode::NOT_FOUND, "not_found", message));
    }
    let limit = state.config.api.max_body_bytes.get();
    let Some(body) = read_body(payload, limit, limit).await? else {
        return Ok(bad_field("body", &format!("larger than api.max_body_bytes ({limit} bytes)")));
    };
    let input: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(input) => input,
        Err(e) => return Ok(bad_field("body", &format!("not JSON: {e}"))),
    };
    let mut run = match input::parse(&input) {
        Ok(run) => run,
        Err(wrong) => return Ok(bad_field(&wrong.field, &wrong.message)),
    };
    let user_id = identity.user_id.clone();
    let (message_id, content, answers) = match run.resume.take() {
        // An interrupt's answer: the run that continues it, whatever the messages say.
        Some((interrupt_id, value)) => {
            let content = crate::protocol::answer_text(&value);
            (None, content, crate::protocol::Answers::Interrupt { interrupt_id, value })
        }
        None => {
            // The messages the thread has (by id) were taken before: the last new one starts
            // the run, and an input with none starts nothing (docs/ag-ui.md).
            let ids = run.messages.iter().filter_map(|m| m.id.clone()).collect();
            let known = match state.store.known(&user_id, &run.thread_id, ids).await {
                Ok(known) => known,
                Err(e) => {
                    let message = format!("the conversation store does not answer: {e}");
                    return Ok(error_response(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &message));
                }
            };
            let new = run.messages.iter().rev().find(|m| m.id.as_ref().is_none_or(|id| !known.contains(id)));
            let Some(new) = new else {
                let why = "has no message the thread does not have yet (by id), and there is no resume";
                return Ok(bad_field("messages", why));
            };
            match new.taken(state.config.limits.max_content_chars.get()) {
                Ok((content, answers)) => (new.id.clone(), content, answers),
                Err(wrong) => return Ok(bad_field(&wrong.field, &wrong.message)),
            }
        }
    };

    let (steps, followed) = futures_channel::mpsc::channel(STEPS_BUFFERED);
    // What this client has not taken, in bytes: the registry stops handing it steps beyond
    // `limits.max_outbound_bytes` (registry/messages.rs, `Follower`).
    let unread = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let steps = Follower { steps, unread: std::sync::Arc::clone(&unread) };
    let (answer, answered) = futures_channel::oneshot::channel();
    let registry = env.registries.for_user(&user_id).clone();
    registry.do_send(StartHttpRun {
        user_id: user_id.clone(),
        thread_id: run.thread_id.clone(),
        content,
        client: run.client,
        message_id,
        answers,
        run_id: run.run_id,
        steps,
        answer,
    });
    let run_id = match actix_web::rt::time::timeout(REGISTRY_WAIT, answered).await {
        Ok(Ok(Ok(run_id))) => run_id,
        Ok(Ok(Err((code, message)))) => return Ok(refused(code, &message)),
        _ => {
            let message = "the registry does not answer";
            return Ok(error_response(StatusCode::SERVICE_UNAVAILABLE, "not_ready", message));
        }
    };
    info!("ag-ui client of user {user_id}: run {run_id} started on thread {}", run.thread_id);
    let guard = Following { registry, user_id, run_id: run_id.clone(), ended: false, unread };
    let renderer = Renderer::new(run.thread_id, run_id);
    let body = futures_util::stream::unfold(
        (followed, renderer, guard),
        |(mut followed, mut renderer, mut guard)| async move {
            let Some(step): Option<RunStep> = followed.next().await else {
                // The registry let go of the run (it ended, or this client fell behind): nothing to
                // cancel from here.
                guard.release();
                return None;
            };
            guard.unread.fetch_sub(step.bytes.min(guard.unread.load(Ordering::Acquire)), Ordering::AcqRel);
            let events = renderer.render(step);
            guard.ended |= renderer.ended();
            Some((Ok::<_, actix_web::Error>(Bytes::from(events)), (followed, renderer, guard)))
        },
    );
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("cache-control", "no-cache"))
        .streaming(body))
}

/// What a refused message becomes over HTTP.
fn refused(code: ErrorCode, message: &str) -> HttpResponse {
    let (status, error) = match code {
        ErrorCode::RateLimited => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
        ErrorCode::AgentBusy => (StatusCode::TOO_MANY_REQUESTS, "agent_busy"),
        ErrorCode::BadMessage => return bad_field("runId", message),
        // docs/agents.md, v2: `resume` names an interrupt the thread does not wait on.
        ErrorCode::NotFound => return bad_field("resume[0].interruptId", message),
        // The stream or the conversation store cannot be reached: nothing was taken.
        ErrorCode::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        // docs/conversations.md: the thread's run is still going (`agent.on_busy`).
        ErrorCode::ThreadBusy => (StatusCode::CONFLICT, "thread_busy"),
        // docs/agents.md, v2: the thread's run stopped to ask; answer it with `resume`.
        ErrorCode::ThreadInterrupted => (StatusCode::CONFLICT, "thread_interrupted"),
        // docs/conversations.md: `store.max_bytes_per_user`.
        ErrorCode::QuotaExceeded => (StatusCode::FORBIDDEN, "quota_exceeded"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    };
    error_response(status, error, message)
}

/// Held by the response body: dropped before the run's end (the client aborted or went away),
/// it cancels the run, so nothing is left behind.
struct Following {
    registry: actix::Addr<Registry>,
    user_id: String,
    run_id: String,
    ended: bool,
    /// The bytes of steps handed to this client and not yet taken (see `Follower`).
    unread: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Following {
    /// The run is over for this client: nothing to cancel when the body goes.
    fn release(&mut self) {
        self.ended = true;
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        if !self.ended {
            debug!("run {}: its AG-UI client went away before the end", self.run_id);
            let (user_id, run_id) = (std::mem::take(&mut self.user_id), std::mem::take(&mut self.run_id));
            self.registry.do_send(CancelRunOf { user_id, run_id });
        }
    }
}
