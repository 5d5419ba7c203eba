//! Where everything lives in a rank's registered regions, and who talks to whom.
//!
//! Only the links the two-hop protocol needs exist: the ranks of a node talk over nvl, and a
//! rank talks over rdma only with the ranks of the same local index on other nodes (its
//! twins, `nodes - 1` of them). Each linked sender owns one ring in the receiver's ring
//! region of that tier, and two metadata slots (by operation parity) in its metadata region.
//! Transports are handed this plan as [`Wiring`], so that they connect only linked ranks and
//! refuse writes outside the sender's own slots wherever they can see a write's target.

use super::meta::{nvl_meta_bytes, rdma_meta_bytes};
use crate::topology::Topology;
use crate::transport::{NUM_REGIONS, RegionId, Tier, Wiring};

/// How a pair of ranks is linked, if it is: same node over nvl, twins (same local index on
/// different nodes) over rdma. Other pairs never exchange anything.
pub fn link(topo: &Topology, a: usize, b: usize) -> Option<Tier> {
    if a == b {
        None
    } else if topo.same_node(a, b) {
        Some(Tier::Nvl)
    } else if topo.local_of(a) == topo.local_of(b) {
        Some(Tier::Rdma)
    } else {
        None
    }
}

/// The region plan every rank of a world shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionPlan {
    topo: Topology,
    num_nvl_bytes: usize,
    num_rdma_bytes: usize,
}

impl RegionPlan {
    pub fn new(topo: Topology, num_nvl_bytes: usize, num_rdma_bytes: usize) -> Self {
        Self {
            topo,
            num_nvl_bytes,
            num_rdma_bytes,
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.topo
    }

    /// Bytes of each sender's ring on `tier`.
    pub fn ring_bytes(&self, tier: Tier) -> usize {
        match tier {
            Tier::Nvl => self.num_nvl_bytes / self.topo.ranks_per_node(),
            Tier::Rdma => self.num_rdma_bytes / self.topo.num_nodes(),
        }
    }

    /// The ring region of `tier` and the offset of sender `from`'s ring in it.
    pub fn ring_of(&self, from: usize, tier: Tier) -> (RegionId, usize) {
        match tier {
            Tier::Nvl => (
                RegionId::NvlRings,
                self.topo.local_of(from) * self.ring_bytes(tier),
            ),
            Tier::Rdma => (
                RegionId::RdmaRings,
                self.topo.node_of(from) * self.ring_bytes(tier),
            ),
        }
    }

    /// Bytes of one metadata record on `tier`.
    pub fn meta_bytes(&self, tier: Tier) -> usize {
        match tier {
            Tier::Nvl => nvl_meta_bytes(self.topo.num_nodes(), self.topo.ranks_per_node()),
            Tier::Rdma => rdma_meta_bytes(self.topo.ranks_per_node()),
        }
    }

    /// Where sender `from`'s metadata of operation `seq` lands at a receiver on `tier`.
    pub fn meta_slot(&self, seq: u64, from: usize, tier: Tier) -> (RegionId, usize) {
        let parity = (seq % 2) as usize;
        let (region, index, slots) = match tier {
            Tier::Nvl => (
                RegionId::NvlMeta,
                self.topo.local_of(from),
                self.topo.ranks_per_node(),
            ),
            Tier::Rdma => (
                RegionId::RdmaMeta,
                self.topo.node_of(from),
                self.topo.num_nodes(),
            ),
        };
        (region, (parity * slots + index) * self.meta_bytes(tier))
    }
}

impl Wiring for RegionPlan {
    fn region_lens(&self) -> [usize; NUM_REGIONS] {
        let (nn, rpn) = (self.topo.num_nodes(), self.topo.ranks_per_node());
        [
            self.num_nvl_bytes,
            self.num_rdma_bytes,
            2 * rpn * self.meta_bytes(Tier::Nvl),
            2 * nn * self.meta_bytes(Tier::Rdma),
        ]
    }

    fn link(&self, a: usize, b: usize) -> Option<Tier> {
        link(&self.topo, a, b)
    }

    fn world_size(&self) -> usize {
        self.topo.world_size()
    }

    fn allows(
        &self,
        receiver: usize,
        sender: usize,
        region: RegionId,
        offset: usize,
        len: usize,
    ) -> bool {
        let Some(tier) = link(&self.topo, sender, receiver) else {
            return false;
        };
        if region.tier() != tier {
            return false;
        }
        let Some(end) = offset.checked_add(len) else {
            return false;
        };
        let within = |start: usize, bytes: usize| start <= offset && end <= start + bytes;
        match region {
            RegionId::NvlRings | RegionId::RdmaRings => {
                let (_, base) = self.ring_of(sender, tier);
                // An immediate alone (a credit) is a zero-length write at the ring's start.
                within(base, self.ring_bytes(tier))
            }
            RegionId::NvlMeta | RegionId::RdmaMeta => (0..2).any(|seq| {
                let (_, at) = self.meta_slot(seq, sender, tier);
                within(at, self.meta_bytes(tier))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn senders_own_disjoint_slots() {
        let topo = Topology::new(3, 4).unwrap();
        let plan = RegionPlan::new(topo, 4 * 1000, 3 * 2000);
        let lens = plan.region_lens();
        for receiver in 0..topo.world_size() {
            for region in RegionId::ALL {
                // Every byte belongs to at most one sender.
                for byte in (0..lens[region as usize]).step_by(7) {
                    let owners: Vec<usize> = (0..topo.world_size())
                        .filter(|&s| plan.allows(receiver, s, region, byte, 1))
                        .collect();
                    assert!(owners.len() <= 1, "{region:?} byte {byte}: {owners:?}");
                }
            }
        }
    }

    #[test]
    fn only_linked_ranks_may_write() {
        let topo = Topology::new(2, 2).unwrap();
        let plan = RegionPlan::new(topo, 2 * 64, 2 * 64);
        // Rank 1 (node 0, local 1) and rank 2 (node 1, local 0) are not linked.
        assert_eq!(plan.link(1, 2), None);
        assert!(!plan.allows(2, 1, RegionId::RdmaRings, 0, 1));
        assert!(!plan.allows(2, 1, RegionId::RdmaMeta, 0, 1));
        // Rank 1's ring at rank 0: the second nvl ring.
        assert!(plan.allows(0, 1, RegionId::NvlRings, 64, 64));
        assert!(!plan.allows(0, 1, RegionId::NvlRings, 0, 64));
        assert!(!plan.allows(0, 1, RegionId::NvlRings, 64, 65));
        // Twins write rdma rings, never nvl ones.
        assert!(plan.allows(3, 1, RegionId::RdmaRings, 0, 64));
        assert!(!plan.allows(3, 1, RegionId::NvlRings, 0, 1));
        assert!(!plan.allows(0, 1, RegionId::NvlRings, usize::MAX, 2));
    }
}
