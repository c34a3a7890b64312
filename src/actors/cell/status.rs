//! A cell's state as the admin console and `/v1/admin/cells` show it.

use actix::prelude::*;

use crate::states::CaState;

/// Whether the cell runs, and if it does, what its CA is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CellState {
    /// The cell runs; its CA is in this state.
    Running(CaState),
    /// The cell died and its supervisor has not (or will no longer) replace it.
    Down,
}

impl CellState {
    pub fn as_str(self) -> &'static str {
        match self {
            CellState::Running(state) => state.as_str(),
            CellState::Down => "down",
        }
    }
}

/// Shown as the CA state's own name, or `down`.
impl serde::Serialize for CellState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[derive(Debug, Clone, serde::Serialize, MessageResponse)]
pub struct CellStatus {
    pub ca: String,
    pub state: CellState,
    pub breaker: String,
    pub key_available: bool,
    /// Why the key cannot sign (a file gone, a token lost), when it cannot.
    pub key_unavailable: Option<String>,
    pub interactive_queued: usize,
    pub background_queued: usize,
    /// Age of the oldest job waiting in each lane (ms).
    pub interactive_oldest_ms: u64,
    pub background_oldest_ms: u64,
    pub in_flight: usize,
    pub draining: bool,
    /// The breaker's latest transitions: (epoch ms, new state).
    pub breaker_transitions: Vec<(i64, String)>,
    pub signatures: u64,
    /// Mean signing time since start (µs).
    pub mean_sign_us: u64,
    /// Filled in by the engine: parked requests of this CA, restarts of its cell, and its
    /// recent history (oldest first).
    pub parked: Option<i64>,
    pub restarts: u64,
    pub history: Vec<crate::actors::history::Point>,
}

impl CellStatus {
    /// A CA whose cell is not running: it died, and its supervisor has not (or will no longer)
    /// replace it.
    pub fn down(ca: &str) -> CellStatus {
        CellStatus {
            ca: ca.to_string(),
            state: CellState::Down,
            breaker: "unknown".into(),
            key_available: false,
            key_unavailable: None,
            interactive_queued: 0,
            background_queued: 0,
            interactive_oldest_ms: 0,
            background_oldest_ms: 0,
            in_flight: 0,
            draining: false,
            breaker_transitions: Vec::new(),
            signatures: 0,
            mean_sign_us: 0,
            parked: None,
            restarts: 0,
            history: Vec::new(),
        }
    }
}
