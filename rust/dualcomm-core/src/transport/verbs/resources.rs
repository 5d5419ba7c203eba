//! The verbs objects a rank owns, each its own type that frees itself: the opened device
//! with its protection domain (`Nic`), registered memory (`Mr`), the completion queue (`Cq`),
//! the shared receive queue (`Srq`) and RC queue pairs (`Qp`). Children hold their parents,
//! so nothing is freed while something made from it lives (a queue pair goes before its
//! queues, every object before the protection domain and the device).
//!
//! Every failed call is an `Error::Os` naming the call and the device, with the errno text.

use std::ffi::{c_int, c_void};
use std::sync::Arc;

use super::abi::{
    self, IbvAsyncEvent, IbvGid, IbvMr, IbvQpCap, IbvQpInitAttr, IbvRecvWr, IbvSendWr,
    IbvSrqInitAttr, IbvWc,
};
use super::device::{Chosen, open_by_name};
use super::events::{AsyncEvent, names_port, names_queue_pair};
use super::library::{Context, Library};
use super::qp::QpAttrs;
use super::work::WriteRequest;
use crate::error::{Error, Result};

type PostSend = unsafe extern "C" fn(*mut c_void, *mut IbvSendWr, *mut *mut IbvSendWr) -> c_int;
type PostRecv = unsafe extern "C" fn(*mut c_void, *mut IbvRecvWr, *mut *mut IbvRecvWr) -> c_int;
type PollCq = unsafe extern "C" fn(*mut c_void, c_int, *mut IbvWc) -> c_int;

/// The operation at `offset` of the context of `obj` (a queue pair, completion queue or
/// shared receive queue: their first field is the context).
///
/// # Safety
/// `obj` is a live object of that kind and `F` the operation's signature.
unsafe fn context_op<F: Copy>(obj: *mut c_void, offset: usize) -> F {
    // SAFETY: as the caller promises; the offsets are checked against verbs.h (abi tests).
    unsafe {
        let ctx = *(obj as *const *const u8).add(abi::CONTEXT_FIELD / 8);
        *(ctx.add(offset) as *const F)
    }
}

fn failed(call: &str, device: &str, errno: Option<i32>) -> Error {
    let e = match errno {
        Some(code) => std::io::Error::from_raw_os_error(code),
        None => std::io::Error::last_os_error(),
    };
    Error::os_from(format!("{call} on {device}"), e)
}

struct NicInner {
    lib: &'static Library,
    ctx: *mut Context,
    pd: *mut c_void,
    device: String,
}

// SAFETY: verbs objects may be used from any thread (libibverbs locks internally); the
// pointers are freed once, by Drop.
unsafe impl Send for NicInner {}
unsafe impl Sync for NicInner {}

impl Drop for NicInner {
    fn drop(&mut self) {
        // SAFETY: made in `Nic::open`; every child holds this, so none is left.
        unsafe {
            (self.lib.dealloc_pd)(self.pd);
            (self.lib.close_device)(self.ctx);
        }
    }
}

/// An opened device and port with its protection domain.
#[derive(Clone)]
pub struct Nic {
    inner: Arc<NicInner>,
    pub chosen: Chosen,
    /// The GID this rank's traffic uses (RoCE addresses by it), and its table index.
    pub gid: [u8; 16],
    pub gid_index: u8,
}

