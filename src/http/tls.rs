//! TLS on a listener (issue 16): rustls through actix-web, its certificate and key files
//! reloaded when they change, and optionally client certificates that authenticate API clients.
//!
//! Why rustls and not openssl (which castellum already links for its CA work): rustls lets a
//! listener swap its certificate between two handshakes through a resolver (no restart, no
//! per-connection callback into C), its client-certificate check is one builder, and a listener
//! facing the network is code where memory safety matters most.
//!
//! A watcher thread reads the files every `reload_interval` and swaps what they hold when their
//! bytes change; a change that does not load (a half-written file, a key that does not match
//! the certificate) is logged once and the listener keeps what it has. The thread ends with the
//! listener (it holds only a weak reference).

use std::any::Any;
use std::path::Path;
use std::sync::{Arc, Weak};

use actix_web::dev::Extensions;
use actix_web::rt::net::TcpStream;
use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};

use crate::config::TlsConfig;
use crate::metrics::Metrics;

/// The stream of a connection on a TLS listener.
pub type TlsStream = actix_tls::accept::rustls_0_23::TlsStream<TcpStream>;

/// Why a listener's TLS files cannot be used. Never holds the key's bytes.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} holds no PEM CERTIFICATE")]
    NoCertificate { path: String },
    #[error("{path} holds no usable PEM private key: {reason}")]
    NoKey { path: String, reason: String },
    #[error("the key in {key} does not match the certificate in {certificate}: {reason}")]
    KeyMismatch { key: String, certificate: String, reason: String },
    #[error("client_ca {path}: {reason}")]
    ClientCa { path: String, reason: String },
    #[error("client_crl {path}: {reason}")]
    ClientCrl { path: String, reason: String },
    #[error("TLS settings: {0}")]
    Settings(String),
}

/// What a listener's files held at their last successful load.
struct Loaded {
    certified: Arc<CertifiedKey>,
    /// Absent: client certificates are not asked for.
    clients: Option<Arc<dyn ClientCertVerifier>>,
    /// The earliest nextUpdate of the client CRLs (Unix seconds), if there are any.
    crls_next_update: Option<i64>,
}

/// The bytes of a listener's files, read once: what is hashed is what is parsed.
struct FileBytes {
    certificate: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
    client_crl: Option<Vec<u8>>,
}

impl FileBytes {
    fn read(files: &TlsConfig) -> Result<FileBytes, TlsError> {
        Ok(FileBytes {
            certificate: read(&files.certificate)?,
            key: read(&files.key)?,
            client_ca: files.client_ca.as_deref().map(read).transpose()?,
            client_crl: files.client_crl.as_deref().map(read).transpose()?,
        })
    }

    /// A digest of each file's digest, to see a change (of any one of them).
    fn digest(&self) -> [u8; 32] {
        let mut each = crate::pki::sha256(&self.certificate).to_vec();
        each.extend(crate::pki::sha256(&self.key));
        for file in [&self.client_ca, &self.client_crl].into_iter().flatten() {
            each.extend(crate::pki::sha256(file));
        }
        crate::pki::sha256(&each)
    }
}

/// One listener's TLS material, shared by the handshakes and the watcher.
pub struct ListenerTls {
    listener: &'static str,
    files: TlsConfig,
    provider: Arc<CryptoProvider>,
    loaded: ArcSwap<Loaded>,
    /// The digest of the files as the watcher last read them (loaded or refused): a content is
    /// tried, and a refusal logged, once.
    last_seen: std::sync::Mutex<[u8; 32]>,
    reloads: Counter,
    refused: Counter,
    not_after: Gauge,
    crls_next_update: Gauge,
}

impl std::fmt::Debug for ListenerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerTls").field("listener", &self.listener).finish_non_exhaustive()
    }
}

