//! The identity key pool: keys generated ahead of need, one small stock per key type that an
//! identity profile uses, each refilled by a thread of its own. A burst of identity creations
//! takes from the stock; when it is empty, keys are generated on the blocking pool under the
//! request's deadline. Key generation never runs on a CA's signer threads or on an event loop.
//!
//! Stocked keys are already sealed under the KEK (for the identity id they will carry), so no
//! plaintext private key waits in memory.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::error::EngineError;
use crate::metrics::Metrics;
use crate::pki::identity::{generate_sealed, SealedKey};
use crate::pki::kek::Kek;
use crate::pki::KeyType;

/// A kind of key: its type and, for RSA, its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeySpec {
    pub key_type: KeyType,
    pub rsa_bits: u32,
}

impl KeySpec {
    pub fn label(&self) -> String {
        match self.key_type {
            KeyType::Rsa => format!("rsa-{}", self.rsa_bits),
            other => other.as_str().to_string(),
        }
    }
}

struct Stock {
    target: usize,
    keys: Mutex<VecDeque<SealedKey>>,
    /// Wakes the refill thread when a key is taken.
    taken: Condvar,
}

struct Shared {
    kek: Arc<Kek>,
    stocks: HashMap<KeySpec, Stock>,
    stopped: AtomicBool,
    metrics: Arc<Metrics>,
    /// Bounds on-demand generation (an empty stock under a burst) to one key per core at a time;
    /// a permit lives as long as its generation, not as long as its caller waits.
    on_demand: Arc<tokio::sync::Semaphore>,
}

#[derive(Clone)]
pub struct KeyPool {
    shared: Arc<Shared>,
}

/// How long a refill thread sleeps before looking whether its pool is still wanted.
const IDLE_CHECK: Duration = Duration::from_millis(500);
/// How often a caller waiting for a generation slot looks whether the stock was refilled.
const STOCK_RECHECK: Duration = Duration::from_millis(5);

impl KeyPool {
    /// Start one refill thread per kind of key, each keeping `target` keys in stock.
    pub fn start(kek: Arc<Kek>, wanted: Vec<(KeySpec, usize)>, metrics: Arc<Metrics>) -> KeyPool {
        let stocks = wanted
            .iter()
            .map(|(spec, target)| {
                (*spec, Stock { target: *target, keys: Mutex::new(VecDeque::new()), taken: Condvar::new() })
            })
            .collect();
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let shared = Arc::new(Shared {
            kek,
            stocks,
            stopped: AtomicBool::new(false),
            metrics,
            on_demand: Arc::new(tokio::sync::Semaphore::new(cores)),
        });
        for (spec, target) in wanted {
            if target == 0 {
                continue;
            }
            let weak = Arc::downgrade(&shared);
            let spawned = std::thread::Builder::new()
                .name(format!("castellum-keygen-{}", spec.label()))
                .spawn(move || refill(weak, spec));
            if let Err(e) = spawned {
                tracing::error!(error = %e, key = %spec.label(), "cannot start a key refill thread; keys are generated on demand");
            }
        }
        KeyPool { shared }
    }

