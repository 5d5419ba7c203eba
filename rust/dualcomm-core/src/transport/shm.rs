//! Shared memory: the ranks of one host map each other's segments and write straight into
//! each other's regions (what NVLink is inside a GPU node).
//!
//! Each rank owns one segment in /dev/shm (mode 0600, a job-unique name) holding a header,
//! its registered regions and one single-producer ring of completions per peer. A writer
//! copies the bytes into the peer's region, then publishes a completion with a release
//! store; the owner reads completions with acquire loads, so the bytes are visible first.
//! An owner with nothing to do spins briefly, then sleeps on a futex in its header that
//! writers ring. Segment names are unlinked as soon as every rank has mapped every segment,
//! so nothing stays in /dev/shm, whatever happens to the processes afterwards.

use std::ffi::CString;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::memory::Registry;
use super::{
    Completion, Departure, MemKey, NUM_REGIONS, OpCount, RegionId, Sge, TierCounters, Transport,
    Wiring,
};
use crate::error::{Error, Result};

const MAGIC: u64 = 0x6475_616c_636f_6d6d; // "dualcomm"
const HEADER_BYTES: usize = 4096;
/// Completions one peer may have outstanding here (its posted receives); writers wait (with
/// a deadline) beyond. The protocol keeps at most `RECV_DEPTH` in flight.
const CQ_SLOTS: u64 = 4096;
const _: () = assert!(CQ_SLOTS as usize >= crate::protocol::op::RECV_DEPTH);
/// A completion as the writer publishes it: `imm: u32 | pad | len: u64` (the source is the
/// queue it sits in).
const SLOT_BYTES: usize = 16;
const CQ_BYTES: usize = 64 + CQ_SLOTS as usize * SLOT_BYTES;
/// Polls before sleeping on the doorbell: about 10-20 us, the cost of a futex wake-up.
const SPIN: u32 = 4000;

/// Header fields, as offsets into the segment.
mod hdr {
    pub const MAGIC: usize = 0;
    pub const WORLD: usize = 8;
    pub const PID: usize = 16;
    /// 0 while the owner is in the job; 1 once it said goodbye.
    pub const STATE: usize = 24;
    pub const COMPLETED_OPS: usize = 32;
    /// Futex word writers bump after publishing; the owner sleeps on it.
    pub const DOORBELL: usize = 40;
    pub const SLEEPING: usize = 44;
    pub const REGION_LENS: usize = 64;
    /// The owner's robust mutex (see the module comment); 64-aligned, 64 bytes reserved.
    pub const LIFELINE: usize = 128;
}

/// `hdr::STATE` values.
const STATE_IN_JOB: u64 = 0;
const STATE_LEFT: u64 = 1;
/// Set by the first peer that found the lifeline's owner dead.
const STATE_DIED: u64 = 2;

fn os_error(what: &str) -> Error {
    Error::os(what)
}

/// One mapped segment (this rank's own, or a peer's).
struct Segment {
    base: *mut u8,
    len: usize,
    region_offsets: [usize; NUM_REGIONS],
    region_lens: [usize; NUM_REGIONS],
    cq_offset: usize,
}

// SAFETY: the mapping lives as long as the struct; shared fields are accessed through
// atomics, region ranges under the protocol's ownership rules (see `Transport::local`).
unsafe impl Send for Segment {}
unsafe impl Sync for Segment {}

/// Region offsets, the completion queues' offset and the segment's size; an error for sizes
/// no segment can have.
fn layout(
    region_lens: [usize; NUM_REGIONS],
    world: usize,
) -> Result<([usize; NUM_REGIONS], usize, usize)> {
    let too_big = || {
        Error::invalid(
            "num_nvl_bytes + num_rdma_bytes",
            "a size a shared-memory segment can have",
            format!("{region_lens:?}"),
        )
    };
    let mut at = HEADER_BYTES;
    let mut offsets = [0; NUM_REGIONS];
    for (i, len) in region_lens.iter().enumerate() {
        offsets[i] = at;
        let padded = len.checked_next_multiple_of(64).ok_or_else(too_big)?;
        at = at.checked_add(padded).ok_or_else(too_big)?;
    }
    let cq = at;
    let len = world
        .checked_mul(CQ_BYTES)
        .and_then(|q| q.checked_add(cq))
        .ok_or_else(too_big)?;
    Ok((offsets, cq, len))
}

