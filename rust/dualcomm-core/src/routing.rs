//! Routing tables: from `topk_idx` to what each rank, node and expert receives, and the
//! per-token plan (destination nodes, local-rank bitmask per node) that the protocol follows.

use crate::error::{Error, Result};
use crate::topology::{LocalMask, Topology};

/// The counts `get_dispatch_layout` returns (DeepEP's names and dtypes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchLayout {
    pub num_tokens_per_rank: Vec<i32>,
    pub num_tokens_per_node: Vec<i32>,
    pub num_tokens_per_expert: Vec<i32>,
    /// Row-major `[num_tokens, world_size]`.
    pub is_token_in_rank: Vec<bool>,
}

/// Checks `num_experts` against the world: experts are owned in equal contiguous blocks.
pub fn experts_per_rank(topo: &Topology, num_experts: usize) -> Result<usize> {
    let w = topo.world_size();
    if num_experts == 0 || num_experts % w != 0 {
        return Err(Error::invalid(
            "num_experts",
            format!("a positive multiple of the world size {w}"),
            num_experts,
        ));
    }
    Ok(num_experts / w)
}

fn check_topk_shape(topk_idx: &[i64], num_tokens: usize, num_topk: usize) -> Result<()> {
    if topk_idx.len() != num_tokens * num_topk {
        return Err(Error::invalid(
            "topk_idx",
            format!(
                "{num_tokens} x {num_topk} = {} entries",
                num_tokens * num_topk
            ),
            topk_idx.len(),
        ));
    }
    Ok(())
}

/// Validates every expert index: `-1` (no expert) or `0 <= e < num_experts`.
pub fn check_expert_indices(topk_idx: &[i64], num_topk: usize, num_experts: usize) -> Result<()> {
    if let Some(pos) = topk_idx
        .iter()
        .position(|&e| e < -1 || e >= num_experts as i64)
    {
        let (t, k) = (pos / num_topk.max(1), pos % num_topk.max(1));
        return Err(Error::invalid(
            format!("topk_idx[{t}, {k}]"),
            format!("-1 or an expert index in [0, {num_experts})"),
            topk_idx[pos],
        ));
    }
    Ok(())
}

pub fn dispatch_layout(
    topo: &Topology,
    topk_idx: &[i64],
    num_tokens: usize,
    num_topk: usize,
    num_experts: usize,
) -> Result<DispatchLayout> {
    let epr = experts_per_rank(topo, num_experts)?;
    check_topk_shape(topk_idx, num_tokens, num_topk)?;
    check_expert_indices(topk_idx, num_topk, num_experts)?;
    let w = topo.world_size();
    let mut out = DispatchLayout {
        num_tokens_per_rank: vec![0; w],
        num_tokens_per_node: vec![0; topo.num_nodes()],
        num_tokens_per_expert: vec![0; num_experts],
        is_token_in_rank: vec![false; num_tokens * w],
    };
    for t in 0..num_tokens {
        let row = &topk_idx[t * num_topk..(t + 1) * num_topk];
        let in_rank = &mut out.is_token_in_rank[t * w..(t + 1) * w];
        let mut node_seen = 0u64; // nodes are counted through their ranks below
        for (k, &e) in row.iter().enumerate() {
            if e < 0 || row[..k].contains(&e) {
                continue; // masked, or the same expert twice: a token counts once per expert
            }
            let e = e as usize;
            out.num_tokens_per_expert[e] += 1;
            let r = e / epr;
            if !in_rank[r] {
                in_rank[r] = true;
                out.num_tokens_per_rank[r] += 1;
                let n = topo.node_of(r);
                // Up to 64 nodes are tracked in a bitmask; more fall back to a scan.
                if n < 64 {
                    if node_seen & (1 << n) == 0 {
                        node_seen |= 1 << n;
                        out.num_tokens_per_node[n] += 1;
                    }
                } else if !node_hit_before(topo, in_rank, r) {
                    out.num_tokens_per_node[n] += 1;
                }
            }
        }
    }
    Ok(out)
}

/// Whether another rank of `r`'s node is already marked in `in_rank` (used past 64 nodes).
fn node_hit_before(topo: &Topology, in_rank: &[bool], r: usize) -> bool {
    let n = topo.node_of(r);
    (0..topo.ranks_per_node())
        .map(|l| topo.rank_at(n, l))
        .any(|x| x != r && in_rank[x])
}

/// Per-token send plan of one source rank: for every (token, node) the bitmask of local
/// ranks on that node that need the token (0 = the token does not go to that node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendPlan {
    topo: Topology,
    num_tokens: usize,
    node_masks: Vec<LocalMask>,
    count_to_rank: Vec<u64>,
    count_to_node: Vec<u64>,
}

