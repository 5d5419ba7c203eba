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
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{Completion, Departure, NUM_REGIONS, RegionId, Tier, TierCounters, Transport};
use crate::error::{Error, Result};

const MAGIC: u64 = 0x6475_616c_636f_6d6d; // "dualcomm"
const HEADER_BYTES: usize = 4096;
/// Completions one peer may have outstanding here; writers wait (with a deadline) beyond.
const CQ_SLOTS: u64 = 4096;
const SLOT_BYTES: usize = 32;
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
}

fn os_error(what: &str) -> Error {
    Error::PeerLost {
        peer: usize::MAX,
        reason: format!("{what}: {}", std::io::Error::last_os_error()),
    }
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

fn layout(region_lens: [usize; NUM_REGIONS], world: usize) -> ([usize; NUM_REGIONS], usize, usize) {
    let mut at = HEADER_BYTES;
    let mut offsets = [0; NUM_REGIONS];
    for (i, len) in region_lens.iter().enumerate() {
        offsets[i] = at;
        at += len.div_ceil(64) * 64;
    }
    let cq = at;
    (offsets, cq, cq + world * CQ_BYTES)
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
        let (region_offsets, cq_offset, len) = layout(region_lens, world);
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
        seg.u64_at(hdr::PID)
            .store(std::process::id() as u64, Ordering::Relaxed);
        for (i, l) in region_lens.iter().enumerate() {
            seg.u64_at(hdr::REGION_LENS + 8 * i)
                .store(*l as u64, Ordering::Relaxed);
        }
        seg.u64_at(hdr::MAGIC).store(MAGIC, Ordering::Release);
        Ok(seg)
    }

    fn open(name: &str, region_lens: [usize; NUM_REGIONS], world: usize) -> Result<Self> {
        let (region_offsets, cq_offset, len) = layout(region_lens, world);
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

    fn check(&self, region: RegionId, offset: usize, len: usize) -> Result<usize> {
        let cap = self.region_lens[region as usize];
        if offset.checked_add(len).is_none_or(|e| e > cap) {
            return Err(Error::invalid(
                "offset + len",
                format!("within a region of {cap} bytes"),
                format!("{offset} + {len}"),
            ));
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

fn encode_slot(c: &Completion) -> [u8; SLOT_BYTES] {
    let mut b = [0u8; SLOT_BYTES];
    b[0] = c.tier as u8;
    b[1] = c.region as u8;
    b[4..8].copy_from_slice(&c.imm.to_le_bytes());
    b[8..16].copy_from_slice(&(c.offset as u64).to_le_bytes());
    b[16..24].copy_from_slice(&(c.len as u64).to_le_bytes());
    b
}

/// Segment names of a job: the prefix must be unique per job (the bootstrap uses the secret).
pub fn segment_name(job: &str, rank: usize) -> String {
    format!("/dualcomm-{job}-{rank}")
}

/// A rank's own segment, created and published before everybody maps everybody.
pub struct ShmSegment {
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
        Ok(Self {
            seg: Segment::create(&name, region_lens, world)?,
            name,
            rank,
            world,
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
    /// Completions taken off our rings while this rank waited to write (see `write_with_imm`),
    /// handed out first by `poll`.
    early: std::sync::Mutex<Vec<Completion>>,
    peers: Vec<Option<Segment>>,
    wire: TierCounters,
    left: std::sync::atomic::AtomicBool,
}

impl ShmTransport {
    /// Maps every peer's segment (`job` as given to `ShmSegment::create` on every rank).
    /// Call `unlink` once every rank has returned from here.
    pub fn attach(own: ShmSegment, job: &str) -> Result<Self> {
        let lens = own.seg.region_lens;
        let mut peers = Vec::with_capacity(own.world);
        for p in 0..own.world {
            peers.push(if p == own.rank {
                None
            } else {
                Some(Segment::open(&segment_name(job, p), lens, own.world)?)
            });
        }
        Ok(Self {
            own,
            early: std::sync::Mutex::new(Vec::new()),
            peers,
            wire: TierCounters::default(),
            left: std::sync::atomic::AtomicBool::new(false),
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
        for src in (0..self.own.world).filter(|&s| s != self.own.rank) {
            let (head, tail, slots) = seg.cq(src);
            let (h, t) = (head.load(Ordering::Relaxed), tail.load(Ordering::Acquire));
            for i in h..t {
                // SAFETY: slots in [head, tail) were published by the writer.
                let b = unsafe {
                    std::slice::from_raw_parts(
                        slots.add((i % CQ_SLOTS) as usize * SLOT_BYTES),
                        SLOT_BYTES,
                    )
                };
                let Some(region) = RegionId::from_index(b[1] as usize) else {
                    return Err(Error::protocol(src, "malformed completion"));
                };
                out.push(Completion {
                    src,
                    tier: if b[0] == 0 { Tier::Nvl } else { Tier::Rdma },
                    region,
                    offset: u64::from_le_bytes(b[8..16].try_into().unwrap()) as usize,
                    len: u64::from_le_bytes(b[16..24].try_into().unwrap()) as usize,
                    imm: u32::from_le_bytes(b[4..8].try_into().unwrap()),
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
                p.u64_at(hdr::STATE).load(Ordering::Acquire) != 0
                    || !Self::alive(p.u64_at(hdr::PID).load(Ordering::Relaxed))
            })
            .count()
    }

    fn peer(&self, p: usize) -> Result<&Segment> {
        self.peers.get(p).and_then(Option::as_ref).ok_or_else(|| {
            Error::invalid(
                "peer",
                format!("another rank in [0, {})", self.own.world),
                p,
            )
        })
    }

    /// Whether the process exists and has not exited (a zombie waiting for its parent to
    /// reap it still answers `kill(pid, 0)`, so its state is read from /proc too).
    fn alive(pid: u64) -> bool {
        // SAFETY: signal 0 only checks that the process exists.
        if pid == 0 || unsafe { libc::kill(pid as libc::pid_t, 0) } != 0 {
            return false;
        }
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // The state follows the parenthesised command name: "pid (comm) S ...".
            Ok(stat) => {
                !matches!(stat.rsplit(')').next().map(str::trim_start), Some(s) if s.starts_with('Z') || s.starts_with('X'))
            }
            Err(_) => true,
        }
    }
}

impl Transport for ShmTransport {
    fn rank(&self) -> usize {
        self.own.rank
    }

    fn region_len(&self, region: RegionId) -> usize {
        self.own.seg.region_lens[region as usize]
    }

    fn write_with_imm(
        &self,
        peer: usize,
        tier: Tier,
        region: RegionId,
        offset: usize,
        segments: &[&[u8]],
        imm: u32,
    ) -> Result<()> {
        if self.left.load(Ordering::Relaxed) {
            return Err(Error::Destroyed);
        }
        let seg = self.peer(peer)?;
        // Only the cheap goodbye flag here; process liveness is checked while polling.
        if seg.u64_at(hdr::STATE).load(Ordering::Acquire) != 0 {
            let d = self.peer_gone(peer).expect("left");
            return Err(Error::PeerLost {
                peer,
                reason: d.reason,
            });
        }
        let len: usize = segments.iter().map(|s| s.len()).sum();
        let at = seg.check(region, offset, len)?;
        let mut w = at;
        for s in segments {
            // SAFETY: checked to lie inside the peer's region; the range is this writer's
            // until the peer hands it back (protocol credits).
            unsafe { std::ptr::copy_nonoverlapping(s.as_ptr(), seg.base.add(w), s.len()) };
            w += s.len();
        }
        let (head, tail, slots) = seg.cq(self.own.rank);
        let t = tail.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(60);
        while t - head.load(Ordering::Acquire) >= CQ_SLOTS {
            // The peer may be waiting the same way on us: keep our own rings draining.
            let mut early = self.early.lock().unwrap();
            self.take_completions(&mut early)?;
            drop(early);
            if self.left.load(Ordering::Relaxed) {
                return Err(Error::Destroyed);
            }
            if self.peer_gone(peer).is_some() || Instant::now() > deadline {
                return Err(Error::PeerLost {
                    peer,
                    reason: "it stopped taking completions".into(),
                });
            }
            std::thread::yield_now();
        }
        let slot = encode_slot(&Completion {
            src: self.own.rank,
            tier,
            region,
            offset,
            len,
            imm,
        });
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
        self.wire.add(tier, len);
        Ok(())
    }

    fn poll(&self, out: &mut Vec<Completion>, deadline: Instant) -> Result<usize> {
        let seg = &self.own.seg;
        let doorbell = seg.u32_at(hdr::DOORBELL);
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
            if now >= deadline || self.left.load(Ordering::Relaxed) {
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
            if doorbell.load(Ordering::SeqCst) == seen {
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

    fn local(&self, region: RegionId, offset: usize, len: usize) -> Result<&[u8]> {
        let at = self.own.seg.check(region, offset, len)?;
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
        if seg.u64_at(hdr::STATE).load(Ordering::Acquire) != 0 {
            let ops = seg.u64_at(hdr::COMPLETED_OPS).load(Ordering::Relaxed);
            return Some(Departure {
                reason: format!("it left after {ops} operations"),
                completed_ops: Some(ops),
            });
        }
        let pid = seg.u64_at(hdr::PID).load(Ordering::Relaxed);
        (!Self::alive(pid)).then(|| Departure {
            reason: format!("its process {pid} is gone"),
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
        own.u64_at(hdr::STATE).store(1, Ordering::Release);
        own.ring(); // our own poller, if any, wakes and sees `left`
        for p in self.peers.iter().flatten() {
            p.ring();
        }
    }

    fn wire_bytes(&self) -> &TierCounters {
        &self.wire
    }
}

impl Drop for ShmTransport {
    fn drop(&mut self) {
        self.shutdown(0);
    }
}
