//! `castellum check-config`: every problem in a configuration at once, each with its key path.
//! Also run at start-up, so an engine never starts on a configuration this would refuse.
//! It sits above both the configuration and the PKI: it loads the CA material a configuration
//! names and judges it.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use crate::config::{Config, ConfigProblem, Mode, PoolConfig};
use crate::db::server_limits::ServerLimits;
use crate::pki::ca::{allowed_in_mode, CaMaterial};
use crate::pki::vocabulary::{ExtendedKeyUsageName, KeyType, RsaSignatureScheme};

/// A pool's checkout wait must stay well below the shortest deadline: at most this fraction.
const POOL_TIMEOUT_DEADLINE_FRACTION: u32 = 4;

struct Problems(Vec<ConfigProblem>);

impl Problems {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigProblem {
            path: path.into(),
            message: message.into(),
            key_unavailable: false,
            warning: false,
        });
    }

    fn key_unavailable(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigProblem {
            path: path.into(),
            message: message.into(),
            key_unavailable: true,
            warning: false,
        });
    }

    fn warn(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigProblem {
            path: path.into(),
            message: message.into(),
            key_unavailable: false,
            warning: true,
        });
    }
}

/// Check a configuration; returns the CA material it loaded (so start-up loads keys once).
pub fn check_config(config: &Config) -> (Vec<ConfigProblem>, HashMap<String, CaMaterial>) {
    let mut p = Problems(Vec::new());
    let cas = check_cas(config, &mut p);
    check_profiles(config, &cas, &mut p);
    check_identities(config, &mut p);
    check_clients(config, &mut p);
    check_certificate_names_are_unobtainable(config, &mut p);
    check_admin(config, &mut p);
    check_tls(config, &mut p);
    check_database(config, &mut p);
    check_lanes(config, &mut p);
    check_store(config, &mut p);
    check_audit(config, &mut p);
    check_crl(config, &mut p);
    if config.cas.is_empty() {
        p.add("cas", "no CA is configured");
    }
    (p.0, cas)
}

