//! What the rest of the engine can ask of a cell.

use std::time::Duration;

use actix::prelude::*;
use tokio::sync::oneshot;

use super::status::CellStatus;
use crate::actors::job::Job;

/// A job for the cell's lanes.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Enqueue(pub Job);

/// Stop taking work and answer once everything queued and in flight is done.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain(pub oneshot::Sender<()>);

#[derive(Message)]
#[rtype(result = "CellStatus")]
pub struct GetStatus;

/// Fault injection (dev mode only): the cell's handler panics, killing the actor, so that its
/// supervisor's replacement can be seen working.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Crash;

/// Fault injection (dev mode only): the cell's thread blocks for this long, as a cell stuck in
/// a handler would, so that its mailbox fills and intake's `try_send` can be seen refusing.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Stall(pub Duration);

/// The operator says the signer is fixed: close the breaker now.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ResetBreaker;
