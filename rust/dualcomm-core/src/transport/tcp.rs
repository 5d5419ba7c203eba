//! TCP: one-sided writes as frames over sockets, for machines without InfiniBand.
//!
//! Every ordered pair of linked ranks (see `Wiring`: the ranks of a node, and twins across
//! nodes) has one connection, opened by the writer; other pairs never connect. A frame is a
//! 24-byte header `{kind, region, imm, offset, len}` and `len` payload bytes, sent with one
//! vectored write per batch of records. The receiving side's reader thread validates the
//! header (known region, range inside the slots the sender owns) before it reads a single
//! payload byte, reads the payload straight into the region, and only then queues the
//! completion `(sender, imm, len)`: the RDMA ordering rule, kept by construction.
//!
//! A connection must open with the job's magic, protocol version, world size, the claimed
//! rank and the per-job secret handed out through the bootstrap; anything else is logged and
//! dropped before it can write a byte. A peer whose connection breaks without saying goodbye
//! is lost; one that said goodbye reports how many operations it completed.

use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::memory::{CompletionQueue, RegionMem, Registry};
use super::{
    Completion, Departure, MemKey, NUM_REGIONS, OpCount, RegionId, Sge, TierCounters, Transport,
    Wiring,
};
use crate::error::{Error, Result};
use crate::protocol::op::RECV_DEPTH;

const MAGIC: [u8; 4] = *b"DCOM";
const VERSION: u32 = 2;
pub const SECRET_BYTES: usize = 16;
const HELLO_BYTES: usize = 4 + 4 + 4 + 4 + SECRET_BYTES;
pub const FRAME_HEADER_BYTES: usize = 24;
const KIND_WRITE: u8 = 1;
const KIND_GOODBYE: u8 = 2;
/// How long an accepted connection may take to introduce itself.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// A bound, not yet serving, listening socket: bind first, publish the port through the
/// bootstrap, then [`TcpTransport::establish`].
pub struct TcpBinding {
    listener: TcpListener,
}

impl TcpBinding {
    /// Binds `host` on an ephemeral port. Only that address is listened on.
    pub fn bind(host: &str) -> Result<Self> {
        let listener = TcpListener::bind((host, 0)).map_err(|e| {
            Error::invalid(
                "host",
                "an address of this machine to listen on",
                format!("{host} ({e})"),
            )
        })?;
        Ok(Self { listener })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound socket")
    }
}

/// A frame header as it travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: u8,
    pub region: u8,
    pub imm: u32,
    pub offset: u64,
    pub len: u64,
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; FRAME_HEADER_BYTES] {
        let mut b = [0u8; FRAME_HEADER_BYTES];
        b[0] = self.kind;
        b[1] = self.region;
        b[4..8].copy_from_slice(&self.imm.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; FRAME_HEADER_BYTES]) -> Self {
        Self {
            kind: b[0],
            region: b[1],
            imm: u32::from_le_bytes(b[4..8].try_into().unwrap()),
            offset: u64::from_le_bytes(b[8..16].try_into().unwrap()),
            len: u64::from_le_bytes(b[16..24].try_into().unwrap()),
        }
    }
}

/// What a received frame asks for, after validation against this rank's regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    Write {
        region: RegionId,
        offset: usize,
        len: usize,
        imm: u32,
    },
    Goodbye {
        completed_ops: u64,
    },
}

/// Checks a header against the receiver's region sizes; the error says what was wrong.
pub fn validate(
    h: &FrameHeader,
    region_lens: &[usize; NUM_REGIONS],
) -> std::result::Result<Frame, String> {
    match h.kind {
        KIND_GOODBYE => Ok(Frame::Goodbye {
            completed_ops: h.offset,
        }),
        KIND_WRITE => {
            let region = RegionId::from_index(h.region as usize)
                .ok_or_else(|| format!("unknown region {}", h.region))?;
            let cap = region_lens[region as usize] as u64;
            if h.offset.checked_add(h.len).is_none_or(|end| end > cap) {
                return Err(format!(
                    "write of {} bytes at offset {} outside a {cap}-byte region",
                    h.len, h.offset
                ));
            }
            Ok(Frame::Write {
                region,
                offset: h.offset as usize,
                len: h.len as usize,
                imm: h.imm,
            })
        }
        k => Err(format!("unknown frame kind {k}")),
    }
}