fn check_cas(config: &Config, p: &mut Problems) -> HashMap<String, CaMaterial> {
    if !config.sabotage.is_empty() && config.mode != Mode::Dev {
        p.add("sabotage", "deliberate defects are refused unless mode = \"dev\"");
    }
    let mut loaded = HashMap::new();
    let mut seen = HashSet::new();
    for (i, ca) in config.cas.iter().enumerate() {
        let at = format!("cas[{i}]");
        if !valid_id(&ca.id) {
            p.add(format!("{at}.id"), format!("{:?} is not a valid id (letters, digits, '-', '_')", ca.id));
        }
        if !seen.insert(ca.id.clone()) {
            p.add(format!("{at}.id"), format!("duplicate CA id {:?}", ca.id));
        }
        if ca.key_passphrase.is_some() && config.mode != Mode::Dev {
            p.add(
                format!("{at}.key_passphrase"),
                "an inline key passphrase is allowed only in dev mode; use key_passphrase_env or key_passphrase_file",
            );
        }
        let sources = [ca.key_passphrase.is_some(), ca.key_passphrase_env.is_some(), ca.key_passphrase_file.is_some()];
        if sources.iter().filter(|s| **s).count() > 1 {
            p.add(
                format!("{at}.key_passphrase"),
                "set only one of key_passphrase, key_passphrase_env, key_passphrase_file",
            );
        }
        if ca.fault.is_active() && config.mode != Mode::Dev {
            p.add(format!("{at}.fault"), "fault injection is refused unless mode = \"dev\"");
        }
        if ca.sign_timeout.is_zero() {
            p.add(format!("{at}.sign_timeout"), "must be positive");
        }
        if ca.signer_threads == 0 {
            p.add(format!("{at}.signer_threads"), "must be at least 1");
        }
        if ca.queue.in_flight == 0 {
            p.add(format!("{at}.queue.in_flight"), "must be at least 1");
        }
        if !(ca.expected_sign_rate.is_finite() && ca.expected_sign_rate > 0.0) {
            p.add(format!("{at}.expected_sign_rate"), "must be a positive number of signatures per second");
        } else {
            // A queue that cannot be emptied within its lane's deadline only holds work that
            // will time out (incident 003): refuse such a capacity.
            for (lane, capacity) in [
                (&config.lanes.interactive, ca.queue.interactive_capacity),
                (&config.lanes.background, ca.queue.background_capacity),
            ] {
                let drain = Duration::from_secs_f64(capacity as f64 / ca.expected_sign_rate);
                if drain > lane.default_deadline {
                    let which =
                        if std::ptr::eq(lane, &config.lanes.interactive) { "interactive" } else { "background" };
                    p.add(
                        format!("{at}.queue.{which}_capacity"),
                        format!(
                            "{capacity} queued requests take {:.1}s to sign at {} per second, longer than the {which} lane's {}s deadline; lower the capacity or raise expected_sign_rate",
                            drain.as_secs_f64(),
                            ca.expected_sign_rate,
                            lane.default_deadline.as_secs_f64()
                        ),
                    );
                }
            }
        }
        if !(1..=1024).contains(&ca.crl_shards) {
            p.add(format!("{at}.crl_shards"), "must be between 1 and 1024");
        }
        if let Some(url) = &ca.base_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) || url.ends_with('/') || !url.is_ascii() {
                p.add(
                    format!("{at}.base_url"),
                    format!("{url:?} is not an http:// or https:// URL without a trailing slash"),
                );
            }
        }
        match (&ca.key_file, &ca.key) {
            (Some(_), Some(_)) => p.add(format!("{at}.key"), "give key_file or [cas.key] pkcs11, not both"),
            (None, None) => p.add(format!("{at}.key_file"), "no key: give key_file or [cas.key] pkcs11"),
            _ => {}
        }
        if let Some(token) = ca.key.as_ref().map(|k| &k.pkcs11) {
            if token.pin.is_some() && config.mode != Mode::Dev {
                p.add(
                    format!("{at}.key.pkcs11.pin"),
                    "an inline PIN is refused unless mode = \"dev\": use pin_file or pin_env",
                );
            }
            if [token.pin.is_some(), token.pin_file.is_some(), token.pin_env.is_some()].iter().filter(|x| **x).count()
                > 1
            {
                p.add(format!("{at}.key.pkcs11"), "give one of pin_file, pin_env and pin");
            }
        }
        let key_in_dev_dir = ca.key_file.as_ref().is_some_and(|f| f.components().any(|c| c.as_os_str() == "keys-dev"));
        if key_in_dev_dir && config.mode != Mode::Dev {
            p.add(
                format!("{at}.key_file"),
                "keys from keys-dev/ are development keys and are refused unless mode = \"dev\"",
            );
        }
        match CaMaterial::load(ca) {
            Ok(material) => {
                if !allowed_in_mode(&material, config.mode) {
                    p.add(
                        format!("{at}.cert_file"),
                        "this CA chains to the development root, refused unless mode = \"dev\"",
                    );
                }
                if let Some(e) = &material.key_error {
                    let field = format!("{at}.{}", e.file().field());
                    if e.is_misconfiguration() {
                        p.add(field, e.to_string());
                    } else {
                        p.key_unavailable(field, e.to_string());
                    }
                }
                if ca.rsa_signature == RsaSignatureScheme::Pss && material.key_type != KeyType::Rsa {
                    p.add(
                        format!("{at}.rsa_signature"),
                        format!("\"pss\" is for RSA keys; this CA's key is {}", material.key_type.as_str()),
                    );
                }
                if material.not_after <= SystemTime::now() {
                    p.add(format!("{at}.cert_file"), "the CA certificate has expired");
                }
                loaded.insert(ca.id.clone(), material);
            }
            Err(e) => {
                let field = e.file().field();
                p.add(format!("{at}.{field}"), e.to_string());
            }
        }
    }
    loaded
}

