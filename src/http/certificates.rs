//! `/v1/certificates`, `/v1/requests`, `/v1/cas`: adapters from HTTP to the engine's handle.

use std::time::Duration;

use actix_web::http::header;
use actix_web::{get, post, web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::{Authenticated, AuthenticatedJson};
use super::problem::Problem;
use super::responses::{ReadRefusals, WriteRefusals};
use crate::engine::Engine;
use crate::error::EngineError;
use crate::types::{CaInfo, CertificateRecord, IssueRequest, IssuedCertificate, RequestStatus};

/// A certificate request: the CSR, and the profile to issue it on.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({ "profile": "tls-server-p256", "csr": EXAMPLE_CSR }))]
pub struct IssueBody {
    /// A profile the client may use (`clients[].profiles`).
    pub profile: String,
    /// Exactly one PEM `CERTIFICATE REQUEST` block.
    pub csr: String,
}

/// The description's example: a P-256 key's CSR for `www.example.test` (`keys-dev/castellum.toml`
/// lets the demo client have it on `tls-server-p256`).
const EXAMPLE_CSR: &str = "-----BEGIN CERTIFICATE REQUEST-----\nMIIBBTCBqwIBADAbMRkwFwYDVQQDDBB3d3cuZXhhbXBsZS50ZXN0MFkwEwYHKoZI\nzj0CAQYIKoZIzj0DAQcDQgAEkRUDrYxa100kGuC8TeRkbNgczaDrc2JqnixaBFHs\ndW1Hgrn6QOHYRmgNni6yVYXcq2AX0tp6PwJW0AExz5vhfqAuMCwGCSqGSIb3DQEJ\nDjEfMB0wGwYDVR0RBBQwEoIQd3d3LmV4YW1wbGUudGVzdDAKBggqhkjOPQQDAgNJ\nADBGAiEAz5IQyIcDuf3kowDBpDgrrjdya34RdIikRWhh4FvHia0CIQDFi5/yt3G7\n7mxmU+NW7xehvHHSM/IadELIizeQ3+gVFA==\n-----END CERTIFICATE REQUEST-----\n";

/// RFC 7240 preferences this API honours.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Prefer {
    pub respond_async: bool,
    pub wait: Option<Duration>,
}

impl Prefer {
    /// The preferences in the values of a request's `Prefer` headers (RFC 7240: a
    /// comma-separated list of `token[=value]`); what is not understood is ignored, as the RFC
    /// asks, and so is a value that is not text.
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Prefer {
        let mut prefer = Prefer::default();
        for value in values {
            let Ok(text) = std::str::from_utf8(value) else { continue };
            for token in text.split(',').map(str::trim) {
                let (name, arg) = match token.split_once('=') {
                    Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
                    None => (token, None),
                };
                match (name.to_ascii_lowercase().as_str(), arg) {
                    ("respond-async", _) => prefer.respond_async = true,
                    ("wait", Some(secs)) => prefer.wait = secs.parse::<u64>().ok().map(Duration::from_secs),
                    _ => {}
                }
            }
        }
        prefer
    }
}

pub fn parse_prefer(req: &HttpRequest) -> Prefer {
    Prefer::parse(req.headers().get_all("prefer").map(|v| v.as_bytes()))
}

/// The `Idempotency-Key` header's value, unquoted; refused unless it is visible ASCII (the
/// engine then checks its length and characters).
pub fn idempotency_key_of(value: Option<&[u8]>) -> Result<Option<String>, EngineError> {
    let Some(value) = value else { return Ok(None) };
    let text = std::str::from_utf8(value)
        .ok()
        .filter(|t| t.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)))
        .ok_or_else(|| EngineError::MalformedRequest("Idempotency-Key is not ASCII".into()))?;
    Ok(Some(text.trim().trim_matches('"').to_string()))
}

pub fn idempotency_key(req: &HttpRequest) -> Result<Option<String>, Problem> {
    idempotency_key_of(req.headers().get("idempotency-key").map(|v| v.as_bytes())).map_err(Problem)
}

#[derive(Serialize, ToSchema)]
pub struct AcceptedBody {
    request_id: String,
    /// `/v1/requests/{request_id}`.
    status_url: String,
}

