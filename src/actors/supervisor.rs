//! The cell supervisor: notices a CA cell that has died (a panic in a cell's handler kills its
//! actor; its mailbox closes) and starts a fresh one in its place, at most `MAX_RESTARTS` per
//! `RESTART_WINDOW` per CA. Work the dead cell held is answered (its callers' channels close:
//! `503`) or, if asynchronous, taken up again by the resumer when its claim lapses. Other CAs'
//! cells are separate actors on separate threads and never notice.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::cell::{CaCell, CellParts, CellSlot};
use super::gauges::CellGauges;
use super::intake::Catalog;
use super::registry::{Registry, SharedSnapshot, Subscribe};
use super::signer::Faults;
use super::store::StoreHandle;
use crate::config::Config;
use crate::metrics::{self, Metrics};
use crate::states::CaState;

const CHECK_INTERVAL: Duration = Duration::from_millis(250);
const MAX_RESTARTS: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// Everything needed to start (or restart) one CA's cell.
#[derive(Clone)]
pub struct CellFactory {
    pub config: Arc<Config>,
    pub catalog: Arc<Catalog>,
    pub store: StoreHandle,
    pub metrics: Arc<Metrics>,
    pub instance: Arc<str>,
    pub snapshot: SharedSnapshot,
}

impl CellFactory {
    pub fn start(&self, ca: &str, gauges: Arc<CellGauges>) -> Option<(Addr<CaCell>, Arbiter)> {
        let cfg = self.config.cas.iter().find(|c| c.id == ca)?;
        let material = self.catalog.cas.get(ca)?;
        let parts = CellParts {
            ca: material.clone(),
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            instance: self.instance.clone(),
            faults: Faults {
                sign_latency: cfg.fault.sign_latency,
                key_stall: cfg.fault.key_stall,
                failure_rate: cfg.fault.failure_rate,
            },
            initial_state: self.snapshot.load().ca_state(ca).unwrap_or(CaState::Disabled),
            gauges,
            sabotage: self.config.sabotages(),
        };
        Some(CaCell::start(cfg, parts))
    }
}

pub struct CellSupervisor {
    pub factory: CellFactory,
    pub cells: Arc<HashMap<String, CellSlot>>,
    pub registry: Addr<Registry>,
    pub arbiters: Arc<Mutex<Vec<Arbiter>>>,
    restarts: HashMap<String, VecDeque<Instant>>,
}

impl CellSupervisor {
    pub fn new(
        factory: CellFactory,
        cells: Arc<HashMap<String, CellSlot>>,
        registry: Addr<Registry>,
        arbiters: Arc<Mutex<Vec<Arbiter>>>,
    ) -> CellSupervisor {
        CellSupervisor { factory, cells, registry, arbiters, restarts: HashMap::new() }
    }

    fn check(&mut self) {
        let now = Instant::now();
        for (ca, slot) in self.cells.iter() {
            if slot.addr.load().connected() {
                continue;
            }
            let history = self.restarts.entry(ca.clone()).or_default();
            while history.front().is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW) {
                history.pop_front();
            }
            if history.len() >= MAX_RESTARTS {
                // Restarting in a loop would hide the fault: leave it down, loudly; requests
                // for this CA get 503 until an operator acts (the other CAs are unaffected).
                if history.len() == MAX_RESTARTS {
                    tracing::error!(ca = %ca, "CA cell keeps dying: not restarting it again within the window");
                    history.push_back(now);
                }
                continue;
            }
            let Some((addr, arbiter)) = self.factory.start(ca, slot.gauges.clone()) else { continue };
            history.push_back(now);
            self.registry.do_send(Subscribe { key: ca.clone(), recipient: addr.clone().recipient() });
            slot.addr.store(Arc::new(addr));
            if let Ok(mut arbiters) = self.arbiters.lock() {
                arbiters.push(arbiter);
            }
            self.factory.metrics.cell_restarts.get_or_create(&metrics::ca(ca)).inc();
            tracing::warn!(ca = %ca, restarts_in_window = history.len(), "CA cell died and was replaced");
        }
    }
}

impl Actor for CellSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(CHECK_INTERVAL, |act, _| act.check());
    }
}
