//! Configuration: compiled-in defaults, then a TOML file (which must exist when named), then
//! `CASTELLUM_*` environment variables (`__` separates nesting: `CASTELLUM_HTTP__LISTEN`).
//!
//! Every duration is written the human way (`"6s"`, `"500ms"`, `"90d"`). The configuration
//! declares *definitions* (CAs, profiles, clients); the live *state* of CAs and profiles
//! (enabled / disabled / retired) lives in the database, where the registry owns it. A CA or
//! profile's `enabled` flag here is only its state the first time the database sees it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::pki::vocabulary::{ExtendedKeyUsageName, KeyType, KeyUsageName, Lane, RsaSignatureScheme};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Development: the keys in `keys-dev/` and fault injection are allowed.
    Dev,
    #[default]
    Production,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub mode: Mode,
    /// Name of this instance in heartbeats and the audit log; defaults to host name + pid.
    pub instance_id: Option<String>,
    pub http: HttpConfig,
    pub admin: AdminConfig,
    pub database: DatabaseConfig,
    pub lanes: LanesConfig,
    pub registry: RegistryConfig,
    pub store: StoreConfig,
    pub audit: AuditConfig,
    pub backoff: BackoffConfig,
    pub async_requests: AsyncConfig,
    pub identities: IdentitiesConfig,
    pub crl: CrlConfig,
    pub cas: Vec<CaConfig>,
    pub profiles: Vec<ProfileConfig>,
    pub clients: Vec<ClientConfig>,
    /// Deliberate defects that show the drills and tests can fail; refused unless `mode = "dev"`.
    pub sabotage: Vec<Sabotage>,
}

/// A defect built into the engine on purpose, so that a drill or test can be run against an
/// engine that breaks its promise and be seen to say so. Each one undoes one property the
/// incidents taught (dev mode only: `check-config` and start-up refuse them otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sabotage {
    /// Intake refuses every CA while any CA's breaker is open: the global back-off of incident 003.
    GlobalBackOff,
    /// Intake ignores the CAs' states: work for a disabled or parked CA is queued (incident 003).
    IgnoreCaState,
    /// Every synchronous certificate request (`POST /v1/certificates` without `respond-async`)
    /// opens a database connection of its own, outside the pools, and holds it until answered:
    /// connections grow with load (incident 000).
    ConnectionPerRequest,
    /// Connections held past the threshold are never reported while held, and the longest-hold
    /// gauge stays still (incident 001).
    SilentLeaks,
    /// `/readyz` never warns that a pool is saturated (its per-pool figures stay) (incident 002).
    QuietReadiness,
    /// Intake refuses background-lane work for every CA while any CA's breaker is open: the
    /// back-off of incident 003, applied to renewals only.
    BackgroundBackOff,
    /// A parked CA keeps signing: its work is neither held nor turned away (incident 003).
    IgnorePark,
    /// Deadlines are not enforced: no predicted-wait refusal, expired jobs are dequeued and
    /// signed, and a synchronous caller waits for its certificate however long it takes.
    IgnoreDeadlines,
    /// Every interactive-lane job stalls 7 s between its write-ahead record and its signature,
    /// longer than any interactive deadline (a stuck HSM session). Not a promise of its own: it
    /// is what makes deadlines matter for [`Sabotage::IgnoreDeadlines`].
    SlowInteractiveSigning,
    /// A CA that is overloaded makes its callers wait out their deadline instead of refusing at
    /// once: excess load times out (incident 000).
    TimeoutsNotRefusals,
    /// Once any request has been refused as overloaded, every later one is too, until restart:
    /// no recovery after a surge (incident 000).
    StickyOverload,
    /// Issuance takes its connections from the control pool: no bulkhead between them (incident 001).
    SharedPool,
    /// The admin console and levers use the control pool (no admin pool of their own), and the
    /// status page fails when it cannot get a connection instead of answering without what
    /// needs the database (incident 001).
    BrittleConsole,
    /// `check-config` does not compare the pools with the expected rate (incident 002).
    BlindCheckConfig,
    /// A read refused or timed out for lack of a connection is answered 500 without
    /// `Retry-After` (incident 002).
    BareErrors,
    /// Every refusal of an authenticated client is audited as a row of its own, through the
    /// issuance Store: a retry storm becomes a storm of database writes (incident 003).
    AuditEachRefusal,
    /// The registry does not LISTEN for other instances' changes and polls the version five times
    /// less often: a CA disabled on one instance goes on being served by the others for seconds
    /// (incident 003's operators needed the disable everywhere at once).
    DeafRegistry,
    /// Intake checks the CSR (structure, key, signature, names) before the client's permission,
    /// the CA's state and its breaker: every refusal of a broken or disabled CA costs a
    /// signature verification, and a retry storm becomes CPU work (incident 003).
    CsrBeforeState,
    /// On SIGTERM the instance stops at once: `/readyz` never says it is draining, and the
    /// requests in flight are dropped unanswered (what issue 15 found behind a load balancer).
    StopWithoutDrain,
    /// A synchronous attempt that ended without an answer (its instance died, its deadline
    /// passed) fixes its `Idempotency-Key`'s result: every retry waits on it and is answered
    /// `503` (what issue 15 found after a kill -9).
    StickyKeyedFailures,
}

