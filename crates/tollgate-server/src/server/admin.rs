//! The control plane: policy versions, rollback, settings overrides, audit. Every
//! change is validated first (422 with every error, nothing changed), written to the
//! store with its audit entry in one transaction, then installed.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use tollgate::PolicyErrors;
use tollgate_store::{Change, PolicyVersion};

use super::data::query;
use super::error::{ApiError, body_rejection, parse_json};
use super::{AppState, State, auth};

fn reason(headers: &HeaderMap) -> String {
    headers
        .get("x-reason")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// 422 with every validation error, located.
pub fn invalid_policy(e: &PolicyErrors) -> ApiError {
    let details: Vec<_> = e
        .errors()
        .map(|d| json!({"path": d.path, "line": d.line, "column": d.column, "message": d.to_string()}))
        .collect();
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "INVALID_POLICY",
        format!(
            "the policy has {} error(s); nothing was changed",
            details.len()
        ),
    )
    .with_details(json!(details))
}

/// Validates, stores (with audit) and installs a new policy version. The caller holds
/// the admin lock.
pub async fn install(
    s: &AppState,
    source: String,
    actor: &str,
    action: &str,
    target: &str,
    reason: &str,
) -> Result<u64, ApiError> {
    let set = s.engine.compile(&source).map_err(|e| invalid_policy(&e))?;
    let current = s.engine.policy().version();
    let version = current + 1;
    s.store
        .insert_policy(
            &PolicyVersion {
                version,
                source,
                created_at: s.clock.now_ms(),
                actor: actor.to_string(),
                reason: reason.to_string(),
            },
            Change {
                actor,
                action,
                target,
                from: Some(current.to_string()),
                to: Some(version.to_string()),
                reason,
            },
        )
        .await?;
    s.engine.install_version(set, version);
    metrics::gauge!("tollgate_policy_version").set(version as f64);
    tracing::info!(version, actor, action, "policy installed");
    Ok(version)
}

/// `GET /v1/admin/policy` (`?format=yaml` for the document text as stored).
#[utoipa::path(get, path = "/v1/admin/policy", params(("format" = Option<String>, Query, description = "json (default) or yaml")),
    responses((status = 200, description = "{version, document}"), (status = 400, description = "an unknown query parameter"), (status = 401)))]
pub async fn get_policy(
    s: State,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    auth::admin(&s.admin_keys, &headers)?;
    query(&q, &["format"])?;
    let set = s.engine.policy();
    match q.get("format").map(String::as_str) {
        None | Some("json") => {
            Ok(Json(json!({"version": set.version(), "document": set.document()})).into_response())
        }
        Some("yaml") => {
            let stored = s.store.policy_version(set.version()).await?;
            let text = stored.map(|v| v.source).unwrap_or_default();
            Ok(([(header::CONTENT_TYPE, "application/yaml")], text).into_response())
        }
        Some(other) => Err(ApiError::bad_request(format!(
            "`format` is json or yaml, not `{other}`"
        ))),
    }
}

/// `PUT /v1/admin/policy`: a new version (YAML or JSON body; `X-Reason`; `If-Match`).
#[utoipa::path(put, path = "/v1/admin/policy",
    responses((status = 200, description = "{version}"), (status = 409, description = "stale If-Match"), (status = 400, description = "If-Match is not a version number or *"), (status = 422, description = "invalid policy, with every error"), (status = 401)))]
