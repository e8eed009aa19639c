//! The HTTP endpoints for operators: `/metrics` (Prometheus text format),
//! `/healthz` (liveness: every relay loop is turning) and `/readyz`
//! (readiness as JSON: broker connected, every source database reachable,
//! not draining) and `/status` (JSON: per source, the partitions this relay
//! owns and how many relays share the table).
//!
//! `/healthz` deliberately ignores the database and the broker: restarting
//! the relay does not fix a broker outage. Do not use `/readyz` as the
//! readinessProbe of a native sidecar: it would take the whole pod out of
//! its Service whenever the broker is away.
//!
//! The server holds at most [`MAX_CONNECTIONS`] connections and closes one
//! after [`IDLE_TIMEOUT`] without a byte (`admin/connections.rs`): idle sockets
//! must not take the descriptors the source pools need.

mod connections;

pub use connections::{IDLE_TIMEOUT, MAX_CONNECTIONS};

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use self::connections::BoundedListener;
use crate::metrics::Metrics;
use crate::sink::rabbitmq::Broker;
use crate::source::SourceHealth;

pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub broker: Arc<Broker>,
    /// Each source's health and the longest a healthy loop may go without a turn.
    pub sources: Vec<(Arc<SourceHealth>, Duration)>,
    pub draining: CancellationToken,
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .with_state(state)
}

/// Serves until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(BoundedListener::new(listener), router(state))
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    let (body, content_type) = state.metrics.render();
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn healthz(State(state): State<Arc<AdminState>>) -> Response {
    let stuck: Vec<&str> = state
        .sources
        .iter()
        .filter(|(h, limit)| h.since_beat() > *limit)
        .map(|(h, _)| h.name.as_str())
        .collect();
    if stuck.is_empty() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("relay loop stuck: {}\n", stuck.join(", ")),
        )
            .into_response()
    }
}

async fn readyz(State(state): State<Arc<AdminState>>) -> Response {
    let broker_up = state.broker.is_up();
    let draining = state.draining.is_cancelled();
    let sources: Vec<_> = state
        .sources
        .iter()
        .map(|(h, _)| {
            // Rows the source cannot move on its own: not a reason to be
            // unready (restarting fixes none of them), but worth seeing.
            let stuck = h.stuck();
            json!({
                "name": h.name,
                "database_up": h.db_up(),
                "listening": h.listening(),
                // Paused by an operator: still ready (pausing is deliberate).
                "paused": h.paused(),
                "last_error": h.last_error(),
                "dead_letters": stuck.dead_letters,
                "held_by_dead_letters": stuck.held_by_dead_letters,
                "unclaimable_rows": stuck.unclaimable,
                "oldest_sendable_age_seconds": stuck.oldest_sendable_age_seconds,
                "wal": h.slot().map(|s| json!({
                    "slot": s.slot,
                    "problem": s.problem,
                    "slot_active": s.active,
                    "streaming_here": h.streaming(),
                    "polling_table": h.polling(),
                })),
            })
        })
        .collect();
    let all_up = state.sources.iter().all(|(h, _)| h.ready());
    let ready = broker_up && all_up && !draining;
    let status = if draining {
        "draining"
    } else if ready {
        "ready"
    } else {
        "not_ready"
    };
    let body = json!({ "status": status, "broker_up": broker_up, "sources": sources });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn status(State(state): State<Arc<AdminState>>) -> Response {
    let sources: Vec<_> = state
        .sources
        .iter()
        .map(|(h, _)| {
            let (partitions, relays) = h.ownership();
            json!({
                "name": h.name,
                "database_up": h.db_up(),
                "listening": h.listening(),
                "paused": h.paused(),
                "relays": relays,
                "partitions_owned": partitions.len(),
                "partitions": partitions,
            })
        })
        .collect();
    let body = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "broker_up": state.broker.is_up(),
        "draining": state.draining.is_cancelled(),
        "sources": sources,
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}