/// The defects an engine is built with: empty unless `mode = "dev"`. Copied into every component
/// that has one, so checking costs a bit test.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sabotages(u32);

impl Sabotages {
    pub fn has(self, what: Sabotage) -> bool {
        self.0 & (1 << what as u32) != 0
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: Mode::Production,
            instance_id: None,
            http: HttpConfig::default(),
            admin: AdminConfig::default(),
            database: DatabaseConfig::default(),
            lanes: LanesConfig::default(),
            registry: RegistryConfig::default(),
            store: StoreConfig::default(),
            audit: AuditConfig::default(),
            backoff: BackoffConfig::default(),
            async_requests: AsyncConfig::default(),
            identities: IdentitiesConfig::default(),
            crl: CrlConfig::default(),
            cas: Vec::new(),
            profiles: Vec::new(),
            clients: Vec::new(),
            sabotage: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: String,
    /// Largest request body accepted; larger ones are refused with `413` before parsing.
    pub max_body_bytes: usize,
    /// actix-web worker threads (0: one per core).
    pub workers: usize,
    /// How long an idle keep-alive connection is kept. Longer than a load balancer's own idle
    /// timeout (often 60 s), so the balancer, not the engine, closes it: an engine closing
    /// first races the balancer's next request on that connection.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// On SIGTERM or SIGINT, how long `/readyz` answers 503 (draining) while everything is still
    /// served, before the listener closes: at least the load balancer's `fall × inter`, so it has
    /// stopped sending by then. A second signal ends it early.
    #[serde(with = "humantime_serde")]
    pub drain_grace: Duration,
    /// A request body must have arrived this long after its headers, or the request is answered
    /// `408` and its connection closed (a client that declares a body and never sends it would
    /// otherwise hold its connection forever).
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// Connections one source address may hold open; a request on one over it is answered `429`
    /// and its connection closed. Behind a load balancer every connection comes from the
    /// balancer's address: set it above the balancer's own limit.
    pub connections_per_source: u32,
    /// Failed authentications one source address may make (a burst, refilled at a rate) before
    /// its failures are answered `429` with `Retry-After`; a valid key is never held back.
    pub auth_failures: RateConfig,
    /// An access log line per answer (target `castellum::access`): `served` (2xx and 3xx; the
    /// default), `all` (refusals too: one line per request of a storm), or `off`. Every answer
    /// is counted in `castellum_http_requests_total` whatever this says.
    pub access_log: AccessLog,
    /// Serve `/metrics` on the API listener too (it is always on the admin listener, behind its
    /// token). `false` keeps CA ids, pool figures and the identity key stock off the API port.
    pub metrics: bool,
    /// TLS on the API listener; absent: plain HTTP (for loopback, or behind a terminating
    /// balancer on a private network).
    pub tls: Option<TlsConfig>,
}

/// Which answers get an access log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLog {
    Off,
    /// 2xx and 3xx: what was served. Refusals are counted, not logged.
    Served,
    All,
}

/// A listener's TLS: its certificate and key files, reloaded when they change.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM: the listener's certificate first, then the intermediates to send with it.
    pub certificate: PathBuf,
    /// PEM: its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM: the CAs whose client certificates authenticate API clients (mutual TLS; see
    /// `clients[].certificate_names`). Absent: no client certificate is asked for.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// PEM: CRLs (one or more `X509 CRL` blocks, every shard of each client CA) against which
    /// a client certificate is checked, reloaded like the other files. With it, a client
    /// certificate is refused in the handshake when it is listed, when no CRL in the file
    /// covers it, or when that CRL is past its nextUpdate (fail closed: keep the file current;
    /// `castellum_tls_client_crl_next_update` tells when it must be). Needs `client_ca`.
    #[serde(default)]
    pub client_crl: Option<PathBuf>,
    /// How often the files are read for a change (a rotation needs no restart).
    #[serde(default = "default_tls_reload_interval", with = "humantime_serde")]
    pub reload_interval: Duration,
}

fn default_tls_reload_interval() -> Duration {
    Duration::from_secs(5)
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 64 * 1024,
            workers: 0,
            keep_alive: Duration::from_secs(75),
            drain_grace: Duration::from_secs(2),
            body_timeout: Duration::from_secs(10),
            connections_per_source: 1024,
            auth_failures: RateConfig { per_second: 2, burst: 20 },
            access_log: AccessLog::Served,
            metrics: true,
            tls: None,
        }
    }
}

