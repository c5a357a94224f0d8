//! `/openapi.json`, generated from the handlers' annotations.

use axum::Json;
use axum::response::{IntoResponse, Response};
use utoipa::OpenApi;

use super::{admin, data, products};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tollgate",
        description = "Policy engine for LLM and AI-agent traffic: decisions, accounting, control plane."
    ),
    paths(
        data::check,
        data::record,
        data::acquire,
        data::release,
        data::create_run,
        data::get_run,
        data::effective_settings,
        data::usage,
        data::healthz,
        data::readyz,
        data::metrics,
        admin::get_policy,
        admin::put_policy,
        admin::list_versions,
        admin::get_version,
        admin::rollback,
        admin::put_setting,
        admin::delete_setting,
        admin::audit,
        products::put_policy,
        products::admit,
        products::provision,
        products::deprovision,
        openapi_json,
    )
)]
struct ApiDoc;

/// `GET /openapi.json`.
#[utoipa::path(get, path = "/openapi.json", responses((status = 200)))]
pub async fn openapi_json() -> Response {
    Json(ApiDoc::openapi()).into_response()
}
