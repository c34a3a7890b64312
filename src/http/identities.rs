//! `/v1/identities`: disposable identities. Adapters from HTTP to the engine's handle.

use actix_web::http::header;
use actix_web::{get, post, web, HttpRequest, HttpResponse};
use serde::Deserialize;
use utoipa::ToSchema;

use super::auth::{Authenticated, AuthenticatedJson};
use super::certificates::{idempotency_key, parse_prefer};
use super::problem::Problem;
use super::responses::{ReadRefusals, WriteRefusals};
use crate::engine::Engine;
use crate::pki::identity::IdentitySubject;
use crate::types::{CreateIdentity, Identity, IdentitySignature, SignDigestRequest};

/// An identity to create on an identity profile.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "profile": "signing-identity",
    "subject": { "common_name": "Release robot", "email": "robot@example.test", "organization": "Example Org" },
}))]
pub struct CreateBody {
    pub profile: String,
    pub subject: IdentitySubject,
}

/// A digest for the identity's key to sign.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignBody {
    /// The digest, base64 (standard alphabet, padded).
    #[schema(content_encoding = "base64", example = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=")]
    pub digest: String,
    /// The hash that made it.
    #[schema(example = "sha256")]
    pub digest_algorithm: String,
}

/// Create an identity: always synchronous (interactive lane), `Prefer: wait=N` shortens it.
#[utoipa::path(
    tag = "identities",
    request_body = CreateBody,
    params(
        ("Prefer" = Option<String>, Header, description = "RFC 7240 `wait=N` (seconds; only shortens the deadline)"),
        ("Idempotency-Key" = Option<String>, Header, description = "A retry with the same key never creates twice"),
    ),
    responses(
        (status = 201, description = "Created", body = Identity,
            headers(("Location" = String, description = "`/v1/identities/{id}`"))),
        WriteRefusals,
    ),
    security(("api_key" = []), ("client_certificate" = [])),
)]
#[post("/v1/identities")]
pub async fn create(
    request: AuthenticatedJson<CreateBody>,
    engine: web::Data<Engine>,
    req: HttpRequest,
) -> Result<HttpResponse, Problem> {
    let AuthenticatedJson { client, body } = request;
    let request = CreateIdentity {
        profile: body.profile,
        subject: body.subject,
        wait: parse_prefer(&req).wait,
        idempotency_key: idempotency_key(&req)?,
    };
    let identity = engine.create_identity(&client, request).await?;
    Ok(HttpResponse::Created()
        .insert_header((header::LOCATION, format!("/v1/identities/{}", identity.id)))
        .json(identity))
}

/// One of the client's identities.
#[utoipa::path(
    tag = "identities",
    params(("id" = String, Path)),
    responses((status = 200, description = "The identity", body = Identity), ReadRefusals),
    security(("api_key" = []), ("client_certificate" = [])),
)]
#[get("/v1/identities/{id}")]
pub async fn show(
    client: Authenticated,
    engine: web::Data<Engine>,
    id: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    Ok(HttpResponse::Ok().json(engine.identity(&client.0, &id).await?))
}

/// Sign a digest with the identity's key (one of its uses; the last destroys the key).
#[utoipa::path(
    tag = "identities",
    params(("id" = String, Path)),
    request_body = SignBody,
    responses((status = 200, description = "Signed", body = IdentitySignature), WriteRefusals),
    security(("api_key" = []), ("client_certificate" = [])),
)]
#[post("/v1/identities/{id}/signatures")]
pub async fn sign(
    request: AuthenticatedJson<SignBody>,
    engine: web::Data<Engine>,
    id: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    let AuthenticatedJson { client, body } = request;
    let request = SignDigestRequest { digest: body.digest, digest_algorithm: body.digest_algorithm };
    let signature = engine.sign_with_identity(&client, &id, request).await?;
    Ok(HttpResponse::Ok().json(signature))
}
