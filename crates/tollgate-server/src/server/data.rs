//! The data plane: decisions, records, leases, runs, effective settings, usage; and
//! the operations endpoints.

use std::collections::HashMap;
use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use tollgate::duration::Millis;
use tollgate::{Decision, EngineError, Micros, RecordOutcome, Request, RunSpec, Subject};

use super::auth::DataCaller;
use super::error::{ApiError, body_rejection, parse_json};
use super::{Counters, State};

/// Only the named query parameters are accepted (a typo must not be silently ignored).
pub fn query(q: &HashMap<String, String>, allowed: &[&str]) -> Result<(), ApiError> {
    match q.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::bad_request(if allowed.is_empty() {
            format!("unknown query parameter `{k}` (this route takes none)")
        } else {
            format!(
                "unknown query parameter `{k}` (accepted: {})",
                allowed.join(", ")
            )
        })
        .with_details(json!([{"field": k, "message": "unknown query parameter"}]))),
        None => Ok(()),
    }
}

fn flag(q: &HashMap<String, String>, name: &str) -> Result<bool, ApiError> {
    match q.get(name).map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true" | "") => Ok(true),
        Some(other) => Err(ApiError::bad_request(format!(
            "`{name}` is true or false, not `{other}`"
        ))),
    }
}

/// A run created by another instance (shared store) is loaded before it is used.
pub async fn ensure_run(s: &super::AppState, run: Option<&str>) -> Result<(), ApiError> {
    if let Some(id) = run
        && s.store.is_postgres()
        && s.engine.run(id).is_none()
    {
        s.store.restore_run(&s.engine, id).await?;
    }
    Ok(())
}

thread_local! {
    // Handles of the metrics nearly every decision touches, looked up once per worker
    // thread: a labelled lookup in the registry costs about a microsecond per call.
    static LATENCY: std::cell::OnceCell<metrics::Histogram> = const { std::cell::OnceCell::new() };
    static ALLOWED: std::cell::RefCell<Vec<(&'static str, metrics::Counter)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Counts, times and logs a decision.
pub fn observe(decision: &Decision, started: Instant, endpoint: &'static str) {
    if decision.allowed && decision.rule.is_none() {
        ALLOWED.with_borrow_mut(
            |handles| match handles.iter().find(|(e, _)| *e == endpoint) {
                Some((_, counter)) => counter.increment(1),
                None => {
                    let counter = decisions_total(decision, endpoint);
                    counter.increment(1);
                    handles.push((endpoint, counter));
                }
            },
        );
    } else {
        decisions_total(decision, endpoint).increment(1);
    }
    LATENCY.with(|h| {
        h.get_or_init(|| metrics::histogram!("tollgate_decision_seconds"))
            .record(started.elapsed().as_secs_f64())
    });
    let backend_failed = |r: &str| r.starts_with("ledger backend error");
    if decision.reason.as_deref().is_some_and(backend_failed)
        || decision.alerts.iter().any(|a| backend_failed(&a.reason))
    {
        metrics::counter!("tollgate_ledger_errors_total").increment(1);
    }
    if !decision.allowed {
        tracing::info!(
            code = decision.code.as_str(),
            policy = decision.policy.as_deref().unwrap_or(""),
            rule = decision.rule.as_deref().unwrap_or(""),
            reason = decision.reason.as_deref().unwrap_or(""),
            decision_id = %decision.decision_id,
            "denied"
        );
    }
    for entry in decision.trace.iter().filter(|t| t.outcome == "error") {
        metrics::counter!("tollgate_expression_errors_total").increment(1);
        tracing::debug!(detail = %entry.detail, "expression error");
    }
}

fn decisions_total(decision: &Decision, endpoint: &'static str) -> metrics::Counter {
    let rule = decision.rule.as_deref().unwrap_or_default().to_string();
    metrics::counter!("tollgate_decisions_total", "code" => decision.code.as_str(), "rule" => rule, "endpoint" => endpoint)
}

/// The decision as the response: status mirrors the code, `Retry-After` on rate limits.
pub fn decision_response(decision: &Decision, allowed_status: StatusCode) -> Response {
    let status = if decision.allowed {
        allowed_status
    } else {
        StatusCode::from_u16(decision.code.http_status()).unwrap_or(StatusCode::FORBIDDEN)
    };
    // Sized for a typical decision up front: growing the buffer while writing costs more
    // than the writing.
    let mut body = Vec::with_capacity(512);
    let mut response = match decision.write_json(&mut body) {
        Ok(()) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        // Not expected (every map key is a string); `Json` answers 500 with the reason.
        Err(_) => (status, Json(decision)).into_response(),
    };
    if let Some(ms) = decision
        .retry_after_ms
        .filter(|_| status == StatusCode::TOO_MANY_REQUESTS)
    {
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(ms.div_ceil(1000).max(1)),
        );
    }
    response
}

/// `POST /v1/check`: decide a request. The body is always the decision.
#[utoipa::path(post, path = "/v1/check", request_body = tollgate::Request, params(("explain" = Option<bool>, Query, description = "fill `trace`")),
    responses((status = 200, description = "allowed"), (status = 403, description = "POLICY_DENIED"),
               (status = 429, description = "RATE_LIMITED, QUOTA_EXCEEDED or BUDGET_EXCEEDED"), (status = 400), (status = 401), (status = 413)))]
