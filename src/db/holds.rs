//! Who holds which connection, for how long, right now. Every checkout is registered with the
//! span that took it; a scan (every half second) exports the longest current hold per pool and
//! reports — once, while it is still held — any hold past the threshold, naming its holder.
//! That is how a leak shows itself before the pool is exhausted (incident 001).

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::DbConn;

struct Hold {
    since: Instant,
    holder: String,
    reported: bool,
}

#[derive(Default)]
pub struct Holds {
    next_id: AtomicU64,
    current: Mutex<HashMap<u64, Hold>>,
}

/// A hold past the threshold, seen for the first time.
#[derive(Debug, Clone)]
pub struct LongHold {
    pub holder: String,
    pub held: Duration,
}

impl Holds {
    fn register(self: &Arc<Self>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let span = tracing::Span::current();
        let thread = std::thread::current();
        let holder = format!(
            "{} (thread {})",
            span.metadata().map(|m| m.name()).unwrap_or("no span"),
            thread.name().unwrap_or("unnamed")
        );
        self.lock().insert(id, Hold { since: Instant::now(), holder, reported: false });
        id
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Hold>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The longest current hold.
    pub fn longest(&self) -> Duration {
        let now = Instant::now();
        self.lock().values().map(|h| now.duration_since(h.since)).max().unwrap_or_default()
    }

    /// The longest current hold, and the holds newly past `threshold`.
    pub fn scan(&self, threshold: Duration) -> (Duration, Vec<LongHold>) {
        let now = Instant::now();
        let mut longest = Duration::ZERO;
        let mut long = Vec::new();
        for hold in self.lock().values_mut() {
            let held = now.duration_since(hold.since);
            longest = longest.max(held);
            if held > threshold && !hold.reported {
                hold.reported = true;
                long.push(LongHold { holder: hold.holder.clone(), held });
            }
        }
        (longest, long)
    }
}

/// A checked-out connection; the hold ends when it is dropped (returned to the pool).
pub struct Held {
    conn: DbConn,
    id: u64,
    holds: Arc<Holds>,
    exempt: std::sync::atomic::AtomicBool,
}

thread_local! {
    /// Set while an exempt connection goes back to its pool: r2d2 reports the check-in on the
    /// thread that drops it, right after [`Held`]'s own drop, and its long hold is no leak.
    static EXEMPT_CHECKIN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the connection being checked in on this thread was exempt (and forget it).
pub(super) fn checkin_is_exempt() -> bool {
    EXEMPT_CHECKIN.with(|flag| flag.replace(false))
}

impl Held {
    pub(super) fn new(conn: DbConn, holds: &Arc<Holds>) -> Held {
        Held { conn, id: holds.register(), holds: holds.clone(), exempt: Default::default() }
    }

    /// A connection held for good on purpose (the registry's listener): never reported.
    pub fn exempt_from_leak_reports(&self) {
        self.holds.lock().remove(&self.id);
        self.exempt.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Deref for Held {
    type Target = DbConn;
    fn deref(&self) -> &DbConn {
        &self.conn
    }
}

impl DerefMut for Held {
    fn deref_mut(&mut self) -> &mut DbConn {
        &mut self.conn
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.holds.lock().remove(&self.id);
        // The connection itself is dropped (checked in) just after this, on this thread.
        EXEMPT_CHECKIN.with(|flag| flag.set(*self.exempt.get_mut()));
    }
}
