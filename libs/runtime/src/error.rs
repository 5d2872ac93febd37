//! The one error model of Tessera. A service returns [`Error`]; it becomes a gRPC `Status`
//! (with `google.rpc.BadRequest` field violations and `google.rpc.ErrorInfo` reason) at the
//! service edge, and the gateway maps a `Status` back to [`Error`] and then to an HTTP status
//! and JSON body. [`Code`] is the small, exhaustive list both mappings go through.

use std::fmt;

use tonic_types::{ErrorDetails, StatusExt};

/// What went wrong, as the caller needs to know it. Maps one-to-one to a gRPC code and to
/// an HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    /// The request is malformed; see the field violations.
    InvalidArgument,
    /// No or bad credentials.
    Unauthenticated,
    /// Credentials are fine but the role may not do this.
    PermissionDenied,
    /// No such object (in the caller's tenant).
    NotFound,
    /// The object to create exists already.
    AlreadyExists,
    /// The request is valid but the state forbids it (insufficient balance, idempotency key
    /// reused with another request, …).
    FailedPrecondition,
    /// A concurrent request holds what this one needs (e.g. the same idempotency key is in
    /// flight); retry later.
    Aborted,
    /// Rate limit or quota exceeded.
    ResourceExhausted,
    /// The request body is larger than allowed.
    PayloadTooLarge,
    /// The operation is not available.
    Unimplemented,
    /// A dependency is down; retry later.
    Unavailable,
    /// The deadline passed before the work finished.
    DeadlineExceeded,
    /// A bug or an unexpected failure; details are in the logs, not in the response.
    Internal,
}

impl Code {
    /// The gRPC status code.
    pub fn grpc(self) -> tonic::Code {
        match self {
            Code::InvalidArgument => tonic::Code::InvalidArgument,
            Code::Unauthenticated => tonic::Code::Unauthenticated,
            Code::PermissionDenied => tonic::Code::PermissionDenied,
            Code::NotFound => tonic::Code::NotFound,
            Code::AlreadyExists => tonic::Code::AlreadyExists,
            Code::FailedPrecondition => tonic::Code::FailedPrecondition,
            Code::Aborted => tonic::Code::Aborted,
            Code::ResourceExhausted | Code::PayloadTooLarge => tonic::Code::ResourceExhausted,
            Code::Unimplemented => tonic::Code::Unimplemented,
            Code::Unavailable => tonic::Code::Unavailable,
            Code::DeadlineExceeded => tonic::Code::DeadlineExceeded,
            Code::Internal => tonic::Code::Internal,
        }
    }

    /// The HTTP status code.
    pub fn http(self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            Code::InvalidArgument => S::BAD_REQUEST,
            Code::Unauthenticated => S::UNAUTHORIZED,
            Code::PermissionDenied => S::FORBIDDEN,
            Code::NotFound => S::NOT_FOUND,
            Code::AlreadyExists | Code::Aborted => S::CONFLICT,
            Code::FailedPrecondition => S::UNPROCESSABLE_ENTITY,
            Code::ResourceExhausted => S::TOO_MANY_REQUESTS,
            Code::PayloadTooLarge => S::PAYLOAD_TOO_LARGE,
            Code::Unimplemented => S::NOT_IMPLEMENTED,
            Code::Unavailable => S::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => S::GATEWAY_TIMEOUT,
            Code::Internal => S::INTERNAL_SERVER_ERROR,
        }
    }

    /// Stable lower-case name used in JSON error bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::InvalidArgument => "invalid_argument",
            Code::Unauthenticated => "unauthenticated",
            Code::PermissionDenied => "permission_denied",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::FailedPrecondition => "failed_precondition",
            Code::Aborted => "aborted",
            Code::ResourceExhausted => "resource_exhausted",
            Code::PayloadTooLarge => "payload_too_large",
            Code::Unimplemented => "unimplemented",
            Code::Unavailable => "unavailable",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::Internal => "internal",
        }
    }

    /// The code for a gRPC status received from another service.
    pub fn from_grpc(code: tonic::Code) -> Self {
        match code {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => Code::InvalidArgument,
            tonic::Code::Unauthenticated => Code::Unauthenticated,
            tonic::Code::PermissionDenied => Code::PermissionDenied,
            tonic::Code::NotFound => Code::NotFound,
            tonic::Code::AlreadyExists => Code::AlreadyExists,
            tonic::Code::FailedPrecondition => Code::FailedPrecondition,
            tonic::Code::Aborted => Code::Aborted,
            tonic::Code::ResourceExhausted => Code::ResourceExhausted,
            tonic::Code::Unimplemented => Code::Unimplemented,
            tonic::Code::Unavailable | tonic::Code::Cancelled => Code::Unavailable,
            tonic::Code::DeadlineExceeded => Code::DeadlineExceeded,
            tonic::Code::Ok
            | tonic::Code::Unknown
            | tonic::Code::Internal
            | tonic::Code::DataLoss => Code::Internal,
        }
    }
}

