//! Verbs on a real RDMA device: run where `ibv_get_device_list` finds one with an active port
//! (`DUALCOMM_IB_DEVICE` picks it, `DUALCOMM_IB_GID_INDEX` its GID on RoCE), skipped with the
//! reason otherwise, as the rust-ibverbs crate's tests do.
#![cfg(feature = "verbs")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use dualcomm_core::Error;
use dualcomm_core::transport::verbs::setup::{VerbsOptions, VerbsSetup};
use dualcomm_core::transport::verbs::transport::VerbsTransport;
use dualcomm_core::transport::{Completion, OpenWiring, RegionId, Sge, Tier, Transport};

use dualcomm_core::transport::verbs::abi::{IbvWc, work_completion};
use dualcomm_core::transport::verbs::address::{PathMtu, QpAddress, RemoteRegion};
use dualcomm_core::transport::verbs::device::{PortLink, find};
use dualcomm_core::transport::verbs::qp::{LinkLayer, QpConfig, connect};
use dualcomm_core::transport::verbs::resources::{Nic, Qp};
use dualcomm_core::transport::verbs::work::{
    LocalSge, RECV_WR_BIT, WcOpcode, WcStatus, WriteRequest,
};

fn nic() -> Option<Nic> {
    let chosen = match find(std::env::var("DUALCOMM_IB_DEVICE").ok().as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("skipped: {e}");
            return None;
        }
    };
    let gid_index = std::env::var("DUALCOMM_IB_GID_INDEX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some(Nic::open(chosen, gid_index).expect("the device that was found opens"))
}

fn address(nic: &Nic, qp: &Qp, psn: u32) -> QpAddress {
    QpAddress {
        rank: 0,
        lid: nic.chosen.port.lid,
        gid: nic.gid,
        qpn: qp.qp_num(),
        psn,
        mtu: nic.chosen.port.active_mtu.unwrap_or(PathMtu::Mtu1024),
        regions: [RemoteRegion::default(); 4],
    }
}

#[test]
fn two_queue_pairs_on_one_device_carry_a_write_with_immediate() {
    let Some(nic) = nic() else { return };
    let cq = nic.completion_queue(64).unwrap();
    let srq = nic.shared_receive_queue(16).unwrap();
    let (a, b) = (
        nic.queue_pair(&cq, &srq, 16, 4).unwrap(),
        nic.queue_pair(&cq, &srq, 16, 4).unwrap(),
    );
    let link = match nic.chosen.port.link {
        PortLink::InfiniBand => LinkLayer::InfiniBand,
        PortLink::Ethernet => LinkLayer::Ethernet {
            gid_index: nic.gid_index,
        },
    };
    let cfg = QpConfig::new(nic.chosen.port.num, link);
    let (addr_a, addr_b) = (address(&nic, &a, 11), address(&nic, &b, 22));
    for (qp, local, remote) in [(&a, &addr_a, &addr_b), (&b, &addr_b, &addr_a)] {
        for (_, attrs) in connect(local, remote, &cfg) {
            qp.modify(&attrs).unwrap();
        }
    }
    let len = 4096;
    let mut src: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
    let mut dst = vec![0u8; len];
    // SAFETY: both buffers outlive their registrations (dropped at the end of the test).
    let (src_mr, dst_mr) = unsafe {
        (
            nic.register(src.as_mut_ptr(), len).unwrap(),
            nic.register(dst.as_mut_ptr(), len).unwrap(),
        )
    };
    srq.post_receive(RECV_WR_BIT | 1).unwrap();
    a.post_write(&WriteRequest {
        wr_id: 7,
        sges: vec![LocalSge {
            addr: src_mr.addr(),
            len: len as u32,
            lkey: src_mr.lkey(),
        }],
        remote_addr: dst_mr.addr(),
        rkey: dst_mr.rkey(),
        imm_be: Some(0xfeedu32.to_be()),
        signaled: true,
    })
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < 2 {
        assert!(Instant::now() < deadline, "completions so far: {got:?}");
        let mut wcs = [IbvWc::default(); 4];
        let n = cq.poll(&mut wcs).unwrap();
        got.extend(wcs[..n].iter().map(work_completion));
    }
    let sent = got
        .iter()
        .find(|c| c.opcode == WcOpcode::RdmaWrite)
        .unwrap();
    assert_eq!(
        (sent.wr_id, sent.status, sent.qp_num),
        (7, WcStatus::Success, a.qp_num())
    );
    let recv = got
        .iter()
        .find(|c| c.opcode == WcOpcode::RecvRdmaWithImm)
        .unwrap();
    assert_eq!(recv.status, WcStatus::Success);
    assert_eq!(
        (recv.imm_be, recv.byte_len, recv.qp_num),
        (0xfeedu32.to_be(), len as u32, b.qp_num())
    );
    drop((src_mr, dst_mr));
    assert_eq!(dst, src);
}

