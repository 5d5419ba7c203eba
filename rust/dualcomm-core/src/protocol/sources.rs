//! Where writes take their bytes from: memory registered with the transport for the length
//! of one operation (the caller's tensors, token headers, metadata records), as an RDMA NIC
//! needs it. Records a rank forwards go straight from the ring they landed in (its own
//! region, registered for good).

use std::marker::PhantomData;

use crate::error::Result;
use crate::transport::{MemKey, Sge, Transport};

/// Memory registered with `t` while this guard lives; `'m` is how long the memory does.
pub struct Registered<'t, 'm> {
    t: &'t dyn Transport,
    keys: Vec<MemKey>,
    _memory: PhantomData<&'m [u8]>,
}

impl<'t, 'm> Registered<'t, 'm> {
    pub fn new(t: &'t dyn Transport) -> Self {
        Self {
            t,
            keys: Vec::new(),
            _memory: PhantomData,
        }
    }

    /// Registers `mem` until this guard drops (the operation flushed its writes before).
    pub fn add(&mut self, mem: &'m [u8]) -> Result<Source> {
        // SAFETY: `mem` is borrowed for `'m`, which outlives this guard, so it stays
        // allocated until `deregister`; it is shared (immutable) meanwhile.
        let key = unsafe { self.t.register(mem.as_ptr(), mem.len())? };
        self.keys.push(key);
        Ok(Source { key })
    }
}

impl Registered<'_, '_> {
    /// Registers memory a caller mutates while the operation runs (in places no posted
    /// write reads) until this guard drops.
    ///
    /// # Safety
    /// The memory stays allocated and in place until this guard has dropped, and no byte
    /// of it changes while a write that gathers it is in flight.
    pub unsafe fn add_raw(&mut self, ptr: *const u8, len: usize) -> Result<Source> {
        // SAFETY: the caller's contract.
        let key = unsafe { self.t.register(ptr, len)? };
        self.keys.push(key);
        Ok(Source { key })
    }
}

impl Drop for Registered<'_, '_> {
    fn drop(&mut self) {
        for &k in &self.keys {
            self.t.deregister(k);
        }
    }
}

/// One registered buffer, cut into entries.
#[derive(Debug, Clone, Copy)]
pub struct Source {
    pub key: MemKey,
}

impl Source {
    /// `len` bytes at byte `offset`.
    pub fn at(self, offset: usize, len: usize) -> Sge {
        Sge {
            key: self.key,
            offset,
            len,
        }
    }

    /// The `i`-th `len`-byte piece.
    pub fn piece(self, i: usize, len: usize) -> Sge {
        Sge {
            key: self.key,
            offset: i * len,
            len,
        }
    }
}