/// The admin console and API: a listener of its own (loopback by default) and its own tokens.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Empty: no admin listener.
    pub listen: String,
    pub tokens: Vec<AdminToken>,
    /// How often each CA's history (issued/s, p99, queue, refusals/s) is sampled for the
    /// console; 60 points are kept.
    #[serde(with = "humantime_serde")]
    pub history_interval: Duration,
    /// TLS on the admin listener (required off loopback in production: `check-config`).
    pub tls: Option<TlsConfig>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:8081".into(),
            tokens: Vec::new(),
            history_interval: Duration::from_secs(5),
            tls: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminToken {
    /// The admin's name, as it appears in the audit log.
    pub name: String,
    /// Hex SHA-256 of the bearer token (`castellum hash-key` prints it).
    pub token_sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite://path`, a plain file path, or `postgres://…`.
    pub url: String,
    /// How many engine instances share this database (for the connection budget).
    pub instances: u32,
    /// The server's `max_connections` (PostgreSQL), or the limit of the role the engine uses.
    pub server_max_connections: u32,
    /// Connections kept free for administrators, migrations and other clients.
    pub reserved_connections: u32,
    /// Per-connection `statement_timeout` on PostgreSQL.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// `busy_timeout` on SQLite.
    #[serde(with = "humantime_serde")]
    pub busy_timeout: Duration,
    /// A connection held longer than this is reported with the span holding it.
    #[serde(with = "humantime_serde")]
    pub slow_hold_threshold: Duration,
    pub pools: PoolsConfig,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "sqlite://castellum.db".into(),
            instances: 1,
            server_max_connections: 100,
            reserved_connections: 10,
            statement_timeout: Duration::from_secs(5),
            busy_timeout: Duration::from_secs(2),
            slow_hold_threshold: Duration::from_secs(2),
            pools: PoolsConfig::default(),
        }
    }
}

impl DatabaseConfig {
    pub fn is_postgres(&self) -> bool {
        self.url.starts_with("postgres://") || self.url.starts_with("postgresql://")
    }
}

/// The three bulkheads: a saturated issuance path never blocks control or status work.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolsConfig {
    /// Used only by the Store's workers (one connection per worker).
    pub issuance: PoolConfig,
    /// Registry, migrations, async-request claims, admin work.
    pub control: PoolConfig,
    /// Reads: certificate and request lookups, readiness.
    pub status: PoolConfig,
    /// The operator's levers and the admin console: capacity issuance, audit and a retry storm
    /// cannot take.
    pub admin: PoolConfig,
    /// The audit writer's alone: refusal tallies and single audit events.
    pub audit: PoolConfig,
}

impl Default for PoolsConfig {
    fn default() -> Self {
        PoolsConfig {
            issuance: PoolConfig { max_size: 2, min_idle: Some(1), ..PoolConfig::default() },
            control: PoolConfig { max_size: 2, min_idle: Some(1), ..PoolConfig::default() },
            status: PoolConfig { max_size: 4, min_idle: Some(1), ..PoolConfig::default() },
            admin: PoolConfig { max_size: 1, min_idle: Some(1), ..PoolConfig::default() },
            audit: PoolConfig { max_size: 1, min_idle: Some(1), ..PoolConfig::default() },
        }
    }
}