fn open_pair(lens: [usize; 4]) -> Option<(VerbsTransport, VerbsTransport)> {
    let opts = VerbsOptions::from_env().unwrap();
    if let Err(e) = find(opts.device.as_deref()) {
        eprintln!("skipped: {e}");
        return None;
    }
    let wiring = Arc::new(OpenWiring {
        lens,
        world: 2,
        tier: Tier::Rdma,
    });
    let timeout = Duration::from_secs(10);
    let setups: Vec<VerbsSetup> = (0..2)
        .map(|r| VerbsSetup::open(r, wiring.clone(), &opts, timeout).unwrap())
        .collect();
    let cards: Vec<Vec<u8>> = setups.iter().map(VerbsSetup::card).collect();
    let mut ts = setups.into_iter().map(|s| s.connect(&cards).unwrap());
    Some((ts.next().unwrap(), ts.next().unwrap()))
}

#[test]
fn without_a_device_the_transport_says_what_is_missing() {
    let opts = VerbsOptions::from_env().unwrap();
    let Err(missing) = find(opts.device.as_deref()) else {
        eprintln!("skipped: this machine has an RDMA device");
        return;
    };
    let wiring = Arc::new(OpenWiring {
        lens: [64; 4],
        world: 2,
        tier: Tier::Rdma,
    });
    let e = VerbsSetup::open(0, wiring, &opts, Duration::from_secs(1))
        .err()
        .expect("no device, no transport");
    assert!(
        matches!(e, Error::TransportUnavailable { .. }) && e.to_string() == missing.to_string(),
        "{e} / {missing}"
    );
}

#[test]
fn the_transport_writes_flushes_and_says_goodbye() {
    let Some((a, b)) = open_pair([4096, 4096, 256, 256]) else {
        return;
    };
    assert_eq!((a.connections(), b.connections()), ([0, 1], [0, 1]));
    let src: Vec<u8> = (0..3000).map(|i| (i % 251) as u8).collect();
    // SAFETY: `src` outlives its registration (deregistered below).
    let key = unsafe { a.register(src.as_ptr(), src.len()).unwrap() };
    let sge = |offset, len| Sge { key, offset, len };
    a.write_with_imm(
        1,
        RegionId::RdmaRings,
        100,
        &[sge(0, 1000), sge(2000, 1000)],
        5,
    )
    .unwrap();
    a.write_with_imm(1, RegionId::RdmaRings, 3000, &[], 6)
        .unwrap();
    a.flush(Instant::now() + Duration::from_secs(10)).unwrap();
    a.deregister(key);
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < 2 && Instant::now() < deadline {
        b.poll(&mut got, deadline).unwrap();
    }
    assert_eq!(
        got,
        vec![
            Completion {
                src: 0,
                imm: 5,
                len: 2000
            },
            Completion {
                src: 0,
                imm: 6,
                len: 0
            },
        ]
    );
    // SAFETY: the completion was seen and nobody writes the range again.
    let landed = unsafe { b.local(RegionId::RdmaRings, 100, 2000).unwrap() };
    assert_eq!(&landed[..1000], &src[..1000]);
    assert_eq!(&landed[1000..], &src[2000..]);
    assert_eq!(a.wire_bytes(), [0, 2000]);
    // A write outside the peer's region is this rank's bug, and is refused before posting.
    assert!(
        a.write_with_imm(1, RegionId::RdmaMeta, 250, &[sge(0, 8)], 0)
            .is_err()
    );
    a.shutdown(41);
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.peer_gone(0).is_none() && Instant::now() < deadline {
        b.poll(&mut got, Instant::now() + Duration::from_millis(10))
            .unwrap();
    }
    let gone = b.peer_gone(0).expect("a's goodbye arrived");
    assert_eq!(gone.completed_ops.map(|n| n.near(41)), Some(41), "{gone:?}");
    assert!(matches!(
        a.write_with_imm(1, RegionId::RdmaRings, 0, &[], 0),
        Err(Error::Destroyed)
    ));
}