impl SendPlan {
    /// Builds the plan from a row-major `[num_tokens, world_size]` boolean table.
    pub fn from_is_token_in_rank(
        topo: &Topology,
        is_token_in_rank: &[bool],
        num_tokens: usize,
    ) -> Result<Self> {
        let w = topo.world_size();
        if is_token_in_rank.len() != num_tokens * w {
            return Err(Error::invalid(
                "is_token_in_rank",
                format!("{num_tokens} x {w} entries"),
                is_token_in_rank.len(),
            ));
        }
        let (nn, rpn) = (topo.num_nodes(), topo.ranks_per_node());
        let mut plan = SendPlan {
            topo: *topo,
            num_tokens,
            node_masks: vec![0; num_tokens * nn],
            count_to_rank: vec![0; w],
            count_to_node: vec![0; nn],
        };
        for t in 0..num_tokens {
            let row = &is_token_in_rank[t * w..(t + 1) * w];
            for n in 0..nn {
                let mut mask: LocalMask = 0;
                for l in 0..rpn {
                    if row[n * rpn + l] {
                        mask |= 1 << l;
                        plan.count_to_rank[n * rpn + l] += 1;
                    }
                }
                if mask != 0 {
                    plan.count_to_node[n] += 1;
                }
                plan.node_masks[t * nn + n] = mask;
            }
        }
        Ok(plan)
    }

    pub fn topology(&self) -> &Topology {
        &self.topo
    }

    pub fn num_nodes(&self) -> usize {
        self.topo.num_nodes()
    }

    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }

    /// Bitmask of local ranks on `node` that receive `token`.
    pub fn mask(&self, token: usize, node: usize) -> LocalMask {
        self.node_masks[token * self.topo.num_nodes() + node]
    }

    pub fn count_to_rank(&self) -> &[u64] {
        &self.count_to_rank
    }

    pub fn count_to_node(&self) -> &[u64] {
        &self.count_to_node
    }

    /// Tokens (in index order) that go to `node` at all.
    pub fn tokens_to_node(&self, node: usize) -> impl Iterator<Item = usize> + '_ {
        (0..self.num_tokens).filter(move |&t| self.mask(t, node) != 0)
    }

    /// Tokens (in index order) that go to `rank`.
    pub fn tokens_to_rank(&self, rank: usize) -> impl Iterator<Item = usize> + '_ {
        let (n, bit) = (self.topo.node_of(rank), 1 << self.topo.local_of(rank));
        (0..self.num_tokens).filter(move |&t| self.mask(t, n) & bit != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Straightforward reference: loops over (token, k) with sets, no cleverness.
    fn reference(
        topo: &Topology,
        topk: &[i64],
        t: usize,
        k: usize,
        e: usize,
    ) -> (Vec<i32>, Vec<i32>, Vec<i32>, Vec<bool>) {
        use std::collections::BTreeSet;
        let w = topo.world_size();
        let epr = e / w;
        let (mut per_rank, mut per_node, mut per_exp) =
            (vec![0; w], vec![0; topo.num_nodes()], vec![0; e]);
        let mut in_rank = vec![false; t * w];
        for tok in 0..t {
            let experts: BTreeSet<usize> = topk[tok * k..(tok + 1) * k]
                .iter()
                .filter(|&&x| x >= 0)
                .map(|&x| x as usize)
                .collect();
            let ranks: BTreeSet<usize> = experts.iter().map(|x| x / epr).collect();
            let nodes: BTreeSet<usize> = ranks.iter().map(|&r| topo.node_of(r)).collect();
            experts.iter().for_each(|&x| per_exp[x] += 1);
            ranks.iter().for_each(|&r| {
                per_rank[r] += 1;
                in_rank[tok * w + r] = true
            });
            nodes.iter().for_each(|&n| per_node[n] += 1);
        }
        (per_rank, per_node, per_exp, in_rank)
    }

    proptest! {
        #[test]
        fn layout_matches_reference(
            nodes in 1usize..5, rpn in 1usize..5, t in 0usize..40, k in 1usize..9,
            epr in 1usize..4, seed in any::<u64>(),
        ) {
            let topo = Topology::new(nodes, rpn).unwrap();
            let e = epr * topo.world_size();
            let mut s = seed;
            let topk: Vec<i64> = (0..t * k).map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) % (e as u64 + 1)) as i64 - 1
            }).collect();
            let got = dispatch_layout(&topo, &topk, t, k, e).unwrap();
            let (pr, pn, pe, ir) = reference(&topo, &topk, t, k, e);
            prop_assert_eq!(&got.num_tokens_per_rank, &pr);
            prop_assert_eq!(&got.num_tokens_per_node, &pn);
            prop_assert_eq!(&got.num_tokens_per_expert, &pe);
            prop_assert_eq!(&got.is_token_in_rank, &ir);
            let plan = SendPlan::from_is_token_in_rank(&topo, &got.is_token_in_rank, t).unwrap();
            let to_rank: Vec<i32> = plan.count_to_rank().iter().map(|&c| c as i32).collect();
            let to_node: Vec<i32> = plan.count_to_node().iter().map(|&c| c as i32).collect();
            prop_assert_eq!(to_rank, pr);
            prop_assert_eq!(to_node, pn);
        }
    }

    #[test]
    fn rejects_bad_expert_indices_and_counts() {
        let topo = Topology::new(2, 2).unwrap();
        let err = dispatch_layout(&topo, &[0, 8], 1, 2, 8).unwrap_err();
        assert!(err.to_string().contains("topk_idx[0, 1]"), "{err}");
        assert!(dispatch_layout(&topo, &[-2, 0], 1, 2, 8).is_err());
        let err = dispatch_layout(&topo, &[0, 1], 1, 2, 6).unwrap_err();
        assert!(err.to_string().contains("num_experts"), "{err}");
        assert!(dispatch_layout(&topo, &[0, 1, 2], 1, 2, 8).is_err());
    }
}
