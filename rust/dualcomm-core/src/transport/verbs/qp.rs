//! An RC queue pair's way from RESET to RTS, as data: which attributes each `ibv_modify_qp`
//! sets, with which values. The values, and why:
//!
//! - `timeout` 18: the local ACK timeout is 4.096 us x 2^18, about 1.07 s; with `retry_cnt` 7 a
//!   silent peer turns into an error completion after about 8.6 s, inside the buffer's default
//!   300 s timeout and long enough not to misfire under congestion (NCCL's default is 18 or 20).
//! - `retry_cnt` 7: the most the hardware allows, as NCCL uses.
//! - `rnr_retry` 7 (retry without limit) with `min_rnr_timer` 12 (0.64 ms): receives come from a
//!   shared receive queue refilled ahead of need (`queues`), so a receiver-not-ready NAK means a
//!   slow receiver, not a lost one; the protocol's own deadline bounds the wait.
//! - `max_rd_atomic` / `max_dest_rd_atomic` 1: the protocol uses writes only, no reads or atomics.
//! - the path MTU is the smaller of the two ports' active MTUs; RoCE needs a GRH (`gid_index`),
//!   InfiniBand addresses by LID; a RoCE GRH gets hop limit 255 (RoCEv2's IP TTL).
//! - access flags: remote write only (a peer may write this rank's regions, never read them).

use super::address::{PathMtu, QpAddress};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QpState {
    Reset,
    Init,
    Rtr,
    Rts,
}

/// How the port is addressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkLayer {
    InfiniBand,
    /// RoCE: the GID table entry this rank's traffic uses.
    Ethernet {
        gid_index: u8,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpConfig {
    pub port: u8,
    pub link: LinkLayer,
    pub timeout: u8,
    pub retry_cnt: u8,
    pub rnr_retry: u8,
    pub min_rnr_timer: u8,
    pub service_level: u8,
}

impl QpConfig {
    pub fn new(port: u8, link: LinkLayer) -> Self {
        Self {
            port,
            link,
            timeout: 18,
            retry_cnt: 7,
            rnr_retry: 7,
            min_rnr_timer: 12,
            service_level: 0,
        }
    }

    /// Seconds a silent peer takes to become an error completion (the ACK timeout times the
    /// transmissions the retry count allows).
    pub fn silent_peer_seconds(&self) -> f64 {
        4.096e-6 * (1u64 << self.timeout) as f64 * (self.retry_cnt as f64 + 1.0)
    }
}

/// The `ibv_qp_attr` fields a transition sets (the binding sets exactly the present ones,
/// with the matching `ibv_qp_attr_mask` bits).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QpAttrs {
    pub state: Option<u8>,
    pub port_num: Option<u8>,
    pub pkey_index: Option<u16>,
    pub remote_write: Option<bool>,
    pub path_mtu: Option<u8>,
    pub dest_qp_num: Option<u32>,
    pub rq_psn: Option<u32>,
    pub max_dest_rd_atomic: Option<u8>,
    pub min_rnr_timer: Option<u8>,
    /// Address vector: destination LID, service level, port; a GRH (GID, index, hop limit) on RoCE.
    pub dlid: Option<u16>,
    pub sl: Option<u8>,
    pub ah_port: Option<u8>,
    pub grh: Option<Grh>,
    pub timeout: Option<u8>,
    pub retry_cnt: Option<u8>,
    pub rnr_retry: Option<u8>,
    pub sq_psn: Option<u32>,
    pub max_rd_atomic: Option<u8>,
}

/// The global route header of a RoCE address vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grh {
    pub dgid: [u8; 16],
    pub sgid_index: u8,
    /// RoCEv2 carries it as the IP TTL: 0 would be dropped by the first router (NCCL uses 255).
    pub hop_limit: u8,
    pub traffic_class: u8,
}

/// `ibv_qp_state` codes.
const INIT: u8 = 1;
const RTR: u8 = 2;
const RTS: u8 = 3;
/// The error state: a queue pair put here flushes its work and refuses its peer's writes.
pub const ERR: u8 = 6;

/// The transition that ends a queue pair's traffic (at shutdown): its posted work is flushed
/// and its peer's next write fails, which that peer reports as this rank's loss.
pub fn to_error() -> QpAttrs {
    QpAttrs {
        state: Some(ERR),
        ..QpAttrs::default()
    }
}