impl Segment {
    fn map(fd: i32, len: usize) -> Result<*mut u8> {
        // SAFETY: a fresh shared mapping of a file we hold open; checked for failure.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os_error("mmap of a shared-memory segment"));
        }
        Ok(p as *mut u8)
    }

    fn create(name: &str, region_lens: [usize; NUM_REGIONS], world: usize) -> Result<Self> {
        let (region_offsets, cq_offset, len) = layout(region_lens, world)?;
        let cname =
            CString::new(name).map_err(|_| Error::invalid("segment name", "no NUL bytes", name))?;
        // SAFETY: plain libc calls on an owned name; every result is checked.
        let fd = unsafe {
            libc::shm_open(
                cname.as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_RDWR,
                0o600,
            )
        };
        if fd < 0 {
            return Err(os_error(&format!("shm_open({name})")));
        }
        // SAFETY: fd is ours.
        let sized = unsafe { libc::ftruncate(fd, len as libc::off_t) };
        // Reserve the pages now: a tmpfs that fills up later would kill a writer with SIGBUS
        // instead of returning an error here.
        // SAFETY: fd is ours; the range is the file's size.
        let reserved =
            sized == 0 && unsafe { libc::posix_fallocate(fd, 0, len as libc::off_t) } == 0;
        let base = if reserved {
            Self::map(fd, len)
        } else {
            Err(Error::invalid(
                "num_nvl_bytes + num_rdma_bytes",
                "a size /dev/shm has room for",
                format!("a {len}-byte segment ({})", std::io::Error::last_os_error()),
            ))
        };
        // SAFETY: the mapping (if any) keeps the memory; the descriptor is not needed.
        unsafe { libc::close(fd) };
        let base = base.inspect_err(|_| unsafe {
            libc::shm_unlink(cname.as_ptr());
        })?;
        let seg = Self {
            base,
            len,
            region_offsets,
            region_lens,
            cq_offset,
        };
        seg.u64_at(hdr::WORLD)
            .store(world as u64, Ordering::Relaxed);
        // For people reading a segment (diagnostics only: liveness is the lifeline).
        seg.u64_at(hdr::PID)
            .store(std::process::id() as u64, Ordering::Relaxed);
        for (i, l) in region_lens.iter().enumerate() {
            seg.u64_at(hdr::REGION_LENS + 8 * i)
                .store(*l as u64, Ordering::Relaxed);
        }
        Ok(seg)
    }

    fn open(name: &str, region_lens: [usize; NUM_REGIONS], world: usize) -> Result<Self> {
        let (region_offsets, cq_offset, len) = layout(region_lens, world)?;
        let cname =
            CString::new(name).map_err(|_| Error::invalid("segment name", "no NUL bytes", name))?;
        // SAFETY: as in `create`.
        let fd = unsafe { libc::shm_open(cname.as_ptr(), libc::O_RDWR, 0) };
        if fd < 0 {
            return Err(os_error(&format!("shm_open({name})")));
        }
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fd is open; st is a valid out-parameter.
        let ok = unsafe { libc::fstat(fd, &mut st) } == 0 && st.st_size as usize == len;
        let base = if ok {
            Self::map(fd, len)
        } else {
            Err(Error::ConfigMismatch(format!(
                "segment {name} has {} bytes, this rank expects {len}: buffer sizes differ",
                st.st_size
            )))
        };
        // SAFETY: as in `create`.
        unsafe { libc::close(fd) };
        let seg = Self {
            base: base?,
            len,
            region_offsets,
            region_lens,
            cq_offset,
        };
        let lens_match = (0..NUM_REGIONS).all(|i| {
            seg.u64_at(hdr::REGION_LENS + 8 * i).load(Ordering::Relaxed) == region_lens[i] as u64
        });
        if seg.u64_at(hdr::MAGIC).load(Ordering::Acquire) != MAGIC
            || seg.u64_at(hdr::WORLD).load(Ordering::Relaxed) != world as u64
            || !lens_match
        {
            return Err(Error::ConfigMismatch(format!(
                "segment {name} belongs to another job, world size or buffer sizes"
            )));
        }
        Ok(seg)
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        // SAFETY: in the header, 8-aligned (the mapping is page-aligned).
        unsafe { &*(self.base.add(off) as *const AtomicU64) }
    }

    fn u32_at(&self, off: usize) -> &AtomicU32 {
        // SAFETY: in the header, 4-aligned.
        unsafe { &*(self.base.add(off) as *const AtomicU32) }
    }

    fn lifeline(&self) -> MutexPtr {
        // SAFETY: in the header, 64-aligned, reserved for the mutex.
        MutexPtr(unsafe { self.base.add(hdr::LIFELINE) } as *mut libc::pthread_mutex_t)
    }

    /// Whether the owner is alive: its lifeline is held. The first peer to find it dead
    /// records so in the header (later try-locks would succeed and prove nothing).
    fn owner_alive(&self) -> bool {
        let state = self.u64_at(hdr::STATE);
        if state.load(Ordering::Acquire) == STATE_DIED {
            return false;
        }
        let m = self.lifeline();
        // SAFETY: a process-shared mutex the owner initialised before publishing MAGIC.
        let rc = unsafe { libc::pthread_mutex_trylock(m.0) };
        match rc {
            libc::EBUSY | libc::EDEADLK => true,
            _ => {
                // Free (0) or "owner died": either way nobody holds it for the owner.
                let _ = state.compare_exchange(
                    STATE_IN_JOB,
                    STATE_DIED,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                if rc == 0 || rc == libc::EOWNERDEAD {
                    // SAFETY: this thread holds it now; leave it consistent and free.
                    unsafe {
                        if rc == libc::EOWNERDEAD {
                            libc::pthread_mutex_consistent(m.0);
                        }
                        libc::pthread_mutex_unlock(m.0);
                    }
                }
                false
            }
        }
    }

    fn check(&self, rank: usize, region: RegionId, offset: usize, len: usize) -> Result<usize> {
        let cap = self.region_lens[region as usize];
        if offset.checked_add(len).is_none_or(|e| e > cap) {
            return Err(super::memory::out_of_bounds(rank, offset, len, cap));
        }
        Ok(self.region_offsets[region as usize] + offset)
    }

    /// The completion ring written by `src` in this segment: (head, tail, slots).
    fn cq(&self, src: usize) -> (&AtomicU64, &AtomicU64, *mut u8) {
        let at = self.cq_offset + src * CQ_BYTES;
        (self.u64_at(at), self.u64_at(at + 8), unsafe {
            self.base.add(at + 64)
        })
    }

    fn ring(&self) {
        // SeqCst on both sides (here and in `poll`): the sleeper's flag store and our
        // doorbell bump must not both miss each other.
        self.u32_at(hdr::DOORBELL).fetch_add(1, Ordering::SeqCst);
        if self.u32_at(hdr::SLEEPING).load(Ordering::SeqCst) != 0 {
            futex_wake(self.u32_at(hdr::DOORBELL));
        }
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `map` mapped.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

/// The owner's side of the lifeline: a thread that holds the segment's robust mutex until
/// the transport is dropped (or the process dies, which the kernel then records in it).
struct Lifeline {
    release: Option<std::sync::mpsc::Sender<()>>,
    holder: Option<std::thread::JoinHandle<()>>,
}

/// Address of a segment's lifeline mutex (the mapping outlives every use).
#[derive(Clone, Copy)]
struct MutexPtr(*mut libc::pthread_mutex_t);
// SAFETY: points into a shared mapping that the holder thread's owner keeps mapped.
unsafe impl Send for MutexPtr {}

impl Lifeline {
    /// Initialises the mutex at `m` (process-shared, robust) and has a new thread take it.
    fn hold(m: MutexPtr) -> Result<Self> {
        // SAFETY: `m` points at zeroed, 64-byte-aligned memory of our own new segment that no
        // one else uses yet; every call's result is checked.
        unsafe {
            let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
            if libc::pthread_mutexattr_init(&mut attr) != 0
                || libc::pthread_mutexattr_setpshared(&mut attr, libc::PTHREAD_PROCESS_SHARED) != 0
                || libc::pthread_mutexattr_setrobust(&mut attr, libc::PTHREAD_MUTEX_ROBUST) != 0
                || libc::pthread_mutex_init(m.0, &attr) != 0
            {
                return Err(Error::os("initialising the shared-memory lifeline"));
            }
            libc::pthread_mutexattr_destroy(&mut attr);
        }
        let (locked_tx, locked_rx) = std::sync::mpsc::channel::<i32>();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::Builder::new()
            .name("dualcomm-lifeline".into())
            .spawn(move || {
                let m = m;
                // SAFETY: initialised above; this thread owns it until it unlocks it below.
                let rc = unsafe { libc::pthread_mutex_lock(m.0) };
                let _ = locked_tx.send(rc);
                if rc == 0 {
                    let _ = released.recv(); // until the transport goes (or the process dies)
                    // SAFETY: locked by this thread.
                    unsafe { libc::pthread_mutex_unlock(m.0) };
                }
            })
            .map_err(|e| Error::os_from("starting the shared-memory lifeline thread", e))?;
        match locked_rx.recv() {
            Ok(0) => Ok(Self {
                release: Some(release),
                holder: Some(holder),
            }),
            Ok(rc) => Err(Error::os_from(
                "taking the shared-memory lifeline",
                std::io::Error::from_raw_os_error(rc),
            )),
            Err(_) => Err(Error::os("taking the shared-memory lifeline")),
        }
    }
}

impl Lifeline {
    /// Lets go of the mutex (what the kernel does for a process that dies).
    fn release(&mut self) {
        drop(self.release.take());
        if let Some(h) = self.holder.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Lifeline {
    fn drop(&mut self) {
        self.release();
    }
}

fn futex_wait(word: &AtomicU32, seen: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: a shared futex word inside our mapping; the kernel re-checks its value.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            seen,
            &ts as *const libc::timespec,
        )
    };
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX) };
}