impl PoolsConfig {
    pub fn total_max(&self) -> u32 {
        self.issuance.max_size
            + self.control.max_size
            + self.status.max_size
            + self.admin.max_size
            + self.audit.max_size
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    pub max_size: u32,
    pub min_idle: Option<u32>,
    #[serde(with = "humantime_serde")]
    pub connection_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub max_lifetime: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    pub test_on_check_out: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_size: 2,
            min_idle: Some(1),
            connection_timeout: Duration::from_millis(500),
            max_lifetime: Some(Duration::from_secs(30 * 60)),
            idle_timeout: Some(Duration::from_secs(10 * 60)),
            test_on_check_out: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LanesConfig {
    pub interactive: LaneConfig,
    pub background: LaneConfig,
}

impl Default for LanesConfig {
    fn default() -> Self {
        LanesConfig {
            interactive: LaneConfig { default_deadline: Duration::from_secs(6), max_deadline: Duration::from_secs(6) },
            background: LaneConfig {
                default_deadline: Duration::from_secs(60),
                max_deadline: Duration::from_secs(300),
            },
        }
    }
}

impl LanesConfig {
    pub fn get(&self, lane: Lane) -> &LaneConfig {
        match lane {
            Lane::Interactive => &self.interactive,
            Lane::Background => &self.background,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaneConfig {
    /// Deadline given to a request that asks for none.
    #[serde(with = "humantime_serde")]
    pub default_deadline: Duration,
    /// No client can ask for more than this (`Prefer: wait=N` only shortens).
    #[serde(with = "humantime_serde")]
    pub max_deadline: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// How often the registry polls the database's registry version (the fallback when
    /// notifications are lost) and writes this instance's heartbeat.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// LISTEN for changes on PostgreSQL (holds one control-pool connection).
    pub listen: bool,
    /// An instance whose heartbeat is older than this is shown as stale.
    #[serde(with = "humantime_serde")]
    pub stale_after: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig { poll_interval: Duration::from_secs(1), listen: true, stale_after: Duration::from_secs(5) }
    }
}

/// How hard a client retrying a refusing CA is told to back off.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackoffConfig {
    /// Refusals by a CA's state (breaker open, disabled, parked, draining) a client may collect
    /// per CA and second before it is answered `429 too-many-retries` with a growing
    /// `Retry-After`. 0 turns this off.
    pub retries_per_second: u32,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig { retries_per_second: 50 }
    }
}

/// The audit writer: refusals are counted in memory and written in aggregate.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// How often refusal tallies are written: one row per (client, target, action, reason).
    #[serde(with = "humantime_serde")]
    pub refusal_interval: Duration,
    /// Single audit events (admin actions) waiting for the writer; beyond this they are
    /// dropped and the drop is counted (metric and an `audit.dropped` row).
    pub max_pending: usize,
    /// Where the head of this instance's audit hash chain is appended (JSON lines) each time it
    /// moves, outside the database: `castellum audit verify` compares the chain with it, which
    /// catches a deleted tail or a rewritten chain. Also logged. None: logged only.
    pub checkpoint_file: Option<PathBuf>,
    /// How often the engine verifies its own chain whole (against the checkpoint file, if any);
    /// the console shows when, and what it found.
    #[serde(with = "humantime_serde")]
    pub verify_interval: Duration,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            refusal_interval: Duration::from_secs(10),
            max_pending: 1024,
            checkpoint_file: None,
            verify_interval: Duration::from_secs(600),
        }
    }
}

/// Certificate revocation lists: one per CA and shard, made by one instance at a time and served
/// by every instance from the database.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CrlConfig {
    /// A revocation is on its shard's CRL within this time.
    #[serde(with = "humantime_serde")]
    pub delay: Duration,
    /// thisUpdate to nextUpdate (the Baseline Requirements allow at most 10 days; 7 by default).
    /// A CRL is made again when half of this has passed, revoked or not.
    #[serde(with = "humantime_serde")]
    pub validity: Duration,
    /// How long an instance owns a shard's generation once it starts; another instance may take
    /// it over after that (a crashed generator).
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
}

impl Default for CrlConfig {
    fn default() -> Self {
        CrlConfig {
            delay: Duration::from_secs(60),
            validity: Duration::from_secs(7 * 86_400),
            lease: Duration::from_secs(30),
        }
    }
}

