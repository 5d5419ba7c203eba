//! Transport throughput and latency against the raw mechanism underneath, in the same run:
//! TCP one-sided writes against a plain socket stream of the same bytes, loopback writes
//! against memcpy; small-write round trips against a plain socket ping-pong.
//! `cargo bench --bench transports`.

use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use dualcomm_core::transport::loopback::LoopbackFabric;
use dualcomm_core::transport::shm::{ShmSegment, ShmTransport};
use dualcomm_core::transport::tcp::{TcpBinding, TcpTransport};
use dualcomm_core::transport::{OpenWiring, RegionId, Sge, Tier, Transport, Wiring};

const CHUNK: usize = 1 << 20;
const TOTAL: usize = 1 << 30;
const REGION: usize = 64 << 20;
const PINGS: usize = 2000;
const LENS: [usize; 4] = [REGION, REGION, 64, 64];

/// Two ranks linked over rdma, regions writable whole: the transport alone, no protocol.
fn wiring() -> Arc<dyn Wiring> {
    Arc::new(OpenWiring {
        lens: LENS,
        world: 2,
        tier: Tier::Rdma,
    })
}

fn tcp_pair() -> (TcpTransport, TcpTransport) {
    let (b0, b1) = (
        TcpBinding::bind("127.0.0.1").unwrap(),
        TcpBinding::bind("127.0.0.1").unwrap(),
    );
    let peers = vec![b0.local_addr().to_string(), b1.local_addr().to_string()];
    let p1 = peers.clone();
    let t1 = thread::spawn(move || {
        TcpTransport::establish(b1, 1, &p1, [1; 16], wiring(), Duration::from_secs(10)).unwrap()
    });
    let t0 =
        TcpTransport::establish(b0, 0, &peers, [1; 16], wiring(), Duration::from_secs(10)).unwrap();
    (t0, t1.join().unwrap())
}

fn shm_pair() -> (ShmTransport, ShmTransport) {
    let job = format!("bench{}", std::process::id());
    let s0 = ShmSegment::create(&job, 0, 2, LENS).unwrap();
    let s1 = ShmSegment::create(&job, 1, 2, LENS).unwrap();
    let t0 = ShmTransport::attach(s0, &job, wiring(), Duration::from_secs(60)).unwrap();
    let t1 = ShmTransport::attach(s1, &job, wiring(), Duration::from_secs(60)).unwrap();
    t0.unlink();
    t1.unlink();
    (t0, t1)
}

fn loopback_pair() -> (Box<dyn Transport>, Box<dyn Transport>) {
    let fabric = LoopbackFabric::new(2);
    let f1 = Arc::clone(&fabric);
    let t1 = thread::spawn(move || {
        f1.join(1, wiring(), String::new(), Duration::from_secs(10))
            .unwrap()
    });
    let t0 = fabric
        .join(0, wiring(), String::new(), Duration::from_secs(10))
        .unwrap();
    (Box::new(t0), Box::new(t1.join().unwrap()))
}

/// `mem` registered with `t` as one write's source (it outlives every write in this file).
fn source(t: &dyn Transport, mem: &[u8]) -> Sge {
    // SAFETY: the callers keep `mem` alive and unchanged while they write from it.
    let key = unsafe { t.register(mem.as_ptr(), mem.len()) }.unwrap();
    Sge {
        key,
        offset: 0,
        len: mem.len(),
    }
}

/// Streams TOTAL bytes from `a` to `b` in CHUNK writes; returns bytes per second.
fn stream(a: &dyn Transport, b: &dyn Transport) -> f64 {
    let chunk = vec![3u8; CHUNK];
    let n = TOTAL / CHUNK;
    let start = Instant::now();
    thread::scope(|s| {
        s.spawn(|| {
            let mut seen = 0;
            let mut out = Vec::new();
            while seen < n {
                out.clear();
                seen += b
                    .poll(&mut out, Instant::now() + Duration::from_secs(10))
                    .unwrap();
            }
        });
        let src = source(a, &chunk);
        for i in 0..n {
            let offset = (i * CHUNK) % REGION;
            a.write_with_imm(1, RegionId::RdmaRings, offset, &[src], i as u32)
                .unwrap();
        }
    });
    TOTAL as f64 / start.elapsed().as_secs_f64()
}

fn raw_socket_stream() -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let reader = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; CHUNK];
        for _ in 0..TOTAL / CHUNK {
            s.read_exact(&mut buf).unwrap();
        }
    });
    let mut w = TcpStream::connect(addr).unwrap();
    w.set_nodelay(true).unwrap();
    let chunk = vec![3u8; CHUNK];
    let start = Instant::now();
    for _ in 0..TOTAL / CHUNK {
        w.write_all(&chunk).unwrap();
    }
    reader.join().unwrap();
    TOTAL as f64 / start.elapsed().as_secs_f64()
}

