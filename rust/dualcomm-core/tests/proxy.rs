//! The rdma tier's CPU proxy over a real transport: a producer thread stands in for the GPU
//! kernel (it packs bytes into a registered send buffer and pushes commands into the ring,
//! as `cuda/command_ring.cuh` does), the proxy drains the ring into writes with immediates,
//! and the peer sees exactly (source, immediate, length) with the bytes in place. Commands a
//! kernel got wrong stop the proxy with an error and tell the kernel through the ring.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use dualcomm_core::Error;
use dualcomm_core::proxy::ring::{STATUS_FAILED, STATUS_OK};
use dualcomm_core::proxy::{Command, CommandRing, Proxy};
use dualcomm_core::transport::loopback::LoopbackFabric;
use dualcomm_core::transport::{Completion, OpenWiring, RegionId, Tier, Transport, Wiring};

const REGION: usize = 1 << 16;
const WAIT: Duration = Duration::from_secs(20);

fn pair() -> (Box<dyn Transport>, Box<dyn Transport>) {
    let wiring = || -> Arc<dyn Wiring> {
        Arc::new(OpenWiring {
            lens: [0, REGION, 0, 0],
            world: 2,
            tier: Tier::Rdma,
        })
    };
    let fabric = LoopbackFabric::new(2);
    let f1 = Arc::clone(&fabric);
    let w1 = wiring();
    let t1 = thread::spawn(move || {
        f1.join(1, w1, String::new(), Duration::from_secs(10))
            .unwrap()
    });
    let t0 = fabric
        .join(0, wiring(), String::new(), Duration::from_secs(10))
        .unwrap();
    (Box::new(t0), Box::new(t1.join().unwrap()))
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(20)
}

#[test]
fn commands_become_writes_the_peer_sees_in_order() {
    let (t0, t1) = pair();
    let send = vec![0u8; 4096];
    // SAFETY: `send` outlives every write below and is written only before its command.
    let key = unsafe { t0.register(send.as_ptr(), send.len()) }.unwrap();
    let ring = Arc::new(CommandRing::owned(0, 4).unwrap());
    let send_addr = send.as_ptr() as usize;
    let producer = {
        let ring = Arc::clone(&ring);
        thread::spawn(move || {
            for i in 0..20u64 {
                let at = (i as usize % 8) * 64;
                // SAFETY: the proxy reads this chunk only after the command that follows.
                unsafe { std::ptr::write_bytes((send_addr + at) as *mut u8, i as u8 + 1, 64) };
                let c = Command::write(
                    0,
                    1,
                    RegionId::RdmaRings,
                    at as u64,
                    i * 64,
                    64,
                    100 + i as u32,
                );
                ring.push(&c, WAIT).unwrap();
                if i % 8 == 7 {
                    // Chunks are reused: wait until the proxy says their writes have left.
                    ring.push(&Command::flush(0), WAIT).unwrap();
                    let want = ring_len_after(i);
                    while ring.flushed() < want {
                        assert_eq!(ring.status(), STATUS_OK);
                        thread::yield_now();
                    }
                }
            }
            ring.push(&Command::flush(0), WAIT).unwrap();
        })
    };
    let mut proxy = Proxy::new(&*t0, 2, key, send.len());
    let deadline = soon();
    while !producer.is_finished() || ring.flushed() < 23 {
        proxy.drain(&ring, deadline).unwrap();
        assert!(Instant::now() < deadline, "the proxy did not finish");
    }
    producer.join().unwrap();
    assert_eq!(proxy.posted(), 20);
    let mut got: Vec<Completion> = Vec::new();
    while got.len() < 20 {
        t1.poll(&mut got, soon()).unwrap();
    }
    for (i, c) in got.iter().enumerate() {
        assert_eq!((c.src, c.imm, c.len), (0, 100 + i as u32, 64));
        // SAFETY: the completion says these bytes landed; nothing writes them again.
        let bytes = unsafe { t1.local(RegionId::RdmaRings, i * 64, 64) }.unwrap();
        assert!(bytes.iter().all(|&b| b == i as u8 + 1), "write {i}");
    }
    t0.deregister(key);
}

/// Commands pushed once write `i` and its flush are in: writes 0..=i plus one flush per 8.
fn ring_len_after(i: u64) -> u64 {
    i + 1 + (i + 1) / 8
}

#[test]
fn a_command_the_proxy_cannot_carry_out_stops_it_and_tells_the_kernel() {
    let (t0, _t1) = pair();
    let send = vec![0u8; 256];
    let key = unsafe { t0.register(send.as_ptr(), send.len()) }.unwrap();
    let cases = [
        (
            Command::write(0, 5, RegionId::RdmaRings, 0, 0, 8, 1),
            "peer 5 in a world of 2",
        ),
        (
            Command::write(0, 0, RegionId::RdmaRings, 0, 0, 8, 1),
            "peer 0 in a world of 2",
        ),
        (
            Command::write(0, 1, RegionId::RdmaRings, 250, 0, 8, 1),
            "8 bytes at 250 of a 256-byte",
        ),
        (
            Command::write(0, 1, RegionId::RdmaRings, 0, 0, 0, 1),
            "0 bytes at 0",
        ),
        // The region plan refuses what no sender may write (outside the peer's region).
        (
            Command::write(0, 1, RegionId::RdmaRings, 0, REGION as u64, 8, 1),
            "",
        ),
    ];
    for (cmd, says) in cases {
        let ring = CommandRing::owned(0, 4).unwrap();
        ring.push(&cmd, WAIT).unwrap();
        let mut proxy = Proxy::new(&*t0, 2, key, send.len());
        let e = proxy.drain(&ring, soon()).unwrap_err();
        assert!(
            matches!(e, Error::Internal { .. }) || !says.is_empty(),
            "{e}"
        );
        assert!(e.to_string().contains(says), "{e}");
        assert_eq!(ring.status(), STATUS_FAILED);
        assert_eq!(proxy.posted(), 0);
    }
    t0.deregister(key);
}