fn encode_slot(imm: u32, len: usize) -> [u8; SLOT_BYTES] {
    let mut b = [0u8; SLOT_BYTES];
    b[0..4].copy_from_slice(&imm.to_le_bytes());
    b[8..16].copy_from_slice(&(len as u64).to_le_bytes());
    b
}

/// Segment names of a job: the prefix must be unique per job (the bootstrap uses the secret).
pub fn segment_name(job: &str, rank: usize) -> String {
    format!("/dualcomm-{job}-{rank}")
}

/// A rank's own segment, created and published before everybody maps everybody.
pub struct ShmSegment {
    /// Dropped before `seg` (fields drop in order): the holder unlocks while still mapped.
    _lifeline: Lifeline,
    seg: Segment,
    name: String,
    rank: usize,
    world: usize,
}

impl ShmSegment {
    pub fn create(
        job: &str,
        rank: usize,
        world: usize,
        region_lens: [usize; NUM_REGIONS],
    ) -> Result<Self> {
        let name = segment_name(job, rank);
        let seg = Segment::create(&name, region_lens, world)?;
        let lifeline = Lifeline::hold(seg.lifeline()).inspect_err(|_| unlink(&name))?;
        // Published last: a peer that maps a segment finds its lifeline held.
        seg.u64_at(hdr::MAGIC).store(MAGIC, Ordering::Release);
        Ok(Self {
            seg,
            name,
            rank,
            world,
            _lifeline: lifeline,
        })
    }
}

