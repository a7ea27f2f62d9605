//! The admin HTTP API (axum): the queue, the traces and the plugin chains of a running router,
//! behind bearer tokens. Described by `docs/admin-api.json` (OpenAPI 3.1), served at
//! `/v1/openapi.json` and checked against these routes by the end-to-end tests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::actions::{self, ActionError};
use super::tokens::Tokens;
use super::views::ErrorView;
use crate::plugins::PluginManager;
use crate::queue::traces::{TraceQuery, TraceStore};
use crate::queue::{Millis, Queue};
use crate::reload::ReloadHandle;

/// The OpenAPI document of this API.
pub const OPENAPI: &str = include_str!("../../../docs/admin-api.json");

/// What the handlers reach.
#[derive(Clone)]
pub struct AdminState {
    pub queue: Arc<dyn Queue>,
    pub traces: Arc<dyn TraceStore>,
    pub plugins: Arc<PluginManager>,
    /// Delivery's destinations: their shaping and back-offs.
    pub dispatcher: Arc<crate::delivery::Dispatcher>,
    pub reload: ReloadHandle,
    /// Signs the DSNs of `bounce`.
    pub hostname: String,
    /// Read at every request: a token removed from the file is refused at once.
    pub tokens_file: PathBuf,
}

/// Binds the listener (an error stops `serve` from starting) and serves until the stop.
pub async fn start(
    listen: SocketAddr,
    state: AdminState,
    shutdown: &crate::shutdown::Shutdown,
) -> anyhow::Result<()> {
    // Checked at start as well as per request: a server must not run an API nobody can use.
    Tokens::load(&state.tokens_file)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|error| anyhow::anyhow!("cannot serve the admin API on {listen}: {error}"))?;
    let app = routes(state);
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.stopping().await })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "admin API stopped");
        }
    });
    tracing::info!(address = %listen, "serving the admin API");
    Ok(())
}

/// Every route; `docs/admin-api.json` lists the same ones.
pub fn routes(state: AdminState) -> Router {
    let guarded = Router::new()
        .route("/v1/queue", get(list))
        .route("/v1/queue/retry", post(retry_all))
        .route("/v1/queue/hold", post(hold_all))
        .route("/v1/queue/release", post(release_all))
        .route("/v1/queue/{id}", get(show).delete(delete))
        .route("/v1/queue/{id}/trace", get(trace))
        .route("/v1/queue/{id}/retry", post(retry))
        .route("/v1/queue/{id}/hold", post(hold))
        .route("/v1/queue/{id}/release", post(release))
        .route("/v1/queue/{id}/bounce", post(bounce))
        .route("/v1/destinations", get(destinations))
        .route(
            "/v1/destinations/{destination}/backoff",
            axum::routing::delete(cancel_backoff),
        )
        .route("/v1/traces", get(refused))
        .route("/v1/plugins", get(plugins))
        .route("/v1/plugins/reload", post(reload))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/v1/openapi.json", get(openapi))
        .merge(guarded)
        .fallback(not_found)
        .with_state(state)
}

/// Refuses a request without a valid `Authorization: Bearer TOKEN`.
async fn authorize(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let offered = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(bearer_token);
    let Some(offered) = offered else {
        return refuse("missing bearer token");
    };
    match Tokens::load(&state.tokens_file) {
        Ok(tokens) if tokens.accepts(offered) => next.run(request).await,
        Ok(_) => {
            tracing::warn!(path = %request.uri().path(), "admin API: wrong token");
            refuse("wrong token")
        }
        Err(error) => {
            tracing::error!(%error, "admin API: cannot read the tokens");
            failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot read the tokens file",
            )
        }
    }
}

/// The token of an `Authorization: Bearer TOKEN` value (the scheme in any case, RFC 9110 11.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn refuse(why: &str) -> Response {
    let mut response = failure(StatusCode::UNAUTHORIZED, why);
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer realm=\"switchyard\""),
    );
    response
}

fn failure(status: StatusCode, error: &str) -> Response {
    (
        status,
        Json(ErrorView {
            error: error.to_string(),
        }),
    )
        .into_response()
}

/// An action's error, or a request that cannot be read, as an HTTP answer.
enum ApiError {
    Action(ActionError),
    BadQuery(QueryRejection),
}

