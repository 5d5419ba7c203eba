//! What a rank tells each linked peer through the bootstrap so that the peer can connect an
//! RC queue pair to it and write its regions: addressing (LID for InfiniBand, GID for RoCE),
//! queue pair number, starting packet sequence number, path MTU, and every region's address,
//! length and remote key. A fixed little-endian encoding; everything decoded is checked.

use crate::error::{Error, Result};
use crate::transport::NUM_REGIONS;

const MAGIC: &[u8; 4] = b"DCVB";
const VERSION: u32 = 1;
/// magic, version, rank, lid (u16) + mtu (u16), qpn, psn, gid, regions.
pub const ADDRESS_BYTES: usize = 4 + 4 + 4 + 4 + 4 + 4 + 16 + NUM_REGIONS * 20;

/// `ibv_mtu`: the path MTU of a queue pair, 256 to 4096 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PathMtu {
    Mtu256 = 1,
    Mtu512 = 2,
    Mtu1024 = 3,
    Mtu2048 = 4,
    Mtu4096 = 5,
}

impl PathMtu {
    pub fn from_code(code: u16) -> Option<Self> {
        Some(match code {
            1 => Self::Mtu256,
            2 => Self::Mtu512,
            3 => Self::Mtu1024,
            4 => Self::Mtu2048,
            5 => Self::Mtu4096,
            _ => return None,
        })
    }

    pub fn bytes(self) -> usize {
        128 << (self as usize)
    }
}

/// A region a peer may write: where it is and its remote key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RemoteRegion {
    pub addr: u64,
    pub len: u64,
    pub rkey: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QpAddress {
    pub rank: u32,
    /// 0 on RoCE, where the GID addresses the port.
    pub lid: u16,
    pub gid: [u8; 16],
    /// Queue pair number and initial packet sequence number: 24 bits each.
    pub qpn: u32,
    pub psn: u32,
    pub mtu: PathMtu,
    pub regions: [RemoteRegion; NUM_REGIONS],
}

impl QpAddress {
    pub fn encode(&self) -> [u8; ADDRESS_BYTES] {
        let mut b = [0u8; ADDRESS_BYTES];
        b[0..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&VERSION.to_le_bytes());
        b[8..12].copy_from_slice(&self.rank.to_le_bytes());
        b[12..14].copy_from_slice(&self.lid.to_le_bytes());
        b[14..16].copy_from_slice(&(self.mtu as u16).to_le_bytes());
        b[16..20].copy_from_slice(&self.qpn.to_le_bytes());
        b[20..24].copy_from_slice(&self.psn.to_le_bytes());
        b[24..40].copy_from_slice(&self.gid);
        for (i, r) in self.regions.iter().enumerate() {
            let at = 40 + i * 20;
            b[at..at + 8].copy_from_slice(&r.addr.to_le_bytes());
            b[at + 8..at + 16].copy_from_slice(&r.len.to_le_bytes());
            b[at + 16..at + 20].copy_from_slice(&r.rkey.to_le_bytes());
        }
        b
    }

    /// Decodes what `peer` sent; a record that cannot be an address of `peer` is its fault.
    pub fn decode(peer: usize, b: &[u8]) -> Result<Self> {
        let bad = |what: String| Error::Protocol {
            peer,
            detail: format!("verbs address: {what}"),
        };
        if b.len() != ADDRESS_BYTES || &b[0..4] != MAGIC {
            return Err(bad(format!(
                "{} bytes, not a dualcomm verbs address",
                b.len()
            )));
        }
        let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().expect("2 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if u32_at(4) != VERSION {
            return Err(bad(format!("version {}, expected {VERSION}", u32_at(4))));
        }
        let rank = u32_at(8);
        if rank as usize != peer {
            return Err(bad(format!("it names rank {rank}")));
        }
        let mtu = PathMtu::from_code(u16_at(14))
            .ok_or_else(|| bad(format!("path MTU code {}", u16_at(14))))?;
        let (qpn, psn) = (u32_at(16), u32_at(20));
        if qpn >= 1 << 24 || psn >= 1 << 24 {
            return Err(bad(format!(
                "queue pair number {qpn} or sequence number {psn} past 24 bits"
            )));
        }
        let mut regions = [RemoteRegion::default(); NUM_REGIONS];
        for (i, r) in regions.iter_mut().enumerate() {
            let at = 40 + i * 20;
            *r = RemoteRegion {
                addr: u64_at(at),
                len: u64_at(at + 8),
                rkey: u32_at(at + 16),
            };
            if r.addr.checked_add(r.len).is_none() {
                return Err(bad(format!(
                    "region {i} of {} bytes at {:#x} wraps",
                    r.len, r.addr
                )));
            }
        }
        Ok(Self {
            rank,
            lid: u16_at(12),
            gid: b[24..40].try_into().expect("16 bytes"),
            qpn,
            psn,
            mtu,
            regions,
        })
    }
}