impl ShmSegment {
    /// Removes the segment's name (idempotent); mappings stay valid.
    pub fn unlink(&self) {
        unlink(&self.name);
    }
}

impl Drop for ShmSegment {
    fn drop(&mut self) {
        self.unlink();
    }
}

/// Removes a segment name, if it is still there.
pub fn unlink(name: &str) {
    if let Ok(c) = CString::new(name) {
        // SAFETY: plain libc call on an owned name.
        unsafe { libc::shm_unlink(c.as_ptr()) };
    }
}

pub struct ShmTransport {
    own: ShmSegment,
    wiring: Arc<dyn Wiring>,
    /// Completions taken off our rings while this rank waited to write (see `write_with_imm`),
    /// handed out first by `poll`.
    early: std::sync::Mutex<Vec<Completion>>,
    peers: Vec<Option<Segment>>,
    wire: TierCounters,
    registry: Registry,
    left: std::sync::atomic::AtomicBool,
    /// How long a writer waits for a peer's full completion queue (the buffer's timeout).
    timeout: Duration,
    /// Bumped by `wake`: a poller that sees it change returns.
    woken: AtomicU64,
}

impl ShmTransport {
    /// Maps the segment of every linked peer (`job` as given to `ShmSegment::create` on
    /// every rank). Call `unlink` once every rank has returned from here.
    pub fn attach(
        own: ShmSegment,
        job: &str,
        wiring: Arc<dyn Wiring>,
        timeout: Duration,
    ) -> Result<Self> {
        let lens = own.seg.region_lens;
        if wiring.world_size() != own.world || wiring.region_lens() != lens {
            return Err(Error::ConfigMismatch(format!(
                "the shared-memory segment of rank {} was made for another world or sizes",
                own.rank
            )));
        }
        let mut peers = Vec::with_capacity(own.world);
        for p in 0..own.world {
            peers.push(if wiring.link(own.rank, p).is_some() {
                Some(Segment::open(&segment_name(job, p), lens, own.world)?)
            } else {
                None
            });
        }
        Ok(Self {
            own,
            wiring,
            early: std::sync::Mutex::new(Vec::new()),
            peers,
            wire: TierCounters::default(),
            registry: Registry::default(),
            left: std::sync::atomic::AtomicBool::new(false),
            timeout,
            woken: AtomicU64::new(0),
        })
    }

