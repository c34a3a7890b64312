//! castellum: a certificate-issuance engine for certificate authorities that keeps issuing when
//! parts of it fail. See `docs/ARCHITECTURE.md` for the actors and who owns what.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let config = castellum::Config::load(Some(std::path::Path::new("keys-dev/castellum.toml")))?;
//! let engine = castellum::Engine::start(config).await?;
//! let client = engine.client("demo").expect("configured");
//! let csr_pem = std::fs::read_to_string("demo.csr")?;
//! let issued = engine
//!     .issue(&client, castellum::IssueRequest { profile: "tls-server-p256".into(), csr_pem, ..Default::default() })
//!     .await?;
//! println!("{}", issued.certificate);
//! engine.shutdown().await;
//! # Ok(()) }
//! ```

pub mod actors;
pub mod admin;
pub mod audit;
#[cfg(feature = "tools")]
pub mod bench;
pub mod check;
pub mod config;
pub mod db;
#[cfg(feature = "tools")]
pub mod drill;
pub mod engine;
pub mod error;
pub mod http;
pub mod metrics;
pub mod pki;
pub mod states;
pub mod telemetry;
pub mod types;

pub use config::Config;
pub use engine::{Engine, StartError};
pub use error::EngineError;
pub use types::{Accepted, CertificateRecord, Chain, Client, IssueRequest, IssuedCertificate, RequestStatus};
