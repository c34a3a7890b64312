//! `/v1/identities`: disposable identities. Adapters from HTTP to the engine's handle.

use actix_web::http::header;
use actix_web::{get, post, web, HttpRequest, HttpResponse};
use serde::Deserialize;

use super::auth::{Authenticated, AuthenticatedJson};
use super::certificates::{idempotency_key, parse_prefer};
use super::problem::Problem;
use crate::engine::Engine;
use crate::pki::identity::IdentitySubject;
use crate::types::{CreateIdentity, SignDigestRequest};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    pub profile: String,
    pub subject: IdentitySubject,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignBody {
    /// The digest, base64 (standard alphabet, padded).
    pub digest: String,
    pub digest_algorithm: String,
}

/// Create an identity: always synchronous (interactive lane), `Prefer: wait=N` shortens it.
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

#[get("/v1/identities/{id}")]
pub async fn show(
    client: Authenticated,
    engine: web::Data<Engine>,
    id: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    Ok(HttpResponse::Ok().json(engine.identity(&client.0, &id).await?))
}

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