fn memcpy_rate() -> f64 {
    let src = vec![3u8; REGION];
    let mut dst = vec![0u8; REGION];
    let start = Instant::now();
    for _ in 0..TOTAL / REGION {
        dst.copy_from_slice(&src);
        black_box(&mut dst);
    }
    TOTAL as f64 / start.elapsed().as_secs_f64()
}

/// Median round trip of a 64-byte write answered by a 64-byte write.
fn ping_pong(a: &dyn Transport, b: &dyn Transport) -> Duration {
    let msg = [5u8; 64];
    let (from_a, from_b) = (source(a, &msg), source(b, &msg));
    let mut rtts = Vec::with_capacity(PINGS);
    thread::scope(|s| {
        s.spawn(|| {
            let mut out = Vec::new();
            for _ in 0..PINGS {
                out.clear();
                while b
                    .poll(&mut out, Instant::now() + Duration::from_secs(10))
                    .unwrap()
                    == 0
                {}
                b.write_with_imm(0, RegionId::RdmaRings, 0, &[from_b], 0)
                    .unwrap();
            }
        });
        let mut out = Vec::new();
        for _ in 0..PINGS {
            let t = Instant::now();
            a.write_with_imm(1, RegionId::RdmaRings, 0, &[from_a], 0)
                .unwrap();
            out.clear();
            while a
                .poll(&mut out, Instant::now() + Duration::from_secs(10))
                .unwrap()
                == 0
            {}
            rtts.push(t.elapsed());
        }
    });
    rtts.sort();
    rtts[PINGS / 2]
}

fn raw_ping_pong() -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let echo = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let mut buf = [0u8; 64];
        for _ in 0..PINGS {
            s.read_exact(&mut buf).unwrap();
            s.write_all(&buf).unwrap();
        }
    });
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_nodelay(true).unwrap();
    let mut buf = [5u8; 64];
    let mut rtts = Vec::with_capacity(PINGS);
    for _ in 0..PINGS {
        let t = Instant::now();
        c.write_all(&buf).unwrap();
        c.read_exact(&mut buf).unwrap();
        rtts.push(t.elapsed());
    }
    echo.join().unwrap();
    rtts.sort();
    rtts[PINGS / 2]
}

fn main() {
    println!(
        "transports: {} MiB in {} KiB one-sided writes; {PINGS} 64-byte round trips",
        TOTAL >> 20,
        CHUNK >> 10
    );
    let (t0, t1) = tcp_pair();
    let tcp = stream(&t0, &t1);
    let raw = raw_socket_stream();
    let (l0, l1) = loopback_pair();
    let lb = stream(l0.as_ref(), l1.as_ref());
    let mem = memcpy_rate();
    let (s0, s1) = shm_pair();
    let shm = stream(&s0, &s1);
    println!(
        "{:<34} {:>10} {:>12} {:>8}",
        "throughput", "GB/s", "baseline", "ratio"
    );
    println!(
        "{:<34} {:>10.2} {:>12.2} {:>7.1}%",
        "tcp write_with_imm vs raw socket",
        tcp / 1e9,
        raw / 1e9,
        100.0 * tcp / raw
    );
    println!(
        "{:<34} {:>10.2} {:>12.2} {:>7.1}%",
        "loopback write vs memcpy",
        lb / 1e9,
        mem / 1e9,
        100.0 * lb / mem
    );
    println!(
        "{:<34} {:>10.2} {:>12.2} {:>7.1}%",
        "shm write vs memcpy",
        shm / 1e9,
        mem / 1e9,
        100.0 * shm / mem
    );
    let rt = ping_pong(&t0, &t1);
    let raw_rt = raw_ping_pong();
    let shm_rt = ping_pong(&s0, &s1);
    println!(
        "{:<34} {:>10} {:>12} {:>8}",
        "latency (median round trip)", "us", "baseline", "ratio"
    );
    println!(
        "{:<34} {:>10.1} {:>12.1} {:>7.2}x",
        "tcp 64 B write + answer vs raw",
        rt.as_secs_f64() * 1e6,
        raw_rt.as_secs_f64() * 1e6,
        rt.as_secs_f64() / raw_rt.as_secs_f64()
    );
    println!(
        "{:<34} {:>10.1} {:>12.1} {:>7.2}x",
        "shm 64 B write + answer vs raw tcp",
        shm_rt.as_secs_f64() * 1e6,
        raw_rt.as_secs_f64() * 1e6,
        shm_rt.as_secs_f64() / raw_rt.as_secs_f64()
    );
}
