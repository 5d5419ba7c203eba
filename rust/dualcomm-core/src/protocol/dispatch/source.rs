//! The source role: this rank's own tokens, each posted once per destination node (to the
//! twin that forwards there) and straight to the ranks of its own node that need it, as
//! ring credits allow.

use super::checks::Checked;
use crate::error::Result;
use crate::protocol::op::Op;
use crate::protocol::record::{HEADER_BYTES, Header};
use crate::routing::SendPlan;
use crate::topology::Topology;
use crate::transport::{Tier, TierCounters};

/// This rank's tokens for one linked peer.
struct Outbox {
    peer: usize,
    tier: Tier,
    tokens: Vec<u32>,
    sent: usize,
}

pub(super) struct Source {
    me: usize,
    topo: Topology,
    outboxes: Vec<Outbox>,
}

impl Source {
    pub fn new(topo: &Topology, me: usize, plan: &SendPlan) -> Self {
        let (nn, rpn, my_node) = (topo.num_nodes(), topo.ranks_per_node(), topo.node_of(me));
        let mut outboxes = Vec::new();
        for n in (0..nn).filter(|&n| n != my_node) {
            outboxes.push(Outbox {
                peer: topo.forwarder(me, n),
                tier: Tier::Rdma,
                tokens: plan.tokens_to_node(n).map(|t| t as u32).collect(),
                sent: 0,
            });
        }
        for l in (0..rpn).filter(|&l| l != topo.local_of(me)) {
            let d = topo.rank_at(my_node, l);
            outboxes.push(Outbox {
                peer: d,
                tier: Tier::Nvl,
                tokens: plan.tokens_to_rank(d).map(|t| t as u32).collect(),
                sent: 0,
            });
        }
        Self {
            me,
            topo: *topo,
            outboxes,
        }
    }

    /// Posts what fits into each peer's ring; returns whether anything was posted. A ring to a
    /// twin closes once its tokens are out; a ring inside the node also carries forwarded
    /// tokens, so it closes only in `close_nvl`.
    pub fn post(
        &mut self,
        op: &mut Op<'_>,
        c: &Checked<'_>,
        payload: &TierCounters,
    ) -> Result<bool> {
        let (t, epoch, topo, me) = (op.t, op.epoch, self.topo, self.me);
        let mut progress = false;
        for ob in &mut self.outboxes {
            let ring = op.send_ring(ob.peer);
            let n = (ring.free() as usize).min(ob.tokens.len() - ob.sent);
            if n > 0 {
                let batch = &ob.tokens[ob.sent..ob.sent + n];
                let dst_node = topo.node_of(ob.peer);
                let headers: Vec<[u8; HEADER_BYTES]> = batch
                    .iter()
                    .map(|&tok| {
                        let mask = match ob.tier {
                            Tier::Rdma => c.plan.mask(tok as usize, dst_node),
                            Tier::Nvl => 1 << topo.local_of(ob.peer),
                        };
                        Header {
                            src_rank: me as u32,
                            src_idx: tok,
                            mask,
                        }
                        .encode()
                    })
                    .collect();
                let mut segs: Vec<&[u8]> = Vec::with_capacity(n * 5);
                for (hdr, &tok) in headers.iter().zip(batch) {
                    segs.push(hdr);
                    segs.extend(c.tokens.sections(tok as usize));
                }
                ring.post(t, epoch, &segs, 5)?;
                payload.add(ob.tier, n * c.tokens.payload_bytes());
                ob.sent += n;
                progress = true;
            }
            if ob.sent == ob.tokens.len() && ob.tier == Tier::Rdma {
                ring.closed = true;
            }
        }
        Ok(progress)
    }

    /// Closes the rings inside the node whose own tokens are out (call once forwarding is
    /// over: they carry forwarded tokens too).
    pub fn close_nvl(&self, op: &mut Op<'_>) {
        for ob in self.outboxes.iter().filter(|o| o.tier == Tier::Nvl) {
            if ob.sent == ob.tokens.len() {
                op.send_ring(ob.peer).closed = true;
            }
        }
    }
}
