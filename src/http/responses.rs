//! The answers the API's description gives its routes beyond their own: DER bodies, and the
//! error answers (problem details) by the routes that can give them. Handlers name these in
//! their annotations; `openapi.rs` gathers the annotations (kept apart so neither imports the
//! other's importer).

use std::collections::BTreeMap;

use utoipa::openapi::header::Header;
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{Object, Ref, Type};
use utoipa::openapi::{Content, RefOr};
use utoipa::IntoResponses;

/// A DER body (a CRL, a certificate, an OCSP request or response): bytes, not JSON.
pub struct Der;

impl utoipa::PartialSchema for Der {
    fn schema() -> RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(utoipa::openapi::KnownFormat::Binary)))
            .into()
    }
}

impl utoipa::ToSchema for Der {}

// ---- Error answers, by the routes that can give them ----

fn problem(description: &str, retry_after: bool) -> RefOr<Response> {
    let content = Content::new(Some(Ref::from_schema_name("ProblemDetails")));
    let mut response = ResponseBuilder::new().description(description).content("application/problem+json", content);
    if retry_after {
        let mut seconds = Header::new(Object::with_type(Type::Integer));
        seconds.description = Some("Seconds to wait before retrying (jittered)".into());
        response = response.header("Retry-After", seconds);
    }
    response.build().into()
}

fn problems(codes: &[u16]) -> BTreeMap<String, RefOr<Response>> {
    codes
        .iter()
        .map(|&code| {
            let response = match code {
                400 => problem("Malformed request: JSON, CSR, path or header", false),
                401 => problem("Missing or invalid credentials (`WWW-Authenticate: Bearer`)", false),
                403 => problem("The client may not use this profile, name or object", false),
                404 => problem("No such object for this client, or no such profile or CA", false),
                408 => problem("The body did not arrive within the listener's `body_timeout`", false),
                409 => problem("The profile or CA is disabled, or the request conflicts with an earlier one", false),
                410 => problem("The identity is gone (used up, expired)", false),
                413 => problem("The body is larger than `http.max_body_bytes`", false),
                422 => problem("Refused by policy: key, signature algorithm, names, digest", false),
                429 => problem("Too many requests, connections or failed authentications", true),
                503 => problem("Not now: the CA is unavailable or overloaded, the deadline passed", true),
                other => unreachable!("no description for {other}"),
            };
            (code.to_string(), response)
        })
        .collect()
}

/// What a request with a JSON body, from a client, can be refused with.
pub struct WriteRefusals;

impl IntoResponses for WriteRefusals {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        problems(&[400, 401, 403, 404, 408, 409, 410, 413, 422, 429, 503])
    }
}

/// What a client's read can be refused with.
pub struct ReadRefusals;

impl IntoResponses for ReadRefusals {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        problems(&[400, 401, 404, 429, 503])
    }
}

/// What a relying party's fetch (no credentials) can be refused with.
pub struct PublicRefusals;

impl IntoResponses for PublicRefusals {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        problems(&[400, 404, 429, 503])
    }
}

/// The refusals of any route: a source over its connections, or over its failed authentications.
pub struct Throttled;

impl IntoResponses for Throttled {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        problems(&[429])
    }
}

/// The OCSP POST's: every OCSP answer is `200`; HTTP only refuses a body that never came.
pub struct OcspRefusals;

impl IntoResponses for OcspRefusals {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        problems(&[408, 429])
    }
}
