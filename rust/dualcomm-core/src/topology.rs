//! Where each rank lives: `num_nodes x ranks_per_node`, rank-major inside a node.

use crate::error::{Error, Result};

/// A set of local ranks of one node, one bit each (token headers carry one per destination
/// node). 128 bits: an NVL72 rack is one NVLink domain of 72 GPUs.
pub type LocalMask = u128;

/// Local ranks of one node are addressed by bit in a [`LocalMask`], hence the cap.
pub const MAX_RANKS_PER_NODE: usize = LocalMask::BITS as usize;
/// Keeps the per-token node sets and the meta exchange small; far above real clusters' EP groups.
pub const MAX_WORLD_SIZE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Topology {
    num_nodes: usize,
    ranks_per_node: usize,
}

impl Topology {
    pub fn new(num_nodes: usize, ranks_per_node: usize) -> Result<Self> {
        if num_nodes == 0 {
            return Err(Error::invalid("num_nodes", "at least 1", num_nodes));
        }
        if ranks_per_node == 0 || ranks_per_node > MAX_RANKS_PER_NODE {
            return Err(Error::invalid(
                "ranks_per_node",
                format!("between 1 and {MAX_RANKS_PER_NODE}"),
                ranks_per_node,
            ));
        }
        if num_nodes
            .checked_mul(ranks_per_node)
            .is_none_or(|w| w > MAX_WORLD_SIZE)
        {
            return Err(Error::invalid(
                "num_nodes * ranks_per_node",
                format!("at most {MAX_WORLD_SIZE}"),
                format!("{num_nodes} * {ranks_per_node}"),
            ));
        }
        Ok(Self {
            num_nodes,
            ranks_per_node,
        })
    }

    pub fn num_nodes(&self) -> usize {
        self.num_nodes
    }

    pub fn ranks_per_node(&self) -> usize {
        self.ranks_per_node
    }

    pub fn world_size(&self) -> usize {
        self.num_nodes * self.ranks_per_node
    }

    pub fn node_of(&self, rank: usize) -> usize {
        rank / self.ranks_per_node
    }

    pub fn local_of(&self, rank: usize) -> usize {
        rank % self.ranks_per_node
    }

    pub fn rank_at(&self, node: usize, local: usize) -> usize {
        node * self.ranks_per_node + local
    }

    /// The rank on `dst_node` that receives `src`'s tokens over the network and forwards
    /// them inside that node: the one with the same local index, so each NIC rail talks to
    /// its twin (the DeepEP arrangement).
    pub fn forwarder(&self, src: usize, dst_node: usize) -> usize {
        self.rank_at(dst_node, self.local_of(src))
    }

    pub fn same_node(&self, a: usize, b: usize) -> bool {
        self.node_of(a) == self.node_of(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarder_keeps_local_index() {
        let t = Topology::new(3, 4).unwrap();
        assert_eq!(t.world_size(), 12);
        assert_eq!(t.node_of(7), 1);
        assert_eq!(t.local_of(7), 3);
        assert_eq!(t.forwarder(7, 2), 11);
        assert_eq!(t.forwarder(7, 1), 7);
        assert!(Topology::new(0, 1).is_err());
        // An NVL72 rack is one node; beyond the mask's width is refused.
        assert!(Topology::new(2, 72).is_ok());
        assert!(Topology::new(1, 129).is_err());
    }
}