/// One problem with one field of a request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FieldViolation {
    /// Dot-separated path of the field (`amount`, `asset.code`).
    pub field: String,
    /// What is wrong with it.
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// An error a caller can act on. Internal causes are logged where they happen and never sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub code: Code,
    pub message: String,
    pub field_violations: Vec<FieldViolation>,
    /// Machine-readable reason (google.rpc.ErrorInfo), e.g. `IDEMPOTENCY_KEY_REUSED`.
    pub reason: Option<String>,
}

/// Result with Tessera's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            field_violations: Vec::new(),
            reason: None,
        }
    }

    /// INVALID_ARGUMENT naming the fields at fault.
    pub fn invalid(violations: Vec<FieldViolation>) -> Self {
        let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
        Self {
            code: Code::InvalidArgument,
            message: format!("invalid request: {}", fields.join(", ")),
            field_violations: violations,
            reason: None,
        }
    }

    /// INVALID_ARGUMENT for one field.
    pub fn invalid_field(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::invalid(vec![FieldViolation::new(field, description)])
    }

    pub fn not_found(what: impl fmt::Display) -> Self {
        Self::new(Code::NotFound, format!("{what} not found"))
    }

    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// An unexpected failure: logged here with the caller's location, returned without detail.
    #[track_caller]
    pub fn internal(cause: impl fmt::Display) -> Self {
        let location = std::panic::Location::caller();
        tracing::error!(%location, error = %cause, "internal error");
        Self::new(Code::Internal, "internal error")
    }

    /// A dependency could not be reached.
    #[track_caller]
    pub fn unavailable(cause: impl fmt::Display) -> Self {
        let location = std::panic::Location::caller();
        tracing::warn!(%location, error = %cause, "dependency unavailable");
        Self::new(
            Code::Unavailable,
            "a dependency is unavailable, retry later",
        )
    }

    /// True for outcomes that depend only on the request and the state it met, so a replay
    /// under the same idempotency key must return the same error. Transient failures are not.
    pub fn is_deterministic(&self) -> bool {
        matches!(
            self.code,
            Code::InvalidArgument
                | Code::NotFound
                | Code::AlreadyExists
                | Code::FailedPrecondition
                | Code::PermissionDenied
        )
    }

    /// The gRPC status, with field violations and reason as standard error details. They
    /// travel in HTTP/2 trailers, which peers cap (16 KiB by default), so a status carries
    /// at most [`MAX_VIOLATIONS`] violations and texts of at most [`MAX_TEXT`] bytes each:
    /// a request with a thousand bad fields still gets its first ones named.
    pub fn to_status(&self) -> tonic::Status {
        let mut details = ErrorDetails::new();
        for v in self.field_violations.iter().take(MAX_VIOLATIONS) {
            details.add_bad_request_violation(clip(&v.field), clip(&v.description));
        }
        if let Some(reason) = &self.reason {
            details.set_error_info(
                reason.clone(),
                "tessera",
                std::collections::HashMap::<String, String>::new(),
            );
        }
        let message = clip(&self.message);
        if self.field_violations.is_empty() && self.reason.is_none() {
            tonic::Status::new(self.code.grpc(), message)
        } else {
            tonic::Status::with_error_details(self.code.grpc(), message, details)
        }
    }

    /// Back from a gRPC status received from another service.
    pub fn from_status(status: &tonic::Status) -> Self {
        let details = status.get_error_details();
        let field_violations = details
            .bad_request()
            .map(|b| {
                b.field_violations
                    .iter()
                    .map(|v| FieldViolation::new(v.field.clone(), v.description.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let reason = details.error_info().map(|i| i.reason.clone());
        let mut code = Code::from_grpc(status.code());
        // UNKNOWN with a source was made on this side of the call, not sent by the peer: the
        // connection broke (the peer died mid-request). Retrying is right: UNAVAILABLE.
        if status.code() == tonic::Code::Unknown && std::error::Error::source(status).is_some() {
            code = Code::Unavailable;
        }
        // RESOURCE_EXHAUSTED for an oversized message is the gRPC spelling of HTTP 413.
        if code == Code::ResourceExhausted && reason.as_deref() == Some("PAYLOAD_TOO_LARGE") {
            code = Code::PayloadTooLarge;
        }
        Self {
            code,
            message: status.message().to_string(),
            field_violations,
            reason,
        }
    }
}

/// Most field violations a gRPC status carries.
pub const MAX_VIOLATIONS: usize = 20;
/// Longest message, field or description (bytes) a gRPC status carries.
pub const MAX_TEXT: usize = 240;

/// `text`, cut to [`MAX_TEXT`] bytes on a character boundary, with `…` when cut.
fn clip(text: &str) -> String {
    if text.len() <= MAX_TEXT {
        return text.to_string();
    }
    let mut end = MAX_TEXT - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for Error {}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        e.to_status()
    }
}

/// Collects field violations while validating a request, then fails once with all of them.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    /// How many violations were added so far.
    pub fn count(&self) -> usize {
        self.0.len()
    }

    /// The page size of a list request: 0 means the default of 20, 1..=100 as given,
    /// anything else is a violation of `page.limit`.
    pub fn page_limit(&mut self, limit: u32) -> u32 {
        match limit {
            0 => 20,
            1..=100 => limit,
            _ => {
                self.add("page.limit", "must be within 1..=100");
                20
            }
        }
    }

    /// `Ok(())` when nothing was added, else `code` with `message`, `reason` and every
    /// violation (e.g. PERMISSION_DENIED for what the caller's role may not write).
    pub fn finish_as(self, code: Code, message: &str, reason: &str) -> Result<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        let mut error = Error::new(code, message).with_reason(reason);
        error.field_violations = self.0;
        Err(error)
    }

    /// `Ok(())` when nothing was added, else INVALID_ARGUMENT with every violation.
    pub fn finish(self) -> Result<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Error::invalid(self.0))
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_broken_connection_is_unavailable_and_a_peers_unknown_stays_internal() {
        let broken = tonic::Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        )));
        assert_eq!(broken.code(), tonic::Code::Unknown);
        assert_eq!(
            super::Error::from_status(&broken).code,
            super::Code::Unavailable
        );
        let sent = tonic::Status::unknown("the peer said so");
        assert_eq!(super::Error::from_status(&sent).code, super::Code::Internal);
    }

    use super::*;

    #[test]
    fn a_status_stays_small_however_many_fields_are_wrong() {
        let long = "é".repeat(1000);
        let mut error = Error::new(Code::InvalidArgument, long.clone());
        error.field_violations = (0..1000)
            .map(|i| FieldViolation::new(format!("lines.{i}.{long}"), long.clone()))
            .collect();
        let back = Error::from_status(&error.to_status());
        assert_eq!(back.field_violations.len(), MAX_VIOLATIONS);
        assert!(back.field_violations[0].field.starts_with("lines.0."));
        assert!(back.message.len() <= MAX_TEXT && back.message.ends_with('…'));
        for v in &back.field_violations {
            assert!(v.field.len() <= MAX_TEXT && v.description.len() <= MAX_TEXT);
        }
        // Short texts pass untouched.
        assert_eq!(clip("amount"), "amount");
    }

    const ALL: [Code; 13] = [
        Code::InvalidArgument,
        Code::Unauthenticated,
        Code::PermissionDenied,
        Code::NotFound,
        Code::AlreadyExists,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::ResourceExhausted,
        Code::PayloadTooLarge,
        Code::Unimplemented,
        Code::Unavailable,
        Code::DeadlineExceeded,
        Code::Internal,
    ];

    #[test]
    fn status_round_trip_keeps_code_violations_and_reason() {
        for code in ALL {
            let mut err = Error::new(code, "boom");
            if code == Code::PayloadTooLarge {
                err = err.with_reason("PAYLOAD_TOO_LARGE");
            }
            let back = Error::from_status(&err.to_status());
            assert_eq!(back.code, code, "{code:?}");
        }
        let err = Error::invalid(vec![
            FieldViolation::new("amount", "must be positive"),
            FieldViolation::new("customer_id", "required"),
        ])
        .with_reason("BAD");
        let back = Error::from_status(&err.to_status());
        assert_eq!(back, err);
    }

    #[test]
    fn http_statuses_are_client_errors_for_caller_faults() {
        for code in ALL {
            let status = code.http();
            let server_side = matches!(
                code,
                Code::Internal | Code::Unavailable | Code::DeadlineExceeded | Code::Unimplemented
            );
            assert_eq!(status.is_server_error(), server_side, "{code:?}");
        }
    }
}
