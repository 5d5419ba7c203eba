//! Fixed-size receive rings with credit flow control. A ring lives in the receiver's
//! registered region and holds whole records of one size (fixed per operation). The sender
//! writes records at its tail and announces them with a DATA immediate; the receiver copies
//! them out, advances its head and hands the space back with a CREDIT immediate. So any
//! number of records streams through a ring of any size that holds at least one record.

use super::imm::{Imm, ImmKind};
use crate::error::{Error, Result};
use crate::transport::{Completion, MAX_SGE, MemKey, RegionId, Sge, Tier, Transport};

/// Where a ring sits: the receiver's region, the byte offset of the ring in it, and its size.
#[derive(Debug, Clone, Copy)]
pub struct RingGeometry {
    pub peer: usize,
    pub tier: Tier,
    pub region: RegionId,
    pub base: usize,
    pub capacity: u64,
    pub record_bytes: usize,
    /// Where this rank's credits for the ring "land" at the peer: the start of the ring this
    /// rank writes there (a credit is an immediate with no bytes, but still a write).
    pub credit_offset: usize,
}

impl RingGeometry {
    fn offset_of(&self, position: u64) -> usize {
        self.base + (position % self.capacity) as usize * self.record_bytes
    }
}

/// The sending side. The operation sets `closed` once it will post nothing more.
#[derive(Debug)]
pub struct SendRing {
    pub geo: RingGeometry,
    pub closed: bool,
    tail: u64,
    credited: u64,
}

impl SendRing {
    pub fn new(geo: RingGeometry) -> Self {
        Self {
            geo,
            closed: false,
            tail: 0,
            credited: 0,
        }
    }

    pub fn sent(&self) -> u64 {
        self.tail
    }

    /// Makes this the ring to a masked peer (shrink mode): nothing is ever posted on it
    /// (no room), and it counts as finished. Only before anything was posted.
    pub fn make_absent(&mut self) {
        debug_assert_eq!(self.tail, 0, "a peer is masked only before data moves");
        self.geo.capacity = 0;
        self.closed = true;
    }

    /// Records that fit now.
    pub fn free(&self) -> u64 {
        self.geo.capacity - (self.tail - self.credited)
    }

    pub fn finished(&self) -> bool {
        self.closed && self.credited == self.tail
    }

    /// Writes `records`, each gathered from `per_record` consecutive entries of `src`,
    /// splitting at the ring's end and so that no write gathers more than `MAX_SGE`
    /// entries (empty ones are left out). The caller checked `free()`.
    pub fn post(
        &mut self,
        t: &dyn Transport,
        epoch: u32,
        src: &[Sge],
        per_record: usize,
    ) -> Result<()> {
        let mut records = src.len() / per_record;
        debug_assert!(records as u64 <= self.free());
        let mut rest = src;
        let mut gathered: Vec<Sge> = Vec::with_capacity(MAX_SGE);
        while records > 0 {
            let until_wrap = (self.geo.capacity - self.tail % self.geo.capacity) as usize;
            let n = records
                .min(until_wrap)
                .min(Imm::MAX_VALUE as usize)
                .min((MAX_SGE / per_record).max(1));
            let (now, later) = rest.split_at(n * per_record);
            gathered.clear();
            gathered.extend(now.iter().filter(|e| e.len > 0));
            let imm = Imm::new(ImmKind::Data, epoch, n as u32);
            let offset = self.geo.offset_of(self.tail);
            t.write_with_imm(self.geo.peer, self.geo.region, offset, &gathered, imm.0)?;
            self.tail += n as u64;
            records -= n;
            rest = later;
        }
        Ok(())
    }

    /// Records posted that the receiver has not acknowledged yet.
    pub fn awaiting_credit(&self) -> bool {
        self.credited < self.tail
    }

    pub fn on_credit(&mut self, n: u64) -> Result<()> {
        if self.credited + n > self.tail {
            return Err(Error::protocol(
                self.geo.peer,
                format!(
                    "returned {n} credits with only {} records outstanding",
                    self.tail - self.credited
                ),
            ));
        }
        self.credited += n;
        Ok(())
    }

    pub fn describe_wait(&self) -> Option<String> {
        (!self.finished()).then(|| {
            format!(
                "rank {} to acknowledge records over {:?} ({} sent, {} acknowledged{})",
                self.geo.peer,
                self.geo.tier,
                self.tail,
                self.credited,
                if self.closed { "" } else { ", more to send" }
            )
        })
    }
}

/// The receiving side. `expected` is how many records this operation will receive.
#[derive(Debug)]
pub struct RecvRing {
    pub geo: RingGeometry,
    expected: Option<u64>,
    /// The ring of a masked peer (shrink mode): nothing arrives on it, whatever is expected.
    absent: bool,
    head: u64,
    tail: u64,
    returned: u64,
}

