//! The public API's contract: an OpenAPI 3.1 description generated from the handlers'
//! annotations and their types, served at `/openapi.json` and kept in `docs/openapi.json`
//! (`castellum openapi` writes it; a test compares the two). The same description decides which
//! methods a path allows, so a wrong method is answered `405` with the `Allow` the contract states.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use actix_web::dev::ResourceDef;
use actix_web::http::Method;
use actix_web::{get, HttpResponse};
use utoipa::openapi::header::Header;
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{Object, Ref, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{Content, RefOr};
use utoipa::{IntoResponses, Modify, OpenApi};

use super::{certificates, identities, ops, problem, revocation};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "castellum",
        description = "Certificate issuance for certificate authorities: certificates from CSRs, \
            disposable identities, revocation, CRLs and OCSP. Errors are RFC 9457 problem details; \
            `429` and `503` carry `Retry-After`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        certificates::issue,
        certificates::certificate,
        certificates::request_status,
        certificates::cas,
        revocation::revoke,
        revocation::crl,
        revocation::ca_certificate,
        revocation::ocsp_post,
        revocation::ocsp_get,
        identities::create,
        identities::show,
        identities::sign,
        ops::healthz,
        ops::readyz,
        ops::metrics,
        openapi_json,
    ),
    components(schemas(problem::ProblemDetails)),
    modifiers(&Credentials),
    tags(
        (name = "certificates", description = "Certificates from CSRs, synchronous or durable and asynchronous"),
        (name = "identities", description = "Disposable identities: a key kept by the engine, its certificate, a few signatures"),
        (name = "revocation", description = "Revocation, and what relying parties fetch: CRLs, CA certificates, OCSP"),
        (name = "operations", description = "Liveness, readiness, metrics, this description"),
    ),
)]
pub struct ApiDoc;

/// The two ways a client proves who it is (`clients[]` in the configuration).
struct Credentials;

impl Modify for Credentials {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut bearer = Http::new(HttpAuthScheme::Bearer);
        bearer.description = Some("A client's API key (`clients[].api_key_sha256` holds its SHA-256)".into());
        components.add_security_scheme("api_key", SecurityScheme::Http(bearer));
        components.add_security_scheme(
            "client_certificate",
            SecurityScheme::MutualTls {
                description: Some(
                    "A TLS client certificate from `http.tls.client_ca` whose name is in \
                     `clients[].certificate_names` (used when no bearer key is sent)"
                        .into(),
                ),
                extensions: None,
            },
        );
    }
}

/// The description, as served and as kept in `docs/openapi.json` (pretty, ending in a newline).
pub fn document() -> &'static str {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        let mut text = ApiDoc::openapi().to_pretty_json().expect("the OpenAPI description serialises");
        text.push('\n');
        text
    })
}

/// This description.
#[utoipa::path(
    tag = "operations",
    responses(
        (status = 200, description = "The OpenAPI 3.1 description of this API", content_type = "application/json"),
        Throttled,
    ),
)]
#[get("/openapi.json")]
pub async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok().content_type("application/json").body(document())
}

/// The described routes: each path template, its matcher and the methods it allows.
struct Routes {
    templates: Vec<String>,
    matchers: Vec<ResourceDef>,
    methods: Vec<Vec<Method>>,
}

fn routes() -> &'static Routes {
    static ROUTES: OnceLock<Routes> = OnceLock::new();
    ROUTES.get_or_init(|| {
        let doc = ApiDoc::openapi();
        let mut routes = Routes { templates: Vec::new(), matchers: Vec::new(), methods: Vec::new() };
        for (template, item) in doc.paths.paths {
            let methods = [
                (Method::GET, item.get.is_some()),
                (Method::POST, item.post.is_some()),
                (Method::PUT, item.put.is_some()),
                (Method::DELETE, item.delete.is_some()),
                (Method::PATCH, item.patch.is_some()),
            ];
            routes.methods.push(methods.into_iter().filter_map(|(m, present)| present.then_some(m)).collect());
            routes.matchers.push(ResourceDef::new(template.as_str()));
            routes.templates.push(template);
        }
        routes
    })
}

/// How many routes the description has.
pub fn route_count() -> usize {
    routes().templates.len()
}

/// The path template of a route found by [`route_index`] (`/v1/certificates/{serial}`, …), or
/// `(other)` for a path the description does not have.
pub fn route_template(route: Option<usize>) -> &'static str {
    route.and_then(|i| routes().templates.get(i)).map_or("(other)", String::as_str)
}

/// Which described route `path` is: its place among the description's, in a fixed order.
pub fn route_index(path: &str) -> Option<usize> {
    routes().matchers.iter().position(|route| route.is_match(path))
}

/// The methods the contract allows on `path`, when it describes the path at all.
pub fn allowed_methods(path: &str) -> Option<&'static [Method]> {
    route_index(path).map(|i| routes().methods[i].as_slice())
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_description_is_openapi_3_1_with_every_route() {
        let doc: serde_json::Value = serde_json::from_str(document()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().unwrap();
        for path in ["/v1/certificates", "/v1/certificates/{serial}/revoke", "/ocsp", "/openapi.json"] {
            assert!(paths.contains_key(path), "{path} missing: {:?}", paths.keys());
        }
    }

    #[test]
    fn allowed_methods_follow_the_description() {
        assert_eq!(allowed_methods("/v1/certificates"), Some(&[Method::POST][..]));
        assert_eq!(allowed_methods("/v1/certificates/00ff"), Some(&[Method::GET][..]));
        assert_eq!(allowed_methods("/nowhere"), None);
    }
}