fn check_profiles(config: &Config, cas: &HashMap<String, CaMaterial>, p: &mut Problems) {
    let mut seen = HashSet::new();
    let ca_ids: HashSet<&str> = config.cas.iter().map(|c| c.id.as_str()).collect();
    for (i, profile) in config.profiles.iter().enumerate() {
        let at = format!("profiles[{i}]");
        if !valid_id(&profile.id) {
            p.add(format!("{at}.id"), format!("{:?} is not a valid id", profile.id));
        }
        if !seen.insert(profile.id.clone()) {
            p.add(format!("{at}.id"), format!("duplicate profile id {:?}", profile.id));
        }
        if !ca_ids.contains(profile.ca.as_str()) {
            p.add(format!("{at}.ca"), format!("no CA named {:?}", profile.ca));
        }
        if profile.validity.is_zero() {
            p.add(format!("{at}.validity"), "must be positive");
        }
        if let Some(ca) = cas.get(&profile.ca) {
            let expiry = SystemTime::now() + profile.validity;
            if expiry > ca.not_after {
                p.add(
                    format!("{at}.validity"),
                    format!("certificates issued now would outlive CA {:?}, which expires sooner", profile.ca),
                );
            }
        }
        if profile.key_usage.is_empty() {
            p.add(format!("{at}.key_usage"), "at least one key usage is required");
        }
        if profile.allowed_keys.is_empty() && profile.identity.is_none() {
            p.add(format!("{at}.allowed_keys"), "at least one key type is required");
        }
        for (j, oid) in profile.policies.iter().enumerate() {
            if oid.parse::<const_oid::ObjectIdentifier>().is_err() {
                p.add(format!("{at}.policies[{j}]"), format!("{oid:?} is not an object identifier"));
            }
        }
        if profile.min_rsa_bits < 2048 {
            p.add(format!("{at}.min_rsa_bits"), "RSA keys below 2048 bits are never accepted");
        }
        let n = &profile.names;
        if !n.dns && !n.ip && !n.email && profile.identity.is_none() {
            p.add(format!("{at}.names"), "the profile allows no name type (dns, ip, email)");
        }
        if n.max_names == 0 {
            p.add(format!("{at}.names.max_names"), "must be at least 1");
        }
        for (j, s) in n.dns_suffixes.iter().enumerate() {
            if !crate::pki::csr::is_valid_dns_name(s.trim_start_matches('.')) {
                p.add(format!("{at}.names.dns_suffixes[{j}]"), format!("{s:?} is not a DNS name"));
            }
        }
        if n.ip && n.ip_ranges.is_empty() {
            p.add(
                format!("{at}.names.ip_ranges"),
                "ip = true needs the address ranges it allows (CIDR, e.g. [\"192.0.2.0/24\"]); none are allowed by default",
            );
        }
        // Baseline Requirements 6.1.5: RSA and ECDSA keys only in TLS server certificates.
        let tls_server = profile.extended_key_usage.contains(&ExtendedKeyUsageName::ServerAuth);
        if tls_server && profile.allowed_keys.contains(&KeyType::Ed25519) {
            p.add(
                format!("{at}.allowed_keys"),
                "ed25519 keys are not allowed in TLS server certificates (Baseline Requirements 6.1.5: RSA and ECDSA only)",
            );
        }
    }
}

