//! What the engine runs for disposable identities: a pool of fresh keys, the vault that signs
//! with sealed keys, and the sweeper that destroys expired ones.

use std::sync::Arc;

use actix::prelude::*;

use crate::actors::keypool::{KeyPool, KeySpec};
use crate::actors::sweeper::{IdentitySweeper, StopSweeping};
use crate::actors::vault::{IdentityVault, VaultHandle};
use crate::config::Config;
use crate::db::DbPool;
use crate::metrics::Metrics;
use crate::pki::kek::Kek;
use crate::pki::KeyType;

/// What the engine runs for identities (present when a KEK is configured).
pub(super) struct IdentityServices {
    pub(super) keys: KeyPool,
    pub(super) vault: VaultHandle,
    sweeper: Addr<IdentitySweeper>,
}

impl IdentityServices {
    /// Start the key pool (for the kinds of key identity profiles use), the vault and the sweeper.
    pub(super) fn start(
        config: &Config,
        kek: Kek,
        control: DbPool,
        instance: Arc<str>,
        metrics: Arc<Metrics>,
    ) -> IdentityServices {
        let kek = Arc::new(kek);
        let cfg = &config.identities;
        let mut wanted: Vec<(KeySpec, usize)> = Vec::new();
        for policy in config.profiles.iter().filter_map(|p| p.identity.as_ref()) {
            let spec = key_spec(policy.key_type, policy.rsa_bits);
            let target = if spec.key_type == KeyType::Rsa { cfg.rsa_pool_size } else { cfg.pool_size };
            if !wanted.iter().any(|(s, _)| *s == spec) {
                wanted.push((spec, target));
            }
        }
        let keys = KeyPool::start(kek.clone(), wanted, metrics.clone());
        let vault = VaultHandle::start(
            IdentityVault { kek, metrics: metrics.clone(), sign_latency: cfg.fault.sign_latency },
            cfg.signer_threads,
        );
        let sweeper = IdentitySweeper { control, instance, interval: cfg.sweep_interval, metrics, busy: false }.start();
        IdentityServices { keys, vault, sweeper }
    }

    /// For the admin console: the key stock per kind of key and the vault's queue.
    pub(super) fn status(&self) -> IdentitiesStatus {
        IdentitiesStatus {
            key_stock: self
                .keys
                .stock_levels()
                .into_iter()
                .map(|(key, stocked, target)| KeyStock { key, stocked, target })
                .collect(),
            vault_waiting: self.vault.waiting(),
        }
    }

    pub(super) fn stop(&self) {
        self.keys.stop();
        self.sweeper.do_send(StopSweeping);
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct IdentitiesStatus {
    pub key_stock: Vec<KeyStock>,
    /// Signatures waiting for a vault thread.
    pub vault_waiting: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyStock {
    pub key: String,
    pub stocked: usize,
    pub target: usize,
}

pub(super) fn key_spec(key_type: KeyType, rsa_bits: u32) -> KeySpec {
    KeySpec { key_type, rsa_bits: if key_type == KeyType::Rsa { rsa_bits } else { 0 } }
}