impl CrlConfig {
    /// How often the generator looks for stale shards: often enough to meet `delay`.
    pub fn poll_interval(&self) -> Duration {
        (self.delay / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Most writes folded into one transaction (group commit).
    pub max_batch: usize,
    /// Writes waiting for a worker; beyond this the Store refuses new work (`503`).
    pub max_pending: usize,
    /// Writes that must be waiting before a second batch is started beside one being
    /// committed (1, the default: whenever any write waits). Every batch costs the database its
    /// round trips and a commit whatever its size; a higher value makes fewer, larger batches
    /// under load, at the price of up to `overlap_at - 1` writes waiting as long as the commit
    /// under way takes. On PostgreSQL with two issuance connections, 8 cut the server's CPU per
    /// issuance by 7–16% at c=64 in pairs (not in a whole run) and cost c=16 6–13% of its
    /// throughput (docs/PERFORMANCE.md).
    pub overlap_at: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig { max_batch: 256, max_pending: 8192, overlap_at: 1 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AsyncConfig {
    /// An accepted asynchronous request not issued within this time is marked expired.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// How long an instance owns a pending request it took; after that any instance may.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How often each instance looks for pending requests nobody owns.
    #[serde(with = "humantime_serde")]
    pub resume_interval: Duration,
}

impl Default for AsyncConfig {
    fn default() -> Self {
        AsyncConfig {
            max_age: Duration::from_secs(24 * 3600),
            lease: Duration::from_secs(30),
            resume_interval: Duration::from_secs(2),
        }
    }
}

/// Disposable identities: keys the engine generates, keeps sealed, and signs with on behalf of
/// the client that created them (profiles with an `[profiles.identity]` section).
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdentitiesConfig {
    /// File holding the key-encryption key: 32 random bytes as 64 hex digits (`#` lines are
    /// comments). Every identity key at rest is sealed under it with AES-256-GCM.
    pub kek_file: Option<PathBuf>,
    /// Name of an environment variable holding the key-encryption key (64 hex digits).
    pub kek_env: Option<String>,
    /// Keys generated ahead, per key type an identity profile uses (ECDSA and Ed25519).
    pub pool_size: usize,
    /// Keys generated ahead per RSA key size (each takes tens to hundreds of milliseconds).
    pub rsa_pool_size: usize,
    /// Threads that open sealed identity keys and sign digests (never a CA's signer threads).
    pub signer_threads: usize,
    /// How often expired identities are looked for and destroyed.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Fault injection for tests; refused unless `mode = "dev"`.
    pub fault: VaultFaultConfig,
}

/// A slow identity vault, for real (dev mode only): every signature waits this long first.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VaultFaultConfig {
    #[serde(with = "humantime_serde")]
    pub sign_latency: Option<Duration>,
}

impl Default for IdentitiesConfig {
    fn default() -> Self {
        IdentitiesConfig {
            kek_file: None,
            kek_env: None,
            pool_size: 16,
            rsa_pool_size: 2,
            signer_threads: 1,
            sweep_interval: Duration::from_secs(5),
            fault: VaultFaultConfig::default(),
        }
    }
}

impl std::fmt::Debug for IdentitiesConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentitiesConfig")
            .field("kek_file", &self.kek_file)
            .field("kek_env", &self.kek_env)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaConfig {
    pub id: String,
    pub cert_file: PathBuf,
    /// PKCS#8 private key, encrypted (PEM `ENCRYPTED PRIVATE KEY`); or `key` for a token.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The key on a PKCS#11 token instead of a file: `[cas.key] pkcs11 = { … }`.
    #[serde(default)]
    pub key: Option<CaKeyConfig>,
    /// Certificates above this CA, nearest first, ending with the root.
    #[serde(default)]
    pub chain_files: Vec<PathBuf>,
    /// The key's passphrase written inline: allowed only in dev mode.
    #[serde(default)]
    pub key_passphrase: Option<String>,
    /// Name of an environment variable holding the passphrase.
    #[serde(default)]
    pub key_passphrase_env: Option<String>,
    /// A file holding the passphrase (first line).
    #[serde(default)]
    pub key_passphrase_file: Option<PathBuf>,
    /// How an RSA CA key signs: `pkcs1` (RSASSA-PKCS1-v1_5, the default) or `pss` (RSASSA-PSS,
    /// SHA-256, MGF1-SHA-256, 32-byte salt). Only for RSA keys.
    #[serde(default)]
    pub rsa_signature: RsaSignatureScheme,
    #[serde(default = "default_signer_threads")]
    pub signer_threads: usize,
    /// A signature not back within this time counts as a failure of this CA's signer (its
    /// breaker sees it): a hung token fails its CA, quickly, and no other.
    #[serde(default = "default_sign_timeout", with = "humantime_serde")]
    pub sign_timeout: Duration,
    #[serde(default)]
    pub queue: CellQueueConfig,
    /// Signatures per second this CA sustains (measure with `castellum bench`); used to check
    /// that its queues can be served within their lanes' deadlines.
    #[serde(default = "default_sign_rate")]
    pub expected_sign_rate: f64,
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// Parked requests fed back per second by `resubmit`.
    #[serde(default = "default_resubmit_rate")]
    pub resubmit_rate: u32,
    /// Fault injection for drills and tests; refused unless `mode = "dev"`.
    #[serde(default)]
    pub fault: FaultConfig,
    /// Where relying parties reach this CA through castellum (`http://crl.example.com`, no
    /// trailing slash): certificates name its CRL (`{base_url}/crl/{id}/{shard}.crl`) and its
    /// certificate (`{base_url}/ca/{id}.der`). None: certificates carry neither.
    #[serde(default)]
    pub base_url: Option<String>,
    /// How many CRLs this CA's revocations are split into; a certificate's shard is chosen at
    /// issuance and never changes. Raising it later is safe (old certificates keep theirs).
    #[serde(default = "default_crl_shards")]
    pub crl_shards: u32,
    /// OCSP for this CA (the Baseline Requirements made it optional; CRLs are always made).
    #[serde(default)]
    pub ocsp: Option<OcspConfig>,
}

/// A CA's OCSP responder: castellum issues its certificate through the CA's own cell and renews
/// it before it expires; answers are served at `{base_url}/ocsp`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OcspConfig {
    /// The profile the responder certificate is issued with: this CA's, on the background lane,
    /// with `extended_key_usage = ["ocsp_signing"]` and `ocsp_no_check = true`.
    pub responder_profile: String,
    /// The DNS name the responder certificate carries (the profile's name policy must allow it).
    pub responder_name: String,
    /// thisUpdate to nextUpdate of an answer (Baseline Requirements: 8 hours to 10 days); an
    /// answer is signed again once half of it has passed.
    #[serde(default = "default_ocsp_validity", with = "humantime_serde")]
    pub response_validity: Duration,
}

/// Where a CA's key is when it is not a key file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaKeyConfig {
    /// On a PKCS#11 token: the key never leaves it.
    pub pkcs11: Pkcs11KeyConfig,
}

/// A key on a PKCS#11 token, found by the token's and the key's labels.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11KeyConfig {
    /// The PKCS#11 module (`/usr/lib/softhsm/libsofthsm2.so` for SoftHSM2).
    pub module: PathBuf,
    pub token_label: String,
    /// The private key's `CKA_LABEL`.
    pub key_label: String,
    /// A file holding the user PIN (first line).
    #[serde(default)]
    pub pin_file: Option<PathBuf>,
    /// Name of an environment variable holding the user PIN.
    #[serde(default)]
    pub pin_env: Option<String>,
    /// The PIN written inline: allowed only in dev mode.
    #[serde(default)]
    pub pin: Option<String>,
}

