//! Product admission (the product-admission convention): per-product `max_engines` (a
//! live-lease quota on `engines`) and `rate_limit_rpm` (a fixed one-minute window on
//! `admit`), kept as an ordinary policy named `product-<id>` so that they are
//! versioned, audited and visible like every other rule.

use axum::Json;
use axum::body::Bytes;
use axum::extract::Path;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use tollgate::{Code, Decision, Request};

use super::auth::DataCaller;
use super::data::{acquire_lease, decision_response, observe, release_lease};
use super::error::{ApiError, body_rejection, parse_json};
use super::{AppState, State, admin, auth};

/// The body of `PUT /v1/products/{id}/policy` (`{}`: no limits).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Engines the product may hold at once (leases on `engines`).
    max_engines: Option<u64>,
    /// Admissions a minute.
    rate_limit_rpm: Option<u64>,
}

fn policy_name(product: &str) -> String {
    format!("product-{product}")
}

/// A product id as a glob that matches exactly it.
fn literal_glob(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '{' | '}' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `PUT /v1/products/{id}/policy` with `{"max_engines": N, "rate_limit_rpm": M}` (`{}`: no limits).
#[utoipa::path(put, path = "/v1/products/{id}/policy", request_body = Limits, params(("id" = String, Path, description = "the product id")), responses((status = 200, description = "{product, max_engines, rate_limit_rpm, version}"), (status = 401), (status = 400)))]
pub async fn put_policy(
    s: State,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let actor = auth::admin(&s.admin_keys, &headers)?;
    let limits: Limits = parse_json(&body.map_err(body_rejection)?)?;
    if limits.rate_limit_rpm == Some(0) {
        return Err(ApiError::bad_request(
            "`rate_limit_rpm` must be at least 1 (omit it for no limit)",
        ));
    }
    // Policy numbers are i64: a larger one would come back as a 422 about a line of the
    // generated document the caller never wrote.
    for (field, value) in [
        ("max_engines", limits.max_engines),
        ("rate_limit_rpm", limits.rate_limit_rpm),
    ] {
        if value.is_some_and(|v| v > i64::MAX as u64) {
            return Err(
                ApiError::bad_request(format!("`{field}` must be at most {}", i64::MAX))
                    .with_details(json!([{"field": field, "message": "too large"}])),
            );
        }
    }
    let _guard = s.admin_lock.lock().await;
    let mut document = s.engine.policy().document().clone();
    if !document.is_object() {
        document = json!({});
    }
    let name = policy_name(&id);
    let policies = document["policies"].as_array().cloned().unwrap_or_default();
    let mut policies: Vec<Value> = policies
        .into_iter()
        .filter(|p| p["name"] != json!(name))
        .collect();
    let mut rules = Vec::new();
    if let Some(max) = limits.max_engines {
        rules.push(json!({"id": "max_engines", "type": "quota", "resource": "engines", "max": max, "by": ["product"]}));
    }
    if let Some(rpm) = limits.rate_limit_rpm {
        rules.push(json!({"id": "rate_limit_rpm", "type": "rate", "limit": rpm, "per": "1m", "algorithm": "fixed_window",
                          "by": ["product"], "when": "action == \"admit\""}));
    }
    if !rules.is_empty() {
        policies
            .push(json!({"name": name, "match": {"product": [literal_glob(&id)]}, "rules": rules}));
    }
    document["policies"] = Value::Array(policies);
    let source = serde_json::to_string_pretty(&document)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let reason = headers
        .get("x-reason")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("product limits")
        .to_string();
    let version = admin::install(
        &s,
        source,
        &actor,
        "product.policy",
        &format!("product:{id}"),
        &reason,
    )
    .await?;
    Ok(Json(json!({"product": id, "max_engines": limits.max_engines, "rate_limit_rpm": limits.rate_limit_rpm, "version": version})).into_response())
}

fn request_for(id: &str, body: &[u8], action: &str) -> Result<Request, ApiError> {
    let mut request: Request = if body.iter().all(u8::is_ascii_whitespace) {
        Request::default()
    } else {
        parse_json(body)?
    };
    request.subject.product = Some(id.to_string());
    request.action = Some(action.to_string());
    Ok(request)
}

/// A denial in the product convention's words.
fn convention_error(s: &AppState, id: &str, decision: &Decision) -> ApiError {
    let status = StatusCode::from_u16(decision.code.http_status()).unwrap_or(StatusCode::FORBIDDEN);
    let reason = decision.reason.clone().unwrap_or_default();
    let mut error = match decision.code {
        Code::QuotaExceeded => {
            let max = product_max_engines(s, id)
                .or_else(|| {
                    reason
                        .strip_prefix("quota of ")
                        .and_then(|r| r.split(' ').next())
                        .and_then(|n| n.parse().ok())
                })
                .map_or_else(|| "?".to_string(), |n: u64| n.to_string());
            ApiError::new(
                status,
                "QUOTA_EXCEEDED",
                format!("Product at max_engines limit ({max})."),
            )
        }
        Code::RateLimited => {
            let secs = decision
                .retry_after_ms
                .unwrap_or(1000)
                .div_ceil(1000)
                .max(1);
            let mut e = ApiError::new(
                status,
                "RATE_LIMITED",
                format!("Rate limit exceeded. Retry in {secs} seconds."),
            );
            e.retry_after_secs = Some(secs);
            e
        }
        Code::BudgetExceeded => ApiError::new(status, "BUDGET_EXCEEDED", reason),
        Code::PolicyDenied | Code::Allowed => ApiError::new(status, "POLICY_DENIED", reason),
    };
    error.details = Some(
        json!({"decision_id": decision.decision_id, "policy": decision.policy, "rule": decision.rule}),
    );
    error
}

fn product_max_engines(s: &AppState, id: &str) -> Option<u64> {
    let set = s.engine.policy();
    let name = policy_name(id);
    set.document()["policies"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == json!(name))?["rules"]
        .as_array()?
        .iter()
        .find(|r| r["id"] == "max_engines")?["max"]
        .as_u64()
}

/// `POST /v1/products/{id}/admit`: may this product take one more request?
#[utoipa::path(post, path = "/v1/products/{id}/admit", request_body(content = Option<tollgate::Request>, description = "optional: the subject's other dimensions, labels and estimate (product and action are set from the route)"), params(("id" = String, Path, description = "the product id")), responses((status = 200, description = "the decision"), (status = 400, description = "a body that is not a request"), (status = 429, description = "RATE_LIMITED (convention body)"), (status = 403), (status = 401, description = "no or unknown API key, when keys are set")))]
pub async fn admit(
    s: State,
    _caller: DataCaller,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request = request_for(&id, &body.map_err(body_rejection)?, "admit")?;
    let started = std::time::Instant::now();
    let decision = s.blocking(|| s.engine.check(&request));
    observe(&decision, started, "admit");
    if !decision.allowed {
        return Err(convention_error(&s, &id, &decision));
    }
    Ok(decision_response(&decision, StatusCode::OK))
}

/// `POST /v1/products/{id}/provision`: a lease on `engines` for the product.
#[utoipa::path(post, path = "/v1/products/{id}/provision", request_body(content = Option<tollgate::Request>, description = "optional: the subject's other dimensions, labels and estimate (product and action are set from the route)"), params(("id" = String, Path, description = "the product id")), responses((status = 201, description = "the decision plus lease_id"), (status = 400, description = "a body that is not a request"), (status = 403, description = "POLICY_DENIED (convention body)"), (status = 429, description = "QUOTA_EXCEEDED (convention body)"), (status = 401, description = "no or unknown API key, when keys are set")))]
pub async fn provision(
    s: State,
    _caller: DataCaller,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let mut request = request_for(&id, &body.map_err(body_rejection)?, "provision")?;
    request.resource = Some("engines".into());
    let decision = acquire_lease(&s, &request, None, false, "provision").await?;
    if !decision.allowed {
        return Err(convention_error(&s, &id, &decision));
    }
    Ok(decision_response(&decision, StatusCode::CREATED))
}

/// `DELETE /v1/products/{id}/provision/{lease_id}`: the engine is gone.
#[utoipa::path(delete, path = "/v1/products/{id}/provision/{lease_id}", params(("id" = String, Path, description = "the product id"), ("lease_id" = String, Path, description = "the lease id from provision")), responses((status = 204), (status = 404), (status = 401, description = "no or unknown API key, when keys are set")))]
pub async fn deprovision(
    s: State,
    _caller: DataCaller,
    Path((_id, lease)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    release_lease(&s, &lease).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    #[test]
    fn product_ids_become_literal_globs() {
        assert_eq!(super::literal_glob("acme"), "acme");
        assert_eq!(super::literal_glob("a*b[1]"), "a\\*b\\[1\\]");
    }
}
