//! Accounting of a verbs transport's queues. Receives: one shared receive queue serves every
//! linked peer; each immediate consumes one posted receive, and the protocol never has more
//! than `RECV_DEPTH` immediates in flight from one peer, so `RECV_DEPTH x peers` receives
//! posted ahead mean no receiver-not-ready, provided receives are refilled before the credits
//! that let senders write again go back (refills come in batches below a watermark). Sends: a
//! queue of fixed depth; one write in `signal_every` asks for a completion (reaping it frees
//! every write before it), and a full queue is back-pressure until completions come back.

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecvQueue {
    depth: usize,
    posted: usize,
}

impl RecvQueue {
    /// A queue for `peers` linked peers that may each have `per_peer` immediates in flight.
    pub fn new(peers: usize, per_peer: usize) -> Self {
        Self {
            depth: peers * per_peer,
            posted: 0,
        }
    }

    /// At most `max` receives posted: a shared receive queue has a device limit (32767 on
    /// ConnectX). Past it, a burst from many peers at once meets receiver-not-ready, which the
    /// NIC retries without limit (`rnr_retry` 7): slower, never lost.
    pub fn capped(self, max: usize) -> Self {
        Self {
            depth: self.depth.min(max),
            ..self
        }
    }

    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Receives to post now: none while at least three quarters are posted (refills go in
    /// batches), else enough to fill the queue.
    pub fn refill(&mut self) -> usize {
        if self.posted * 4 >= self.depth * 3 {
            return 0;
        }
        let n = self.depth - self.posted;
        self.posted = self.depth;
        n
    }

    /// An immediate arrived: it consumed a posted receive. More arrivals than receives mean
    /// the flow control of the protocol above was broken (by `peer`).
    pub fn consumed(&mut self, peer: usize) -> Result<()> {
        self.posted = self.posted.checked_sub(1).ok_or_else(|| Error::Protocol {
            peer,
            detail: "an immediate beyond every posted receive".into(),
        })?;
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendQueue {
    depth: usize,
    signal_every: usize,
    /// Work request id of the next post, and of the oldest one not known to be done.
    next: u64,
    done: u64,
    /// Whether the newest post asks for a completion (else a flush adds one that does).
    tail_signaled: bool,
}

impl SendQueue {
    pub fn new(depth: usize, signal_every: usize) -> Self {
        Self {
            depth,
            signal_every: signal_every.clamp(1, depth),
            next: 0,
            done: 0,
            tail_signaled: true,
        }
    }

    /// Room for another write (else: reap completions first).
    pub fn has_room(&self) -> bool {
        ((self.next - self.done) as usize) < self.depth
    }

    /// Takes a slot for a write: its work request id and whether it asks for a completion
    /// (every `signal_every`-th; the one that fills the queue, so a full queue always ends in a
    /// completion that frees it; and any the caller marks `last`, the write before a flush,
    /// whose completion the flush waits for).
    pub fn post(&mut self, last: bool) -> Option<(u64, bool)> {
        if !self.has_room() {
            return None;
        }
        let id = self.next;
        self.next += 1;
        let outstanding = (self.next - self.done) as usize;
        let signaled =
            last || (id + 1) % self.signal_every as u64 == 0 || outstanding == self.depth;
        self.tail_signaled = signaled;
        Some((id, signaled))
    }

    /// Whether a flush must post a signaled write of its own: writes are outstanding and the
    /// newest asks for no completion, so nothing would ever say they are done.
    pub fn needs_fence(&self) -> bool {
        !self.drained() && !self.tail_signaled
    }

    /// A signaled completion for `wr_id`: it and every write before it have left.
    pub fn completed(&mut self, wr_id: u64) {
        self.done = self.done.max(wr_id + 1);
    }

    /// Whether every write posted so far is done (the contract's `flush`).
    pub fn drained(&self) -> bool {
        self.done == self.next
    }

    /// Writes posted but not yet known to be done.
    pub fn outstanding(&self) -> usize {
        (self.next - self.done) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receives_are_refilled_in_batches_and_never_overdrawn() {
        let mut q = RecvQueue::new(3, 1024);
        assert_eq!(q.refill(), 3072);
        for _ in 0..700 {
            q.consumed(1).unwrap();
        }
        assert_eq!(q.refill(), 0); // still above three quarters
        for _ in 0..100 {
            q.consumed(1).unwrap();
        }
        assert_eq!(q.refill(), 800);
        let mut big = RecvQueue::new(63, 1025).capped(16384);
        assert_eq!((big.depth(), big.refill()), (16384, 16384));
        let mut empty = RecvQueue::new(1, 1);
        let e = empty.consumed(4).unwrap_err();
        assert!(matches!(e, Error::Protocol { peer: 4, .. }), "{e}");
    }

    #[test]
    fn a_full_send_queue_always_ends_in_a_completion_that_frees_it() {
        let mut q = SendQueue::new(8, 4);
        let posts: Vec<(u64, bool)> = std::iter::from_fn(|| q.post(false)).collect();
        assert_eq!(posts.len(), 8);
        assert_eq!(
            posts
                .iter()
                .filter(|p| p.1)
                .map(|p| p.0)
                .collect::<Vec<_>>(),
            vec![3, 7]
        );
        assert!(!q.has_room() && q.post(false).is_none());
        q.completed(3);
        assert_eq!(q.outstanding(), 4);
        assert!(q.has_room() && !q.drained());
        q.completed(7);
        assert!(q.drained());
        // A depth that is no multiple of the signalling interval still signals its last slot.
        let mut odd = SendQueue::new(5, 4);
        let signaled: Vec<u64> = std::iter::from_fn(|| odd.post(false))
            .filter(|p| p.1)
            .map(|p| p.0)
            .collect();
        assert_eq!(signaled, vec![3, 4]);
        // The write before a flush asks for its completion, or the flush would never end.
        let mut q = SendQueue::new(8, 4);
        assert_eq!(q.post(false), Some((0, false)));
        assert!(q.needs_fence());
        assert_eq!(q.post(true), Some((1, true)));
        assert!(!q.needs_fence());
        q.completed(1);
        assert!(q.drained() && !q.needs_fence());
    }
}