pub async fn put_policy(
    s: State,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let actor = auth::admin(&s.admin_keys, &headers)?;
    let body = body.map_err(body_rejection)?;
    let source = String::from_utf8(body.to_vec())
        .map_err(|_| ApiError::bad_request("the policy must be UTF-8 text"))?;
    let _guard = s.admin_lock.lock().await;
    if let Some(header) = headers.get(header::IF_MATCH) {
        // A version number (quoted or not, as an ETag), or `*`: any current version.
        let text = header.to_str().unwrap_or_default().trim().trim_matches('"');
        let expected = match text {
            "*" => None,
            _ => Some(text.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!(
                    "If-Match is a policy version number (or *), not `{}`",
                    String::from_utf8_lossy(header.as_bytes())
                ))
                .with_details(json!([{"field": "If-Match", "message": "not a version"}]))
            })?),
        };
        let current = s.engine.policy().version();
        if expected.is_some_and(|v| v != current) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "VERSION_CONFLICT",
                format!("If-Match `{text}` is stale: the current version is {current}"),
            ));
        }
    }
    let version = install(
        &s,
        source,
        &actor,
        "policy.replace",
        "policy",
        &reason(&headers),
    )
    .await?;
    Ok(Json(json!({"version": version})).into_response())
}

/// `GET /v1/admin/policy/versions`.
#[utoipa::path(get, path = "/v1/admin/policy/versions", responses((status = 200, description = "{versions: [{version, created_at, actor, reason}]}"), (status = 400, description = "an unknown query parameter"), (status = 401)))]
pub async fn list_versions(
    s: State,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    auth::admin(&s.admin_keys, &headers)?;
    // No parameters: one given is a mistake, refused as on every other route.
    query(&q, &[])?;
    let versions: Vec<_> = s
        .store
        .policy_versions()
        .await?
        .into_iter()
        .map(|v| json!({"version": v.version, "created_at": tollgate::rfc3339(v.created_at), "actor": v.actor, "reason": v.reason}))
        .collect();
    Ok(Json(json!({ "versions": versions })).into_response())
}

/// `GET /v1/admin/policy/versions/{v}`.
#[utoipa::path(get, path = "/v1/admin/policy/versions/{version}", params(("version" = u64, Path, description = "the policy version")), responses((status = 200, description = "{version, document, source, created_at, actor, reason}"), (status = 400, description = "not a version number"), (status = 401), (status = 404)))]
pub async fn get_version(
    s: State,
    headers: HeaderMap,
    Path(version): Path<String>,
) -> Result<Response, ApiError> {
    auth::admin(&s.admin_keys, &headers)?;
    let v = stored_version(&s, &version).await?;
    let document = tollgate::yaml::load_one(&v.source)
        .map(|n| n.to_json())
        .unwrap_or(serde_json::Value::Null);
    Ok(Json(json!({
        "version": v.version, "document": document, "source": v.source,
        "created_at": tollgate::rfc3339(v.created_at), "actor": v.actor, "reason": v.reason,
    }))
    .into_response())
}

async fn stored_version(s: &AppState, version: &str) -> Result<PolicyVersion, ApiError> {
    let n: u64 = version
        .parse()
        .map_err(|_| ApiError::bad_request(format!("`{version}` is not a version number")))?;
    s.store
        .policy_version(n)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no policy version {n}")))
}