/// Identity profiles, and the key-encryption key every identity key is sealed under.
fn check_identities(config: &Config, p: &mut Problems) {
    use crate::pki::Lane;
    let mut any = false;
    for (i, profile) in config.profiles.iter().enumerate() {
        let Some(policy) = &profile.identity else { continue };
        any = true;
        let at = format!("profiles[{i}].identity");
        if profile.lane != Lane::Interactive {
            p.add(format!("profiles[{i}].lane"), "identity profiles are served on the interactive lane");
        }
        if policy.lifetime.is_zero() {
            p.add(format!("{at}.lifetime"), "must be positive");
        }
        if policy.lifetime > profile.validity {
            p.add(
                format!("{at}.lifetime"),
                "must not exceed the profile's validity: the key would outlive its certificate",
            );
        }
        if policy.max_uses == 0 {
            p.add(format!("{at}.max_uses"), "must be at least 1");
        }
        if policy.key_type == KeyType::Rsa {
            if !(2048..=8192).contains(&policy.rsa_bits) {
                p.add(format!("{at}.rsa_bits"), "must be between 2048 and 8192");
            }
            p.warn(
                format!("{at}.key_type"),
                format!(
                    "RSA-{} key generation takes from tens of milliseconds to seconds: once the {} pre-generated keys (identities.rsa_pool_size) are used, a burst can miss the interactive lane's {}s deadline; prefer ecdsa-p256",
                    policy.rsa_bits,
                    config.identities.rsa_pool_size,
                    config.lanes.interactive.default_deadline.as_secs_f64()
                ),
            );
        } else if policy.rsa_signature != RsaSignatureScheme::Pkcs1 {
            p.add(format!("{at}.rsa_signature"), "applies to RSA keys only");
        }
        if !policy.email_domains.is_empty() && !profile.names.email {
            p.add(format!("{at}.email_domains"), "set, but the profile does not allow email addresses (names.email)");
        }
        for (j, d) in policy.email_domains.iter().enumerate() {
            if !crate::pki::csr::is_valid_dns_name(d.trim_start_matches('.')) {
                p.add(format!("{at}.email_domains[{j}]"), format!("{d:?} is not a domain name"));
            }
        }
        for (j, o) in policy.organizations.iter().enumerate() {
            if o.trim().is_empty() || o.chars().count() > 64 || o.trim() != o {
                p.add(format!("{at}.organizations[{j}]"), "must be 1 to 64 characters, without surrounding spaces");
            }
        }
    }
    let cfg = &config.identities;
    let configured = cfg.kek_file.is_some() || cfg.kek_env.is_some();
    if any || configured {
        if let Err(e) = crate::pki::kek::Kek::load(cfg, config.mode) {
            let path = match (&cfg.kek_file, &cfg.kek_env) {
                (Some(_), None) => "identities.kek_file",
                (None, Some(_)) => "identities.kek_env",
                _ => "identities",
            };
            p.add(path, e.to_string());
        }
    }
    if cfg.signer_threads == 0 {
        p.add("identities.signer_threads", "must be at least 1");
    }
    if cfg.sweep_interval.is_zero() {
        p.add("identities.sweep_interval", "must be positive");
    }
    if cfg.fault.sign_latency.is_some() && config.mode != Mode::Dev {
        p.add("identities.fault", "fault injection is refused unless mode = \"dev\"");
    }
}

fn check_admin(config: &Config, p: &mut Problems) {
    let mut names = HashSet::new();
    for (i, token) in config.admin.tokens.iter().enumerate() {
        let hash = token.token_sha256.to_ascii_lowercase();
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            p.add(format!("admin.tokens[{i}].token_sha256"), "must be 64 hex digits (castellum hash-key prints it)");
        }
        if !names.insert(token.name.clone()) {
            p.add(format!("admin.tokens[{i}].name"), format!("duplicate admin name {:?}", token.name));
        }
    }
    if !config.admin.listen.is_empty() && config.admin.tokens.is_empty() {
        p.add("admin.tokens", "the admin listener is on but no admin token is configured");
    }
    if !config.admin.listen.is_empty() && config.admin.listen == config.http.listen {
        p.add("admin.listen", "must differ from http.listen: the admin console has a listener of its own");
    }
}