/// The three transitions that connect `local`'s queue pair to `remote`'s.
pub fn connect(local: &QpAddress, remote: &QpAddress, cfg: &QpConfig) -> [(QpState, QpAttrs); 3] {
    let mtu: PathMtu = local.mtu.min(remote.mtu);
    let init = QpAttrs {
        state: Some(INIT),
        port_num: Some(cfg.port),
        pkey_index: Some(0),
        remote_write: Some(true),
        ..QpAttrs::default()
    };
    let (dlid, grh) = match cfg.link {
        LinkLayer::InfiniBand => (remote.lid, None),
        LinkLayer::Ethernet { gid_index } => (
            0,
            Some(Grh {
                dgid: remote.gid,
                sgid_index: gid_index,
                hop_limit: 255,
                traffic_class: 0,
            }),
        ),
    };
    let rtr = QpAttrs {
        state: Some(RTR),
        path_mtu: Some(mtu as u8),
        dest_qp_num: Some(remote.qpn),
        rq_psn: Some(remote.psn),
        max_dest_rd_atomic: Some(1),
        min_rnr_timer: Some(cfg.min_rnr_timer),
        dlid: Some(dlid),
        sl: Some(cfg.service_level),
        // The port goes in the address vector: IBV_QP_PORT is not allowed in INIT -> RTR.
        ah_port: Some(cfg.port),
        grh,
        ..QpAttrs::default()
    };
    let rts = QpAttrs {
        state: Some(RTS),
        timeout: Some(cfg.timeout),
        retry_cnt: Some(cfg.retry_cnt),
        rnr_retry: Some(cfg.rnr_retry),
        sq_psn: Some(local.psn),
        max_rd_atomic: Some(1),
        ..QpAttrs::default()
    };
    [
        (QpState::Init, init),
        (QpState::Rtr, rtr),
        (QpState::Rts, rts),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::verbs::address::RemoteRegion;

    fn addr(rank: u32, qpn: u32, psn: u32, mtu: PathMtu) -> QpAddress {
        QpAddress {
            rank,
            lid: 40 + rank as u16,
            gid: [rank as u8; 16],
            qpn,
            psn,
            mtu,
            regions: [RemoteRegion::default(); 4],
        }
    }

    #[test]
    fn infiniband_connects_by_lid_with_each_sides_sequence_numbers() {
        let (me, peer) = (
            addr(0, 100, 7, PathMtu::Mtu4096),
            addr(1, 200, 9, PathMtu::Mtu2048),
        );
        let [(s0, init), (s1, rtr), (s2, rts)] =
            connect(&me, &peer, &QpConfig::new(1, LinkLayer::InfiniBand));
        assert_eq!((s0, s1, s2), (QpState::Init, QpState::Rtr, QpState::Rts));
        assert_eq!(
            (init.state, init.port_num, init.remote_write),
            (Some(INIT), Some(1), Some(true))
        );
        // Receive side: the peer's queue pair and sequence numbers, the smaller MTU.
        assert_eq!(
            (rtr.dest_qp_num, rtr.rq_psn, rtr.path_mtu),
            (Some(200), Some(9), Some(PathMtu::Mtu2048 as u8))
        );
        assert_eq!(
            (rtr.dlid, rtr.grh, rtr.port_num, rtr.ah_port),
            (Some(41), None, None, Some(1))
        );
        // Send side: this rank's own sequence number and the retry policy.
        assert_eq!(
            (rts.sq_psn, rts.timeout, rts.retry_cnt, rts.rnr_retry),
            (Some(7), Some(18), Some(7), Some(7))
        );
        assert!(rts.dest_qp_num.is_none() && init.path_mtu.is_none());
    }

    #[test]
    fn roce_addresses_by_gid_and_a_silent_peer_is_found_in_seconds() {
        let (me, peer) = (
            addr(0, 1, 1, PathMtu::Mtu1024),
            addr(3, 2, 2, PathMtu::Mtu4096),
        );
        let cfg = QpConfig::new(1, LinkLayer::Ethernet { gid_index: 3 });
        let [_, (_, rtr), _] = connect(&me, &peer, &cfg);
        assert_eq!(rtr.dlid, Some(0));
        let grh = rtr.grh.unwrap();
        assert_eq!((grh.dgid, grh.sgid_index, grh.hop_limit), ([3; 16], 3, 255));
        let s = cfg.silent_peer_seconds();
        assert!((8.0..10.0).contains(&s), "{s}");
    }
}
