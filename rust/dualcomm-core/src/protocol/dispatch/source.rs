//! The source role: this rank's own tokens, each posted once per destination node (to the
//! twin that forwards there) and straight to the ranks of its own node that need it, as
//! ring credits allow.

use super::checks::Checked;
use crate::error::Result;
use crate::protocol::op::Op;
use crate::protocol::record::{HEADER_BYTES, Header};
use crate::protocol::sources::Source;
use crate::routing::SendPlan;
use crate::topology::Topology;
use crate::transport::{Sge, Tier, TierCounters};

/// This rank's tokens for one linked peer.
struct Outbox {
    peer: usize,
    tier: Tier,
    tokens: Vec<u32>,
    sent: usize,
    /// The registered headers of `tokens`, in order.
    headers: Option<Source>,
}

/// Where a token's record sections come from: its header, then row, scales, top-k
/// indices and weights in the caller's registered tensors.
#[derive(Clone, Copy)]
pub(super) struct TokenSources {
    pub x: Source,
    pub scales: Source,
    pub idx: Source,
    pub weights: Source,
}

pub(super) struct Sender {
    me: usize,
    topo: Topology,
    outboxes: Vec<Outbox>,
    tokens: Option<TokenSources>,
}

impl Sender {
    pub fn new(topo: &Topology, me: usize, plan: &SendPlan) -> Self {
        let (nn, rpn, my_node) = (topo.num_nodes(), topo.ranks_per_node(), topo.node_of(me));
        let mut outboxes = Vec::new();
        for n in (0..nn).filter(|&n| n != my_node) {
            outboxes.push(Outbox {
                peer: topo.forwarder(me, n),
                tier: Tier::Rdma,
                tokens: plan.tokens_to_node(n).map(|t| t as u32).collect(),
                sent: 0,
                headers: None,
            });
        }
        for l in (0..rpn).filter(|&l| l != topo.local_of(me)) {
            let d = topo.rank_at(my_node, l);
            outboxes.push(Outbox {
                peer: d,
                tier: Tier::Nvl,
                tokens: plan.tokens_to_rank(d).map(|t| t as u32).collect(),
                sent: 0,
                headers: None,
            });
        }
        Self {
            me,
            topo: *topo,
            outboxes,
            tokens: None,
        }
    }

    /// The record headers of every outbox, to be registered (`attach`): a twin's carry the
    /// local ranks of its node that need the token, a node rank's only that rank.
    pub fn headers(&self, plan: &SendPlan) -> Vec<Vec<u8>> {
        let topo = self.topo;
        self.outboxes
            .iter()
            .map(|ob| {
                let dst_node = topo.node_of(ob.peer);
                ob.tokens
                    .iter()
                    .flat_map(|&tok| {
                        let mask = match ob.tier {
                            Tier::Rdma => plan.mask(tok as usize, dst_node),
                            Tier::Nvl => 1 << topo.local_of(ob.peer),
                        };
                        Header {
                            src_rank: self.me as u32,
                            src_idx: tok,
                            mask,
                        }
                        .encode()
                    })
                    .collect()
            })
            .collect()
    }

    /// Where the records' bytes come from, once registered.
    pub fn attach(&mut self, headers: Vec<Source>, tokens: TokenSources) {
        for (ob, h) in self.outboxes.iter_mut().zip(headers) {
            ob.headers = Some(h);
        }
        self.tokens = Some(tokens);
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
        let (t, epoch) = (op.t, op.epoch);
        let src = self.tokens.expect("attached before the first post");
        let tk = &c.tokens;
        let mut progress = false;
        for ob in &mut self.outboxes {
            let ring = op.send_ring(ob.peer);
            let n = (ring.free() as usize).min(ob.tokens.len() - ob.sent);
            if n > 0 {
                let headers = ob.headers.expect("attached before the first post");
                let mut sges: Vec<Sge> = Vec::with_capacity(n * 5);
                for (i, &tok) in (ob.sent..ob.sent + n).zip(&ob.tokens[ob.sent..ob.sent + n]) {
                    let tok = tok as usize;
                    sges.extend([
                        headers.piece(i, HEADER_BYTES),
                        src.x.piece(tok, tk.x_bytes),
                        src.scales.piece(tok, tk.scale_bytes),
                        src.idx.piece(tok, tk.topk * 8),
                        src.weights.piece(tok, tk.topk * 4),
                    ]);
                }
                ring.post(t, epoch, &sges, 5)?;
                payload.add(ob.tier, n * tk.payload_bytes());
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