struct Shared {
    rank: usize,
    world: usize,
    secret: [u8; SECRET_BYTES],
    regions: [RegionMem; NUM_REGIONS],
    wiring: Arc<dyn Wiring>,
    cq: CompletionQueue,
    gone: Vec<Mutex<Option<Departure>>>,
    stop: AtomicBool,
    /// Authenticated incoming connections (clones, to unblock their readers at shutdown).
    inbound: Mutex<Vec<Option<TcpStream>>>,
    inbound_changed: Condvar,
    rejected: AtomicU64,
    address: String,
}

impl Shared {
    fn region_lens(&self) -> [usize; NUM_REGIONS] {
        std::array::from_fn(|i| self.regions[i].len())
    }

    fn lose(&self, peer: usize, reason: String) {
        let mut g = self.gone[peer].lock().unwrap();
        if g.is_none() {
            *g = Some(Departure {
                reason,
                completed_ops: None,
            });
        }
        drop(g);
        self.cq.wake();
    }
}

pub struct TcpTransport {
    shared: Arc<Shared>,
    senders: Vec<Option<Mutex<TcpStream>>>,
    /// Clones of the senders, to close a connection whose writer is stuck holding its lock.
    closers: Vec<Option<TcpStream>>,
    wire: TierCounters,
    registry: Registry,
    closed: AtomicBool,
    /// The deadline of a write to a peer that stops reading (the buffer's timeout).
    timeout: Duration,
}

impl TcpTransport {
    /// Connects to every linked peer (retrying until `timeout`) and waits until every linked
    /// peer has connected here. `peers[r]` is rank r's published address.
    pub fn establish(
        binding: TcpBinding,
        rank: usize,
        peers: &[String],
        secret: [u8; SECRET_BYTES],
        wiring: Arc<dyn Wiring>,
        timeout: Duration,
    ) -> Result<Self> {
        let world = peers.len();
        if rank >= world {
            return Err(Error::invalid("rank", format!("in [0, {world})"), rank));
        }
        if wiring.world_size() != world {
            return Err(Error::invalid(
                "wiring",
                format!("a plan for {world} ranks"),
                wiring.world_size(),
            ));
        }
        let region_lens = wiring.region_lens();
        let deadline = Instant::now() + timeout;
        let shared = Arc::new(Shared {
            rank,
            world,
            secret,
            regions: RegionMem::all(region_lens)?,
            wiring,
            cq: CompletionQueue::default(),
            gone: (0..world).map(|_| Mutex::new(None)).collect(),
            stop: AtomicBool::new(false),
            inbound: Mutex::new((0..world).map(|_| None).collect()),
            inbound_changed: Condvar::new(),
            rejected: AtomicU64::new(0),
            address: binding.local_addr().to_string(),
        });
        binding
            .listener
            .set_nonblocking(true)
            .map_err(|e| io_error("listening socket", e))?;
        {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("dualcomm-accept-{rank}"))
                .spawn(move || accept_loop(shared, binding.listener))
                .map_err(|e| io_error("acceptor thread", e))?;
        }
        let mut senders = Vec::with_capacity(world);
        let mut closers = Vec::with_capacity(world);
        // On any failure below: stop accepting and drop the connections made so far.
        let fail = |e: Error| {
            shared.stop.store(true, Ordering::Relaxed);
            for s in shared.inbound.lock().unwrap().iter().flatten() {
                s.shutdown(Shutdown::Both).ok();
            }
            e
        };
        for (p, addr) in peers.iter().enumerate() {
            if shared.wiring.link(rank, p).is_none() {
                senders.push(None);
                closers.push(None);
                continue;
            }
            let stream = connect(addr, deadline).map_err(|why| {
                fail(Error::Timeout {
                    what: format!("a connection to rank {p} at {addr} ({why})"),
                    timeout,
                })
            })?;
            // A peer that stops reading (frozen, partitioned) must not block a write past the
            // operation deadline.
            stream.set_write_timeout(Some(timeout)).ok();
            let mut hello = Vec::with_capacity(HELLO_BYTES);
            hello.extend_from_slice(&MAGIC);
            hello.extend_from_slice(&VERSION.to_le_bytes());
            hello.extend_from_slice(&(world as u32).to_le_bytes());
            hello.extend_from_slice(&(rank as u32).to_le_bytes());
            hello.extend_from_slice(&secret);
            let mut stream = stream;
            stream
                .write_all(&hello)
                .map_err(|e| fail(io_error(&format!("hello to rank {p}"), e)))?;
            closers.push(stream.try_clone().ok());
            senders.push(Some(Mutex::new(stream)));
        }
        let t = TcpTransport {
            shared,
            senders,
            closers,
            wire: TierCounters::default(),
            registry: Registry::default(),
            closed: AtomicBool::new(false),
            timeout,
        };
        // Every peer must have introduced itself before the first operation.
        let mut inbound = t.shared.inbound.lock().unwrap();
        loop {
            let missing: Vec<usize> = (0..world)
                .filter(|&p| t.shared.wiring.link(rank, p).is_some() && inbound[p].is_none())
                .collect();
            if missing.is_empty() {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                drop(inbound);
                t.shutdown(0);
                return Err(Error::Timeout {
                    what: format!("ranks {missing:?} to connect to rank {rank}"),
                    timeout,
                });
            }
            inbound = t
                .shared
                .inbound_changed
                .wait_timeout(inbound, deadline - now)
                .unwrap()
                .0;
        }
        drop(inbound);
        Ok(t)
    }
}

