//! Verbs on a real RDMA device: run where `ibv_get_device_list` finds one with an active port
//! (`DUALCOMM_IB_DEVICE` picks it, `DUALCOMM_IB_GID_INDEX` its GID on RoCE), skipped with the
//! reason otherwise, as the rust-ibverbs crate's tests do.

use std::time::{Duration, Instant};

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
        imm_be: 0xfeedu32.to_be(),
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