/// TLS files load (certificate, matching key, client CAs), and listeners off loopback speak
/// TLS in production: bearer keys and admin tokens must not cross a network in clear.
fn check_tls(config: &Config, p: &mut Problems) {
    let production = config.mode != Mode::Dev;
    let listeners = [
        ("http", "API", &config.http.listen, config.http.tls.as_ref()),
        ("admin", "admin", &config.admin.listen, config.admin.tls.as_ref()),
    ];
    for (at, what, listen, tls) in listeners {
        if listen.is_empty() {
            continue;
        }
        match tls {
            Some(files) => {
                if files.reload_interval.is_zero() {
                    p.add(format!("{at}.tls.reload_interval"), "must be positive");
                }
                if at == "admin" && files.client_ca.is_some() {
                    p.add(
                        "admin.tls.client_ca",
                        "admins authenticate by token; client certificates are for API clients",
                    );
                }
                if files.client_crl.is_some() && files.client_ca.is_none() {
                    p.add(
                        format!("{at}.tls.client_crl"),
                        "CRLs check client certificates, and none is asked for without client_ca",
                    );
                }
                if let Err(e) = crate::http::tls::check_files(files) {
                    p.add(format!("{at}.tls"), e.to_string());
                }
                if production && readable_by_others(&files.key) {
                    p.warn(format!("{at}.tls.key"), "the key file is readable by its group or other users (chmod 600)");
                }
            }
            None if production && !is_loopback(listen) => {
                let message = format!("the {what} listener {listen} is not on loopback and has no TLS: its bearer credentials would cross the network in clear");
                if at == "admin" {
                    p.add(format!("{at}.tls"), message);
                } else {
                    p.warn(
                        format!("{at}.tls"),
                        format!("{message} (unless a balancer on a private network terminates TLS)"),
                    );
                }
            }
            None => {}
        }
    }
}

/// Whether a file's permissions let anyone but its owner read it (group included).
fn readable_by_others(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0)
}

/// Whether every address `listen` can mean is a loopback address (`localhost` counts).
fn is_loopback(listen: &str) -> bool {
    use std::net::ToSocketAddrs as _;
    match listen.to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<_> = addrs.collect();
            !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback())
        }
        Err(_) => false,
    }
}

fn check_clients(config: &Config, p: &mut Problems) {
    let profiles: HashSet<&str> = config.profiles.iter().map(|x| x.id.as_str()).collect();
    let mut names = HashSet::new();
    let mut keys = HashSet::new();
    let mut certificate_names = HashSet::new();
    let mtls = config.http.tls.as_ref().and_then(|t| t.client_ca.as_ref());
    for (i, client) in config.clients.iter().enumerate() {
        let at = format!("clients[{i}]");
        if !names.insert(client.name.clone()) {
            p.add(format!("{at}.name"), format!("duplicate client name {:?}", client.name));
        }
        let hash = client.api_key_sha256.to_ascii_lowercase();
        if hash.is_empty() && !client.certificate_names.is_empty() {
            // Authenticated by its client certificate alone.
        } else if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            p.add(format!("{at}.api_key_sha256"), "must be 64 hex digits (castellum hash-key prints it)");
        } else if !keys.insert(hash) {
            p.add(format!("{at}.api_key_sha256"), "two clients share one API key");
        }
        if let Some(rate) = &client.rate {
            if rate.per_second == 0 || rate.burst == 0 {
                p.add(format!("{at}.rate"), "per_second and burst must be at least 1");
            }
        }
        for (j, profile) in client.profiles.iter().enumerate() {
            if !profiles.contains(profile.as_str()) {
                p.add(format!("{at}.profiles[{j}]"), format!("no profile named {profile:?}"));
            }
        }
        for (j, name) in client.certificate_names.iter().enumerate() {
            let at = format!("{at}.certificate_names[{j}]");
            if name.trim().is_empty() {
                p.add(at, "must not be empty");
            } else if !certificate_names.insert(crate::pki::names::certificate_name(name)) {
                p.add(at, format!("{name:?} authenticates two clients"));
            } else if mtls.is_none() {
                p.add(at, "no client certificate is asked for: set http.tls.client_ca");
            }
        }
        for (j, s) in client.names.dns_suffixes.iter().enumerate() {
            if !crate::pki::csr::is_valid_dns_name(s.trim_start_matches('.')) {
                p.add(format!("{at}.names.dns_suffixes[{j}]"), format!("{s:?} is not a DNS name"));
            }
        }
    }
}