    /// Removes this rank's segment name; the memory stays mapped by everyone who has it.
    pub fn unlink(&self) {
        self.own.unlink();
    }

    /// Moves every published completion off this rank's rings into `out`.
    fn take_completions(&self, out: &mut Vec<Completion>) -> Result<usize> {
        let seg = &self.own.seg;
        let mut n = 0;
        for src in (0..self.own.world).filter(|&s| self.peers[s].is_some()) {
            let (head, tail, slots) = seg.cq(src);
            let (h, t) = (head.load(Ordering::Relaxed), tail.load(Ordering::Acquire));
            // The tail is the writer's: never trust it further than the queue's size.
            if t.wrapping_sub(h) > CQ_SLOTS {
                return Err(Error::protocol(
                    src,
                    format!("completion queue tail {t} is not within {CQ_SLOTS} of head {h}"),
                ));
            }
            for i in h..t {
                // SAFETY: slots in [head, tail) were published by the writer.
                let b = unsafe {
                    std::slice::from_raw_parts(
                        slots.add((i % CQ_SLOTS) as usize * SLOT_BYTES),
                        SLOT_BYTES,
                    )
                };
                out.push(Completion {
                    src,
                    imm: u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")),
                    // Saturates rather than wraps on 32-bit hosts: a bad length is refused
                    // by the protocol, which knows what each message must hold.
                    len: usize::try_from(u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")))
                        .unwrap_or(usize::MAX),
                });
                n += 1;
            }
            head.store(t, Ordering::Release);
        }
        Ok(n)
    }

    /// Peers that have left or whose process is gone.
    fn departed(&self) -> usize {
        self.peers
            .iter()
            .flatten()
            .filter(|p| {
                p.u64_at(hdr::STATE).load(Ordering::Acquire) != STATE_IN_JOB || !p.owner_alive()
            })
            .count()
    }

    fn peer(&self, p: usize) -> Result<&Segment> {
        self.peers
            .get(p)
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::Internal {
                rank: self.own.rank,
                detail: format!("a write to rank {p}, which is not linked to this one"),
            })
    }
}

impl Transport for ShmTransport {
    fn rank(&self) -> usize {
        self.own.rank
    }

