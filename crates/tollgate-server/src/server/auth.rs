//! API keys (data plane, `Authorization: Bearer`) and admin keys (`X-Admin-Key`),
//! compared in constant time.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::request::Parts;
use subtle::ConstantTimeEq;

use super::AppState;
use super::error::ApiError;

/// Named keys from `name=key,name=key`.
#[derive(Clone, Debug, Default)]
pub struct Keys(Vec<(String, String)>);

impl Keys {
    pub fn parse(text: &str) -> Result<Keys, String> {
        let mut keys = Vec::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (name, key) = item
                .split_once('=')
                .filter(|(n, k)| !n.is_empty() && !k.is_empty())
                .ok_or_else(|| format!("bad key entry `{item}` (expected name=key)"))?;
            keys.push((name.to_string(), key.to_string()));
        }
        Ok(Keys(keys))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The name of the key, when `given` is one of them. Every key is compared, in
    /// constant time, so timing tells nothing about which prefix matched.
    pub fn find(&self, given: &str) -> Option<&str> {
        let mut found = None;
        for (name, key) in &self.0 {
            if bool::from(key.as_bytes().ct_eq(given.as_bytes())) {
                found = Some(name.as_str());
            }
        }
        found
    }
}

/// The data plane: open when no API key is configured.
fn data(keys: &Keys, headers: &HeaderMap) -> Result<(), ApiError> {
    if keys.is_empty() {
        return Ok(());
    }
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| ApiError::unauthorized("missing `Authorization: Bearer <key>`"))?;
    keys.find(given)
        .map(|_| ())
        .ok_or_else(|| ApiError::unauthorized("unknown API key"))
}

/// A data-plane caller whose API key checked out (every caller, when no key is
/// configured). Checked on the request's own headers: the `HeaderMap` extractor would
/// copy all of them on every check.
pub struct DataCaller;

impl FromRequestParts<Arc<AppState>> for DataCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        data(&state.api_keys, &parts.headers).map(|()| DataCaller)
    }
}

/// The control plane: closed when no admin key is configured. Returns the actor.
pub fn admin(keys: &Keys, headers: &HeaderMap) -> Result<String, ApiError> {
    if keys.is_empty() {
        return Err(ApiError::unauthorized(
            "the control plane is disabled: set TOLLGATE_ADMIN_KEYS=\"name=key,…\"",
        ));
    }
    let given = headers
        .get("x-admin-key")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::unauthorized("missing `X-Admin-Key`"))?;
    keys.find(given)
        .map(str::to_string)
        .ok_or_else(|| ApiError::unauthorized("unknown admin key"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_and_match() {
        let k = Keys::parse("alice=KEY1, bob=KEY2").unwrap();
        assert_eq!(k.find("KEY2"), Some("bob"));
        assert_eq!(k.find("KEY"), None);
        assert_eq!(k.find(""), None);
        assert!(Keys::parse("alice").is_err());
        assert!(Keys::parse("=x").is_err());
        assert!(Keys::parse("").unwrap().is_empty());
    }
}