/// What one rank publishes through the bootstrap: for each peer it links to, the address of
/// the queue pair it made for that peer (`to` rank as u32, then the address), in any order.
pub fn encode_card(entries: &[(usize, QpAddress)]) -> Vec<u8> {
    let mut card = Vec::with_capacity(entries.len() * (4 + ADDRESS_BYTES));
    for (to, address) in entries {
        card.extend_from_slice(&(*to as u32).to_le_bytes());
        card.extend_from_slice(&address.encode());
    }
    card
}

/// The address `owner`'s card holds for rank `to`; a card that is malformed, or that has no
/// address (or two) for `to`, is `owner`'s fault.
pub fn address_in_card(owner: usize, card: &[u8], to: usize) -> Result<QpAddress> {
    let bad = |what: String| Error::Protocol {
        peer: owner,
        detail: format!("verbs card: {what}"),
    };
    const ENTRY: usize = 4 + ADDRESS_BYTES;
    if card.len() % ENTRY != 0 {
        return Err(bad(format!(
            "{} bytes, not a whole number of {ENTRY}-byte entries",
            card.len()
        )));
    }
    let mut found = None;
    for entry in card.chunks_exact(ENTRY) {
        let entry_to = u32::from_le_bytes(entry[..4].try_into().expect("4 bytes")) as usize;
        if entry_to != to {
            continue;
        }
        if found.is_some() {
            return Err(bad(format!("two addresses for rank {to}")));
        }
        found = Some(QpAddress::decode(owner, &entry[4..])?);
    }
    found.ok_or_else(|| {
        bad(format!(
            "no address for rank {to}: rank {owner} did not make a queue pair for it \
             (do both ranks agree on the topology?)"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(rank: u32) -> QpAddress {
        QpAddress {
            rank,
            lid: 17,
            gid: [7; 16],
            qpn: 0x12_3456,
            psn: 0xab_cdef,
            mtu: PathMtu::Mtu4096,
            regions: std::array::from_fn(|i| RemoteRegion {
                addr: 0x1000 * (i as u64 + 1),
                len: 64 << i,
                rkey: 9 + i as u32,
            }),
        }
    }

    #[test]
    fn a_card_gives_each_peer_the_address_made_for_it() {
        let for_peer = |qpn| QpAddress { qpn, ..sample(1) };
        let card = encode_card(&[(4, for_peer(40)), (0, for_peer(10)), (7, for_peer(70))]);
        for (to, qpn) in [(0, 10), (4, 40), (7, 70)] {
            assert_eq!(address_in_card(1, &card, to).unwrap().qpn, qpn);
        }
        // An address in the card of one rank that names another is refused.
        assert!(address_in_card(3, &card, 0).is_err());
    }

    proptest! {
        #[test]
        fn round_trips(lid: u16, qpn in 0u32..1 << 24, psn in 0u32..1 << 24, mtu in 1u16..6, gid: [u8; 16]) {
            let a = QpAddress { lid, qpn, psn, gid, mtu: PathMtu::from_code(mtu).unwrap(), ..sample(3) };
            prop_assert_eq!(QpAddress::decode(3, &a.encode()).unwrap(), a);
        }
    }

    #[test]
    fn what_cannot_be_an_address_is_the_senders_fault() {
        let good = sample(2).encode();
        type Tamper = Box<dyn Fn(&mut [u8])>;
        let cases: Vec<(Tamper, &str)> = vec![
            (Box::new(|b| b[0] = b'X'), "not a dualcomm verbs address"),
            (Box::new(|b| b[4] = 9), "version 9"),
            (Box::new(|b| b[8] = 5), "it names rank 5"),
            (Box::new(|b| b[14] = 6), "path MTU code 6"),
            (Box::new(|b| b[19] = 1), "past 24 bits"),
            (
                Box::new(|b| b[40..48].copy_from_slice(&u64::MAX.to_le_bytes())),
                "wraps",
            ),
        ];
        for (tamper, says) in cases {
            let mut b = good;
            tamper(&mut b);
            let e = QpAddress::decode(2, &b).unwrap_err();
            assert!(
                matches!(e, Error::Protocol { peer: 2, .. }) && e.to_string().contains(says),
                "{e}"
            );
        }
        assert!(QpAddress::decode(2, &good[..10]).is_err());
        let card = encode_card(&[(0, sample(2)), (5, sample(2))]);
        assert!(address_in_card(2, &card[..card.len() - 1], 5).is_err());
        let twice = encode_card(&[(5, sample(2)), (5, sample(2))]);
        for (card, to, says) in [
            (&card, 4, "no address for rank 4"),
            (&twice, 5, "two addresses"),
        ] {
            let e = address_in_card(2, card, to).unwrap_err();
            assert!(
                matches!(e, Error::Protocol { peer: 2, .. }) && e.to_string().contains(says),
                "{e}"
            );
        }
        assert_eq!(PathMtu::Mtu1024.bytes(), 1024);
    }
}