impl std::fmt::Debug for Pkcs11KeyConfig {
    // The PIN must never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11KeyConfig")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("key_label", &self.key_label)
            .field("pin_file", &self.pin_file)
            .field("pin_env", &self.pin_env)
            .field("pin", &self.pin.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// A CA's circuit breaker: only that CA's signer failures count.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Outcomes older than this are forgotten.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Signatures in the window before the ratio is judged.
    pub min_requests: u32,
    /// Failed share of signatures in the window that opens the breaker.
    pub failure_ratio: f64,
    /// This many failures in a row open it at once, whatever the window holds (a CA whose key
    /// is gone fails every signature: it must not take a window of history to notice).
    pub consecutive_failures: u32,
    /// How long an open breaker refuses before letting probes through.
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
    /// Successful probes in a row that close it again.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            window: Duration::from_secs(10),
            min_requests: 5,
            failure_ratio: 0.5,
            consecutive_failures: 5,
            open_for: Duration::from_secs(2),
            half_open_probes: 2,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultConfig {
    /// Added to every signature of this CA (a slow HSM), on this CA's signer threads only.
    #[serde(with = "humantime_serde")]
    pub sign_latency: Option<Duration>,
    /// Share of this CA's signatures that fail (0.0 to 1.0), as a broken HSM would.
    pub failure_rate: f64,
    /// A stall inside each key operation of this CA (a hung token), judged by `sign_timeout`.
    #[serde(with = "humantime_serde")]
    pub key_stall: Option<Duration>,
}

impl FaultConfig {
    pub fn is_active(&self) -> bool {
        self.sign_latency.is_some() || self.key_stall.is_some() || self.failure_rate > 0.0
    }
}

impl std::fmt::Debug for CaConfig {
    // The passphrase must never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaConfig")
            .field("id", &self.id)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("key", &self.key)
            .field("key_passphrase", &self.key_passphrase.as_ref().map(|_| "<redacted>"))
            .field("key_passphrase_env", &self.key_passphrase_env)
            .field("key_passphrase_file", &self.key_passphrase_file)
            .finish_non_exhaustive()
    }
}

fn default_signer_threads() -> usize {
    1
}
fn default_sign_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_sign_rate() -> f64 {
    1000.0
}
fn default_ocsp_validity() -> Duration {
    Duration::from_secs(86_400)
}
fn default_crl_shards() -> u32 {
    4
}
fn default_resubmit_rate() -> u32 {
    100
}
fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CellQueueConfig {
    pub interactive_capacity: usize,
    pub background_capacity: usize,
    /// Jobs of this CA between dequeue and reply at once (pipelined through store and signer).
    pub in_flight: usize,
}

impl Default for CellQueueConfig {
    fn default() -> Self {
        CellQueueConfig { interactive_capacity: 512, background_capacity: 2048, in_flight: 64 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    pub id: String,
    pub ca: String,
    #[serde(default = "default_lane")]
    pub lane: Lane,
    #[serde(with = "humantime_serde")]
    pub validity: Duration,
    /// notBefore is set this far in the past to absorb relying parties' clock skew.
    #[serde(default = "default_backdate", with = "humantime_serde")]
    pub backdate: Duration,
    pub key_usage: Vec<KeyUsageName>,
    #[serde(default)]
    pub extended_key_usage: Vec<ExtendedKeyUsageName>,
    /// Key types a CSR may carry (not used by identity profiles, whose key the engine makes).
    #[serde(default)]
    pub allowed_keys: Vec<KeyType>,
    #[serde(default = "default_min_rsa_bits")]
    pub min_rsa_bits: u32,
    #[serde(default)]
    pub names: NamePolicy,
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// This profile issues disposable identities (`POST /v1/identities`), not CSRs.
    #[serde(default)]
    pub identity: Option<IdentityPolicy>,
    /// Certificate policy OIDs the certificates assert (for TLS server certificates, the CA/B
    /// Forum's reserved `2.23.140.1.2.1` (DV) or `2.23.140.1.2.2` (OV)).
    #[serde(default)]
    pub policies: Vec<String>,
    /// Leave the common name out of the subject (the Baseline Requirements discourage it in DV
    /// certificates; the names are in the subjectAltName).
    #[serde(default)]
    pub omit_common_name: bool,
    /// Leave out the subject key identifier (not recommended in subscriber certificates by the
    /// Baseline Requirements since SC-062).
    #[serde(default)]
    pub omit_subject_key_id: bool,
    /// Add `id-pkix-ocsp-nocheck` (RFC 6960 4.2.2.2.1): for OCSP responder certificates.
    #[serde(default)]
    pub ocsp_no_check: bool,
}

/// A disposable identity: the key the engine generates, how long it lives, how often it signs,
/// and what its subject may say.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityPolicy {
    #[serde(default = "default_identity_key")]
    pub key_type: KeyType,
    /// RSA modulus size, when `key_type = "rsa"`.
    #[serde(default = "default_identity_rsa_bits")]
    pub rsa_bits: u32,
    /// RSA signature scheme, when `key_type = "rsa"`.
    #[serde(default)]
    pub rsa_signature: RsaSignatureScheme,
    /// The identity (and its key) is destroyed this long after creation, or with its
    /// certificate, whichever comes first.
    #[serde(with = "humantime_serde")]
    pub lifetime: Duration,
    /// Signatures the identity makes before its key is destroyed (1: truly disposable).
    #[serde(default = "default_max_uses")]
    pub max_uses: u32,
    /// Organisation names a subject may carry (empty: none).
    #[serde(default)]
    pub organizations: Vec<String>,
    /// Domains a subject's email address may be in (empty: any, if the profile allows email).
    #[serde(default)]
    pub email_domains: Vec<String>,
}

fn default_identity_key() -> KeyType {
    KeyType::EcdsaP256
}
fn default_identity_rsa_bits() -> u32 {
    3072
}
fn default_max_uses() -> u32 {
    1
}

fn default_lane() -> Lane {
    Lane::Interactive
}
fn default_backdate() -> Duration {
    Duration::from_secs(60)
}
fn default_min_rsa_bits() -> u32 {
    2048
}

/// Which names a certificate of this profile may carry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NamePolicy {
    pub dns: bool,
    /// A DNS name must equal one of these or end with `.` + one of them. Empty: any.
    pub dns_suffixes: Vec<String>,
    pub ip: bool,
    /// With `ip = true`, the address ranges allowed (CIDR); an address outside them is refused.
    /// `check-config` refuses `ip = true` without them.
    pub ip_ranges: Vec<ipnet::IpNet>,
    pub email: bool,
    /// At least one name is required, at most this many.
    pub max_names: usize,
    /// Copy the CSR's common name into the subject (it must also be one of the SANs).
    pub subject_cn: bool,
}

impl Default for NamePolicy {
    fn default() -> Self {
        NamePolicy {
            dns: true,
            dns_suffixes: Vec::new(),
            ip: false,
            ip_ranges: Vec::new(),
            email: false,
            max_names: 100,
            subject_cn: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    pub name: String,
    /// Hex SHA-256 of the client's bearer API key (`castellum hash-key` prints it). Empty: the
    /// client authenticates by its TLS client certificate alone (`certificate_names`).
    #[serde(default)]
    pub api_key_sha256: String,
    pub profiles: Vec<String>,
    /// The client's own rate (GCRA); over it, requests get `429` with `Retry-After`.
    #[serde(default)]
    pub rate: Option<RateConfig>,
    /// Mutual TLS: a client certificate verified against `http.tls.client_ca` whose
    /// subjectAltName (DNS name or URI) or common name is one of these authenticates this client
    /// on a request without a bearer key. `api_key_sha256` may then be empty.
    #[serde(default)]
    pub certificate_names: Vec<String>,
    /// The names this client may request, within what each profile allows.
    #[serde(default)]
    pub names: ClientNamePolicy,
}

/// The names a client may request, intersected with the profile's (issue 16): one client cannot
/// obtain a certificate for another's domain.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientNamePolicy {
    /// A DNS name (or an email address's domain) must equal one of these or end with `.` + one
    /// of them. Empty: whatever the profile allows.
    pub dns_suffixes: Vec<String>,
    /// The IP addresses this client may request (CIDR). Empty (the default): none.
    pub ip_ranges: Vec<ipnet::IpNet>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateConfig {
    pub per_second: u32,
    pub burst: u32,
}

/// One problem in a configuration, with the key path it concerns (`castellum check-config`
/// lists them all; the checks are in `check.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted key path, e.g. `profiles[2].ca` or `database.pools.issuance.connection_timeout`.
    pub path: String,
    pub message: String,
    /// A CA key that cannot be loaded now. `check-config` fails on it; at start-up the engine
    /// starts that CA in a failed state instead (its key is retried), and the others serve.
    pub key_unavailable: bool,
    /// Allowed, but risky: reported by `check-config`, never refused.
    pub warning: bool,
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let severity = if self.warning { "warning: " } else { "" };
        write!(f, "{severity}{}: {}", self.path, self.message)
    }
}

/// Errors reading the configuration (before any semantic check).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Figment(Box<figment::Error>),
}