impl Nic {
    pub fn open(chosen: Chosen, gid_index: u8) -> Result<Self> {
        let unavailable = |reason: String| Error::TransportUnavailable {
            transport: "verbs".into(),
            reason,
        };
        let lib = Library::get().map_err(unavailable)?;
        let ctx = open_by_name(lib, &chosen.device).map_err(unavailable)?;
        // SAFETY: a live context.
        let pd = unsafe { (lib.alloc_pd)(ctx) };
        if pd.is_null() {
            let e = failed("ibv_alloc_pd", &chosen.device, None);
            // SAFETY: opened above, nothing made on it.
            unsafe { (lib.close_device)(ctx) };
            return Err(e);
        }
        let inner = Arc::new(NicInner {
            lib,
            ctx,
            pd,
            device: chosen.device.clone(),
        });
        // SAFETY: a live context; `async_fd` is at its verbs.h offset (abi tests).
        let async_fd = unsafe { *((ctx as *const u8).add(abi::ASYNC_FD_OFFSET) as *const c_int) };
        // SAFETY: the context's own descriptor; non-blocking so events can be polled.
        let flags = unsafe { libc::fcntl(async_fd, libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0
            || unsafe { libc::fcntl(async_fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
        {
            return Err(failed(
                "fcntl(O_NONBLOCK) on the async event fd",
                &chosen.device,
                None,
            ));
        }
        let mut gid = IbvGid::default();
        // SAFETY: a live context; `gid` is an ibv_gid.
        let rc = unsafe {
            (lib.query_gid)(
                ctx,
                chosen.port.num,
                gid_index as c_int,
                (&mut gid as *mut IbvGid).cast(),
            )
        };
        if rc != 0 {
            return Err(failed("ibv_query_gid", &chosen.device, None));
        }
        Ok(Self {
            inner,
            chosen,
            gid: gid.raw,
            gid_index,
        })
    }

    /// Registers `len` bytes at `ptr` for local use and for peers' writes.
    ///
    /// # Safety
    /// The memory stays valid until the returned `Mr` is dropped.
    pub unsafe fn register(&self, ptr: *mut u8, len: usize) -> Result<Mr> {
        let access = abi::IBV_ACCESS_LOCAL_WRITE | abi::IBV_ACCESS_REMOTE_WRITE;
        // SAFETY: the caller's promise.
        unsafe { self.register_with(ptr, len, access) }
    }

    /// Registers `len` bytes at `ptr` as a source of this rank's writes only: the NIC may
    /// read them, nobody may write them (so read-only memory registers too).
    ///
    /// # Safety
    /// The memory stays valid until the returned `Mr` is dropped.
    pub unsafe fn register_source(&self, ptr: *const u8, len: usize) -> Result<Mr> {
        // SAFETY: the caller's promise; with no access flags the NIC never writes it.
        unsafe { self.register_with(ptr.cast_mut(), len, 0) }
    }

    unsafe fn register_with(&self, ptr: *mut u8, len: usize, access: i32) -> Result<Mr> {
        let n = &self.inner;
        // SAFETY: a live protection domain; the caller keeps the memory.
        let mr = unsafe { (n.lib.reg_mr)(n.pd, ptr.cast(), len, access) } as *mut IbvMr;
        if mr.is_null() {
            return Err(failed("ibv_reg_mr", &n.device, None));
        }
        Ok(Mr {
            nic: Arc::clone(n),
            mr,
        })
    }

    /// The asynchronous events the device has queued (none waits: the descriptor is
    /// non-blocking), each acknowledged.
    pub fn async_events(&self) -> Vec<AsyncEvent> {
        let n = &self.inner;
        let mut out = Vec::new();
        loop {
            let mut raw = IbvAsyncEvent::default();
            // SAFETY: a live context; `raw` is an ibv_async_event.
            let rc =
                unsafe { (n.lib.get_async_event)(n.ctx, (&mut raw as *mut IbvAsyncEvent).cast()) };
            if rc != 0 {
                return out; // EAGAIN: nothing more queued
            }
            let qp_num = names_queue_pair(raw.event_type).then(|| {
                // SAFETY: the event's element is a live ibv_qp of this context until acked.
                unsafe { *((raw.element as *const u8).add(abi::QP_NUM_OFFSET) as *const u32) }
            });
            let port = names_port(raw.event_type).then_some(raw.element as u32 as u8);
            // SAFETY: acknowledges the event just read, once.
            unsafe { (n.lib.ack_async_event)((&mut raw as *mut IbvAsyncEvent).cast()) };
            out.push(AsyncEvent {
                event_type: raw.event_type,
                qp_num,
                port,
            });
        }
    }

    pub fn completion_queue(&self, depth: usize) -> Result<Cq> {
        let n = &self.inner;
        let cqe = c_int::try_from(depth)
            .map_err(|_| Error::invalid("completion queue depth", "below 2^31", depth))?;
        // SAFETY: a live context; no completion channel (the engine polls).
        let cq =
            unsafe { (n.lib.create_cq)(n.ctx, cqe, std::ptr::null_mut(), std::ptr::null_mut(), 0) };
        if cq.is_null() {
            return Err(failed("ibv_create_cq", &n.device, None));
        }
        Ok(Cq {
            inner: Arc::new(CqInner {
                nic: Arc::clone(n),
                cq,
            }),
        })
    }

    pub fn shared_receive_queue(&self, depth: u32) -> Result<Srq> {
        let n = &self.inner;
        let mut attr = IbvSrqInitAttr {
            srq_context: std::ptr::null_mut(),
            max_wr: depth,
            // Writes with immediate need no receive buffer: receives carry no entries.
            max_sge: 1,
            srq_limit: 0,
        };
        // SAFETY: a live protection domain; `attr` is an ibv_srq_init_attr.
        let srq = unsafe { (n.lib.create_srq)(n.pd, (&mut attr as *mut IbvSrqInitAttr).cast()) };
        if srq.is_null() {
            return Err(failed("ibv_create_srq", &n.device, None));
        }
        Ok(Srq {
            inner: Arc::new(SrqInner {
                nic: Arc::clone(n),
                srq,
            }),
        })
    }

    /// An RC queue pair completing into `cq`, receiving from `srq`, in the RESET state.
    pub fn queue_pair(&self, cq: &Cq, srq: &Srq, send_depth: u32, max_sge: u32) -> Result<Qp> {
        let n = &self.inner;
        let mut attr = IbvQpInitAttr {
            qp_context: std::ptr::null_mut(),
            send_cq: cq.inner.cq,
            recv_cq: cq.inner.cq,
            srq: srq.inner.srq,
            cap: IbvQpCap {
                max_send_wr: send_depth,
                max_recv_wr: 0,
                max_send_sge: max_sge,
                max_recv_sge: 0,
                max_inline_data: 0,
            },
            qp_type: abi::IBV_QPT_RC,
            // Only the work requests the send queue's accounting marks are signaled.
            sq_sig_all: 0,
        };
        // SAFETY: a live protection domain; `attr` is an ibv_qp_init_attr.
        let qp = unsafe { (n.lib.create_qp)(n.pd, (&mut attr as *mut IbvQpInitAttr).cast()) };
        if qp.is_null() {
            return Err(failed("ibv_create_qp", &n.device, None));
        }
        Ok(Qp {
            nic: Arc::clone(n),
            qp,
            _cq: Arc::clone(&cq.inner),
            _srq: Arc::clone(&srq.inner),
        })
    }
}

/// Registered memory.
pub struct Mr {
    nic: Arc<NicInner>,
    mr: *mut IbvMr,
}

// SAFETY: as NicInner.
unsafe impl Send for Mr {}
unsafe impl Sync for Mr {}

impl Mr {
    pub fn lkey(&self) -> u32 {
        // SAFETY: a live ibv_mr.
        unsafe { (*self.mr).lkey }
    }

    pub fn rkey(&self) -> u32 {
        // SAFETY: a live ibv_mr.
        unsafe { (*self.mr).rkey }
    }

    pub fn addr(&self) -> u64 {
        // SAFETY: a live ibv_mr.
        unsafe { (*self.mr).addr as u64 }
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: registered in `Nic::register`, deregistered once.
        unsafe { (self.nic.lib.dereg_mr)(self.mr.cast()) };
    }
}

struct CqInner {
    nic: Arc<NicInner>,
    cq: *mut c_void,
}

// SAFETY: as NicInner.
unsafe impl Send for CqInner {}
unsafe impl Sync for CqInner {}

impl Drop for CqInner {
    fn drop(&mut self) {
        // SAFETY: made in `Nic::completion_queue`; its queue pairs hold this, so none is left.
        unsafe { (self.nic.lib.destroy_cq)(self.cq) };
    }
}

pub struct Cq {
    inner: Arc<CqInner>,
}

impl Cq {
    /// Takes up to `out.len()` completions; returns how many.
    pub fn poll(&self, out: &mut [IbvWc]) -> Result<usize> {
        let cq = self.inner.cq;
        let max = c_int::try_from(out.len()).unwrap_or(c_int::MAX);
        // SAFETY: a live completion queue; ibv_poll_cq's operation, `out` has `max` entries.
        let got = unsafe {
            let poll: PollCq = context_op(cq, abi::context_ops::POLL_CQ);
            poll(cq, max, out.as_mut_ptr())
        };
        usize::try_from(got).map_err(|_| failed("ibv_poll_cq", &self.inner.nic.device, None))
    }
}

struct SrqInner {
    nic: Arc<NicInner>,
    srq: *mut c_void,
}

// SAFETY: as NicInner.
unsafe impl Send for SrqInner {}
unsafe impl Sync for SrqInner {}

impl Drop for SrqInner {
    fn drop(&mut self) {
        // SAFETY: made in `Nic::shared_receive_queue`; its queue pairs hold this.
        unsafe { (self.nic.lib.destroy_srq)(self.srq) };
    }
}

pub struct Srq {
    inner: Arc<SrqInner>,
}

impl Srq {
    /// Posts one receive with no buffer (a write with immediate only needs the slot).
    pub fn post_receive(&self, wr_id: u64) -> Result<()> {
        let srq = self.inner.srq;
        let mut wr = IbvRecvWr {
            wr_id,
            next: std::ptr::null_mut(),
            sg_list: std::ptr::null_mut(),
            num_sge: 0,
        };
        let mut bad = std::ptr::null_mut();
        // SAFETY: a live shared receive queue; ibv_post_srq_recv's operation.
        let rc = unsafe {
            let post: PostRecv = context_op(srq, abi::context_ops::POST_SRQ_RECV);
            post(srq, &mut wr, &mut bad)
        };
        if rc != 0 {
            return Err(failed(
                "ibv_post_srq_recv",
                &self.inner.nic.device,
                Some(rc),
            ));
        }
        Ok(())
    }
}

/// An RC queue pair.
pub struct Qp {
    nic: Arc<NicInner>,
    qp: *mut c_void,
    _cq: Arc<CqInner>,
    _srq: Arc<SrqInner>,
}

// SAFETY: as NicInner.
unsafe impl Send for Qp {}
unsafe impl Sync for Qp {}

impl Qp {
    pub fn qp_num(&self) -> u32 {
        // SAFETY: a live ibv_qp; the offset is checked against verbs.h.
        unsafe { *((self.qp as *const u8).add(abi::QP_NUM_OFFSET) as *const u32) }
    }

    /// One `ibv_modify_qp` with exactly the attributes `a` sets.
    pub fn modify(&self, a: &QpAttrs) -> Result<()> {
        let (mut attr, mask) = abi::qp_attr(a);
        // SAFETY: a live queue pair; `attr` is an ibv_qp_attr.
        let rc = unsafe {
            (self.nic.lib.modify_qp)(self.qp, (&mut attr as *mut abi::IbvQpAttr).cast(), mask)
        };
        if rc != 0 {
            return Err(failed("ibv_modify_qp", &self.nic.device, Some(rc)));
        }
        Ok(())
    }

    /// Posts `req` (an RDMA write with immediate).
    pub fn post_write(&self, req: &WriteRequest) -> Result<()> {
        let mut sges = abi::sges(req);
        let mut wr = abi::send_wr(req, &mut sges);
        let mut bad = std::ptr::null_mut();
        // SAFETY: a live queue pair; `wr` and its entries live across the call (the NIC
        // copies work requests when they are posted).
        let rc = unsafe {
            let post: PostSend = context_op(self.qp, abi::context_ops::POST_SEND);
            post(self.qp, &mut wr, &mut bad)
        };
        if rc != 0 {
            return Err(failed("ibv_post_send", &self.nic.device, Some(rc)));
        }
        Ok(())
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: made in `Nic::queue_pair`, destroyed once, before its queues (held above).
        unsafe { (self.nic.lib.destroy_qp)(self.qp) };
    }
}
