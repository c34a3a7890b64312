//! The public API's contract: an OpenAPI 3.1 description generated from the handlers'
//! annotations and their types, served at `/openapi.json` and kept in `docs/openapi.json`
//! (`castellum openapi` writes it; a test compares the two). The same description decides which
//! methods a path allows, so a wrong method is answered `405` with the `Allow` the contract states.

use std::sync::OnceLock;

use actix_web::http::Method;
use actix_web::{get, HttpResponse};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::observe::RouteTable;
use super::responses::Throttled;
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
    table: RouteTable,
    methods: Vec<Vec<Method>>,
    /// The `Allow` header of each route.
    allow: Vec<String>,
}

fn routes() -> &'static Routes {
    static ROUTES: OnceLock<Routes> = OnceLock::new();
    ROUTES.get_or_init(|| {
        let doc = ApiDoc::openapi();
        let mut templates = Vec::new();
        let (mut methods_of, mut allow) = (Vec::new(), Vec::new());
        for (template, item) in doc.paths.paths {
            let methods = [
                (Method::GET, item.get.is_some()),
                (Method::POST, item.post.is_some()),
                (Method::PUT, item.put.is_some()),
                (Method::DELETE, item.delete.is_some()),
                (Method::PATCH, item.patch.is_some()),
            ];
            let methods: Vec<Method> = methods.into_iter().filter_map(|(m, present)| present.then_some(m)).collect();
            allow.push(methods.iter().map(Method::as_str).collect::<Vec<_>>().join(", "));
            methods_of.push(methods);
            templates.push(template);
        }
        Routes { table: RouteTable::new(templates), methods: methods_of, allow }
    })
}

/// The described routes, by template: the API listener's labels in the metrics.
pub fn route_table() -> &'static RouteTable {
    &routes().table
}

/// The `Allow` header for a method `path` does not take, when the contract describes the path
/// with other methods.
pub fn allow_header(path: &str, method: &Method) -> Option<&'static str> {
    let i = routes().table.find(path)?;
    (!routes().methods[i].contains(method)).then(|| routes().allow[i].as_str())
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
        assert_eq!(allow_header("/v1/certificates", &Method::GET), Some("POST"));
        assert_eq!(allow_header("/v1/certificates", &Method::POST), None);
        assert_eq!(allow_header("/v1/certificates/00ff", &Method::PUT), Some("GET"));
        assert_eq!(allow_header("/nowhere", &Method::GET), None);
    }
}