impl From<figment::Error> for ConfigError {
    fn from(e: figment::Error) -> Self {
        ConfigError::Figment(Box::new(e))
    }
}

impl ConfigError {
    /// One line per underlying problem, each naming its key path.
    pub fn problems(&self) -> Vec<ConfigProblem> {
        match self {
            ConfigError::Figment(e) => (**e)
                .clone()
                .into_iter()
                .map(|err| {
                    let path = if err.path.is_empty() { "<root>".to_string() } else { err.path.join(".") };
                    let source = err
                        .metadata
                        .as_ref()
                        .and_then(|m| m.source.as_ref().map(|s| format!(" (from {s})")))
                        .unwrap_or_default();
                    ConfigProblem {
                        path,
                        message: format!("{}{}", err.kind, source),
                        key_unavailable: false,
                        warning: false,
                    }
                })
                .collect(),
        }
    }
}

/// `CASTELLUM_*` variables that belong to the command line (`--config`, the admin, drill and
/// storm commands' token, keys and URL) or to the test harness, not to the configuration: read as
/// configuration keys they would be refused as unknown fields.
const COMMAND_LINE_VARIABLES: &[&str] =
    &["config", "admin_token", "admin_token_file", "admin_url", "admin_cacert", "api_key", "storm_api_key", "test_pg"];

