//! Who a request is from: a bearer API key (`Authorization: Bearer <key>`, compared by its
//! SHA-256), or else the verified TLS client certificate of its connection, by its names.

use std::future::{ready, Ready};
use std::sync::Arc;

use actix_web::{dev::Payload, web, FromRequest, HttpRequest};
use futures_util::future::LocalBoxFuture;
use futures_util::{FutureExt as _, StreamExt as _};
use serde::de::DeserializeOwned;

use super::bounds::SourceBounds;
use super::problem::Problem;
use super::tls::ClientCertificate;
use crate::engine::Engine;
use crate::error::EngineError;
use crate::types::Client;

/// The authenticated client of a request.
pub struct Authenticated(pub Arc<Client>);

impl FromRequest for Authenticated {
    type Error = Problem;
    type Future = Ready<Result<Self, Problem>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(authenticate(req).map_err(Problem))
    }
}

/// The client whose bearer key the request carries or, without one, whose name its connection's
/// client certificate carries. A failure counts against the request's source address (`429`
/// once it fails too often; a valid key is never held back).
pub(super) fn authenticate(req: &HttpRequest) -> Result<Authenticated, EngineError> {
    let engine = req.app_data::<web::Data<Engine>>().ok_or(EngineError::Internal("no engine".into()))?;
    let found = match (bearer(req), req.conn_data::<ClientCertificate>()) {
        (Some(key), _) => engine.authenticate(key),
        (None, Some(cert)) => engine.authenticate_certificate(&cert.names),
        (None, None) => Err(EngineError::Unauthorized),
    };
    found.map(Authenticated).map_err(|e| match (e, req.app_data::<web::Data<SourceBounds>>()) {
        (EngineError::Unauthorized, Some(bounds)) => bounds.auth_failed(req.peer_addr().map(|a| a.ip())),
        (e, _) => e,
    })
}

/// Whether a request carries credentials at all: a bearer key, or a client certificate.
pub(super) fn has_credentials(req: &HttpRequest) -> bool {
    req.headers().contains_key(actix_web::http::header::AUTHORIZATION) || req.conn_data::<ClientCertificate>().is_some()
}

/// The bearer token of a request's `Authorization` header.
pub fn bearer(req: &HttpRequest) -> Option<&str> {
    let value = req.headers().get(actix_web::http::header::AUTHORIZATION)?.to_str().ok()?;
    let key = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")).map(str::trim)?;
    (!key.is_empty()).then_some(key)
}

/// A refused request's body up to this size is read and thrown away before the refusal is
/// answered: answered with its body unread, the connection is closed, and a client retrying with
/// a wrong key would make the engine accept a new TCP connection for every refusal. A body that
/// does not arrive within `DRAIN_WAIT` is not waited for (the connection is closed instead).
const DRAIN_LIMIT: u64 = 64 * 1024;
const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The authenticated client of a request and its JSON body. The key is checked first; the body
/// is parsed only for a client that has one (and read, unparsed, for one that has not).
pub struct AuthenticatedJson<T> {
    pub client: Arc<Client>,
    pub body: T,
}

impl<T: DeserializeOwned + 'static> FromRequest for AuthenticatedJson<T> {
    type Error = actix_web::Error;
    type Future = LocalBoxFuture<'static, Result<Self, actix_web::Error>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        match authenticate(req) {
            Ok(Authenticated(client)) => {
                let body = web::Json::<T>::from_request(req, payload);
                async move { Ok(AuthenticatedJson { client, body: body.await?.into_inner() }) }.boxed_local()
            }
            Err(refused) => {
                let declared = req
                    .headers()
                    .get(actix_web::http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                let mut body = payload.take();
                async move {
                    if declared.is_some_and(|n| n <= DRAIN_LIMIT) {
                        let drain = async { while let Some(Ok(_)) = body.next().await {} };
                        let _ = actix_web::rt::time::timeout(DRAIN_WAIT, drain).await;
                    }
                    Err(Problem(refused).into())
                }
                .boxed_local()
            }
        }
    }
}
