//! Request extractors that turn malformed input into field-level 4xx errors: strict JSON
//! bodies (size-limited, unknown fields refused, the failing field named), the caller's API
//! key, and the `Idempotency-Key` header.

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request};
use http::request::Parts;
use serde::de::DeserializeOwned;
use tessera_runtime::{Code, Error, RequestContext};

use crate::AppState;
use crate::api::Allowed;
use crate::error::ApiError;
use crate::keys::{Principal, Role};
use crate::observe::RequestId;

/// A JSON body parsed strictly into `T` (which should `deny_unknown_fields`).
pub struct StrictJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for StrictJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !is_json {
            return Err(Error::invalid_field("Content-Type", "must be application/json").into());
        }
        let limit = state.max_body_bytes;
        let bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|_| too_large(limit))?;
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let syntax = inner.is_syntax() || inner.is_eof();
            let mut field = if path == "." || syntax {
                "body".to_string()
            } else {
                path
            };
            // A missing field is reported at its parent; name the field itself.
            if let Some(name) = inner
                .to_string()
                .strip_prefix("missing field `")
                .and_then(|rest| rest.split('`').next())
            {
                field = if field == "body" {
                    name.to_string()
                } else {
                    format!("{field}.{name}")
                };
            }
            let description = if syntax {
                format!("is not valid JSON: {inner}")
            } else {
                inner.to_string()
            };
            ApiError(Error::invalid_field(field, description))
        })?;
        de.end().map_err(|e| {
            ApiError(Error::invalid_field(
                "body",
                format!("trailing characters: {e}"),
            ))
        })?;
        Ok(Self(value))
    }
}

/// 413 for a body over `limit` bytes.
pub fn too_large(limit: usize) -> ApiError {
    ApiError(
        Error::new(
            Code::PayloadTooLarge,
            format!("request body is larger than {limit} bytes"),
        )
        .with_reason("PAYLOAD_TOO_LARGE"),
    )
}

/// The API key of a request: `Authorization: Bearer <key>` or `X-Api-Key: <key>`.
pub fn api_key(headers: &http::HeaderMap) -> Option<&str> {
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
    header(http::header::AUTHORIZATION.as_str())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| header("x-api-key"))
        .map(str::trim)
}

/// The authenticated caller, from `Authorization: Bearer <key>` or `X-Api-Key: <key>`.
impl FromRequestParts<Arc<AppState>> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let Some(key) = api_key(&parts.headers) else {
            return Err(ApiError::new(
                Code::Unauthenticated,
                "missing API key: send `Authorization: Bearer <key>`",
            ));
        };
        let principal =
            state.keys.authenticate(key).await?.ok_or_else(|| {
                ApiError::new(Code::Unauthenticated, "invalid or revoked API key")
            })?;
        let limited = state
            .limits
            .check(&principal.key_id, &principal.tenant_id, parts.uri.path());
        if let Some(caller) = parts.extensions.get::<crate::observe::Caller>() {
            caller.set(principal.clone(), limited);
        }
        if let Some(secs) = limited.and_then(|info| info.retry_after) {
            return Err(ApiError::from(
                tessera_runtime::Error::new(
                    Code::ResourceExhausted,
                    format!("rate limit exceeded: retry in {secs} s"),
                )
                .with_reason("RATE_LIMITED"),
            ));
        }
        // The route's roles (see `crate::api`); a route that declares none serves no key.
        let allowed = parts.extensions.get::<Allowed>().map_or(&[][..], |a| a.0);
        principal.require(allowed)?;
        Ok(principal)
    }
}

impl Principal {
    /// Refuses with 403 unless the caller has one of `roles`.
    fn require(&self, roles: &[Role]) -> Result<(), ApiError> {
        if roles.contains(&self.role) {
            Ok(())
        } else {
            Err(ApiError::new(
                Code::PermissionDenied,
                format!("the `{}` role may not do this", self.role.as_str()),
            ))
        }
    }

    /// The context passed to the services.
    pub fn context(&self, request_id: &RequestId) -> RequestContext {
        RequestContext {
            tenant_id: self.tenant_id.clone(),
            principal: self.key_id.clone(),
            role: self.role.as_str().to_string(),
            request_id: request_id.0.clone(),
        }
    }
}

/// The `Idempotency-Key` header, required on every write.
pub struct IdempotencyKey(pub String);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let value = parts.headers.get("idempotency-key").ok_or_else(|| {
            Error::invalid_field("Idempotency-Key", "header is required on writes")
        })?;
        let value = value
            .to_str()
            .map_err(|_| Error::invalid_field("Idempotency-Key", "must be visible ASCII"))?;
        tessera_store::idempotency::validate_key(value).map_err(|_| {
            Error::invalid_field(
                "Idempotency-Key",
                "must be 1 to 255 visible ASCII characters",
            )
        })?;
        Ok(Self(value.to_string()))
    }
}
