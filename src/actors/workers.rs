//! Threads of their own for blocking, CPU-bound work (a CA's signatures, the identity vault's):
//! named threads that take jobs from one bounded queue, which anyone holding the handle puts into.
//!
//! Not an actix `SyncArbiter`: it routes every message through an actor on the arbiter that
//! started it (the system arbiter, shared by every CA: one more thread to wake per job), and its
//! queue has no bound.

use crossbeam_channel::TrySendError;

/// Where jobs of type `J` are put; the threads stop once every handle is gone and the queue is
/// empty.
pub struct Workers<J> {
    queue: crossbeam_channel::Sender<J>,
}

impl<J> Clone for Workers<J> {
    fn clone(&self) -> Self {
        Workers { queue: self.queue.clone() }
    }
}

/// Why a job was not queued; the job comes back to be answered.
pub enum Refused<J> {
    /// `capacity` jobs already wait.
    Full(J),
    /// Every thread is gone (they only stop when the handles are dropped).
    Gone(J),
}

impl<J: Send + 'static> Workers<J> {
    /// Start `threads` threads named `{name}-{i}`, each running `work` on the jobs it takes; at
    /// most `capacity` jobs wait.
    pub fn start(name: &str, threads: usize, capacity: usize, work: impl Fn(J) + Send + Sync + 'static) -> Workers<J> {
        let (queue, taken) = crossbeam_channel::bounded::<J>(capacity.max(1));
        let work = std::sync::Arc::new(work);
        for i in 0..threads.max(1) {
            let (work, taken) = (work.clone(), taken.clone());
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || taken.iter().for_each(|job| work(job)))
                // Started with the engine, or with a cell the supervisor replaces; a system that
                // cannot start a thread fails there, as `Arbiter::new` does.
                .expect("a worker thread");
        }
        Workers { queue }
    }

    /// Queue a job without waiting: a full queue is refused at once.
    pub fn try_send(&self, job: J) -> Result<(), Refused<J>> {
        self.queue.try_send(job).map_err(|e| match e {
            TrySendError::Full(job) => Refused::Full(job),
            TrySendError::Disconnected(job) => Refused::Gone(job),
        })
    }

    /// Jobs waiting for a thread.
    pub fn waiting(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn jobs_run_on_the_named_threads_and_a_full_queue_refuses() {
        let (done, finished) = mpsc::channel::<String>();
        let (taken, holding) = mpsc::channel::<()>();
        let (release, gate) = crossbeam_channel::bounded::<()>(0);
        let workers = Workers::start("castellum-test-worker", 1, 2, move |job: u32| {
            if job == 0 {
                // Hold the only thread until the test lets go.
                let _ = taken.send(());
                let _ = gate.recv();
            }
            let _ = done.send(format!("{job} on {}", std::thread::current().name().unwrap_or("?")));
        });
        assert!(workers.try_send(0).is_ok());
        // Once the thread holds job 0, two may wait and the third is refused.
        holding.recv_timeout(Duration::from_secs(5)).expect("the thread takes job 0");
        assert!(workers.try_send(1).is_ok() && workers.try_send(2).is_ok());
        assert_eq!(workers.waiting(), 2);
        assert!(matches!(workers.try_send(3), Err(Refused::Full(3))));
        release.send(()).unwrap();
        let ran: Vec<String> = (0..3).map(|_| finished.recv_timeout(Duration::from_secs(5)).unwrap()).collect();
        assert_eq!(
            ran,
            ["0 on castellum-test-worker-0", "1 on castellum-test-worker-0", "2 on castellum-test-worker-0"]
        );
    }
}
