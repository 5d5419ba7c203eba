//! Rank masking for shrink mode (DeepEP's `enable_shrink`): ranks this endpoint no longer
//! sends to or waits for, so that the survivors of a failed rank keep running.
//!
//! A rank is masked by the caller (`low_latency_update_mask_buffer`) or by an operation that
//! waited for the rank's metadata past the deadline, or saw it leave before it sent any.
//! Masking happens only before data moves (see `protocol::op`), so an operation either runs
//! with a peer or without it, never with half of what it sent. Only worlds in which every
//! rank is linked to every other (one rank per node, as a low-latency buffer's) can mask:
//! there no rank forwards for another, so a masked rank takes nothing but its own traffic
//! with it.

use std::sync::atomic::{AtomicBool, Ordering};

/// One flag per rank, shared by an endpoint's channels and read from any thread.
#[derive(Debug)]
pub struct RankMask {
    masked: Vec<AtomicBool>,
}

impl RankMask {
    pub fn new(world_size: usize) -> Self {
        Self {
            masked: (0..world_size).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    pub fn world_size(&self) -> usize {
        self.masked.len()
    }

    pub fn is_masked(&self, rank: usize) -> bool {
        self.masked
            .get(rank)
            .is_some_and(|m| m.load(Ordering::Acquire))
    }

    /// Masks (`true`) or unmasks `rank`; out-of-range ranks are the caller's to refuse.
    pub fn set(&self, rank: usize, masked: bool) {
        if let Some(m) = self.masked.get(rank) {
            m.store(masked, Ordering::Release);
        }
    }

    /// Unmasks every rank.
    pub fn clear(&self) {
        for m in &self.masked {
            m.store(false, Ordering::Release);
        }
    }

    /// The flags now, by rank.
    pub fn snapshot(&self) -> Vec<bool> {
        self.masked
            .iter()
            .map(|m| m.load(Ordering::Acquire))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_and_clears_by_rank() {
        let m = RankMask::new(4);
        m.set(2, true);
        m.set(9, true); // out of range: ignored
        assert_eq!(m.snapshot(), [false, false, true, false]);
        assert!(m.is_masked(2) && !m.is_masked(9));
        m.set(2, false);
        m.set(0, true);
        assert_eq!(m.snapshot(), [true, false, false, false]);
        m.clear();
        assert_eq!(m.snapshot(), [false; 4]);
    }
}