    fn region_len(&self, region: RegionId) -> usize {
        self.own.seg.region_lens[region as usize]
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
                let at = self.own.seg.check(self.own.rank, region, offset, len)?;
                // SAFETY: checked; a rank reads its own region only where the protocol lets it.
                Ok(unsafe { std::slice::from_raw_parts(self.own.seg.base.add(at), len) })
            })?;
        self.write_segments(peer, region, offset, &segments, imm)
    }

    fn region_memory(&self, region: RegionId) -> (*const u8, usize) {
        let seg = &self.own.seg;
        // SAFETY: the region lies inside the mapping (see `layout`).
        let p = unsafe { seg.base.add(seg.region_offsets[region as usize]) };
        (p as *const u8, seg.region_lens[region as usize])
    }

    fn poll(&self, out: &mut Vec<Completion>, deadline: Instant) -> Result<usize> {
        self.poll_until(out, deadline, &|| false)
    }

    fn poll_until(
        &self,
        out: &mut Vec<Completion>,
        deadline: Instant,
        stop: &dyn Fn() -> bool,
    ) -> Result<usize> {
        let seg = &self.own.seg;
        let doorbell = seg.u32_at(hdr::DOORBELL);
        let woken = self.woken.load(Ordering::SeqCst);
        let stopped = || stop() || self.woken.load(Ordering::SeqCst) != woken;
        // Counted when about to sleep first (it costs a syscall per peer).
        let mut departed_before: Option<usize> = None;
        let mut spins = 0;
        loop {
            let seen = doorbell.load(Ordering::SeqCst);
            let mut n = {
                let mut early = self.early.lock().unwrap();
                let k = early.len();
                out.append(&mut early);
                k
            };
            n += self.take_completions(out)?;
            if n > 0 {
                return Ok(n);
            }
            let now = Instant::now();
            if now >= deadline || self.left.load(Ordering::Relaxed) || stopped() {
                return Ok(0);
            }
            if spins < SPIN {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            let departed_before = *departed_before.get_or_insert_with(|| self.departed());
            // Park: announce the sleep, re-check nothing arrived, then wait on the doorbell.
            // Sleep in short slices so a peer that died without ringing is noticed.
            seg.u32_at(hdr::SLEEPING).store(1, Ordering::SeqCst);
            if doorbell.load(Ordering::SeqCst) == seen && !stopped() {
                futex_wait(
                    doorbell,
                    seen,
                    (deadline - now).min(Duration::from_millis(20)),
                );
            }
            seg.u32_at(hdr::SLEEPING).store(0, Ordering::SeqCst);
            if self.departed() != departed_before {
                return Ok(0); // a peer left: let the protocol decide whether it mattered
            }
        }
    }

    unsafe fn local(&self, region: RegionId, offset: usize, len: usize) -> Result<&[u8]> {
        let at = self.own.seg.check(self.own.rank, region, offset, len)?;
        // SAFETY: checked; see the trait's contract on concurrent access.
        Ok(unsafe { std::slice::from_raw_parts(self.own.seg.base.add(at), len) })
    }

    fn peer_gone(&self, peer: usize) -> Option<Departure> {
        if peer == self.own.rank {
            return self.left.load(Ordering::Relaxed).then(|| Departure {
                reason: "this rank left".into(),
                completed_ops: None,
            });
        }
        let seg = self.peers.get(peer)?.as_ref()?;
        if seg.u64_at(hdr::STATE).load(Ordering::Acquire) == STATE_LEFT {
            let ops = seg.u64_at(hdr::COMPLETED_OPS).load(Ordering::Relaxed);
            return Some(Departure {
                reason: format!("it left after {ops} operations"),
                completed_ops: Some(OpCount::Exact(ops)),
            });
        }
        (!seg.owner_alive()).then(|| Departure {
            reason: format!(
                "its process (pid {} in its own pid namespace) is gone",
                seg.u64_at(hdr::PID).load(Ordering::Relaxed)
            ),
            completed_ops: None,
        })
    }

    fn shutdown(&self, completed_ops: u64) {
        if self.left.swap(true, Ordering::Relaxed) {
            return;
        }
        let own = &self.own.seg;
        own.u64_at(hdr::COMPLETED_OPS)
            .store(completed_ops, Ordering::Relaxed);
        own.u64_at(hdr::STATE).store(STATE_LEFT, Ordering::Release);
        own.ring(); // our own poller, if any, wakes and sees `left`
        for p in self.peers.iter().flatten() {
            p.ring();
        }
    }

    fn wire_bytes(&self) -> [u64; 2] {
        self.wire.both()
    }

    fn wake(&self) {
        // Counted before the doorbell rings, so a poller that sleeps sees one or the other.
        self.woken.fetch_add(1, Ordering::SeqCst);
        self.own.seg.ring();
    }

    fn connections(&self) -> [usize; 2] {
        let mut n = [0; 2];
        for p in (0..self.own.world).filter(|&p| self.peers[p].is_some()) {
            if let Some(t) = self.wiring.link(self.own.rank, p) {
                n[t as usize] += 1;
            }
        }
        n
    }
}