pub async fn check(
    s: State,
    Query(q): Query<HashMap<String, String>>,
    _caller: DataCaller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    query(&q, &["explain"])?;
    let explain = flag(&q, "explain")?;
    let request: Request = parse_json(&body.map_err(body_rejection)?)?;
    ensure_run(&s, request.subject.run.as_deref()).await?;
    let started = Instant::now();
    let decision = s.blocking(|| {
        if explain {
            s.engine.check_explained(&request)
        } else {
            s.engine.check(&request)
        }
    });
    observe(&decision, started, "check");
    Ok(decision_response(&decision, StatusCode::OK))
}

/// The body of `POST /v1/record`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecordBody {
    /// The `decision_id` of the check.
    decision_id: String,
    /// What the call cost, in USD (a decimal string or a number).
    #[schema(value_type = String, example = "0.0031")]
    cost_usd: Micros,
}

/// `POST /v1/record`: the actual cost of an allowed decision (idempotent).
#[utoipa::path(post, path = "/v1/record", request_body = RecordBody, responses((status = 200, description = "{recorded, duplicate}"), (status = 404, description = "unknown decision"), (status = 400), (status = 503), (status = 401, description = "no or unknown API key, when keys are set")))]
pub async fn record(
    s: State,
    _caller: DataCaller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body: RecordBody = parse_json(&body.map_err(body_rejection)?)?;
    if let Some(why) = body.cost_usd.unrecordable() {
        return Err(ApiError::bad_request(format!(
            "`cost_usd` must be between 0 and {}",
            Micros::MAX_RECORDED
        ))
        .with_details(json!([{"field": "cost_usd", "message": why}])));
    }
    let id = uuid::Uuid::parse_str(&body.decision_id).map_err(|_| {
        ApiError::bad_request(format!("`{}` is not a decision id", body.decision_id))
    })?;
    let now = s.clock.now_ms();
    let ledger = match &s.counters {
        Counters::Memory(l) => l,
        Counters::Redis(redis) => {
            // Redis counts the cost (idempotently) in its own script; the store keeps
            // the durable row, with what it counted toward, to answer duplicates across
            // restarts and to rebuild Redis after a loss.
            let (outcome, at, sinks) = s
                .blocking(|| redis.record_counted(id.as_u128(), body.cost_usd))
                .map_err(|e| ApiError::unavailable(e.to_string()))?;
            let duplicate = match outcome {
                RecordOutcome::Recorded => {
                    s.store
                        .record_spend(&body.decision_id, at, body.cost_usd, now, sinks)
                        .await?;
                    false
                }
                RecordOutcome::Duplicate => true,
                RecordOutcome::UnknownDecision
                    if s.store.spend_recorded(&body.decision_id).await? =>
                {
                    true
                }
                RecordOutcome::UnknownDecision => return Err(unknown_decision(&body.decision_id)),
            };
            return Ok(recorded(duplicate));
        }
    };
    let duplicate = match ledger.begin_record(id.as_u128(), now) {
        Ok(pending) => {
            // Durable first: only a committed record is acknowledged.
            if let Err(e) = s
                .store
                .record_spend(
                    &body.decision_id,
                    pending.at,
                    body.cost_usd,
                    now,
                    pending.sinks.clone(),
                )
                .await
            {
                ledger.abort_record(id.as_u128());
                return Err(e.into());
            }
            ledger.finish_record(&pending, body.cost_usd);
            false
        }
        Err(RecordOutcome::Duplicate) => true,
        Err(_) if s.store.spend_recorded(&body.decision_id).await? => true,
        Err(_) => return Err(unknown_decision(&body.decision_id)),
    };
    Ok(recorded(duplicate))
}