    /// A key for a new identity: from stock, or generated now if the stock is empty (within the
    /// request's deadline, at most one generation per core at a time).
    pub async fn take(&self, spec: KeySpec, deadline: Instant) -> Result<SealedKey, EngineError> {
        if let Some(key) = self.take_stocked(spec) {
            return Ok(key);
        }
        let too_late = || EngineError::DeadlineExceeded { retry_after: Duration::from_secs(1) };
        // Wait for a generation slot (keeping this caller's place in line), taking a stocked key
        // instead if one appears meanwhile.
        let acquire = self.shared.on_demand.clone().acquire_owned();
        tokio::pin!(acquire);
        let permit = loop {
            if Instant::now() >= deadline {
                return Err(too_late());
            }
            tokio::select! {
                permit = &mut acquire => break permit.map_err(|_| EngineError::ShuttingDown)?,
                _ = tokio::time::sleep(STOCK_RECHECK) => {
                    if let Some(key) = self.take_stocked(spec) {
                        return Ok(key);
                    }
                }
            }
        };
        if let Some(key) = self.take_stocked(spec) {
            return Ok(key);
        }
        self.count(spec, "on-demand");
        let (tx, rx) = tokio::sync::oneshot::channel();
        let pool = self.clone();
        actix_web::rt::task::spawn_blocking(move || {
            let key = generate_sealed(spec.key_type, spec.rsa_bits, &pool.shared.kek);
            drop(permit);
            // Finished after its caller gave up: the key is not wasted.
            if let Err(Ok(key)) = tx.send(key) {
                pool.give_back(spec, key);
            }
        });
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(key)) => key,
            Ok(Err(_)) => Err(EngineError::Internal("key generation task ended without a key".into())),
            Err(_) => Err(too_late()),
        }
    }

    /// Return a key that was taken but never used (an idempotent replay, a caller that gave up).
    pub fn give_back(&self, spec: KeySpec, key: SealedKey) {
        if let Some(stock) = self.shared.stocks.get(&spec) {
            let mut keys = stock.keys.lock().unwrap_or_else(|e| e.into_inner());
            if keys.len() < stock.target {
                keys.push_back(key);
            }
            self.gauge(spec, keys.len());
        }
    }

    /// A key from stock, counted as such.
    fn take_stocked(&self, spec: KeySpec) -> Option<SealedKey> {
        let key = self.pop(spec)?;
        self.count(spec, "pool");
        Some(key)
    }

    fn pop(&self, spec: KeySpec) -> Option<SealedKey> {
        let stock = self.shared.stocks.get(&spec)?;
        let key = {
            let mut keys = stock.keys.lock().unwrap_or_else(|e| e.into_inner());
            let key = keys.pop_front();
            self.gauge(spec, keys.len());
            key
        };
        stock.taken.notify_one();
        key
    }

    fn gauge(&self, spec: KeySpec, stocked: usize) {
        // One statement: the family's guard must not outlive it (it blocks other labels).
        self.shared.metrics.identity_key_pool.get_or_create(&vec![("key", spec.label())]).set(stocked as i64);
    }

    /// Each kind of key: (label, keys in stock now, stock kept), for the admin console.
    pub fn stock_levels(&self) -> Vec<(String, usize, usize)> {
        let mut levels: Vec<_> = self
            .shared
            .stocks
            .iter()
            .map(|(spec, stock)| {
                (spec.label(), stock.keys.lock().unwrap_or_else(|e| e.into_inner()).len(), stock.target)
            })
            .collect();
        levels.sort();
        levels
    }

    /// Stop the refill threads (they exit within [`IDLE_CHECK`]).
    pub fn stop(&self) {
        self.shared.stopped.store(true, Ordering::Relaxed);
        self.shared.on_demand.close();
        for stock in self.shared.stocks.values() {
            stock.taken.notify_all();
        }
    }

    fn count(&self, spec: KeySpec, source: &'static str) {
        let labels = vec![("key", spec.label()), ("source", source.to_string())];
        self.shared.metrics.identity_keys.get_or_create(&labels).inc();
    }
}

/// Keep one stock full until the pool is stopped or dropped.
fn refill(weak: Weak<Shared>, spec: KeySpec) {
    loop {
        let Some(shared) = weak.upgrade() else { return };
        if shared.stopped.load(Ordering::Relaxed) {
            return;
        }
        let Some(stock) = shared.stocks.get(&spec) else { return };
        {
            // Look and wait under one guard, so a take between the two is never missed.
            let keys = stock.keys.lock().unwrap_or_else(|e| e.into_inner());
            if keys.len() >= stock.target {
                drop(stock.taken.wait_timeout(keys, IDLE_CHECK));
                continue;
            }
        }
        match generate_sealed(spec.key_type, spec.rsa_bits, &shared.kek) {
            Ok(key) => KeyPool { shared: shared.clone() }.give_back(spec, key),
            Err(e) => {
                tracing::error!(error = %e, key = %spec.label(), "identity key generation failed");
                std::thread::sleep(IDLE_CHECK);
            }
        }
    }
}
