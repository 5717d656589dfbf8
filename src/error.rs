//! The one error type of the API (API.md §1), mapped once to an HTTP answer and once to a
//! Socket.IO ack. Everything below the handlers converts into it.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::domain::FieldError;
use crate::store::StoreError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Validation(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("wrong username or password")]
    InvalidCredentials,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("too many requests; retry in {}s", retry_after.as_secs().max(1))]
    RateLimited { retry_after: Duration },
    #[error("{0}")]
    Unavailable(String),
    /// The sender's membership was revoked (a leave, on any instance) after it was checked and
    /// before the send was sequenced. Answered as `forbidden`; the service re-checks first.
    #[error("not a member of this room")]
    MembershipRevoked,
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::Validation(_) => "validation_failed",
            Self::Unauthorized(_) => "unauthorized",
            Self::InvalidCredentials => "invalid_credentials",
            Self::Forbidden(_) | Self::MembershipRevoked => "forbidden",
            Self::NotFound(_) => "not_found",
            Self::Conflict(_) => "conflict",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::RateLimited { .. } => "rate_limited",
            Self::Unavailable(_) => "unavailable",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Validation(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) | Self::InvalidCredentials => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) | Self::MembershipRevoked => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// `{"error": {"code", "message"}}`, the body of every non-2xx answer.
    pub fn body(&self) -> Value {
        let mut error = json!({"code": self.code(), "message": self.to_string()});
        if let Self::RateLimited { retry_after } = self {
            error["retry_after_secs"] = json!(retry_after.as_secs().max(1));
        }
        json!({ "error": error })
    }

    /// `{"ok": false, "error": {...}}`, the failed Socket.IO ack.
    pub fn ack(&self) -> Value {
        let mut v = self.body();
        v["ok"] = json!(false);
        v
    }

    /// The error another instance answered with (`body` as [`Self::body`] makes it), so that a
    /// forwarded request fails here as it failed there.
    pub fn from_wire(status: u16, body: &Value) -> Self {
        let error = &body["error"];
        let message = error["message"].as_str().unwrap_or("the room's home region refused the request").to_string();
        match error["code"].as_str().unwrap_or("") {
            "validation_failed" => Self::Validation(message),
            "forbidden" => Self::Forbidden(message),
            "not_found" => Self::NotFound(message),
            "conflict" => Self::Conflict(message),
            "payload_too_large" => Self::Validation(message),
            "rate_limited" => {
                Self::RateLimited { retry_after: Duration::from_secs(error["retry_after_secs"].as_u64().unwrap_or(1)) }
            }
            "unavailable" => Self::Unavailable(message),
            // Our token or address refused, or an answer we cannot read: not the client's fault.
            code => {
                tracing::warn!(status, code, "a peer region refused an internal request");
                Self::Unavailable("the room's home region refused this instance's request; retry later".into())
            }
        }
    }

    pub fn validation(msg: impl Into<String>) -> Self {
        Self::Validation(msg.into())
    }
    pub fn room_not_found() -> Self {
        Self::NotFound("room not found".into())
    }
    pub fn not_member() -> Self {
        Self::Forbidden("not a member of this room".into())
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        Self::Validation(e.0)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::UsernameTaken => Self::Conflict("username is taken".into()),
            StoreError::NotFound(what) => Self::NotFound(format!("{what} not found")),
            StoreError::Unavailable(reason) => {
                tracing::warn!(error = %reason, "store unavailable");
                Self::Unavailable("the store is unavailable; retry later".into())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = (self.status(), axum::Json(self.body())).into_response();
        if let Self::RateLimited { retry_after } = &self {
            let secs = retry_after.as_secs().max(1).to_string();
            if let Ok(v) = HeaderValue::from_str(&secs) {
                res.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        res
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let e = ApiError::validation("body must be 1..=4000 characters");
        assert_eq!(
            e.body(),
            json!({"error": {"code": "validation_failed", "message": "body must be 1..=4000 characters"}})
        );
        assert_eq!(e.ack()["ok"], json!(false));
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let r = ApiError::RateLimited { retry_after: Duration::from_millis(200) }.into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    }

    #[test]
    fn a_peers_error_comes_back_as_itself() {
        for e in [
            ApiError::validation("bad"),
            ApiError::not_member(),
            ApiError::room_not_found(),
            ApiError::Conflict("taken".into()),
            ApiError::Unavailable("later".into()),
            ApiError::RateLimited { retry_after: Duration::from_secs(3) },
        ] {
            assert_eq!(ApiError::from_wire(e.status().as_u16(), &e.body()), e);
        }
        // A refused internal token is this deployment's problem, not the client's.
        let refused = ApiError::Unauthorized("invalid internal token".into());
        assert_eq!(ApiError::from_wire(401, &refused.body()).code(), "unavailable");
        assert_eq!(ApiError::from_wire(502, &json!("garbage")).code(), "unavailable");
    }
}
