//! A cell's two bounded queues. Interactive work goes first; when both wait, background work
//! still gets one dispatch in every [`BACKGROUND_SHARE`], so renewals are never starved by a
//! steady stream of interactive requests.

use std::collections::VecDeque;

use crate::pki::Lane;

/// Background work gets at least one dispatch in this many when both lanes wait.
pub const BACKGROUND_SHARE: u32 = 5;

pub struct Lanes<T> {
    interactive: VecDeque<T>,
    background: VecDeque<T>,
    interactive_capacity: usize,
    background_capacity: usize,
    /// Interactive items taken in a row while background work waited.
    interactive_streak: u32,
}

impl<T> Lanes<T> {
    pub fn new(interactive_capacity: usize, background_capacity: usize) -> Lanes<T> {
        Lanes {
            interactive: VecDeque::new(),
            background: VecDeque::new(),
            interactive_capacity,
            background_capacity,
            interactive_streak: 0,
        }
    }

    /// Queue `item` in `lane`, or hand it back if that lane is full.
    pub fn push(&mut self, lane: Lane, item: T) -> Result<(), T> {
        let (queue, capacity) = match lane {
            Lane::Interactive => (&mut self.interactive, self.interactive_capacity),
            Lane::Background => (&mut self.background, self.background_capacity),
        };
        if queue.len() >= capacity {
            return Err(item);
        }
        queue.push_back(item);
        Ok(())
    }

    /// The next item to run: interactive first, background at least once in every
    /// [`BACKGROUND_SHARE`] while both wait.
    pub fn take_next(&mut self) -> Option<T> {
        let take_background = !self.background.is_empty()
            && (self.interactive.is_empty() || self.interactive_streak + 1 >= BACKGROUND_SHARE);
        if take_background {
            self.interactive_streak = 0;
            return self.background.pop_front();
        }
        let item = self.interactive.pop_front();
        if item.is_some() && !self.background.is_empty() {
            self.interactive_streak += 1;
        }
        item
    }

    pub fn is_empty(&self) -> bool {
        self.interactive.is_empty() && self.background.is_empty()
    }

    /// Items waiting in each lane: (interactive, background).
    pub fn depths(&self) -> (usize, usize) {
        (self.interactive.len(), self.background.len())
    }

    /// The item that has waited longest in `lane`.
    pub fn oldest(&self, lane: Lane) -> Option<&T> {
        match lane {
            Lane::Interactive => self.interactive.front(),
            Lane::Background => self.background.front(),
        }
    }

    /// Everything waiting, interactive first, leaving both lanes empty.
    pub fn take_all(&mut self) -> Vec<T> {
        self.interactive.drain(..).chain(self.background.drain(..)).collect()
    }

    /// Keep only the items `keep` says to (in both lanes).
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        self.interactive.retain(&mut keep);
        self.background.retain(&mut keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_lane_is_bounded_on_its_own() {
        let mut lanes = Lanes::new(2, 1);
        assert_eq!(lanes.push(Lane::Interactive, 1), Ok(()));
        assert_eq!(lanes.push(Lane::Interactive, 2), Ok(()));
        assert_eq!(lanes.push(Lane::Interactive, 3), Err(3), "the interactive lane is full");
        assert_eq!(lanes.push(Lane::Background, 4), Ok(()), "the background lane is not");
        assert_eq!(lanes.push(Lane::Background, 5), Err(5));
        assert_eq!(lanes.depths(), (2, 1));
        assert_eq!(lanes.oldest(Lane::Interactive), Some(&1));
        assert_eq!(lanes.oldest(Lane::Background), Some(&4));
    }

    #[test]
    fn interactive_goes_first_and_background_gets_one_in_five() {
        let mut lanes = Lanes::new(100, 100);
        for i in 0..20 {
            lanes.push(Lane::Interactive, i).unwrap();
        }
        for b in 100..104 {
            lanes.push(Lane::Background, b).unwrap();
        }
        let order: Vec<i32> = std::iter::from_fn(|| lanes.take_next()).collect();
        assert_eq!(
            order,
            [0, 1, 2, 3, 100, 4, 5, 6, 7, 101, 8, 9, 10, 11, 102, 12, 13, 14, 15, 103, 16, 17, 18, 19],
            "four interactive, then one background, while both wait"
        );
        assert!(lanes.is_empty());
    }

    #[test]
    fn background_alone_runs_at_once_and_interactive_alone_keeps_no_debt() {
        let mut lanes = Lanes::new(100, 100);
        lanes.push(Lane::Background, 1).unwrap();
        assert_eq!(lanes.take_next(), Some(1));
        // Interactive work with nothing else waiting does not count towards the share...
        for i in 10..20 {
            lanes.push(Lane::Interactive, i).unwrap();
        }
        for _ in 0..10 {
            lanes.take_next();
        }
        // ...so background work arriving now waits its turn behind four interactive items.
        for i in 20..30 {
            lanes.push(Lane::Interactive, i).unwrap();
        }
        lanes.push(Lane::Background, 2).unwrap();
        let order: Vec<i32> = (0..5).filter_map(|_| lanes.take_next()).collect();
        assert_eq!(order, [20, 21, 22, 23, 2]);
    }

    #[test]
    fn take_all_and_retain_cover_both_lanes() {
        let mut lanes = Lanes::new(10, 10);
        for i in 0..4 {
            lanes.push(Lane::Interactive, i).unwrap();
            lanes.push(Lane::Background, 10 + i).unwrap();
        }
        lanes.retain(|i| i % 2 == 0);
        assert_eq!(lanes.depths(), (2, 2));
        assert_eq!(lanes.take_all(), [0, 2, 10, 12]);
        assert!(lanes.is_empty());
        assert_eq!(lanes.take_next(), None);
    }
}