impl ListenerTls {
    /// Load `files` for `listener` (`api` or `admin`), start watching them, and return the
    /// rustls configuration to bind with.
    pub fn start(listener: &'static str, files: &TlsConfig, metrics: &Metrics) -> Result<ServerConfig, TlsError> {
        let provider = provider();
        let labels = vec![("listener", listener.to_string())];
        let outcome = |o: &str| {
            let mut l = labels.clone();
            l.push(("outcome", o.to_string()));
            metrics.tls_reloads.get_or_create(&l).clone()
        };
        let (reloads, refused) = (outcome("loaded"), outcome("refused"));
        let not_after = metrics.tls_certificate_not_after.get_or_create(&labels).clone();
        let crls_next_update = metrics.tls_client_crl_next_update.get_or_create(&labels).clone();
        let bytes = FileBytes::read(files)?;
        let first = load(files, &bytes, &provider)?;
        not_after.set(certificate_not_after(&first.certified));
        crls_next_update.set(first.crls_next_update.unwrap_or_default());
        let tls = Arc::new(ListenerTls {
            listener,
            files: files.clone(),
            provider: provider.clone(),
            loaded: ArcSwap::from_pointee(first),
            last_seen: std::sync::Mutex::new(bytes.digest()),
            reloads,
            refused,
            not_after,
            crls_next_update,
        });
        let builder = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Settings(e.to_string()))?;
        let builder = match tls.files.client_ca {
            Some(_) => builder.with_client_cert_verifier(Arc::new(ClientVerifier(tls.clone()))),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::new(CertificateResolver(tls.clone())));
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        if tls.files.client_ca.is_some() {
            // A resumed session carries its client certificate without checking it again: an
            // expired certificate, or one of a CA since removed, would go on authenticating.
            config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            config.send_tls13_tickets = 0;
        }
        watch(Arc::downgrade(&tls));
        Ok(config)
    }

    /// Load the files again if their bytes changed; keep what is loaded if they do not load
    /// (logged and counted once per content: a later change is tried again).
    fn reload_if_changed(&self) {
        let bytes = FileBytes::read(&self.files);
        // An unreadable file is a content too: its error is logged once, not every interval.
        let digest = match &bytes {
            Ok(bytes) => bytes.digest(),
            Err(e) => crate::pki::sha256(e.to_string().as_bytes()),
        };
        {
            let mut last_seen = self.last_seen.lock().unwrap_or_else(|e| e.into_inner());
            if digest == *last_seen {
                return;
            }
            *last_seen = digest;
        }
        let outcome = bytes.and_then(|bytes| load(&self.files, &bytes, &self.provider));
        match outcome {
            Ok(next) => {
                self.not_after.set(certificate_not_after(&next.certified));
                self.crls_next_update.set(next.crls_next_update.unwrap_or_default());
                self.loaded.store(Arc::new(next));
                self.reloads.inc();
                tracing::info!(listener = self.listener, "TLS certificate and key reloaded");
            }
            Err(error) => {
                self.refused.inc();
                tracing::error!(listener = self.listener, error = %error, "TLS files changed but do not load; serving the previous certificate");
            }
        }
    }
}

/// rustls's *ring* provider. rustls 0.23.48 deprecates it because *ring* has no post-quantum
/// key exchange (X25519MLKEM768); aws-lc-rs has, at the price of a C build (cmake) that
/// doubles a cold build here. What these listeners carry (bearer keys valid until rotated,
/// public certificates) is noted in docs/SECURITY.md as the reason to switch later.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Whether a listener's files load (for `check-config`), without starting anything.
pub fn check_files(files: &TlsConfig) -> Result<(), TlsError> {
    load(files, &FileBytes::read(files)?, &provider()).map(|_| ())
}

fn watch(tls: Weak<ListenerTls>) {
    let Some(strong) = tls.upgrade() else { return };
    let (name, interval) = (format!("castellum-tls-{}", strong.listener), strong.files.reload_interval);
    drop(strong);
    let spawned = std::thread::Builder::new().name(name).spawn(move || loop {
        std::thread::sleep(interval);
        match tls.upgrade() {
            Some(tls) => tls.reload_if_changed(),
            None => return,
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the TLS file watcher: certificate changes need a restart");
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.display().to_string(), source })
}

/// Check a listener's files (as read): the chain, a key that matches it, the client CAs.
fn load(files: &TlsConfig, bytes: &FileBytes, provider: &Arc<CryptoProvider>) -> Result<Loaded, TlsError> {
    let cert_path = files.certificate.display().to_string();
    let key_path = files.key.display().to_string();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes.certificate)
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::NoCertificate { path: cert_path.clone() })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: cert_path });
    }
    // The parse error names a PEM problem, never the key's bytes.
    let key = PrivateKeyDer::from_pem_slice(&bytes.key)
        .map_err(|e| TlsError::NoKey { path: key_path.clone(), reason: e.to_string() })?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::NoKey { path: key_path.clone(), reason: e.to_string() })?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| TlsError::KeyMismatch {
        key: key_path,
        certificate: cert_path,
        reason: e.to_string(),
    })?;
    let crls = match (&files.client_crl, &bytes.client_crl) {
        (Some(path), Some(pem)) => Some(client_crls(path, pem)?),
        _ => None,
    };
    let crls_next_update = crls.as_ref().and_then(|c| c.next_update);
    let clients = match (&files.client_ca, &bytes.client_ca) {
        // CRLs without a client CA are refused by check-config (`client_crl`), before this.
        (Some(path), Some(pem)) => Some(client_verifier(path, pem, crls, provider)?),
        _ => None,
    };
    Ok(Loaded { certified: Arc::new(certified), clients, crls_next_update })
}

/// The CRLs of a `client_crl` file, and the earliest time one of them goes stale.
struct ClientCrls {
    path: String,
    ders: Vec<CertificateRevocationListDer<'static>>,
    next_update: Option<i64>,
}