fn io_error(what: &str, e: std::io::Error) -> Error {
    Error::os_from(what, e)
}

/// Writes every slice, one vectored system call per batch the kernel takes (a batch of
/// records with their headers is one `writev`, not one call per segment).
fn write_all_vectored(s: &mut TcpStream, mut slices: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    while !slices.is_empty() {
        match s.write_vectored(slices) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn connect(addr: &str, deadline: Instant) -> std::result::Result<TcpStream, String> {
    let target: SocketAddr = addr
        .to_socket_addrs()
        .map_err(|e| format!("bad address: {e}"))?
        .next()
        .ok_or("address resolves to nothing")?;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("no answer before the deadline".into());
        }
        match TcpStream::connect_timeout(&target, left.min(Duration::from_secs(2))) {
            Ok(s) => {
                s.set_nodelay(true).ok();
                return Ok(s);
            }
            // The peer may not listen yet, or its backlog is full: try again shortly.
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Connections allowed to be introducing themselves at once; more are refused, so a flood
/// of idle connections cannot exhaust threads.
const MAX_PENDING_HELLOS: usize = 64;

fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let pending = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    while !shared.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, from)) => {
                if pending.load(Ordering::Relaxed) >= MAX_PENDING_HELLOS {
                    reject(
                        &shared,
                        from,
                        "too many connections waiting to introduce themselves",
                    );
                    continue;
                }
                pending.fetch_add(1, Ordering::Relaxed);
                let (sh, pend) = (Arc::clone(&shared), Arc::clone(&pending));
                let spawned = thread::Builder::new()
                    .name(format!("dualcomm-recv-{}", shared.rank))
                    .spawn(move || serve(sh, stream, from, pend));
                if spawned.is_err() {
                    pending.fetch_sub(1, Ordering::Relaxed);
                    reject(&shared, from, "no thread could be started for it");
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(5)),
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn reject(shared: &Shared, from: SocketAddr, why: &str) {
    shared.rejected.fetch_add(1, Ordering::Relaxed);
    eprintln!(
        "dualcomm: rank {} dropped a connection from {from}: {why}",
        shared.rank
    );
}

/// Checks the hello; returns the authenticated peer rank.
fn hello(shared: &Shared, stream: &mut TcpStream) -> std::result::Result<usize, String> {
    let mut b = [0u8; HELLO_BYTES];
    stream
        .read_exact(&mut b)
        .map_err(|e| format!("incomplete hello ({e})"))?;
    if b[0..4] != MAGIC {
        return Err("not a dualcomm connection".into());
    }
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap()) as usize;
    if u32_at(4) != VERSION as usize {
        return Err(format!(
            "protocol version {}, expected {VERSION}",
            u32_at(4)
        ));
    }
    if u32_at(8) != shared.world {
        return Err(format!(
            "world of {} ranks, this one has {}",
            u32_at(8),
            shared.world
        ));
    }
    let peer = u32_at(12);
    if peer >= shared.world || shared.wiring.link(shared.rank, peer).is_none() {
        return Err(format!(
            "claims to be rank {peer}, which is not linked to this one"
        ));
    }
    // Compare all bytes whatever the first mismatch, so timing tells nothing.
    let diff = b[16..]
        .iter()
        .zip(&shared.secret)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if diff != 0 {
        return Err("wrong job secret".into());
    }
    Ok(peer)
}

fn serve(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    from: SocketAddr,
    pending: Arc<std::sync::atomic::AtomicUsize>,
) {
    stream.set_nonblocking(false).ok();
    stream.set_read_timeout(Some(HELLO_TIMEOUT)).ok();
    let introduced = hello(&shared, &mut stream);
    pending.fetch_sub(1, Ordering::Relaxed);
    let peer = match introduced {
        Ok(p) => p,
        Err(why) => return reject(&shared, from, &why),
    };
    {
        let mut inbound = shared.inbound.lock().unwrap();
        if inbound[peer].is_some() {
            drop(inbound);
            return reject(&shared, from, &format!("rank {peer} is already connected"));
        }
        inbound[peer] = stream.try_clone().ok();
        shared.inbound_changed.notify_all();
    }
    stream.set_read_timeout(None).ok();
    let lens = shared.region_lens();
    let mut said_goodbye = false;
    loop {
        let mut hb = [0u8; FRAME_HEADER_BYTES];
        if let Err(e) = stream.read_exact(&mut hb) {
            if !said_goodbye && !shared.stop.load(Ordering::Relaxed) {
                shared.lose(peer, format!("its connection broke ({e})"));
            }
            return;
        }
        match validate(&FrameHeader::decode(&hb), &lens) {
            Ok(Frame::Goodbye { completed_ops }) => {
                *shared.gone[peer].lock().unwrap() = Some(Departure {
                    reason: format!("it left after {completed_ops} operations"),
                    completed_ops: Some(OpCount::Exact(completed_ops)),
                });
                said_goodbye = true;
                shared.cq.wake();
            }
            Ok(Frame::Write {
                region,
                offset,
                len,
                ..
            }) if !shared.wiring.allows(shared.rank, peer, region, offset, len) => {
                let why = format!(
                    "it wrote {len} bytes at offset {offset} of region {region:?}, outside the \
                     slots it owns there"
                );
                eprintln!("dualcomm: rank {} dropped rank {peer}: {why}", shared.rank);
                stream.shutdown(Shutdown::Both).ok();
                return shared.lose(peer, why);
            }
            Ok(Frame::Write {
                region,
                offset,
                len,
                imm,
            }) => {
                // SAFETY: validated to lie inside the region; the range belongs to this
                // writer until the owner hands it back (protocol credits).
                let dst = match unsafe {
                    shared.regions[region as usize].range_mut(shared.rank, offset, len)
                } {
                    Ok(d) => d,
                    Err(e) => return shared.lose(peer, e.to_string()),
                };
                if let Err(e) = stream.read_exact(dst) {
                    return shared.lose(peer, format!("its connection broke mid-write ({e})"));
                }
                let c = Completion {
                    src: peer,
                    imm,
                    len,
                };
                // Each immediate consumes one of the receives this rank keeps posted for
                // the peer: one that sends past them is refused, not queued without bound.
                if !shared.cq.push_within(c, RECV_DEPTH) {
                    let why = format!("it sent more than {RECV_DEPTH} immediates ahead");
                    stream.shutdown(Shutdown::Both).ok();
                    return shared.lose(peer, why);
                }
            }
            Err(why) => {
                eprintln!(
                    "dualcomm: rank {} dropped rank {peer}: invalid frame: {why}",
                    shared.rank
                );
                stream.shutdown(Shutdown::Both).ok();
                return shared.lose(peer, format!("it sent an invalid frame ({why})"));
            }
        }
    }
}

impl Transport for TcpTransport {
    fn rank(&self) -> usize {
        self.shared.rank
    }

    fn region_len(&self, region: RegionId) -> usize {
        self.shared.regions[region as usize].len()
    }

    unsafe fn register(&self, ptr: *const u8, len: usize) -> Result<MemKey> {
        // SAFETY: the caller's contract (`Transport::register`).
        Ok(unsafe { self.registry.register(ptr, len) })
    }

    fn deregister(&self, key: MemKey) {
        self.registry.deregister(key);
    }

    fn write_with_imm(
        &self,
        peer: usize,
        region: RegionId,
        offset: usize,
        src: &[Sge],
        imm: u32,
    ) -> Result<()> {
        let segments = self
            .registry
            .gather(self.rank(), src, |region, offset, len| {
                self.shared.regions[region as usize].range(self.shared.rank, offset, len)
            })?;
        self.write_segments(peer, region, offset, &segments, imm)
    }

    fn region_memory(&self, region: RegionId) -> (*const u8, usize) {
        let r = &self.shared.regions[region as usize];
        (r.as_ptr(), r.len())
    }

    fn poll(&self, out: &mut Vec<Completion>, deadline: Instant) -> Result<usize> {
        Ok(self.shared.cq.poll(out, deadline))
    }

    unsafe fn local(&self, region: RegionId, offset: usize, len: usize) -> Result<&[u8]> {
        self.shared.regions[region as usize].range(self.shared.rank, offset, len)
    }

    fn peer_gone(&self, peer: usize) -> Option<Departure> {
        if peer == self.shared.rank && self.closed.load(Ordering::Relaxed) {
            return Some(Departure {
                reason: "this rank left".into(),
                completed_ops: None,
            });
        }
        self.shared.gone.get(peer)?.lock().unwrap().clone()
    }

    fn shutdown(&self, completed_ops: u64) {
        if self.closed.swap(true, Ordering::Relaxed) {
            return;
        }
        self.shared.stop.store(true, Ordering::Relaxed);
        let bye = FrameHeader {
            kind: KIND_GOODBYE,
            region: 0,
            imm: 0,
            offset: completed_ops,
            len: 0,
        }
        .encode();
        for (sender, closer) in self.senders.iter().zip(&self.closers) {
            match sender.as_ref().map(Mutex::try_lock) {
                Some(Ok(mut s)) => {
                    // A peer that stopped reading must not hold up leaving for long.
                    s.set_write_timeout(Some(Duration::from_millis(200))).ok();
                    s.write_all(&bye).ok();
                    s.shutdown(Shutdown::Write).ok();
                }
                // A write is in progress (maybe stuck): close under it, without a goodbye.
                _ => {
                    if let Some(c) = closer {
                        c.shutdown(Shutdown::Both).ok();
                    }
                }
            }
        }
        for s in self.shared.inbound.lock().unwrap().iter().flatten() {
            s.shutdown(Shutdown::Both).ok();
        }
        self.shared.cq.wake();
    }

    fn wire_bytes(&self) -> [u64; 2] {
        self.wire.both()
    }

    fn wake(&self) {
        self.shared.cq.wake();
    }

    fn set_notify(&self, notify: super::Notify) -> bool {
        self.shared.cq.set_notify(notify);
        true
    }

    fn address(&self) -> Option<String> {
        Some(self.shared.address.clone())
    }

    /// Connections refused so far (bad hello, wrong secret, duplicate rank, ...).
    fn rejected_connections(&self) -> u64 {
        self.shared.rejected.load(Ordering::Relaxed)
    }

    fn connections(&self) -> [usize; 2] {
        let mut n = [0; 2];
        for p in (0..self.shared.world).filter(|&p| self.senders[p].is_some()) {
            if let Some(t) = self.shared.wiring.link(self.shared.rank, p) {
                n[t as usize] += 1;
            }
        }
        n
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.shutdown(0);
    }
}

impl TcpTransport {
    /// Copies `segments` to `peer` (see `Transport::write_with_imm`).
    fn write_segments(
        &self,
        peer: usize,
        region: RegionId,
        offset: usize,
        segments: &[&[u8]],
        imm: u32,
    ) -> Result<()> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(Error::Destroyed);
        }
        let Some(sender) = self.senders.get(peer).and_then(Option::as_ref) else {
            return Err(Error::Internal {
                rank: self.shared.rank,
                detail: format!("a write to rank {peer}, which is not linked to this one"),
            });
        };
        if let Some(d) = self.peer_gone(peer) {
            return Err(Error::PeerLost {
                peer,
                reason: d.reason,
            });
        }
        let len: usize = segments.iter().map(|s| s.len()).sum();
        if !self
            .shared
            .wiring
            .allows(peer, self.shared.rank, region, offset, len)
        {
            return Err(super::memory::outside_slots(
                self.shared.rank,
                peer,
                region,
                offset,
                len,
            ));
        }
        let header = FrameHeader {
            kind: KIND_WRITE,
            region: region as u8,
            imm,
            offset: offset as u64,
            len: len as u64,
        }
        .encode();
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(1 + segments.len());
        slices.push(IoSlice::new(&header));
        slices.extend(segments.iter().map(|s| IoSlice::new(s)));
        let mut s = sender.lock().unwrap();
        let sent = write_all_vectored(&mut s, &mut slices);
        if let Err(e) = sent {
            // A frame cut short leaves the stream unusable either way.
            self.shared
                .lose(peer, format!("a write to it failed ({e})"));
            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
                return Err(Error::Timeout {
                    what: format!("rank {peer} to take data (its socket stayed full)"),
                    timeout: self.timeout,
                });
            }
            return Err(Error::PeerLost {
                peer,
                reason: format!("a write to it failed ({e})"),
            });
        }
        self.wire.add(region.tier(), FRAME_HEADER_BYTES + len);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 50_000, ..ProptestConfig::default() })]
        /// Fuzzes the frame decoder: whatever 24 bytes arrive, validation either refuses them
        /// or yields a write that lies inside its region.
        #[test]
        fn any_header_is_refused_or_in_bounds(bytes in proptest::array::uniform24(any::<u8>()),
                                              lens in proptest::array::uniform4(0usize..1 << 20)) {
            let h = FrameHeader::decode(&bytes);
            if let Ok(Frame::Write { region, offset, len, .. }) = validate(&h, &lens) {
                prop_assert!(offset + len <= lens[region as usize]);
            }
        }

        #[test]
        fn headers_round_trip(kind in 0u8..4, region in 0u8..5, imm in any::<u32>(),
                              offset in any::<u64>(), len in any::<u64>()) {
            let h = FrameHeader { kind, region, imm, offset, len };
            prop_assert_eq!(FrameHeader::decode(&h.encode()), h);
        }
    }

    /// A peer that bypasses its own checks (a raw socket with the right hello) writes into
    /// the ring of another sender: the receiver drops it before a byte lands.
    #[test]
    fn receiver_refuses_writes_outside_the_senders_slots() {
        use crate::protocol::layout::RegionPlan;
        use crate::topology::Topology;
        let topo = Topology::new(1, 3).unwrap();
        let plan = Arc::new(RegionPlan::new(topo, 3 * 64, 64));
        let secret = [9u8; SECRET_BYTES];
        let b0 = TcpBinding::bind("127.0.0.1").unwrap();
        // Ranks 1 and 2 are played by hand: listeners rank 0 connects to, then raw sockets.
        let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
        let l2 = TcpListener::bind("127.0.0.1:0").unwrap();
        let peers = vec![
            b0.local_addr().to_string(),
            l1.local_addr().unwrap().to_string(),
            l2.local_addr().unwrap().to_string(),
        ];
        let addr0 = b0.local_addr();
        let hello = move |rank: u32| {
            let mut h = Vec::new();
            h.extend_from_slice(&MAGIC);
            h.extend_from_slice(&VERSION.to_le_bytes());
            h.extend_from_slice(&3u32.to_le_bytes());
            h.extend_from_slice(&rank.to_le_bytes());
            h.extend_from_slice(&secret);
            h
        };
        let fakes = thread::spawn(move || {
            let mut socks = Vec::new();
            for rank in [1u32, 2] {
                let mut s = TcpStream::connect(addr0).unwrap();
                s.write_all(&hello(rank)).unwrap();
                socks.push(s);
            }
            socks
        });
        let t0 =
            TcpTransport::establish(b0, 0, &peers, secret, plan, Duration::from_secs(10)).unwrap();
        let mut socks = fakes.join().unwrap();
        // Rank 1's ring at rank 0 is bytes [64, 128) of the nvl rings; [128, 192) is rank 2's.
        let frame = |offset: u64| FrameHeader {
            kind: KIND_WRITE,
            region: RegionId::NvlRings as u8,
            imm: 1 << 30 | 1,
            offset,
            len: 64,
        };
        socks[0].write_all(&frame(64).encode()).unwrap();
        socks[0].write_all(&[1u8; 64]).unwrap();
        socks[0].write_all(&frame(128).encode()).unwrap();
        socks[0].write_all(&[2u8; 64]).unwrap();
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while t0.peer_gone(1).is_none() && Instant::now() < deadline {
            t0.poll(&mut got, Instant::now() + Duration::from_millis(50))
                .unwrap();
        }
        // What arrived before the peer was dropped is queued ahead of its departure.
        t0.poll(&mut got, Instant::now()).unwrap();
        // The write into its own ring arrived; the other one never landed.
        assert_eq!(got.len(), 1, "{got:?}");
        let gone = t0.peer_gone(1).expect("rank 1 dropped");
        assert!(
            gone.reason.contains("outside the slots it owns"),
            "{gone:?}"
        );
        // SAFETY: no peer writes rank 2's ring here (rank 2 sent nothing).
        let ring2 = unsafe { t0.local(RegionId::NvlRings, 128, 64) }.unwrap();
        assert!(ring2.iter().all(|&b| b == 0));
        assert!(t0.peer_gone(2).is_none());
        drop(l1);
        drop(l2);
    }

    #[test]
    fn refuses_out_of_range_writes() {
        let lens = [100, 0, 64, 8];
        let w = |region, offset, len| FrameHeader {
            kind: KIND_WRITE,
            region,
            imm: 0,
            offset,
            len,
        };
        assert!(validate(&w(0, 90, 10), &lens).is_ok());
        assert!(validate(&w(0, 90, 11), &lens).is_err());
        assert!(validate(&w(1, 0, 1), &lens).is_err());
        assert!(validate(&w(4, 0, 0), &lens).is_err());
        assert!(validate(&w(0, u64::MAX, 2), &lens).is_err());
    }
}