/// Issue a certificate for a CSR: `201` with it, or (`Prefer: respond-async`) `202` with the
/// request stored durably, to be polled at its `Location`.
#[utoipa::path(
    tag = "certificates",
    request_body = IssueBody,
    params(
        ("Prefer" = Option<String>, Header, description = "RFC 7240: `respond-async`, `wait=N` (seconds; only shortens the deadline)"),
        ("Idempotency-Key" = Option<String>, Header, description = "A retry with the same key never issues twice"),
    ),
    responses(
        (status = 201, description = "Issued", body = IssuedCertificate,
            headers(("Location" = String, description = "`/v1/certificates/{serial}`"))),
        (status = 202, description = "Accepted and stored; poll its `Location`", body = AcceptedBody,
            headers(("Location" = String, description = "`/v1/requests/{id}`"), ("Preference-Applied" = String))),
        WriteRefusals,
    ),
    security(("api_key" = []), ("client_certificate" = [])),
)]
#[post("/v1/certificates")]
pub async fn issue(
    request: AuthenticatedJson<IssueBody>,
    engine: web::Data<Engine>,
    req: HttpRequest,
) -> Result<HttpResponse, Problem> {
    let prefer = parse_prefer(&req);
    let AuthenticatedJson { client, body } = request;
    let request = IssueRequest {
        profile: body.profile,
        csr_pem: body.csr,
        wait: prefer.wait,
        idempotency_key: idempotency_key(&req)?,
    };
    if prefer.respond_async {
        let accepted = engine.submit(&client, request).await?;
        let location = format!("/v1/requests/{}", accepted.request_id);
        return Ok(HttpResponse::Accepted()
            .insert_header((header::LOCATION, location.clone()))
            .insert_header(("Preference-Applied", "respond-async"))
            .json(AcceptedBody { request_id: accepted.request_id, status_url: location }));
    }
    let issued = engine.issue(&client, request).await?;
    Ok(HttpResponse::Created()
        .insert_header((header::LOCATION, format!("/v1/certificates/{}", issued.serial)))
        .json(issued))
}

/// One of the client's certificates, with its state and revocation; as a PEM chain with
/// `Accept: application/pem-certificate-chain`.
#[utoipa::path(
    tag = "certificates",
    params(("serial" = String, Path, description = "Lower-case hex serial number")),
    responses(
        (status = 200, description = "The certificate", content(
            (CertificateRecord = "application/json"),
            (String = "application/pem-certificate-chain"),
        )),
        ReadRefusals,
    ),
    security(("api_key" = []), ("client_certificate" = [])),
)]
#[get("/v1/certificates/{serial}")]
pub async fn certificate(
    client: Authenticated,
    engine: web::Data<Engine>,
    serial: web::Path<String>,
    req: HttpRequest,
) -> Result<HttpResponse, Problem> {
    let record = engine.certificate(&client.0, &serial).await?;
    let wants_pem = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/pem-certificate-chain"));
    if wants_pem {
        let mut pem = record.certificate.clone();
        pem.extend(record.chain.iter().map(String::as_str));
        return Ok(HttpResponse::Ok().content_type("application/pem-certificate-chain").body(pem));
    }
    Ok(HttpResponse::Ok().json(record))
}

/// An asynchronous request: its state, then its certificate or its error.
#[utoipa::path(
    tag = "certificates",
    params(("id" = String, Path, description = "The `request_id` of a `202`")),
    responses((status = 200, description = "The request", body = RequestStatus), ReadRefusals),
    security(("api_key" = []), ("client_certificate" = [])),
)]
#[get("/v1/requests/{id}")]
pub async fn request_status(
    client: Authenticated,
    engine: web::Data<Engine>,
    id: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    Ok(HttpResponse::Ok().json(engine.request_status(&client.0, &id).await?))
}

/// The CAs, their state and chains.
#[utoipa::path(
    tag = "certificates",
    responses((status = 200, description = "The CAs", body = CaList), ReadRefusals),
    security(("api_key" = []), ("client_certificate" = [])),
)]
#[get("/v1/cas")]
pub async fn cas(_client: Authenticated, engine: web::Data<Engine>) -> HttpResponse {
    HttpResponse::Ok().json(CaList { cas: engine.cas() })
}

#[derive(Serialize, ToSchema)]
pub struct CaList {
    cas: Vec<CaInfo>,
}