fn client_crls(path: &Path, pem: &[u8]) -> Result<ClientCrls, TlsError> {
    let path = path.display().to_string();
    let fail = |reason: String| TlsError::ClientCrl { path: path.clone(), reason };
    let ders: Vec<CertificateRevocationListDer<'static>> =
        CertificateRevocationListDer::pem_slice_iter(pem).collect::<Result<_, _>>().map_err(|e| fail(e.to_string()))?;
    if ders.is_empty() {
        return Err(fail("holds no PEM X509 CRL".into()));
    }
    let next_updates = ders
        .iter()
        .map(|der| x509_parser::parse_x509_crl(der).map(|(_, crl)| crl.next_update().map(|t| t.timestamp())))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(e.to_string()))?;
    Ok(ClientCrls { path, ders, next_update: next_updates.into_iter().flatten().min() })
}

fn client_verifier(
    path: &Path,
    pem: &[u8],
    crls: Option<ClientCrls>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let at = path.display().to_string();
    let fail = |reason: String| TlsError::ClientCa { path: at.clone(), reason };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        roots.add(cert.map_err(|e| fail(e.to_string()))?).map_err(|e| fail(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(fail("holds no PEM CERTIFICATE".into()));
    }
    // A client without a certificate may still present a bearer key; one with a certificate
    // that does not verify is refused during the handshake.
    let builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).allow_unauthenticated();
    let Some(crls) = crls else {
        return builder.build().map_err(|e| fail(e.to_string()));
    };
    // The client's own certificate is checked (an intermediate's revocation is its root's
    // business, and `client_ca` is where an operator removes a CA); a certificate no CRL
    // covers, or covered by a stale one, is refused rather than trusted.
    builder
        .with_crls(crls.ders)
        .only_check_end_entity_revocation()
        .enforce_revocation_expiration()
        .build()
        .map_err(|e| TlsError::ClientCrl { path: crls.path, reason: e.to_string() })
}

fn certificate_not_after(certified: &CertifiedKey) -> i64 {
    certified
        .cert
        .first()
        .and_then(|der| x509_parser::parse_x509_certificate(der).ok())
        .map(|(_, cert)| cert.validity().not_after.timestamp())
        .unwrap_or_default()
}

/// Hands every handshake the certificate loaded last.
#[derive(Debug)]
struct CertificateResolver(Arc<ListenerTls>);

impl ResolvesServerCert for CertificateResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.loaded.load_full().certified.clone())
    }
}

/// Checks client certificates against the client CAs loaded last.
#[derive(Debug)]
struct ClientVerifier(Arc<ListenerTls>);

impl ClientVerifier {
    fn current(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        self.0.loaded.load_full().clients.clone().ok_or_else(|| rustls::Error::General("no client CA loaded".into()))
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    /// No hints: they would have to outlive a reload of the CA file. A client picks its
    /// certificate itself (curl, openssl and the usual libraries send the one they are given).
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current()?.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The names of a connection's verified client certificate: its subjectAltName DNS names and
/// URIs, and its subject's common name. Stored on the connection when it opens.
#[derive(Debug, Clone)]
pub struct ClientCertificate {
    pub names: Vec<String>,
}

/// The TCP stream under a connection, plain or TLS.
pub fn tcp_stream(connection: &dyn Any) -> Option<&TcpStream> {
    connection.downcast_ref::<TcpStream>().or_else(|| connection.downcast_ref::<TlsStream>().map(|tls| tls.get_ref().0))
}

/// Note a TLS connection's client certificate (already verified by the handshake) on it.
pub fn on_connect(connection: &dyn Any, extensions: &mut Extensions) {
    let Some(tls) = connection.downcast_ref::<TlsStream>() else { return };
    let Some(der) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) else { return };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else { return };
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(n) | x509_parser::extensions::GeneralName::URI(n) => {
                    names.push(n.to_string())
                }
                _ => {}
            }
        }
    }
    for cn in cert.subject().iter_common_name() {
        if let Ok(cn) = cn.as_str() {
            names.push(cn.to_string());
        }
    }
    extensions.insert(ClientCertificate { names });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_error_for_a_bad_key_names_the_file_not_its_bytes() {
        let dir = std::env::temp_dir().join(format!("castellum-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        // A key block whose body does not decode: its text must not reach the error.
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nSECRETSECRET*\n-----END PRIVATE KEY-----\n").unwrap();
        let files = TlsConfig {
            certificate: cert,
            key: key.clone(),
            client_ca: None,
            client_crl: None,
            reload_interval: Duration::from_secs(1),
        };
        let e = check_files(&files).err().unwrap().to_string();
        assert!(e.contains("key.pem"), "{e}");
        assert!(!e.contains("SECRET"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