/// A name that authenticates one client by its TLS client certificate must not be one another
/// client can have castellum certify for client authentication: it could then act as that
/// client. Judged over every profile with the clientAuth usage, whatever its CA (whether that CA
/// chains to `http.tls.client_ca` is not looked at: stricter, and simpler to reason about).
fn check_certificate_names_are_unobtainable(config: &Config, p: &mut Problems) {
    use crate::pki::names::{normalize_suffix, within_suffixes};
    let client_auth: Vec<_> = config
        .profiles
        .iter()
        .filter(|profile| profile.extended_key_usage.contains(&ExtendedKeyUsageName::ClientAuth) && profile.names.dns)
        .collect();
    for (i, owner) in config.clients.iter().enumerate() {
        for (j, name) in owner.certificate_names.iter().enumerate() {
            let name = name.to_ascii_lowercase();
            if name.contains("://") {
                continue; // castellum certifies no URI names
            }
            for other in config.clients.iter().filter(|c| c.name != owner.name) {
                let theirs: Vec<String> = other.names.dns_suffixes.iter().map(|s| normalize_suffix(s)).collect();
                let reachable = client_auth.iter().find(|profile| {
                    let suffixes: Vec<String> =
                        profile.names.dns_suffixes.iter().map(|s| normalize_suffix(s)).collect();
                    other.profiles.contains(&profile.id)
                        && (suffixes.is_empty() || within_suffixes(&name, &suffixes))
                        && (theirs.is_empty() || within_suffixes(&name, &theirs))
                });
                if let Some(profile) = reachable {
                    p.add(
                        format!("clients[{i}].certificate_names[{j}]"),
                        format!(
                            "client {:?} may obtain a client certificate for {name:?} (profile {:?}) and would act as {:?}: restrict its names ([clients.names] dns_suffixes)",
                            other.name, profile.id, owner.name
                        ),
                    );
                }
            }
        }
    }
}

fn check_database(config: &Config, p: &mut Problems) {
    let db = &config.database;
    let is_pg = db.is_postgres();
    let is_sqlite = !is_pg && !db.url.contains("://") || db.url.starts_with("sqlite://");
    if !is_pg && !is_sqlite {
        p.add("database.url", "unsupported scheme: use sqlite://PATH, a file path, or postgres://…");
    }
    if db.instances == 0 {
        p.add("database.instances", "must be at least 1");
    }
    if is_sqlite && db.instances > 1 {
        p.add("database.instances", "SQLite serves a single instance; use PostgreSQL for several");
    }
    let pools = &db.pools;
    let named = [
        ("issuance", &pools.issuance),
        ("control", &pools.control),
        ("status", &pools.status),
        ("admin", &pools.admin),
        ("audit", &pools.audit),
    ];
    for (name, pool) in named {
        check_pool(config, &format!("database.pools.{name}"), pool, p);
    }
    if is_pg {
        let budget = db.server_max_connections.saturating_sub(db.reserved_connections);
        let wanted = connections_needed(config, db.instances);
        if wanted > budget {
            p.add(
                "database.pools",
                format!(
                    "{} = {wanted}, more than server_max_connections {} − reserved_connections {} = {budget}",
                    pools_sum(config, db.instances),
                    db.server_max_connections,
                    db.reserved_connections
                ),
            );
        }
        if config.registry.listen && pools.control.max_size < 2 {
            p.add(
                "database.pools.control.max_size",
                "must be at least 2 on PostgreSQL: the registry's listener holds one connection",
            );
        }
        if db.statement_timeout >= config.shortest_deadline() {
            p.add("database.statement_timeout", "must be shorter than the shortest lane deadline");
        }
    }
}

/// Connections `instances` instances may hold at once: each one's pools, no more (the
/// registry's LISTEN connection is one of the control pool's, the audit writer has a pool of its
/// own, and the migration connection at start-up is closed before the pools open).
pub fn connections_needed(config: &Config, instances: u32) -> u32 {
    // Saturating: N comes from the command line, and a wrapped product would pass.
    instances.saturating_mul(config.database.pools.total_max())
}

