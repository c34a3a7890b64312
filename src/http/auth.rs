//! Bearer API keys: `Authorization: Bearer <key>`; keys are compared by their SHA-256.

use std::future::{ready, Ready};
use std::sync::Arc;

use actix_web::{dev::Payload, web, FromRequest, HttpRequest};

use super::problem::Problem;
use crate::engine::Engine;
use crate::error::EngineError;
use crate::types::Client;

/// The authenticated client of a request.
pub struct Authenticated(pub Arc<Client>);

impl FromRequest for Authenticated {
    type Error = Problem;
    type Future = Ready<Result<Self, Problem>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let result = (|| {
            let engine = req.app_data::<web::Data<Engine>>().ok_or(EngineError::Internal("no engine".into()))?;
            let value = req.headers().get(actix_web::http::header::AUTHORIZATION).ok_or(EngineError::Unauthorized)?;
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
                .ok_or(EngineError::Unauthorized)?;
            engine.authenticate(token.trim()).map(Authenticated)
        })();
        ready(result.map_err(Problem))
    }
}
