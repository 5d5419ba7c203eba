//! The forwarder role: tokens this rank's twins sent over rdma for its node, passed on over
//! nvl to the ranks in each token's local-rank mask (and kept, where this rank is one), as
//! far as their rings have room. What was forwarded is logged for combine, which reduces
//! those tokens here on the way back.

use super::Forwarded;
use super::checks::Checked;
use super::receiver::Receiver;
use crate::error::{Error, Result};
use crate::protocol::op::Op;
use crate::protocol::record::{Header, SourceOrder};
use crate::topology::{LocalMask, Topology};
use crate::transport::{Sge, Tier, TierCounters};

pub(super) struct Forwarder {
    topo: Topology,
    me: usize,
    twins: Vec<usize>,
    /// Each twin's tokens arrive in increasing index order, below its token count.
    order: SourceOrder,
    log: Vec<Forwarded>,
    /// Per twin (by rank) and local rank: tokens forwarded so far, against what the twin
    /// announced (its masks must agree with its counts, or the error would surface at a
    /// third rank, blaming this one).
    forwarded_to: Vec<Vec<u64>>,
}

impl Forwarder {
    pub fn new(topo: &Topology, me: usize) -> Self {
        let twins = (0..topo.num_nodes())
            .filter(|&n| n != topo.node_of(me))
            .map(|n| topo.forwarder(me, n))
            .collect();
        Self {
            topo: *topo,
            me,
            twins,
            order: SourceOrder::new(vec![0; topo.world_size()]),
            log: Vec::new(),
            forwarded_to: vec![vec![0; topo.ranks_per_node()]; topo.world_size()],
        }
    }

    /// Once token counts are known (every source's count bounds its token indices).
    pub fn start(&mut self, src_tokens: Vec<u64>) {
        self.order = SourceOrder::new(src_tokens);
    }

    /// Forwards what the twins' rings hold; returns whether anything moved.
    pub fn forward(
        &mut self,
        op: &mut Op<'_>,
        r: &mut Receiver<'_>,
        c: &Checked<'_>,
        payload: &TierCounters,
    ) -> Result<bool> {
        let mut progress = false;
        for i in 0..self.twins.len() {
            progress |= self.forward_from(op, self.twins[i], r, c, payload)?;
        }
        Ok(progress)
    }

    /// Whether every twin's tokens have been passed on (each exactly as it announced).
    pub fn done(&self, op: &Op<'_>) -> Result<bool> {
        let done = self.twins.iter().all(|&p| {
            let ring = op.recv[p].as_ref().expect("twin ring");
            ring.expected() == Some(ring.consumed())
        });
        if done {
            for &p in &self.twins {
                let announced = op.twin_counts(p);
                if let Some(l) =
                    (0..announced.len()).find(|&l| self.forwarded_to[p][l] != announced[l])
                {
                    return Err(Error::protocol(
                        p,
                        format!(
                            "sent {} tokens for local rank {l} of node {}, {} were announced",
                            self.forwarded_to[p][l],
                            self.topo.node_of(self.me),
                            announced[l]
                        ),
                    ));
                }
            }
        }
        Ok(done)
    }

    /// The tokens forwarded, sorted by (source, index), for combine.
    pub fn into_log(mut self) -> Vec<Forwarded> {
        self.log.sort_unstable_by_key(|f| (f.src, f.idx));
        self.log
    }

    /// Takes the records at the head of twin `p`'s ring, each whole or not at all.
    fn forward_from(
        &mut self,
        op: &mut Op<'_>,
        p: usize,
        r: &mut Receiver<'_>,
        c: &Checked<'_>,
        payload: &TierCounters,
    ) -> Result<bool> {
        let (t, epoch, topo, me) = (op.t, op.epoch, self.topo, self.me);
        let rpn = topo.ranks_per_node();
        let my_node = topo.node_of(me);
        let ring = op.recv[p].as_ref().expect("twin ring");
        let avail = ring.available();
        let mut room: Vec<u64> = (0..rpn)
            .map(|l| {
                let d = topo.rank_at(my_node, l);
                if d == me {
                    u64::MAX
                } else {
                    op.send[d].as_ref().expect("local ring").free()
                }
            })
            .collect();
        let mut batches: Vec<Vec<Sge>> = vec![Vec::new(); rpn];
        let mut taken = 0;
        let valid_mask = LocalMask::MAX >> (LocalMask::BITS as usize - rpn);
        for i in 0..avail {
            let rec = ring.record(t, i)?;
            let h = Header::decode(rec);
            if h.src_rank as usize != p || h.mask == 0 || h.mask & !valid_mask != 0 {
                return Err(Error::protocol(
                    p,
                    format!(
                        "record claims source {} and local-rank mask {:#x}; expected source {p} \
                         and a non-empty mask below {rpn} ranks",
                        h.src_rank, h.mask
                    ),
                ));
            }
            let targets = (0..rpn).filter(|l| h.mask & (1 << l) != 0);
            if targets.clone().any(|l| room[l] == 0) {
                break;
            }
            self.order.accept(p, &h)?;
            let announced = op.twin_counts(p);
            for l in targets.clone() {
                self.forwarded_to[p][l] += 1;
                if self.forwarded_to[p][l] > announced[l] {
                    return Err(Error::protocol(
                        p,
                        format!(
                            "sent more tokens for local rank {l} of node {my_node} than the {} \
                             it announced",
                            announced[l]
                        ),
                    ));
                }
            }
            for l in targets {
                if topo.rank_at(my_node, l) == me {
                    r.deliver(p, &h, &c.layout.split(rec))?;
                } else {
                    // Sent on from where it landed (this rank's registered ring).
                    batches[l].push(ring.record_source(i));
                    room[l] -= 1;
                }
            }
            self.log.push(Forwarded {
                src: h.src_rank,
                idx: h.src_idx,
                mask: h.mask,
            });
            taken += 1;
        }
        for (l, batch) in batches.iter().enumerate().filter(|(_, b)| !b.is_empty()) {
            let d = topo.rank_at(my_node, l);
            op.send_ring(d).post(t, epoch, batch, 1)?;
            payload.add(Tier::Nvl, batch.len() * c.tokens.payload_bytes());
        }
        op.recv_ring(p).consume(taken);
        Ok(taken > 0)
    }
}
