//! RFC 9457 problem details: every [`EngineError`] becomes `application/problem+json` with its
//! stable `type`, and a `Retry-After` where the answer is "not now".

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use rand::Rng;
use serde::Serialize;

use crate::error::EngineError;

#[derive(Debug)]
pub struct Problem(pub EngineError);

impl From<EngineError> for Problem {
    fn from(e: EngineError) -> Self {
        Problem(e)
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    problem_type: String,
    title: &'a str,
    status: u16,
    detail: String,
}

impl ResponseError for Problem {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        let mut resp = HttpResponse::build(status);
        resp.content_type("application/problem+json");
        if let Some(after) = self.0.retry_after() {
            // Jitter spreads the retries of many clients refused at the same moment.
            let secs = after.as_secs().max(1);
            let jittered = secs + rand::rng().random_range(0..=secs);
            resp.insert_header((header::RETRY_AFTER, jittered.to_string()));
        }
        if matches!(self.0, EngineError::Unauthorized) {
            resp.insert_header((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
        }
        let detail = match &self.0 {
            // Internal details stay in the logs.
            EngineError::Internal(_) => "internal error".to_string(),
            other => other.to_string(),
        };
        if let EngineError::Internal(msg) = &self.0 {
            tracing::error!(error = %msg, "internal error");
        }
        resp.json(Body {
            problem_type: self.0.problem_type(),
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail,
        })
    }
}