impl From<ActionError> for ApiError {
    fn from(error: ActionError) -> ApiError {
        ApiError::Action(error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let error = match self {
            ApiError::BadQuery(rejection) => {
                return failure(StatusCode::BAD_REQUEST, &rejection.body_text())
            }
            ApiError::Action(error) => error,
        };
        let status = match &error {
            ActionError::NoMessage(_) | ActionError::NoTrace(_) => StatusCode::NOT_FOUND,
            ActionError::Busy { .. } | ActionError::Stale(_) => StatusCode::CONFLICT,
            ActionError::Queue(error) if error.is_unavailable() => StatusCode::SERVICE_UNAVAILABLE,
            ActionError::Queue(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        failure(status, &error.to_string())
    }
}

type Answer<T> = Result<Json<T>, ApiError>;

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn not_found() -> Response {
    failure(
        StatusCode::NOT_FOUND,
        "no such route (see /v1/openapi.json)",
    )
}

#[derive(Deserialize)]
struct ListQuery {
    tenant: Option<String>,
}

async fn list(
    State(state): State<AdminState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Answer<Vec<super::views::MessageView>> {
    let Query(query) = query.map_err(ApiError::BadQuery)?;
    Ok(Json(
        actions::list(state.queue.as_ref(), query.tenant.as_deref()).await?,
    ))
}

async fn show(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Answer<super::views::MessageView> {
    Ok(Json(actions::show(state.queue.as_ref(), &id).await?))
}

async fn trace(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Answer<Vec<crate::queue::traces::TraceRecord>> {
    Ok(Json(actions::trace(state.traces.as_ref(), &id).await?))
}

async fn retry(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Answer<super::views::Changed> {
    Ok(Json(actions::retry(state.queue.as_ref(), Some(&id)).await?))
}

async fn retry_all(State(state): State<AdminState>) -> Answer<super::views::Changed> {
    Ok(Json(actions::retry(state.queue.as_ref(), None).await?))
}

async fn hold(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Answer<super::views::Held> {
    Ok(Json(actions::hold(state.queue.as_ref(), Some(&id)).await?))
}

async fn hold_all(State(state): State<AdminState>) -> Answer<super::views::Held> {
    Ok(Json(actions::hold(state.queue.as_ref(), None).await?))
}

async fn release(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Answer<super::views::Changed> {
    Ok(Json(
        actions::release(state.queue.as_ref(), Some(&id)).await?,
    ))
}

async fn release_all(State(state): State<AdminState>) -> Answer<super::views::Changed> {
    Ok(Json(actions::release(state.queue.as_ref(), None).await?))
}

async fn bounce(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Answer<super::views::Bounced> {
    Ok(Json(
        actions::bounce(state.queue.as_ref(), &state.hostname, &id, &state.plugins).await?,
    ))
}

async fn delete(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    match actions::delete(state.queue.as_ref(), &id).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => ApiError::Action(error).into_response(),
    }
}

async fn destinations(State(state): State<AdminState>) -> Json<Vec<super::views::DestinationView>> {
    Json(state.dispatcher.destinations())
}

/// Ends a destination's back-off at once: 204, or 404 when none is in force.
async fn cancel_backoff(
    State(state): State<AdminState>,
    Path(destination): Path<String>,
) -> Response {
    if state.dispatcher.cancel_backoff(&destination) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        failure(
            StatusCode::NOT_FOUND,
            &format!("no back-off in force for {destination}"),
        )
    }
}

#[derive(Deserialize)]
struct TracesQuery {
    client: Option<String>,
    sender: Option<String>,
    /// Unix milliseconds.
    since: Option<Millis>,
    until: Option<Millis>,
    limit: Option<i64>,
}

async fn refused(
    State(state): State<AdminState>,
    query: Result<Query<TracesQuery>, QueryRejection>,
) -> Answer<Vec<crate::queue::traces::TraceRecord>> {
    let Query(query) = query.map_err(ApiError::BadQuery)?;
    let query = TraceQuery {
        client_ip: query.client,
        sender: query.sender,
        since: query.since,
        until: query.until,
        limit: query.limit.unwrap_or(20).clamp(1, 1000),
    };
    Ok(Json(actions::refused(state.traces.as_ref(), &query).await?))
}

async fn plugins(State(state): State<AdminState>) -> Json<crate::plugins::status::ChainsStatus> {
    Json(state.plugins.status())
}

/// Reloads the configuration's plugin chains and tenant files (as SIGHUP) and answers once the
/// reload is over: 200 with the new status, or 422 with it when the reload, or a tenant's file,
/// failed (what failed keeps running its previous generation).
async fn reload(State(state): State<AdminState>) -> Response {
    let Some(over) = state.reload.request() else {
        return failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "the reload task has stopped",
        );
    };
    if tokio::time::timeout(Duration::from_secs(120), over)
        .await
        .is_err()
    {
        return failure(
            StatusCode::GATEWAY_TIMEOUT,
            "the reload did not finish within 120 s",
        );
    }
    let status = state.plugins.status();
    let code = if status.last_reload_error.is_some() || !status.tenant_errors.is_empty() {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    (code, Json(status)).into_response()
}
