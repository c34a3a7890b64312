//! The identity sweeper: destroys identities past their expiry (key deleted at rest, audited),
//! whether or not anyone tries to use them again. Runs on the control pool, a bounded batch at a
//! time; every instance sweeps, and the conditional update makes concurrent sweeps harmless.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::db::{identities, DbPool};
use crate::metrics::Metrics;
use crate::pki::now_ms;

/// Most identities destroyed in one transaction.
const BATCH: i64 = 500;

pub struct IdentitySweeper {
    pub control: DbPool,
    pub instance: Arc<str>,
    pub interval: Duration,
    pub metrics: Arc<Metrics>,
    pub busy: bool,
}

impl Actor for IdentitySweeper {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.interval, |act, ctx| act.sweep(ctx));
    }
}

/// The engine is shutting down.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopSweeping;

impl Handler<StopSweeping> for IdentitySweeper {
    type Result = ();

    fn handle(&mut self, _: StopSweeping, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl IdentitySweeper {
    fn sweep(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        self.busy = true;
        let (pool, instance) = (self.control.clone(), self.instance.clone());
        let work = actix_web::rt::task::spawn_blocking(move || {
            let mut conn = pool.get()?;
            identities::destroy_expired(&mut conn, now_ms(), &instance, BATCH)
        });
        ctx.spawn(work.into_actor(self).map(|result, act, _| {
            act.busy = false;
            act.metrics.identity_sweeps.inc();
            match result {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => {
                    act.metrics
                        .identities_destroyed
                        .get_or_create(&vec![("reason", "expired".to_string())])
                        .inc_by(n as u64);
                    tracing::info!(destroyed = n, "expired identities destroyed");
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "identity sweep failed; retried next interval"),
                Err(e) => tracing::warn!(error = %e, "identity sweep task failed"),
            }
        }));
    }
}