fn pools_sum(config: &Config, instances: u32) -> String {
    let pools = &config.database.pools;
    format!(
        "{instances} instance(s) × {} connections (issuance {} + control {}, the registry's LISTEN among them, + status {} + admin {} + audit {})",
        pools.total_max(),
        pools.issuance.max_size,
        pools.control.max_size,
        pools.status.max_size,
        pools.admin.max_size,
        pools.audit.max_size,
    )
}

/// The connection budget against what the PostgreSQL server itself reports: its
/// `max_connections` less its reserved slots, and the role's and the database's own limits, less
/// `database.reserved_connections` left to other clients. A problem when the instances could
/// open more; a warning when the configuration's `server_max_connections` is not the server's.
/// Returns the problems and a line saying how the budget was reckoned.
pub fn check_server_budget(config: &Config, server: &ServerLimits) -> (Vec<ConfigProblem>, String) {
    let mut p = Problems(Vec::new());
    let db = &config.database;
    let wanted = connections_needed(config, db.instances);
    let open = server.open_to_roles();
    let mut limits = vec![(
        open.saturating_sub(db.reserved_connections),
        format!(
            "max_connections {} − superuser_reserved_connections {} − reserved_connections {} − database.reserved_connections {}",
            server.max_connections,
            server.superuser_reserved_connections,
            server.reserved_connections,
            db.reserved_connections
        ),
    )];
    if let Ok(role) = u32::try_from(server.role_limit) {
        limits.push((
            role.saturating_sub(db.reserved_connections),
            format!("the role's CONNECTION LIMIT {role} − database.reserved_connections {}", db.reserved_connections),
        ));
    }
    if let Ok(database) = u32::try_from(server.database_limit) {
        limits.push((
            database.saturating_sub(db.reserved_connections),
            format!(
                "the database's CONNECTION LIMIT {database} − database.reserved_connections {}",
                db.reserved_connections
            ),
        ));
    }
    let (budget, why) = limits.into_iter().min_by_key(|(n, _)| *n).unwrap_or_default();
    let line = format!(
        "{} = {wanted}, of {budget} the server allows ({why}, read from the server)",
        pools_sum(config, db.instances)
    );
    if wanted > budget {
        p.add(
            "database.pools",
            format!("{} = {wanted}, more than the server allows: {why} = {budget}", pools_sum(config, db.instances)),
        );
    }
    if u32::try_from(server.max_connections).ok() != Some(db.server_max_connections) {
        p.warn(
            "database.server_max_connections",
            format!(
                "is {}, the server's max_connections is {}: the server's is what counts",
                db.server_max_connections, server.max_connections
            ),
        );
    }
    (p.0, line)
}

fn check_pool(config: &Config, at: &str, pool: &PoolConfig, p: &mut Problems) {
    if pool.max_size == 0 {
        p.add(format!("{at}.max_size"), "must be at least 1");
    }
    if pool.min_idle.is_some_and(|m| m > pool.max_size) {
        p.add(format!("{at}.min_idle"), "must not exceed max_size");
    }
    let limit = config.shortest_deadline() / POOL_TIMEOUT_DEADLINE_FRACTION;
    if pool.connection_timeout > limit {
        p.add(
            format!("{at}.connection_timeout"),
            format!(
                "{}ms is not well below the shortest deadline ({}ms): at most a quarter of it ({}ms)",
                pool.connection_timeout.as_millis(),
                config.shortest_deadline().as_millis(),
                limit.as_millis()
            ),
        );
    }
    if pool.connection_timeout.is_zero() {
        p.add(format!("{at}.connection_timeout"), "must be positive");
    }
    if pool.max_lifetime.is_none() {
        p.add(format!("{at}.max_lifetime"), "set a max lifetime so connections are recycled");
    }
}

