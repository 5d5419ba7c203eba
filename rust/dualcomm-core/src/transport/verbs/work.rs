//! The transport contract in work requests and completions: a `write_with_imm` becomes one
//! `IBV_WR_RDMA_WRITE_WITH_IMM` (its scatter-gather list from registered memory, its target a
//! peer's region at an offset checked against that region's length, the immediate in network
//! byte order); a receive completion becomes the contract's `(source, immediate, length)`, the
//! source found from the queue pair it arrived on; an error completion is the peer's loss.

use super::address::RemoteRegion;
use crate::error::{Error, Result};
use crate::transport::{Completion, MAX_SGE, MemKey, Sge};

/// A registered memory region as the NIC knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalRegion {
    pub addr: u64,
    pub len: usize,
    pub lkey: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalSge {
    pub addr: u64,
    pub len: u32,
    pub lkey: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteRequest {
    pub wr_id: u64,
    pub sges: Vec<LocalSge>,
    pub remote_addr: u64,
    pub rkey: u32,
    /// The immediate as the wire carries it (`htonl`); none for a plain write (a fence).
    pub imm_be: Option<u32>,
    pub signaled: bool,
}

/// One contract write, as the transport was asked for it.
#[derive(Debug, Clone, Copy)]
pub struct Write<'a> {
    pub wr_id: u64,
    pub src: &'a [Sge],
    /// Where in the peer's region.
    pub offset: usize,
    pub imm: u32,
    pub signaled: bool,
}

/// The work request for `w`: its entries of memory registered under their keys (`regions`),
/// to `remote` at its offset. Nothing is posted if any part falls outside what it names: that
/// is a bug of this rank, an internal error.
pub fn write_request(
    rank: usize,
    w: &Write<'_>,
    regions: &dyn Fn(MemKey) -> Option<LocalRegion>,
    remote: &RemoteRegion,
) -> Result<WriteRequest> {
    let (src, offset) = (w.src, w.offset);
    let bad = |detail: String| Error::Internal {
        rank,
        detail: format!("verbs write: {detail}"),
    };
    if src.len() > MAX_SGE {
        return Err(bad(format!(
            "{} scatter-gather entries, at most {MAX_SGE}",
            src.len()
        )));
    }
    let mut sges = Vec::with_capacity(src.len());
    let mut total: u64 = 0;
    // A zero-length entry reads as 2^31 bytes on some NICs: empty entries are left out.
    for s in src.iter().filter(|s| s.len > 0) {
        let r = regions(s.key)
            .ok_or_else(|| bad(format!("memory key {} is not registered", s.key.0)))?;
        if s.offset.checked_add(s.len).is_none_or(|end| end > r.len) {
            return Err(bad(format!(
                "{} bytes at {} of a {}-byte region",
                s.len, s.offset, r.len
            )));
        }
        let len = u32::try_from(s.len).map_err(|_| bad(format!("an entry of {} bytes", s.len)))?;
        total += s.len as u64;
        sges.push(LocalSge {
            addr: r.addr + s.offset as u64,
            len,
            lkey: r.lkey,
        });
    }
    if total >= 1 << 31 {
        return Err(bad(format!("a write of {total} bytes (at most 2^31 - 1)")));
    }
    if (offset as u64)
        .checked_add(total)
        .is_none_or(|end| end > remote.len)
    {
        return Err(bad(format!(
            "{total} bytes at {offset} of the peer's {}-byte region",
            remote.len
        )));
    }
    Ok(WriteRequest {
        wr_id: w.wr_id,
        sges,
        remote_addr: remote.addr + offset as u64,
        rkey: remote.rkey,
        imm_be: Some(w.imm.to_be()),
        signaled: w.signaled,
    })
}

/// Receive work requests carry this bit in their id, so that any completion (an error one
/// too, whose opcode is undefined) says whether it consumed a posted receive.
pub const RECV_WR_BIT: u64 = 1 << 63;

pub fn is_receive(wr_id: u64) -> bool {
    wr_id & RECV_WR_BIT != 0
}

