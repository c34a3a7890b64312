//! An application that embeds castellum behind its own route: no castellum HTTP API, just the
//! engine's handle inside the application's own actix-web service.
//!
//!   cargo run --example embed
//!   curl -s -X POST localhost:9090/enroll/demo.example.test
//!
//! It listens on `EMBED_LISTEN` when set (`127.0.0.1:0` picks a free port; the address is
//! printed), and stops cleanly on SIGINT or SIGTERM.
//!
//! The application authenticates its users itself and issues as the configured client "demo";
//! here it also makes the key and CSR for the user (a real application would receive a CSR).

use actix_web::{post, web, App, HttpResponse, HttpServer};
use castellum::{Config, Engine, IssueRequest};
use openssl::ec::{EcGroup, EcKey};
use openssl::nid::Nid;
use openssl::pkey::PKey;
use openssl::stack::Stack;
use openssl::x509::extension::SubjectAlternativeName;
use openssl::x509::{X509NameBuilder, X509ReqBuilder};

fn csr_for(host: &str) -> Result<String, openssl::error::ErrorStack> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    let key = PKey::from_ec_key(EcKey::generate(&group)?)?;
    let mut req = X509ReqBuilder::new()?;
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_text("CN", host)?;
    req.set_subject_name(&name.build())?;
    req.set_pubkey(&key)?;
    let mut exts = Stack::new()?;
    exts.push(SubjectAlternativeName::new().dns(host).build(&req.x509v3_context(None))?)?;
    req.add_extensions(&exts)?;
    req.sign(&key, openssl::hash::MessageDigest::sha256())?;
    Ok(String::from_utf8_lossy(&req.build().to_pem()?).into_owned())
}

#[post("/enroll/{host}")]
async fn enroll(engine: web::Data<Engine>, host: web::Path<String>) -> HttpResponse {
    let Some(client) = engine.client("demo") else {
        return HttpResponse::InternalServerError().finish();
    };
    let csr_pem = match csr_for(&host) {
        Ok(csr) => csr,
        Err(e) => return HttpResponse::BadRequest().body(e.to_string()),
    };
    match engine.issue(&client, IssueRequest { profile: "tls-server-p256".into(), csr_pem, ..Default::default() }).await
    {
        Ok(issued) => HttpResponse::Ok().content_type("application/pem-certificate-chain").body(issued.certificate),
        Err(e) => HttpResponse::build(actix_web::http::StatusCode::from_u16(e.http_status()).unwrap_or_default())
            .body(e.to_string()),
    }
}

#[actix_web::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = Config::load(Some(std::path::Path::new("keys-dev/castellum.toml")))?;
    config.database.url = "sqlite://castellum-embed.db".into();
    let engine = Engine::start(config).await?;
    let data = web::Data::new(engine.clone());
    let listen = std::env::var("EMBED_LISTEN").unwrap_or_else(|_| "127.0.0.1:9090".into());
    let server = HttpServer::new(move || App::new().app_data(data.clone()).service(enroll)).bind(&listen)?;
    for addr in server.addrs() {
        println!("embedding application on http://{addr} — try: curl -s -X POST {addr}/enroll/demo.example.test");
    }
    server.run().await?;
    engine.shutdown().await;
    Ok(())
}
