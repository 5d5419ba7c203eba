//! A rank's verbs transport is set up in two steps around the bootstrap, as NCCL's IB
//! transport is. `VerbsSetup::open` opens the device, allocates and registers this rank's
//! regions and makes one RC queue pair per linked peer (none for the others); its `card` is
//! what the bootstrap all-gathers. `VerbsSetup::connect` takes every rank's card and moves
//! each queue pair through INIT -> RTR -> RTS to the queue pair that peer made for this rank.
//! Receives are posted before any queue pair is ready, so an early writer never meets an
//! empty queue.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::abi::IbvWc;
use super::address::{PathMtu, QpAddress, RemoteRegion, address_in_card, encode_card};
use super::device::{PortLink, find};
use super::qp::{self, LinkLayer, QpConfig};
use super::queues::{RecvQueue, SendQueue};
use super::resources::{Cq, Mr, Nic, Qp, Srq};
use super::transport::{
    MAX_SRQ_DEPTH, POLL_BATCH, Peer, Reaper, SEND_DEPTH, SIGNAL_EVERY, VerbsTransport,
};
use super::work::RECV_WR_BIT;
use crate::error::{Error, Result};
use crate::protocol::op::RECV_DEPTH;
use crate::transport::memory::RegionMem;
use crate::transport::{MAX_SGE, NUM_REGIONS, Tier, TierCounters, Wiring};

/// Which device, port and GID a rank uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerbsOptions {
    /// NCCL_IB_HCA-style selection (`mlx5_0:1`, `^mlx5_1`, `=mlx5_2`); `None`: the first
    /// active port.
    pub device: Option<String>,
    /// The GID table entry on RoCE (NCCL_IB_GID_INDEX's role); ignored on InfiniBand.
    pub gid_index: u8,
}

impl VerbsOptions {
    /// From `DUALCOMM_IB_DEVICE` and `DUALCOMM_IB_GID_INDEX`.
    pub fn from_env() -> Result<Self> {
        let gid_index = match std::env::var("DUALCOMM_IB_GID_INDEX") {
            Ok(v) => v.trim().parse().map_err(|_| {
                Error::invalid("DUALCOMM_IB_GID_INDEX", "a GID table index, 0 to 255", &v)
            })?,
            Err(_) => 0,
        };
        Ok(Self {
            device: std::env::var("DUALCOMM_IB_DEVICE")
                .ok()
                .filter(|s| !s.is_empty()),
            gid_index,
        })
    }
}

/// A queue pair made for `peer`, not connected yet.
struct Unconnected {
    peer: usize,
    tier: Tier,
    qp: Qp,
    psn: u32,
}

/// A rank's verbs resources before its peers' addresses are known.
pub struct VerbsSetup {
    rank: usize,
    wiring: Arc<dyn Wiring>,
    timeout: Duration,
    nic: Nic,
    cq: Cq,
    srq: Srq,
    region_mrs: [Option<Mr>; NUM_REGIONS],
    regions: [RegionMem; NUM_REGIONS],
    links: Vec<Unconnected>,
    recv: RecvQueue,
}

