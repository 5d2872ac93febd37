//! One JSON error shape for every failure, Stripe-like:
//! `{"error": {"code", "message", "field_violations": [{"field", "description"}], "request_id"}}`
//! with the HTTP status from the shared code table. Handlers return [`ApiError`]; the
//! observe middleware adds the request id when it renders the body.

use axum::Json;
use axum::response::{IntoResponse, Response};
use tessera_runtime::{Code, Error};

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        Self(e)
    }
}

impl From<tonic::Status> for ApiError {
    fn from(status: tonic::Status) -> Self {
        Self(Error::from_status(&status))
    }
}

impl ApiError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self(Error::new(code, message))
    }
}

/// Carried in the response extensions until the observe middleware renders it.
#[derive(Debug, Clone)]
pub struct PendingError(pub Error);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = self.0.code.http().into_response();
        response.extensions_mut().insert(PendingError(self.0));
        response
    }
}

/// The JSON body of an error.
pub fn render(error: &Error, request_id: &str) -> Response {
    let body = serde_json::json!({
        "error": {
            "code": error.code.as_str(),
            "message": error.message,
            "field_violations": error.field_violations,
            "reason": error.reason,
            "request_id": request_id,
        }
    });
    (error.code.http(), Json(body)).into_response()
}