impl RecvRing {
    pub fn new(geo: RingGeometry) -> Self {
        Self {
            geo,
            expected: None,
            absent: false,
            head: 0,
            tail: 0,
            returned: 0,
        }
    }

    /// Validates a DATA completion: the records landed at the ring's tail (the only place a
    /// sender may put them), so only their count and length are the sender's to say.
    pub fn on_data(&mut self, c: &Completion, n: u64) -> Result<()> {
        let peer = self.geo.peer;
        if n == 0
            || c.len as u64 != n * self.geo.record_bytes as u64
            || (self.tail % self.geo.capacity) + n > self.geo.capacity
        {
            return Err(Error::protocol(
                peer,
                format!(
                    "write of {} bytes announced as {n} records; expected whole records of {} \
                     bytes, not past the ring's end ({} of {} slots used)",
                    c.len,
                    self.geo.record_bytes,
                    self.tail % self.geo.capacity,
                    self.geo.capacity
                ),
            ));
        }
        if self.tail + n - self.head > self.geo.capacity {
            return Err(Error::protocol(peer, "wrote past the credits it was given"));
        }
        if let Some(exp) = self.expected
            && self.tail + n > exp
        {
            return Err(Error::protocol(
                peer,
                format!("sent {} records, {exp} were announced", self.tail + n),
            ));
        }
        self.tail += n;
        Ok(())
    }

    /// How many records this operation will receive on this ring (none on an absent one).
    pub fn set_expected(&mut self, n: u64) {
        if !self.absent {
            self.expected = Some(n);
        }
    }

    pub fn expected(&self) -> Option<u64> {
        self.expected
    }

    /// Makes this the ring of a masked peer (shrink mode): it expects nothing more than
    /// what arrived (nothing: a peer is masked only before data moves) and counts as
    /// finished.
    pub fn make_absent(&mut self) {
        debug_assert_eq!(self.tail, 0, "a peer is masked only before data moves");
        self.absent = true;
        self.expected = Some(self.tail);
    }

    /// Records announced (or not yet announced how many) that have not arrived.
    pub fn awaiting_data(&self) -> bool {
        self.expected.is_none_or(|e| self.tail < e)
    }

    pub fn available(&self) -> u64 {
        self.tail - self.head
    }

    pub fn consumed(&self) -> u64 {
        self.head
    }

    /// The `i`-th record after the head, as a write's source (forwarding sends it on from
    /// where it landed).
    pub fn record_source(&self, i: u64) -> Sge {
        debug_assert!(i < self.available());
        Sge {
            key: MemKey::region(self.geo.region),
            offset: self.geo.offset_of(self.head + i),
            len: self.geo.record_bytes,
        }
    }

    /// The `i`-th record after the head.
    pub fn record<'t>(&self, t: &'t dyn Transport, i: u64) -> Result<&'t [u8]> {
        debug_assert!(i < self.available());
        // SAFETY: records in [head, tail) were announced complete and their space is not
        // handed back until `consume` and `return_credits`: the sender does not write them.
        unsafe {
            t.local(
                self.geo.region,
                self.geo.offset_of(self.head + i),
                self.geo.record_bytes,
            )
        }
    }

    pub fn consume(&mut self, n: u64) {
        debug_assert!(n <= self.available());
        self.head += n;
    }

    /// Whether `return_credits` would hand space back now.
    pub fn credit_due(&self) -> bool {
        let owed = self.head - self.returned;
        owed > 0 && (owed * 2 >= self.geo.capacity || self.available() == 0)
    }

    /// Hands consumed space back: in batches of half a ring, and always once the ring is
    /// empty (the sender may be waiting on exactly those slots).
    pub fn return_credits(&mut self, t: &dyn Transport, epoch: u32) -> Result<()> {
        let owed = self.head - self.returned;
        if self.credit_due() {
            let mut left = owed;
            while left > 0 {
                let n = left.min(Imm::MAX_VALUE as u64);
                let imm = Imm::new(ImmKind::Credit, epoch, n as u32);
                // A credit is an immediate without bytes.
                let at = self.geo.credit_offset;
                t.write_with_imm(self.geo.peer, self.geo.region, at, &[], imm.0)?;
                left -= n;
            }
            self.returned = self.head;
        }
        Ok(())
    }

    pub fn finished(&self) -> bool {
        self.expected == Some(self.head) && self.returned == self.head
    }

    pub fn describe_wait(&self) -> Option<String> {
        (!self.finished()).then(|| match self.expected {
            Some(exp) => format!(
                "{} more records from rank {} over {:?} ({} of {exp} arrived)",
                exp - self.tail.min(exp),
                self.geo.peer,
                self.geo.tier,
                self.tail
            ),
            None => format!("the record count from rank {}", self.geo.peer),
        })
    }
}