fn check_lanes(config: &Config, p: &mut Problems) {
    for (name, lane) in [("interactive", &config.lanes.interactive), ("background", &config.lanes.background)] {
        if lane.default_deadline.is_zero() {
            p.add(format!("lanes.{name}.default_deadline"), "must be positive");
        }
        if lane.default_deadline > lane.max_deadline {
            p.add(format!("lanes.{name}.default_deadline"), "must not exceed max_deadline");
        }
    }
    if config.async_requests.lease.is_zero() {
        p.add("async_requests.lease", "must be positive");
    }
    if config.http.max_body_bytes < 4096 {
        p.add("http.max_body_bytes", "must be at least 4096 bytes (a CSR does not fit otherwise)");
    }
    if config.http.body_timeout < Duration::from_millis(100) {
        p.add("http.body_timeout", "must be at least 100ms (a body that never comes is cut off after it)");
    }
    if config.http.connections_per_source == 0 {
        p.add("http.connections_per_source", "must be at least 1 (0 would refuse every request)");
    }
    if config.http.auth_failures.per_second == 0 || config.http.auth_failures.burst == 0 {
        p.add("http.auth_failures", "per_second and burst must be at least 1");
    }
}

fn check_store(config: &Config, p: &mut Problems) {
    if config.store.max_batch == 0 {
        p.add("store.max_batch", "must be at least 1");
    }
    if config.store.overlap_at == 0 {
        p.add("store.overlap_at", "must be at least 1 (1: a second batch as soon as a write waits)");
    }
}

fn check_crl(config: &Config, p: &mut Problems) {
    let crl = &config.crl;
    if crl.delay < Duration::from_millis(200) {
        p.add("crl.delay", "must be at least 200ms");
    }
    // Baseline Requirements 4.9.7: nextUpdate at most ten days after thisUpdate.
    if crl.validity < Duration::from_secs(60) || crl.validity > Duration::from_secs(10 * 86_400) {
        p.add("crl.validity", "must be at least 1 minute and at most ten days (Baseline Requirements 4.9.7)");
    }
    if crl.lease < Duration::from_secs(1) {
        p.add("crl.lease", "must be at least 1s");
    }
}

fn check_audit(config: &Config, p: &mut Problems) {
    let audit = &config.audit;
    for (name, every) in [
        ("audit.refusal_interval", audit.refusal_interval),
        ("audit.verify_interval", audit.verify_interval),
        ("admin.history_interval", config.admin.history_interval),
    ] {
        if every < Duration::from_millis(10) {
            p.add(name, "must be at least 10ms");
        }
    }
    if config.database.pools.audit.max_size != 1 {
        // The writer's rounds run one at a time, on one connection; a second would sit idle.
        p.add("database.pools.audit.max_size", "must be 1: the audit writer seals its chain on one connection");
    }
    if audit.max_pending == 0 {
        p.add("audit.max_pending", "must be at least 1");
    }
    if let Some(file) = &audit.checkpoint_file {
        // The head is appended there every interval: its folder must exist now, not at the first.
        let folder = file.parent().filter(|f| !f.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        if !folder.is_dir() {
            p.add("audit.checkpoint_file", format!("its folder {} does not exist", folder.display()));
        } else if file.is_dir() {
            p.add("audit.checkpoint_file", format!("{} is a folder, not a file", file.display()));
        }
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Can the pools sustain `rate` requests per second if each request holds a connection of the
/// issuance pool and one of the status pool for about `hold`? Little's law with 2× headroom:
/// a pool needs `rate × hold × 2` connections. (`castellum check-config --expected-rate`.)
pub fn check_capacity(config: &Config, rate: f64, hold: Duration) -> Vec<ConfigProblem> {
    let needed = (rate * hold.as_secs_f64() * 2.0).ceil() as u32;
    let mut p = Problems(Vec::new());
    if config.sabotaged(crate::config::Sabotage::BlindCheckConfig) {
        return p.0;
    }
    for (name, pool) in [("issuance", &config.database.pools.issuance), ("status", &config.database.pools.status)] {
        if pool.max_size < needed {
            p.add(
                format!("database.pools.{name}.max_size"),
                format!(
                    "{} connections are too few for {rate} requests per second holding a connection {} ms each: {needed} needed (rate × hold × 2 headroom)",
                    pool.max_size,
                    hold.as_millis()
                ),
            );
        }
    }
    p.0
}
