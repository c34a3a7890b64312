//! Identical background work done once: while a job for a key is queued or running, later
//! requests for the same key attach to it as followers instead of adding work, and are answered
//! with its result when it ends — each exactly once.

use std::collections::HashMap;
use std::hash::Hash;

pub struct Coalescer<K, F> {
    /// Keys with a job queued or running, and the requests attached to it.
    leaders: HashMap<K, Vec<F>>,
}

impl<K: Hash + Eq, F> Default for Coalescer<K, F> {
    fn default() -> Self {
        Coalescer { leaders: HashMap::new() }
    }
}

impl<K: Hash + Eq, F> Coalescer<K, F> {
    /// Attach `follower` to the job running for `key`; handed back if there is none.
    pub fn attach(&mut self, key: &K, follower: F) -> Result<(), F> {
        match self.leaders.get_mut(key) {
            Some(followers) => {
                followers.push(follower);
                Ok(())
            }
            None => Err(follower),
        }
    }

    /// A job for `key` is queued: later requests for it attach to it.
    pub fn lead(&mut self, key: K) {
        self.leaders.entry(key).or_default();
    }

    /// The job for `key` has ended: its followers, to answer. Later requests start a new job.
    pub fn release(&mut self, key: &K) -> Vec<F> {
        self.leaders.remove(key).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn followers_attach_to_a_leader_and_are_released_once() {
        let mut c: Coalescer<&str, u32> = Coalescer::default();
        assert_eq!(c.attach(&"renewal", 1), Err(1), "no job to attach to");
        c.lead("renewal");
        assert_eq!(c.attach(&"renewal", 2), Ok(()));
        assert_eq!(c.attach(&"renewal", 3), Ok(()));
        assert_eq!(c.attach(&"other", 4), Err(4), "another key is other work");
        assert_eq!(c.release(&"renewal"), [2, 3]);
        assert_eq!(c.release(&"renewal"), Vec::<u32>::new(), "released once");
        assert_eq!(c.attach(&"renewal", 5), Err(5), "after the job ended, a new request is new work");
    }

    #[test]
    fn leading_again_keeps_the_followers_already_attached() {
        let mut c: Coalescer<u8, u8> = Coalescer::default();
        c.lead(1);
        c.attach(&1, 10).unwrap();
        c.lead(1);
        assert_eq!(c.release(&1), [10]);
    }
}