/// `ibv_wc_status`: success, or why the NIC gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WcStatus {
    Success,
    /// Any other status, with its code and `ibv_wc_status_str` text.
    Failed(u32, &'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WcOpcode {
    /// A send-side completion of a posted write.
    RdmaWrite,
    /// A peer's write with immediate landed here.
    RecvRdmaWithImm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkCompletion {
    pub wr_id: u64,
    pub status: WcStatus,
    pub opcode: WcOpcode,
    pub byte_len: u32,
    pub imm_be: u32,
    /// The local queue pair it completed on (one per linked peer).
    pub qp_num: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The contract's completion of a peer's write.
    Received(Completion),
    /// Writes to `peer` up to this work request have left this rank's memory (each peer's
    /// queue pair numbers its own work requests).
    Sent { peer: usize, wr_id: u64 },
}

/// What a completion means for the contract; an error completion is the loss of the peer its
/// queue pair connects to (the queue pair is in the error state from then on).
pub fn event(
    wc: &WorkCompletion,
    peer_of_qp: &dyn Fn(u32) -> Option<usize>,
    rank: usize,
) -> Result<Event> {
    let peer = peer_of_qp(wc.qp_num).ok_or_else(|| Error::Internal {
        rank,
        detail: format!(
            "a completion on queue pair {}, which is none of this rank's",
            wc.qp_num
        ),
    })?;
    if let WcStatus::Failed(code, text) = wc.status {
        return Err(Error::PeerLost {
            peer,
            reason: format!("its queue pair failed ({text}, status {code})"),
        });
    }
    Ok(match wc.opcode {
        WcOpcode::RecvRdmaWithImm => Event::Received(Completion {
            src: peer,
            imm: u32::from_be(wc.imm_be),
            len: wc.byte_len as usize,
        }),
        WcOpcode::RdmaWrite => Event::Sent {
            peer,
            wr_id: wc.wr_id,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regions(k: MemKey) -> Option<LocalRegion> {
        match k.0 {
            1 => Some(LocalRegion {
                addr: 0x10_000,
                len: 4096,
                lkey: 77,
            }),
            2 => Some(LocalRegion {
                addr: 0x90_000,
                len: 64,
                lkey: 78,
            }),
            _ => None,
        }
    }

    const REMOTE: RemoteRegion = RemoteRegion {
        addr: 0x5000_0000,
        len: 1 << 20,
        rkey: 555,
    };

    fn sge(key: u32, offset: usize, len: usize) -> Sge {
        Sge {
            key: MemKey(key),
            offset,
            len,
        }
    }

    #[test]
    fn a_write_gathers_registered_memory_to_the_peers_region() {
        let src = [sge(1, 100, 24), sge(2, 0, 64)];
        let w = Write {
            wr_id: 42,
            src: &src,
            offset: 4096,
            imm: 0x0102_0304,
            signaled: true,
        };
        let wr = write_request(0, &w, &regions, &REMOTE).unwrap();
        assert_eq!(
            wr.sges,
            vec![
                LocalSge {
                    addr: 0x10_000 + 100,
                    len: 24,
                    lkey: 77
                },
                LocalSge {
                    addr: 0x90_000,
                    len: 64,
                    lkey: 78
                },
            ]
        );
        assert_eq!(
            (wr.remote_addr, wr.rkey, wr.wr_id, wr.signaled),
            (0x5000_0000 + 4096, 555, 42, true)
        );
        assert_eq!(wr.imm_be.unwrap().to_ne_bytes(), [1, 2, 3, 4]); // network byte order on the wire
    }

    #[test]
    fn what_falls_outside_registered_memory_or_the_peers_region_is_refused() {
        let cases = [
            (vec![sge(3, 0, 8)], 0, "memory key 3 is not registered"),
            (vec![sge(2, 60, 8)], 0, "8 bytes at 60 of a 64-byte region"),
            (vec![sge(1, 0, 64)], (1 << 20) - 32, "64 bytes at 1048544"),
            (
                vec![sge(1, 0, 1); MAX_SGE + 1],
                0,
                "31 scatter-gather entries",
            ),
        ];
        for (src, offset, says) in cases {
            let w = Write {
                wr_id: 1,
                src: &src,
                offset,
                imm: 0,
                signaled: false,
            };
            let e = write_request(2, &w, &regions, &REMOTE).unwrap_err();
            assert!(
                matches!(e, Error::Internal { rank: 2, .. }) && e.to_string().contains(says),
                "{e}"
            );
        }
    }

    #[test]
    fn completions_become_the_contracts_and_errors_lose_the_peer() {
        let peer_of = |qp: u32| (qp >= 10).then(|| (qp - 10) as usize);
        let wc = WorkCompletion {
            wr_id: 0,
            status: WcStatus::Success,
            opcode: WcOpcode::RecvRdmaWithImm,
            byte_len: 4128,
            imm_be: 0xdead_beefu32.to_be(),
            qp_num: 13,
        };
        assert_eq!(
            event(&wc, &peer_of, 0).unwrap(),
            Event::Received(Completion {
                src: 3,
                imm: 0xdead_beef,
                len: 4128
            })
        );
        let sent = WorkCompletion {
            opcode: WcOpcode::RdmaWrite,
            wr_id: 9,
            ..wc
        };
        assert_eq!(
            event(&sent, &peer_of, 0).unwrap(),
            Event::Sent { peer: 3, wr_id: 9 }
        );
        let failed = WorkCompletion {
            status: WcStatus::Failed(12, "transport retry counter exceeded"),
            ..wc
        };
        let e = event(&failed, &peer_of, 0).unwrap_err();
        assert!(
            matches!(e, Error::PeerLost { peer: 3, .. })
                && e.to_string().contains("retry counter exceeded"),
            "{e}"
        );
        let stray = WorkCompletion { qp_num: 2, ..wc };
        assert!(matches!(
            event(&stray, &peer_of, 0).unwrap_err(),
            Error::Internal { .. }
        ));
    }
}