fn unknown_decision(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "UNKNOWN_DECISION",
        format!("no allowed decision `{id}` to record against (unknown, denied, or too old)"),
    )
}

fn recorded(duplicate: bool) -> Response {
    metrics::counter!("tollgate_records_total", "duplicate" => if duplicate { "true" } else { "false" }).increment(1);
    Json(json!({"recorded": true, "duplicate": duplicate})).into_response()
}

/// `POST /v1/leases`: a check that also takes a lease on `resource` (`?ttl=30s` lets the
/// slot come back on its own).
#[utoipa::path(post, path = "/v1/leases", request_body = tollgate::Request, params(("ttl" = Option<String>, Query, description = "lease lifetime, e.g. 30s"), ("explain" = Option<bool>, Query)),
    responses((status = 201, description = "the decision plus lease_id"), (status = 429), (status = 403), (status = 400), (status = 401, description = "no or unknown API key, when keys are set")))]
pub async fn acquire(
    s: State,
    Query(q): Query<HashMap<String, String>>,
    _caller: DataCaller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    query(&q, &["ttl", "explain"])?;
    let explain = flag(&q, "explain")?;
    let ttl = match q.get("ttl") {
        Some(t) => Some(Millis::parse(t).ok_or_else(|| {
            ApiError::bad_request(format!("bad `ttl` `{t}` (e.g. 30s, 5m; at most 36500d)"))
        })?),
        None => None,
    };
    let request: Request = parse_json(&body.map_err(body_rejection)?)?;
    let decision = acquire_lease(&s, &request, ttl, explain, "lease").await?;
    Ok(decision_response(&decision, StatusCode::CREATED))
}

/// Takes a lease and makes it durable; on a store failure the lease is given back.
pub async fn acquire_lease(
    s: &super::AppState,
    request: &Request,
    ttl: Option<Millis>,
    explain: bool,
    endpoint: &'static str,
) -> Result<Decision, ApiError> {
    let Some(resource) = request.resource.as_deref() else {
        return Err(ApiError::bad_request("a lease needs `resource`")
            .with_details(json!([{"field": "resource", "message": "required"}])));
    };
    ensure_run(s, request.subject.run.as_deref()).await?;
    let started = Instant::now();
    let decision = s.blocking(|| s.engine.acquire(request, ttl, explain));
    observe(&decision, started, endpoint);
    if let Some(lease) = &decision.lease_id {
        let now = s.clock.now_ms();
        let expires = ttl.map(|t| now + t.0);
        if let Err(e) = s
            .store
            .insert_lease(lease, resource, &request.subject, expires, now)
            .await
        {
            let _ = s.blocking(|| s.engine.release(lease));
            return Err(e.into());
        }
    }
    Ok(decision)
}

/// `DELETE /v1/leases/{id}`.
#[utoipa::path(delete, path = "/v1/leases/{id}", params(("id" = String, Path, description = "the lease id")), responses((status = 204), (status = 404), (status = 401, description = "no or unknown API key, when keys are set")))]
pub async fn release(
    s: State,
    _caller: DataCaller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    release_lease(&s, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub async fn release_lease(s: &super::AppState, id: &str) -> Result<(), ApiError> {
    if uuid::Uuid::parse_str(id).is_err() {
        return Err(ApiError::not_found(format!("no lease `{id}`")));
    }
    let stored = s.store.delete_lease(id).await?;
    let live = s
        .blocking(|| s.engine.release(id))
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    if stored || live {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("no lease `{id}`")))
    }
}