impl Config {
    /// Is this deliberate defect built in? (Only ever true in dev mode.)
    pub fn sabotaged(&self, what: Sabotage) -> bool {
        self.sabotages().has(what)
    }

    /// Every deliberate defect built in (none outside dev mode).
    pub fn sabotages(&self) -> Sabotages {
        match self.mode {
            Mode::Dev => Sabotages(self.sabotage.iter().fold(0, |set, s| set | 1 << *s as u32)),
            _ => Sabotages::default(),
        }
    }

    /// Defaults, then the file (which must exist), then `CASTELLUM_*` variables.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            fig = fig.merge(Toml::file_exact(path));
        }
        fig = fig.merge(Env::prefixed("CASTELLUM_").ignore(COMMAND_LINE_VARIABLES).split("__"));
        let mut config: Config = fig.extract()?;
        // Relative key and certificate paths are relative to the configuration file.
        if let Some(dir) = file.and_then(Path::parent) {
            config.resolve_paths(dir);
        }
        Ok(config)
    }

    /// Parse a configuration from TOML text (tests, embedding applications).
    pub fn from_toml(text: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        let mut config: Config =
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(text)).extract()?;
        config.resolve_paths(base_dir);
        Ok(config)
    }

    fn resolve_paths(&mut self, dir: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        if let Some(f) = self.identities.kek_file.as_mut() {
            fix(f);
        }
        for ca in &mut self.cas {
            fix(&mut ca.cert_file);
            if let Some(f) = ca.key_file.as_mut() {
                fix(f);
            }
            if let Some(f) = ca.key.as_mut().and_then(|k| k.pkcs11.pin_file.as_mut()) {
                fix(f);
            }
            ca.chain_files.iter_mut().for_each(fix);
            if let Some(f) = ca.key_passphrase_file.as_mut() {
                fix(f);
            }
        }
    }

    pub fn instance_id(&self) -> String {
        self.instance_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        })
    }

    /// The shortest deadline any request can get (the pool timeouts must sit well below it).
    pub fn shortest_deadline(&self) -> Duration {
        self.lanes.interactive.default_deadline.min(self.lanes.background.default_deadline)
    }
}

#[cfg(test)]
mod sabotage_tests {
    use super::*;

    #[test]
    fn defects_are_built_in_only_in_dev_mode() {
        let all = vec![Sabotage::GlobalBackOff, Sabotage::IgnoreDeadlines, Sabotage::BareErrors];
        let dev = Config { mode: Mode::Dev, sabotage: all.clone(), ..Config::default() };
        for what in &all {
            assert!(dev.sabotaged(*what), "{what:?}");
        }
        assert!(!dev.sabotaged(Sabotage::IgnorePark));
        let production = Config { mode: Mode::Production, sabotage: all, ..Config::default() };
        assert_eq!(production.sabotages(), Sabotages::default());
    }
}
