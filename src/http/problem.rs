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

/// An error answer (RFC 9457), `application/problem+json`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ProblemDetails<'a> {
    /// A stable URI naming the problem (`urn:castellum:problem:<slug>`): what a client branches on.
    #[serde(rename = "type")]
    problem_type: String,
    /// The HTTP status's reason phrase.
    title: &'a str,
    status: u16,
    /// What went wrong with this request, for a person.
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
        // A body that never came, or a source over its connections: the connection is not kept.
        if matches!(self.0, EngineError::BodyTimeout(_) | EngineError::TooManyConnections { .. }) {
            resp.force_close();
        }
        if let EngineError::MethodNotAllowed { allowed } = &self.0 {
            resp.insert_header((header::ALLOW, HeaderValue::from_static(allowed)));
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
        resp.json(ProblemDetails {
            problem_type: self.0.problem_type(),
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail,
        })
    }
}

/// The request spans of [`tracing_actix_web::TracingLogger`], lean: its default span carries a
/// dozen fields (a fresh UUID, the peer, the user agent, …) that the log formats on every request,
/// and formats every error twice into it (and, as a feature turned off in Cargo.toml, logs an
/// event for each). Here a request's span holds its method and route, then its status and problem
/// slug (a `&'static str`): a storm of refusals costs a small span each and logs nothing.
pub struct RequestSpan;

impl tracing_actix_web::RootSpanBuilder for RequestSpan {
    fn on_request_start(request: &actix_web::dev::ServiceRequest) -> tracing::Span {
        tracing::info_span!(
            "request",
            method = %request.method(),
            route = request.match_pattern().as_deref().unwrap_or("(no route)"),
            http.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            problem = tracing::field::Empty,
        )
    }

    fn on_request_end<B: actix_web::body::MessageBody>(
        span: tracing::Span,
        outcome: &Result<actix_web::dev::ServiceResponse<B>, actix_web::Error>,
    ) {
        let (status, error) = match outcome {
            Ok(response) => (response.status(), response.response().error()),
            Err(error) => (error.as_response_error().status_code(), Some(error)),
        };
        span.record("http.status_code", i64::from(status.as_u16()));
        span.record("otel.status_code", if status.is_server_error() { "ERROR" } else { "OK" });
        if let Some(problem) = error.and_then(|e| e.as_error::<Problem>()) {
            span.record("problem", problem.0.slug());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use super::*;

    /// The Retry-After of 200 answers to the same error, read from the response headers.
    fn retry_afters(err: EngineError) -> BTreeSet<u64> {
        (0..200)
            .map(|_| {
                let resp = Problem(err.clone()).error_response();
                let value = resp.headers().get(header::RETRY_AFTER).expect("a Retry-After");
                value.to_str().unwrap().parse().unwrap()
            })
            .collect()
    }

    #[test]
    fn every_503_and_429_says_when_to_retry_jittered_up_to_twice_as_long() {
        let cases = [
            EngineError::TooManyRetries { ca: "ica-p384".into(), retry_after: Duration::from_secs(2) },
            EngineError::RateLimited { retry_after: Duration::from_secs(2) },
            EngineError::CaUnavailable {
                ca: "ica-p384".into(),
                reason: "parked".into(),
                retry_after: Duration::from_secs(2),
            },
        ];
        for err in cases {
            let seen = retry_afters(err.clone());
            assert!(seen.iter().all(|s| (2..=4).contains(s)), "{err}: {seen:?}");
            assert!(seen.len() > 1, "{err}: not jittered: {seen:?}");
        }
    }
}