impl Drop for ShmTransport {
    fn drop(&mut self) {
        self.shutdown(0);
    }
}

impl ShmTransport {
    /// Copies `segments` to `peer` (see `Transport::write_with_imm`).
    fn write_segments(
        &self,
        peer: usize,
        region: RegionId,
        offset: usize,
        segments: &[&[u8]],
        imm: u32,
    ) -> Result<()> {
        if self.left.load(Ordering::Relaxed) {
            return Err(Error::Destroyed);
        }
        let seg = self.peer(peer)?;
        // Only the cheap state word here; the lifeline is checked while polling.
        let state = seg.u64_at(hdr::STATE).load(Ordering::Acquire);
        if state != STATE_IN_JOB {
            let reason = self
                .peer_gone(peer)
                .map_or_else(|| format!("its segment says state {state}"), |d| d.reason);
            return Err(Error::PeerLost { peer, reason });
        }
        let len: usize = segments.iter().map(|s| s.len()).sum();
        // The receiver cannot check a write that lands by a store: the writer checks it
        // against the plan, so this rank never touches another sender's slots.
        if !self.wiring.allows(peer, self.own.rank, region, offset, len) {
            return Err(super::memory::outside_slots(
                self.own.rank,
                peer,
                region,
                offset,
                len,
            ));
        }
        let at = seg.check(self.own.rank, region, offset, len)?;
        let mut w = at;
        for s in segments {
            // SAFETY: checked to lie inside the peer's region; the range is this writer's
            // until the peer hands it back (protocol credits).
            unsafe { std::ptr::copy_nonoverlapping(s.as_ptr(), seg.base.add(w), s.len()) };
            w += s.len();
        }
        let (head, tail, slots) = seg.cq(self.own.rank);
        let t = tail.load(Ordering::Relaxed);
        let deadline = Instant::now() + self.timeout;
        loop {
            // The head is the peer's to write: a value that is not behind our tail by at most
            // the queue's size is corruption, not back-pressure.
            let used = t.wrapping_sub(head.load(Ordering::Acquire));
            if used > CQ_SLOTS {
                return Err(Error::protocol(
                    peer,
                    format!(
                        "completion queue head {} is not within {CQ_SLOTS} of tail {t}",
                        t.wrapping_sub(used)
                    ),
                ));
            }
            if used < CQ_SLOTS {
                break;
            }
            // The peer may be waiting the same way on us: keep our own rings draining.
            let mut early = self.early.lock().unwrap();
            self.take_completions(&mut early)?;
            drop(early);
            if self.left.load(Ordering::Relaxed) {
                return Err(Error::Destroyed);
            }
            if let Some(d) = self.peer_gone(peer) {
                return Err(Error::PeerLost {
                    peer,
                    reason: d.reason,
                });
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: format!("rank {peer} to take completions from its full queue"),
                    timeout: self.timeout,
                });
            }
            std::thread::yield_now();
        }
        let slot = encode_slot(imm, len);
        // SAFETY: slot `t % CQ_SLOTS` is free (checked above) and only this rank writes it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                slot.as_ptr(),
                slots.add((t % CQ_SLOTS) as usize * SLOT_BYTES),
                SLOT_BYTES,
            )
        };
        tail.store(t + 1, Ordering::Release);
        seg.ring();
        self.wire.add(region.tier(), len);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{OpenWiring, Sge, Tier};

    /// Eight registered bytes of `t` as a write's source.
    fn eight_bytes(t: &ShmTransport) -> Sge {
        static BYTES: [u8; 8] = [1; 8];
        // SAFETY: static memory.
        let key = unsafe { t.register(BYTES.as_ptr(), 8) }.unwrap();
        Sge {
            key,
            offset: 0,
            len: 8,
        }
    }

    fn pair(tag: &str) -> (ShmTransport, ShmTransport) {
        let job = format!("unit{}{tag}", std::process::id());
        let lens = [4096, 0, 0, 0];
        let wiring = || -> Arc<dyn Wiring> {
            Arc::new(OpenWiring {
                lens,
                world: 2,
                tier: Tier::Nvl,
            })
        };
        let s0 = ShmSegment::create(&job, 0, 2, lens).unwrap();
        let s1 = ShmSegment::create(&job, 1, 2, lens).unwrap();
        let t0 = ShmTransport::attach(s0, &job, wiring(), Duration::from_secs(2)).unwrap();
        let t1 = ShmTransport::attach(s1, &job, wiring(), Duration::from_secs(2)).unwrap();
        t0.unlink();
        t1.unlink();
        (t0, t1)
    }

    #[test]
    fn a_corrupt_tail_from_a_peer_is_an_error_not_an_endless_loop() {
        let (t0, t1) = pair("tail");
        t1.write_with_imm(0, RegionId::NvlRings, 0, &[eight_bytes(&t1)], 7)
            .unwrap();
        // Rank 1's tail in rank 0's segment, pushed far beyond what the queue can hold.
        let (head, tail, _) = t0.own.seg.cq(1);
        tail.store(
            head.load(Ordering::Relaxed) + CQ_SLOTS + 5,
            Ordering::Release,
        );
        let mut out = Vec::new();
        let err = t0
            .poll(&mut out, Instant::now() + Duration::from_secs(1))
            .unwrap_err();
        assert!(
            matches!(&err, Error::Protocol { peer: 1, detail } if detail.contains("tail")),
            "{err}"
        );
    }

    #[test]
    fn a_corrupt_head_from_a_peer_is_an_error_not_back_pressure() {
        let (t0, t1) = pair("head");
        // Rank 0 owns the head of rank 1's queue in its segment; it claims to be ahead.
        let (head, tail, _) = t0.own.seg.cq(1);
        head.store(tail.load(Ordering::Relaxed) + 5, Ordering::Release);
        let err = t1
            .write_with_imm(0, RegionId::NvlRings, 0, &[eight_bytes(&t1)], 7)
            .unwrap_err();
        assert!(
            matches!(&err, Error::Protocol { peer: 0, detail } if detail.contains("head")),
            "{err}"
        );
    }

    #[test]
    fn sources_must_be_registered() {
        let (_t0, t1) = pair("reg");
        let src = eight_bytes(&t1);
        t1.deregister(src.key);
        let err = t1
            .write_with_imm(0, RegionId::NvlRings, 0, &[src], 7)
            .unwrap_err();
        assert!(
            matches!(&err, Error::Internal { detail, .. } if detail.contains("unregistered")),
            "{err}"
        );
        let src = eight_bytes(&t1);
        let past = Sge { offset: 4, ..src };
        let err = t1
            .write_with_imm(0, RegionId::NvlRings, 0, &[past], 7)
            .unwrap_err();
        assert!(matches!(err, Error::Internal { .. }), "{err}");
        let many = vec![Sge { len: 0, ..src }; crate::transport::MAX_SGE + 1];
        let err = t1
            .write_with_imm(0, RegionId::NvlRings, 0, &many, 7)
            .unwrap_err();
        assert!(
            matches!(&err, Error::Internal { detail, .. } if detail.contains("entries")),
            "{err}"
        );
    }

    #[test]
    fn a_full_queue_waits_for_the_buffers_timeout_then_fails() {
        let (_t0, t1) = pair("full");
        for _ in 0..CQ_SLOTS {
            t1.write_with_imm(0, RegionId::NvlRings, 0, &[], 1).unwrap();
        }
        // Rank 0 never polls: the writer waits for the transport's timeout (2 s here, the
        // buffer's in a job), not a fixed minute.
        let start = Instant::now();
        let err = t1
            .write_with_imm(0, RegionId::NvlRings, 0, &[], 1)
            .unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(10),
            "{took:?}"
        );
    }

    #[test]
    fn a_peer_whose_lifeline_holder_is_gone_is_seen_gone() {
        let (t0, mut t1) = pair("life");
        assert!(t0.peer_gone(1).is_none());
        assert!(t0.peer_gone(1).is_none(), "a second look changes nothing");
        // Rank 1's lifeline is let go without a goodbye (as when its process dies).
        t1.own._lifeline.release();
        let gone = t0.peer_gone(1).expect("rank 1 seen gone");
        assert!(gone.completed_ops.is_none(), "{gone:?}");
        assert!(t0.peer_gone(1).is_some(), "and stays gone");
    }
}