impl VerbsSetup {
    /// Opens the device `options` selects and makes everything a rank needs but its peers'
    /// addresses. `TransportUnavailable` says what is missing (libibverbs, a device, a port).
    pub fn open(
        rank: usize,
        wiring: Arc<dyn Wiring>,
        options: &VerbsOptions,
        timeout: Duration,
    ) -> Result<Self> {
        let chosen = find(options.device.as_deref())?;
        let nic = Nic::open(chosen, options.gid_index)?;
        let regions = RegionMem::all(wiring.region_lens())?;
        let mut region_mrs: [Option<Mr>; NUM_REGIONS] = Default::default();
        for (mr, mem) in region_mrs.iter_mut().zip(&regions) {
            if !mem.is_empty() {
                // SAFETY: the region lives in the transport next to its registration, which
                // is declared first and so dropped first.
                *mr = Some(unsafe { nic.register(mem.as_ptr().cast_mut(), mem.len())? });
            }
        }
        let peers: Vec<(usize, Tier)> = (0..wiring.world_size())
            .filter_map(|p| wiring.link(rank, p).map(|t| (p, t)))
            .collect();
        // One receive per immediate a peer may have in flight, and one for its goodbye.
        let recv = RecvQueue::new(peers.len(), RECV_DEPTH + 1).capped(MAX_SRQ_DEPTH);
        let cq = nic.completion_queue((recv.depth() + peers.len() * SEND_DEPTH).max(1))?;
        let srq = nic.shared_receive_queue(recv.depth().max(1) as u32)?;
        let seed = RandomState::new();
        let links = peers
            .into_iter()
            .map(|(peer, tier)| {
                Ok(Unconnected {
                    peer,
                    tier,
                    qp: nic.queue_pair(&cq, &srq, SEND_DEPTH as u32, MAX_SGE as u32)?,
                    // A random first sequence number, as NCCL's: a stale packet of an earlier
                    // job on the same queue pair number is not taken for this one's.
                    psn: (seed.hash_one((rank, peer)) & 0xff_ffff) as u32,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            rank,
            wiring,
            timeout,
            nic,
            cq,
            srq,
            region_mrs,
            regions,
            links,
            recv,
        })
    }

    /// The device and port in use, in words.
    pub fn device(&self) -> String {
        self.nic.chosen.to_string()
    }

    /// This rank's regions as a peer writes them.
    fn remote_regions(&self) -> [RemoteRegion; NUM_REGIONS] {
        std::array::from_fn(|i| match &self.region_mrs[i] {
            Some(mr) => RemoteRegion {
                addr: mr.addr(),
                len: self.regions[i].len() as u64,
                rkey: mr.rkey(),
            },
            None => RemoteRegion::default(),
        })
    }

    fn address_of(&self, link: &Unconnected) -> QpAddress {
        let port = &self.nic.chosen.port;
        QpAddress {
            rank: self.rank as u32,
            lid: port.lid,
            gid: self.nic.gid,
            qpn: link.qp.qp_num(),
            psn: link.psn,
            mtu: port.active_mtu.unwrap_or(PathMtu::Mtu1024),
            regions: self.remote_regions(),
        }
    }

    /// What this rank publishes through the bootstrap: an address for each linked peer.
    pub fn card(&self) -> Vec<u8> {
        let entries: Vec<(usize, QpAddress)> = self
            .links
            .iter()
            .map(|l| (l.peer, self.address_of(l)))
            .collect();
        encode_card(&entries)
    }

    fn qp_config(&self) -> QpConfig {
        let port = &self.nic.chosen.port;
        let link = match port.link {
            PortLink::InfiniBand => LinkLayer::InfiniBand,
            PortLink::Ethernet => LinkLayer::Ethernet {
                gid_index: self.nic.gid_index,
            },
        };
        QpConfig::new(port.num, link)
    }

    /// Connects every queue pair to the one its peer made for this rank; `cards[r]` is rank
    /// r's `card` (ranks this one does not link to may send anything).
    pub fn connect(mut self, cards: &[Vec<u8>]) -> Result<VerbsTransport> {
        let world = self.wiring.world_size();
        if cards.len() != world {
            return Err(Error::invalid(
                "cards",
                format!("one card per rank of the world ({world})"),
                cards.len(),
            ));
        }
        let lens = self.wiring.region_lens();
        let cfg = self.qp_config();
        for _ in 0..self.recv.refill() {
            self.srq.post_receive(RECV_WR_BIT)?;
        }
        let mut peers: Vec<Option<Peer>> = (0..world).map(|_| None).collect();
        let mut qp_peer = HashMap::new();
        for link in std::mem::take(&mut self.links) {
            let remote = address_in_card(link.peer, &cards[link.peer], self.rank)?;
            for (i, r) in remote.regions.iter().enumerate() {
                if r.len != lens[i] as u64 {
                    return Err(Error::ConfigMismatch(format!(
                        "rank {} registered {} bytes for region {i}, rank {} expects {}",
                        link.peer, r.len, self.rank, lens[i]
                    )));
                }
            }
            let local = self.address_of(&link);
            for (_, attrs) in qp::connect(&local, &remote, &cfg) {
                link.qp.modify(&attrs)?;
            }
            qp_peer.insert(link.qp.qp_num(), link.peer);
            peers[link.peer] = Some(Peer {
                tier: link.tier,
                qp: link.qp,
                remote: remote.regions,
                sends: Mutex::new(SendQueue::new(SEND_DEPTH, SIGNAL_EVERY)),
            });
        }
        Ok(VerbsTransport {
            rank: self.rank,
            wiring: self.wiring,
            timeout: self.timeout,
            device: self.nic.chosen.device.clone(),
            peers,
            qp_peer,
            reaper: Mutex::new(Reaper {
                recv: self.recv,
                arrived: Vec::new(),
                wcs: vec![IbvWc::default(); POLL_BATCH],
                events_due: Instant::now(),
            }),
            sources: Mutex::new(Vec::new()),
            gone: (0..world).map(|_| Mutex::new(None)).collect(),
            closed: AtomicBool::new(false),
            wakeups: AtomicU64::new(0),
            counters: TierCounters::default(),
            srq: self.srq,
            cq: self.cq,
            region_mrs: self.region_mrs,
            regions: self.regions,
            nic: self.nic,
        })
    }
}