/// `POST /v1/admin/policy/rollback/{v}`: version `v`'s document becomes a new version.
#[utoipa::path(post, path = "/v1/admin/policy/rollback/{version}", params(("version" = u64, Path, description = "the version whose document becomes a new version")), responses((status = 200, description = "{version}"), (status = 400, description = "not a version number"), (status = 401), (status = 404), (status = 422, description = "the old document no longer validates")))]
pub async fn rollback(
    s: State,
    headers: HeaderMap,
    Path(version): Path<String>,
) -> Result<Response, ApiError> {
    let actor = auth::admin(&s.admin_keys, &headers)?;
    let _guard = s.admin_lock.lock().await;
    let old = stored_version(&s, &version).await?;
    let mut why = reason(&headers);
    if why.is_empty() {
        why = format!("rollback to version {}", old.version);
    }
    let new = install(
        &s,
        old.source,
        &actor,
        "policy.rollback",
        &format!("policy@{}", old.version),
        &why,
    )
    .await?;
    Ok(Json(json!({"version": new, "rolled_back_to": old.version})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingBody {
    value: serde_json::Value,
}

fn scope_of(q: &HashMap<String, String>) -> Result<String, ApiError> {
    query(q, &["scope"])?;
    Ok(q.get("scope").cloned().unwrap_or_else(|| "global".into()))
}

/// `PUT /v1/admin/settings/{key}?scope=…` with `{"value": …}`.
#[utoipa::path(put, path = "/v1/admin/settings/{key}", params(("key" = String, Path, description = "the setting key"), ("scope" = Option<String>, Query, description = "global (default), product:<id>, team:<id>, key:<id>, user:<id>")),
    responses((status = 200, description = "{key, scope, value, previous}"), (status = 400, description = "a body that is not {\"value\": …}, an unknown query parameter"), (status = 401), (status = 422, description = "unknown key, wrong type, out of bounds, bad scope")))]
pub async fn put_setting(
    s: State,
    headers: HeaderMap,
    Path(key): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let actor = auth::admin(&s.admin_keys, &headers)?;
    let scope = scope_of(&q)?;
    let body: SettingBody = parse_json(&body.map_err(body_rejection)?)?;
    let _guard = s.admin_lock.lock().await;
    let value = s
        .engine
        .check_setting(&scope, &key, &body.value)
        .map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "INVALID_SETTING",
                e.to_string(),
            )
        })?;
    let previous = s.engine.setting_override(&scope, &key);
    let target = format!("setting:{key}@{scope}");
    let why = reason(&headers);
    s.store
        .put_override(
            &scope,
            &key,
            Some(&value),
            s.clock.now_ms(),
            Change {
                actor: &actor,
                action: "setting.set",
                target: &target,
                from: previous.as_ref().map(ToString::to_string),
                to: Some(value.to_string()),
                reason: &why,
            },
        )
        .await?;
    s.engine
        .set_setting(&scope, &key, value.clone())
        .map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "INVALID_SETTING",
                e.to_string(),
            )
        })?;
    Ok(
        Json(json!({"key": key, "scope": scope, "value": value, "previous": previous}))
            .into_response(),
    )
}

/// `DELETE /v1/admin/settings/{key}?scope=…`.
#[utoipa::path(delete, path = "/v1/admin/settings/{key}", params(("key" = String, Path, description = "the setting key"), ("scope" = Option<String>, Query, description = "global (default), product:<id>, team:<id>, key:<id>, user:<id>")), responses((status = 204), (status = 400, description = "an unknown query parameter"), (status = 401), (status = 404, description = "no override there")))]
pub async fn delete_setting(
    s: State,
    headers: HeaderMap,
    Path(key): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let actor = auth::admin(&s.admin_keys, &headers)?;
    let scope = scope_of(&q)?;
    let _guard = s.admin_lock.lock().await;
    let Some(previous) = s.engine.setting_override(&scope, &key) else {
        return Err(ApiError::not_found(format!(
            "no override of `{key}` at scope `{scope}`"
        )));
    };
    let target = format!("setting:{key}@{scope}");
    let why = reason(&headers);
    s.store
        .put_override(
            &scope,
            &key,
            None,
            s.clock.now_ms(),
            Change {
                actor: &actor,
                action: "setting.remove",
                target: &target,
                from: Some(previous.to_string()),
                to: None,
                reason: &why,
            },
        )
        .await?;
    s.engine
        .remove_setting(&scope, &key)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /v1/admin/audit?limit=`: newest first.
#[utoipa::path(get, path = "/v1/admin/audit", params(("limit" = Option<u32>, Query)), responses((status = 200, description = "{entries: [{id, at, actor, action, target, from, to, reason}]}"), (status = 400, description = "a limit that is not a number, an unknown query parameter"), (status = 401)))]
pub async fn audit(
    s: State,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    auth::admin(&s.admin_keys, &headers)?;
    query(&q, &["limit"])?;
    let limit = match q.get("limit") {
        Some(l) => l
            .parse::<u32>()
            .map_err(|_| ApiError::bad_request(format!("`limit` is a whole number, not `{l}`")))?
            .min(10_000),
        None => 100,
    };
    let entries = s.store.audit_entries(limit).await?;
    Ok(Json(json!({ "entries": entries })).into_response())
}