/// `POST /v1/runs`: freeze the policy version and settings for a run.
#[utoipa::path(post, path = "/v1/runs", request_body = tollgate::RunSpec, responses((status = 201, description = "{id, policy_version, settings, budget_usd}"), (status = 409, description = "the id exists"), (status = 422), (status = 400), (status = 401, description = "no or unknown API key, when keys are set")))]
pub async fn create_run(
    s: State,
    _caller: DataCaller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let spec: RunSpec = parse_json(&body.map_err(body_rejection)?)?;
    let info = s.engine.create_run(spec.clone()).map_err(|e| match e {
        EngineError::RunExists(_) => {
            ApiError::new(StatusCode::CONFLICT, "RUN_EXISTS", e.to_string())
        }
        other => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "INVALID_RUN",
            other.to_string(),
        ),
    })?;
    let spec = RunSpec {
        id: Some(info.id.clone()),
        ..spec
    };
    s.store.insert_run(&spec, &info, s.clock.now_ms()).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

/// `GET /v1/runs/{id}`.
#[utoipa::path(get, path = "/v1/runs/{id}", params(("id" = String, Path, description = "the run id")), responses((status = 200), (status = 404), (status = 401, description = "no or unknown API key, when keys are set")))]
pub async fn get_run(
    s: State,
    _caller: DataCaller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    ensure_run(&s, Some(&id)).await?;
    let info = s
        .engine
        .run(&id)
        .ok_or_else(|| ApiError::not_found(format!("no run `{id}`")))?;
    Ok(Json(info).into_response())
}

/// `GET /v1/settings/effective?product=&team=&key=&user=&agent=&run=`.
#[utoipa::path(get, path = "/v1/settings/effective", responses((status = 200, description = "{settings: {KEY: {value, source}}}"), (status = 404, description = "unknown run"), (status = 401, description = "no or unknown API key, when keys are set")))]
pub async fn effective_settings(
    s: State,
    _caller: DataCaller,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    query(&q, &["product", "team", "key", "user", "agent", "run"])?;
    let get = |k: &str| q.get(k).cloned();
    let subject = Subject {
        product: get("product"),
        team: get("team"),
        key: get("key"),
        user: get("user"),
        agent: get("agent"),
        run: get("run"),
    };
    ensure_run(&s, subject.run.as_deref()).await?;
    let settings = s
        .engine
        .settings(&subject)
        .map_err(|e| ApiError::not_found(e.to_string()))?;
    Ok(Json(json!({ "settings": settings })).into_response())
}

/// `GET /v1/usage?dimension=&id=`.
#[utoipa::path(get, path = "/v1/usage", responses((status = 200, description = "{items: [...]}"), (status = 401, description = "no or unknown API key, when keys are set")))]
pub async fn usage(
    s: State,
    _caller: DataCaller,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    query(&q, &["dimension", "id"])?;
    let filter = match (q.get("dimension"), q.get("id")) {
        (Some(d), Some(i)) => Some((d.as_str(), i.as_str())),
        (None, None) => None,
        _ => {
            return Err(ApiError::bad_request(
                "give both `dimension` and `id`, or neither",
            ));
        }
    };
    let items = s
        .blocking(|| s.engine.usage(filter))
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    Ok(Json(json!({ "items": items })).into_response())
}

/// `GET /healthz`: the process answers.
#[utoipa::path(get, path = "/healthz", responses((status = 200)))]
pub async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// `GET /readyz`: the store answers.
#[utoipa::path(get, path = "/readyz", responses((status = 200), (status = 503)))]
pub async fn readyz(s: State) -> Response {
    if let Err(e) = s.store.ping().await {
        return ApiError::unavailable(format!("the store does not answer: {e}")).into_response();
    }
    if let Counters::Redis(r) = &s.counters
        && let Err(e) = s.blocking(|| r.ping())
    {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "LEDGER_UNAVAILABLE",
            format!("the ledger does not answer: {e}"),
        )
        .into_response();
    }
    Json(json!({"status": "ready", "policy_version": s.engine.policy().version()})).into_response()
}

/// `GET /metrics`: Prometheus text.
#[utoipa::path(get, path = "/metrics", responses((status = 200)))]
pub async fn metrics(s: State) -> Response {
    metrics::gauge!("tollgate_policy_version").set(s.engine.policy().version() as f64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}
