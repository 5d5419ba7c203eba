//! The C structures and constants of verbs.h that the data path passes to libibverbs, laid
//! out by hand (libibverbs is loaded at run time, so there is no bindgen step), and the
//! translation of this module's plain values into them and back. Every offset, size and
//! constant here is checked against the installed header by a test that compiles C, so a
//! layout slip fails CI instead of corrupting a NIC's work queue.

use std::ffi::c_void;

use super::qp::QpAttrs;
use super::work::{LocalSge, WcOpcode, WcStatus, WorkCompletion, WriteRequest};

// enum ibv_wr_opcode, ibv_send_flags, ibv_wc_opcode, ibv_wc_flags.
pub const IBV_WR_RDMA_WRITE: u32 = 0;
pub const IBV_WR_RDMA_WRITE_WITH_IMM: u32 = 1;
pub const IBV_SEND_SIGNALED: u32 = 1 << 1;
pub const IBV_WC_RDMA_WRITE: u32 = 1;
pub const IBV_WC_RECV_RDMA_WITH_IMM: u32 = 129;
pub const IBV_WC_WITH_IMM: u32 = 1 << 1;
// enum ibv_qp_type, ibv_access_flags.
pub const IBV_QPT_RC: u32 = 2;
pub const IBV_ACCESS_LOCAL_WRITE: i32 = 1;
pub const IBV_ACCESS_REMOTE_WRITE: i32 = 1 << 1;
// enum ibv_qp_attr_mask.
pub const IBV_QP_STATE: i32 = 1;
pub const IBV_QP_ACCESS_FLAGS: i32 = 1 << 3;
pub const IBV_QP_PKEY_INDEX: i32 = 1 << 4;
pub const IBV_QP_PORT: i32 = 1 << 5;
pub const IBV_QP_AV: i32 = 1 << 7;
pub const IBV_QP_PATH_MTU: i32 = 1 << 8;
pub const IBV_QP_TIMEOUT: i32 = 1 << 9;
pub const IBV_QP_RETRY_CNT: i32 = 1 << 10;
pub const IBV_QP_RNR_RETRY: i32 = 1 << 11;
pub const IBV_QP_RQ_PSN: i32 = 1 << 12;
pub const IBV_QP_MAX_QP_RD_ATOMIC: i32 = 1 << 13;
pub const IBV_QP_MIN_RNR_TIMER: i32 = 1 << 15;
pub const IBV_QP_SQ_PSN: i32 = 1 << 16;
pub const IBV_QP_MAX_DEST_RD_ATOMIC: i32 = 1 << 17;
pub const IBV_QP_DEST_QPN: i32 = 1 << 20;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IbvSge {
    pub addr: u64,
    pub length: u32,
    pub lkey: u32,
}

/// `wr.rdma` of `ibv_send_wr`, padded to the union's size (its largest member, `atomic`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IbvRdmaWr {
    pub remote_addr: u64,
    pub rkey: u32,
    pub _rest: [u32; 5],
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IbvSendWr {
    pub wr_id: u64,
    pub next: *mut IbvSendWr,
    pub sg_list: *mut IbvSge,
    pub num_sge: i32,
    pub opcode: u32,
    pub send_flags: u32,
    /// Network byte order.
    pub imm_data: u32,
    pub rdma: IbvRdmaWr,
    pub qp_type: u32,
    /// The `bind_mw` / `tso` union, unused by RDMA writes.
    pub _tail: [u64; 6],
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IbvRecvWr {
    pub wr_id: u64,
    pub next: *mut IbvRecvWr,
    pub sg_list: *mut IbvSge,
    pub num_sge: i32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IbvWc {
    pub wr_id: u64,
    pub status: u32,
    pub opcode: u32,
    pub vendor_err: u32,
    pub byte_len: u32,
    /// Network byte order.
    pub imm_data: u32,
    pub qp_num: u32,
    pub src_qp: u32,
    pub wc_flags: u32,
    pub pkey_index: u16,
    pub slid: u16,
    pub sl: u8,
    pub dlid_path_bits: u8,
}

#[repr(C, align(8))]
#[derive(Debug, Clone, Copy, Default)]
pub struct IbvGid {
    pub raw: [u8; 16],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IbvGlobalRoute {
    pub dgid: IbvGid,
    pub flow_label: u32,
    pub sgid_index: u8,
    pub hop_limit: u8,
    pub traffic_class: u8,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IbvAhAttr {
    pub grh: IbvGlobalRoute,
    pub dlid: u16,
    pub sl: u8,
    pub src_path_bits: u8,
    pub static_rate: u8,
    pub is_global: u8,
    pub port_num: u8,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IbvQpCap {
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    pub max_inline_data: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IbvQpAttr {
    pub qp_state: u32,
    pub cur_qp_state: u32,
    pub path_mtu: u32,
    pub path_mig_state: u32,
    pub qkey: u32,
    pub rq_psn: u32,
    pub sq_psn: u32,
    pub dest_qp_num: u32,
    pub qp_access_flags: u32,
    pub cap: IbvQpCap,
    pub ah_attr: IbvAhAttr,
    pub alt_ah_attr: IbvAhAttr,
    pub pkey_index: u16,
    pub alt_pkey_index: u16,
    pub en_sqd_async_notify: u8,
    pub sq_draining: u8,
    pub max_rd_atomic: u8,
    pub max_dest_rd_atomic: u8,
    pub min_rnr_timer: u8,
    pub port_num: u8,
    pub timeout: u8,
    pub retry_cnt: u8,
    pub rnr_retry: u8,
    pub alt_port_num: u8,
    pub alt_timeout: u8,
    pub rate_limit: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IbvQpInitAttr {
    pub qp_context: *mut c_void,
    pub send_cq: *mut c_void,
    pub recv_cq: *mut c_void,
    pub srq: *mut c_void,
    pub cap: IbvQpCap,
    pub qp_type: u32,
    pub sq_sig_all: i32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IbvSrqInitAttr {
    pub srq_context: *mut c_void,
    pub max_wr: u32,
    pub max_sge: u32,
    pub srq_limit: u32,
}

/// The head of `ibv_mr`: where the keys are.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IbvMr {
    pub context: *mut c_void,
    pub pd: *mut c_void,
    pub addr: *mut c_void,
    pub length: usize,
    pub handle: u32,
    pub lkey: u32,
    pub rkey: u32,
}

/// Offsets into `struct ibv_context` of the operations verbs.h calls inline
/// (`ibv_post_send`, `ibv_poll_cq`, `ibv_post_srq_recv` are `static inline` there, so no
/// library symbol exists for them: the function pointer is read from the context).
pub mod context_ops {
    pub const POLL_CQ: usize = 8 + 8 * 11;
    pub const POST_SRQ_RECV: usize = 8 + 8 * 20;
    pub const POST_SEND: usize = 8 + 8 * 25;
}

/// The field of `ibv_qp`, `ibv_cq` and `ibv_srq` that points at their context: the first.
pub const CONTEXT_FIELD: usize = 0;
/// `ibv_qp.qp_num`.
pub const QP_NUM_OFFSET: usize = 52;
/// `ibv_context.async_fd`: made non-blocking, so that asynchronous events can be polled.
pub const ASYNC_FD_OFFSET: usize = 268;

/// `ibv_async_event`: the object it concerns (a pointer, or a port number), and its type.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IbvAsyncEvent {
    pub element: u64,
    pub event_type: u32,
    pub _pad: u32,
}

/// `ibv_event_type` values the transport acts on.
pub const IBV_EVENT_CQ_ERR: u32 = 0;
pub const IBV_EVENT_QP_FATAL: u32 = 1;
pub const IBV_EVENT_QP_REQ_ERR: u32 = 2;
pub const IBV_EVENT_QP_ACCESS_ERR: u32 = 3;
pub const IBV_EVENT_DEVICE_FATAL: u32 = 8;
pub const IBV_EVENT_PORT_ERR: u32 = 10;
pub const IBV_EVENT_SRQ_ERR: u32 = 14;
/// Port events that change nothing for an established connection.
pub const IBV_EVENT_PORT_ACTIVE: u32 = 9;
pub const IBV_EVENT_LID_CHANGE: u32 = 11;
pub const IBV_EVENT_PKEY_CHANGE: u32 = 12;
pub const IBV_EVENT_SM_CHANGE: u32 = 13;
pub const IBV_EVENT_CLIENT_REREGISTER: u32 = 17;
pub const IBV_EVENT_GID_CHANGE: u32 = 18;

/// `a` as `ibv_modify_qp`'s attributes and mask: exactly the fields `a` sets.
pub fn qp_attr(a: &QpAttrs) -> (IbvQpAttr, i32) {
    let mut attr = IbvQpAttr::default();
    let mut mask = 0;
    let mut set = |bit: i32, present: bool| {
        if present {
            mask |= bit;
        }
    };
    if let Some(s) = a.state {
        attr.qp_state = s as u32;
    }
    set(IBV_QP_STATE, a.state.is_some());
    if let Some(p) = a.port_num {
        attr.port_num = p;
    }
    set(IBV_QP_PORT, a.port_num.is_some());
    if let Some(p) = a.pkey_index {
        attr.pkey_index = p;
    }
    set(IBV_QP_PKEY_INDEX, a.pkey_index.is_some());
    if let Some(w) = a.remote_write {
        attr.qp_access_flags =
            (IBV_ACCESS_LOCAL_WRITE | if w { IBV_ACCESS_REMOTE_WRITE } else { 0 }) as u32;
    }
    set(IBV_QP_ACCESS_FLAGS, a.remote_write.is_some());
    if let Some(m) = a.path_mtu {
        attr.path_mtu = m as u32;
    }
    set(IBV_QP_PATH_MTU, a.path_mtu.is_some());
    if let Some(q) = a.dest_qp_num {
        attr.dest_qp_num = q;
    }
    set(IBV_QP_DEST_QPN, a.dest_qp_num.is_some());
    if let Some(p) = a.rq_psn {
        attr.rq_psn = p;
    }
    set(IBV_QP_RQ_PSN, a.rq_psn.is_some());
    if let Some(n) = a.max_dest_rd_atomic {
        attr.max_dest_rd_atomic = n;
    }
    set(IBV_QP_MAX_DEST_RD_ATOMIC, a.max_dest_rd_atomic.is_some());
    if let Some(t) = a.min_rnr_timer {
        attr.min_rnr_timer = t;
    }
    set(IBV_QP_MIN_RNR_TIMER, a.min_rnr_timer.is_some());
    // The address vector: destination LID, service level, port, and a GRH on RoCE.
    let av = a.dlid.is_some() || a.sl.is_some() || a.ah_port.is_some() || a.grh.is_some();
    attr.ah_attr.dlid = a.dlid.unwrap_or(0);
    attr.ah_attr.sl = a.sl.unwrap_or(0);
    attr.ah_attr.port_num = a.ah_port.unwrap_or(0);
    if let Some(g) = a.grh {
        attr.ah_attr.is_global = 1;
        attr.ah_attr.grh = IbvGlobalRoute {
            dgid: IbvGid { raw: g.dgid },
            flow_label: 0,
            sgid_index: g.sgid_index,
            hop_limit: g.hop_limit,
            traffic_class: g.traffic_class,
        };
    }
    set(IBV_QP_AV, av);
    if let Some(t) = a.timeout {
        attr.timeout = t;
    }
    set(IBV_QP_TIMEOUT, a.timeout.is_some());
    if let Some(r) = a.retry_cnt {
        attr.retry_cnt = r;
    }
    set(IBV_QP_RETRY_CNT, a.retry_cnt.is_some());
    if let Some(r) = a.rnr_retry {
        attr.rnr_retry = r;
    }
    set(IBV_QP_RNR_RETRY, a.rnr_retry.is_some());
    if let Some(p) = a.sq_psn {
        attr.sq_psn = p;
    }
    set(IBV_QP_SQ_PSN, a.sq_psn.is_some());
    if let Some(n) = a.max_rd_atomic {
        attr.max_rd_atomic = n;
    }
    set(IBV_QP_MAX_QP_RD_ATOMIC, a.max_rd_atomic.is_some());
    (attr, mask)
}

/// `req`'s scatter-gather list as `ibv_sge`s (they must stay in place until posted).
pub fn sges(req: &WriteRequest) -> Vec<IbvSge> {
    req.sges
        .iter()
        .map(|s: &LocalSge| IbvSge {
            addr: s.addr,
            length: s.len,
            lkey: s.lkey,
        })
        .collect()
}

/// The `ibv_send_wr` for `req`, gathering from `sg_list` (from [`sges`]).
pub fn send_wr(req: &WriteRequest, sg_list: &mut [IbvSge]) -> IbvSendWr {
    IbvSendWr {
        wr_id: req.wr_id,
        next: std::ptr::null_mut(),
        sg_list: if sg_list.is_empty() {
            std::ptr::null_mut()
        } else {
            sg_list.as_mut_ptr()
        },
        num_sge: sg_list.len() as i32,
        opcode: if req.imm_be.is_some() {
            IBV_WR_RDMA_WRITE_WITH_IMM
        } else {
            IBV_WR_RDMA_WRITE
        },
        send_flags: if req.signaled { IBV_SEND_SIGNALED } else { 0 },
        imm_data: req.imm_be.unwrap_or(0),
        rdma: IbvRdmaWr {
            remote_addr: req.remote_addr,
            rkey: req.rkey,
            _rest: [0; 5],
        },
        qp_type: 0,
        _tail: [0; 6],
    }
}

/// `ibv_wc_status_str`'s words for the statuses a reliable connection can end in.
pub fn status_text(code: u32) -> &'static str {
    match code {
        1 => "local length error",
        2 => "local QP operation error",
        4 => "local protection error",
        5 => "Work Request Flushed Error",
        9 => "remote invalid request error",
        10 => "remote access error",
        11 => "remote operation error",
        12 => "transport retry counter exceeded",
        13 => "RNR retry counter exceeded",
        _ => "general error",
    }
}

/// A polled `ibv_wc` as this module's completion. On an error completion only `wr_id`,
/// `status` and `qp_num` are defined, so the opcode is taken from the work request's id.
pub fn work_completion(wc: &IbvWc) -> WorkCompletion {
    let receive = super::work::is_receive(wc.wr_id);
    WorkCompletion {
        wr_id: wc.wr_id,
        status: if wc.status == 0 {
            WcStatus::Success
        } else {
            WcStatus::Failed(wc.status, status_text(wc.status))
        },
        opcode: if receive || wc.opcode == IBV_WC_RECV_RDMA_WITH_IMM {
            WcOpcode::RecvRdmaWithImm
        } else {
            WcOpcode::RdmaWrite
        },
        byte_len: wc.byte_len,
        imm_be: if wc.wc_flags & IBV_WC_WITH_IMM != 0 {
            wc.imm_data
        } else {
            0
        },
        qp_num: wc.qp_num,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::verbs::address::{PathMtu, QpAddress, RemoteRegion};
    use crate::transport::verbs::device::port_attr;
    use crate::transport::verbs::qp::{LinkLayer, QpConfig, connect};
    use std::mem::{offset_of, size_of};

    fn addr(qpn: u32, psn: u32) -> QpAddress {
        QpAddress {
            rank: 0,
            lid: 9,
            gid: [7; 16],
            qpn,
            psn,
            mtu: PathMtu::Mtu4096,
            regions: [RemoteRegion::default(); 4],
        }
    }

    #[test]
    fn each_transition_sets_exactly_the_fields_verbs_requires() {
        let cfg = QpConfig::new(1, LinkLayer::Ethernet { gid_index: 3 });
        let [(_, init), (_, rtr), (_, rts)] = connect(&addr(10, 1), &addr(20, 2), &cfg);
        let (a, m) = qp_attr(&init);
        // ibv_modify_qp(3)'s required attributes for RESET -> INIT on an RC queue pair.
        assert_eq!(
            m,
            IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS
        );
        assert_eq!((a.qp_state, a.port_num), (1, 1));
        assert_eq!(
            a.qp_access_flags,
            (IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE) as u32
        );
        let (a, m) = qp_attr(&rtr);
        assert_eq!(
            m,
            IBV_QP_STATE
                | IBV_QP_AV
                | IBV_QP_PATH_MTU
                | IBV_QP_DEST_QPN
                | IBV_QP_RQ_PSN
                | IBV_QP_MAX_DEST_RD_ATOMIC
                | IBV_QP_MIN_RNR_TIMER
        );
        assert_eq!((a.qp_state, a.dest_qp_num, a.rq_psn), (2, 20, 2));
        assert_eq!(a.ah_attr.is_global, 1);
        assert_eq!(a.ah_attr.grh.dgid.raw, [7; 16]);
        assert_eq!(a.ah_attr.grh.sgid_index, 3);
        let (a, m) = qp_attr(&rts);
        assert_eq!(
            m,
            IBV_QP_STATE
                | IBV_QP_TIMEOUT
                | IBV_QP_RETRY_CNT
                | IBV_QP_RNR_RETRY
                | IBV_QP_SQ_PSN
                | IBV_QP_MAX_QP_RD_ATOMIC
        );
        assert_eq!(
            (a.qp_state, a.sq_psn, a.timeout, a.retry_cnt),
            (3, 1, 18, 7)
        );
    }

    #[test]
    fn a_write_request_becomes_a_signaled_write_with_immediate() {
        let req = WriteRequest {
            wr_id: 42,
            sges: vec![
                LocalSge {
                    addr: 0x1000,
                    len: 24,
                    lkey: 5,
                },
                LocalSge {
                    addr: 0x2000,
                    len: 100,
                    lkey: 6,
                },
            ],
            remote_addr: 0x9000,
            rkey: 77,
            imm_be: Some(0x1234_5678u32.to_be()),
            signaled: true,
        };
        let mut list = sges(&req);
        let wr = send_wr(&req, &mut list);
        assert_eq!((wr.wr_id, wr.num_sge, wr.opcode), (42, 2, 1));
        assert_eq!(wr.send_flags, IBV_SEND_SIGNALED);
        assert_eq!((wr.rdma.remote_addr, wr.rdma.rkey), (0x9000, 77));
        assert_eq!(wr.imm_data, 0x1234_5678u32.to_be());
        // SAFETY: sg_list points at `list`'s two entries.
        let got = unsafe { std::slice::from_raw_parts(wr.sg_list, 2) };
        assert_eq!(
            got[1],
            IbvSge {
                addr: 0x2000,
                length: 100,
                lkey: 6
            }
        );
        let unsignaled = WriteRequest {
            signaled: false,
            sges: vec![],
            ..req
        };
        let wr = send_wr(&unsignaled, &mut []);
        assert_eq!((wr.send_flags, wr.num_sge), (0, 0));
        assert!(wr.sg_list.is_null());
        // Without an immediate it is a plain write: the peer sees no completion (a fence).
        let fence = WriteRequest {
            imm_be: None,
            ..unsignaled
        };
        assert_eq!(send_wr(&fence, &mut []).opcode, IBV_WR_RDMA_WRITE);
    }

    #[test]
    fn completions_keep_the_immediate_and_errors_their_words() {
        let wc = IbvWc {
            wr_id: super::super::work::RECV_WR_BIT | 3,
            opcode: IBV_WC_RECV_RDMA_WITH_IMM,
            byte_len: 96,
            imm_data: 0xabcd,
            wc_flags: IBV_WC_WITH_IMM,
            qp_num: 17,
            ..IbvWc::default()
        };
        let c = work_completion(&wc);
        assert_eq!(c.status, WcStatus::Success);
        assert_eq!(c.opcode, WcOpcode::RecvRdmaWithImm);
        assert_eq!((c.byte_len, c.imm_be, c.qp_num), (96, 0xabcd, 17));
        // An error completion's opcode is undefined: a send's id says it was a write.
        let err = work_completion(&IbvWc {
            wr_id: 8,
            status: 12,
            opcode: 0xffff,
            qp_num: 17,
            ..IbvWc::default()
        });
        assert_eq!(
            err.status,
            WcStatus::Failed(12, "transport retry counter exceeded")
        );
        assert_eq!(err.opcode, WcOpcode::RdmaWrite);
    }

    /// Every layout and constant above, as this file states them, for comparing with C.
    fn ours() -> Vec<(&'static str, usize)> {
        vec![
            ("sizeof(struct ibv_sge)", size_of::<IbvSge>()),
            ("sizeof(struct ibv_send_wr)", size_of::<IbvSendWr>()),
            (
                "offsetof(struct ibv_send_wr, num_sge)",
                offset_of!(IbvSendWr, num_sge),
            ),
            (
                "offsetof(struct ibv_send_wr, opcode)",
                offset_of!(IbvSendWr, opcode),
            ),
            (
                "offsetof(struct ibv_send_wr, send_flags)",
                offset_of!(IbvSendWr, send_flags),
            ),
            (
                "offsetof(struct ibv_send_wr, imm_data)",
                offset_of!(IbvSendWr, imm_data),
            ),
            (
                "offsetof(struct ibv_send_wr, wr.rdma.remote_addr)",
                offset_of!(IbvSendWr, rdma),
            ),
            (
                "offsetof(struct ibv_send_wr, wr.rdma.rkey)",
                offset_of!(IbvSendWr, rdma) + offset_of!(IbvRdmaWr, rkey),
            ),
            (
                "offsetof(struct ibv_send_wr, qp_type)",
                offset_of!(IbvSendWr, qp_type),
            ),
            ("sizeof(struct ibv_recv_wr)", size_of::<IbvRecvWr>()),
            (
                "offsetof(struct ibv_recv_wr, num_sge)",
                offset_of!(IbvRecvWr, num_sge),
            ),
            ("sizeof(struct ibv_wc)", size_of::<IbvWc>()),
            ("offsetof(struct ibv_wc, status)", offset_of!(IbvWc, status)),
            (
                "offsetof(struct ibv_wc, byte_len)",
                offset_of!(IbvWc, byte_len),
            ),
            (
                "offsetof(struct ibv_wc, imm_data)",
                offset_of!(IbvWc, imm_data),
            ),
            ("offsetof(struct ibv_wc, qp_num)", offset_of!(IbvWc, qp_num)),
            (
                "offsetof(struct ibv_wc, wc_flags)",
                offset_of!(IbvWc, wc_flags),
            ),
            ("sizeof(struct ibv_qp_attr)", size_of::<IbvQpAttr>()),
            (
                "offsetof(struct ibv_qp_attr, qp_access_flags)",
                offset_of!(IbvQpAttr, qp_access_flags),
            ),
            (
                "offsetof(struct ibv_qp_attr, ah_attr)",
                offset_of!(IbvQpAttr, ah_attr),
            ),
            (
                "offsetof(struct ibv_qp_attr, ah_attr.grh.sgid_index)",
                offset_of!(IbvQpAttr, ah_attr) + offset_of!(IbvGlobalRoute, sgid_index),
            ),
            (
                "offsetof(struct ibv_qp_attr, ah_attr.dlid)",
                offset_of!(IbvQpAttr, ah_attr) + offset_of!(IbvAhAttr, dlid),
            ),
            (
                "offsetof(struct ibv_qp_attr, ah_attr.is_global)",
                offset_of!(IbvQpAttr, ah_attr) + offset_of!(IbvAhAttr, is_global),
            ),
            (
                "offsetof(struct ibv_qp_attr, ah_attr.port_num)",
                offset_of!(IbvQpAttr, ah_attr) + offset_of!(IbvAhAttr, port_num),
            ),
            (
                "offsetof(struct ibv_qp_attr, pkey_index)",
                offset_of!(IbvQpAttr, pkey_index),
            ),
            (
                "offsetof(struct ibv_qp_attr, max_rd_atomic)",
                offset_of!(IbvQpAttr, max_rd_atomic),
            ),
            (
                "offsetof(struct ibv_qp_attr, port_num)",
                offset_of!(IbvQpAttr, port_num),
            ),
            (
                "offsetof(struct ibv_qp_attr, rnr_retry)",
                offset_of!(IbvQpAttr, rnr_retry),
            ),
            (
                "offsetof(struct ibv_qp_attr, rate_limit)",
                offset_of!(IbvQpAttr, rate_limit),
            ),
            (
                "sizeof(struct ibv_qp_init_attr)",
                size_of::<IbvQpInitAttr>(),
            ),
            (
                "offsetof(struct ibv_qp_init_attr, cap)",
                offset_of!(IbvQpInitAttr, cap),
            ),
            (
                "offsetof(struct ibv_qp_init_attr, qp_type)",
                offset_of!(IbvQpInitAttr, qp_type),
            ),
            (
                "sizeof(struct ibv_srq_init_attr)",
                size_of::<IbvSrqInitAttr>(),
            ),
            (
                "offsetof(struct ibv_srq_init_attr, attr.max_wr)",
                offset_of!(IbvSrqInitAttr, max_wr),
            ),
            ("offsetof(struct ibv_mr, lkey)", offset_of!(IbvMr, lkey)),
            ("offsetof(struct ibv_mr, rkey)", offset_of!(IbvMr, rkey)),
            (
                "offsetof(struct ibv_context, ops.poll_cq)",
                context_ops::POLL_CQ,
            ),
            (
                "offsetof(struct ibv_context, ops.post_srq_recv)",
                context_ops::POST_SRQ_RECV,
            ),
            (
                "offsetof(struct ibv_context, ops.post_send)",
                context_ops::POST_SEND,
            ),
            ("offsetof(struct ibv_qp, context)", CONTEXT_FIELD),
            ("offsetof(struct ibv_cq, context)", CONTEXT_FIELD),
            ("offsetof(struct ibv_srq, context)", CONTEXT_FIELD),
            ("offsetof(struct ibv_qp, qp_num)", QP_NUM_OFFSET),
            ("offsetof(struct ibv_context, async_fd)", ASYNC_FD_OFFSET),
            ("sizeof(struct ibv_async_event)", size_of::<IbvAsyncEvent>()),
            (
                "offsetof(struct ibv_async_event, event_type)",
                offset_of!(IbvAsyncEvent, event_type),
            ),
            ("IBV_EVENT_CQ_ERR", IBV_EVENT_CQ_ERR as usize),
            ("IBV_EVENT_QP_FATAL", IBV_EVENT_QP_FATAL as usize),
            ("IBV_EVENT_QP_REQ_ERR", IBV_EVENT_QP_REQ_ERR as usize),
            ("IBV_EVENT_QP_ACCESS_ERR", IBV_EVENT_QP_ACCESS_ERR as usize),
            ("IBV_EVENT_DEVICE_FATAL", IBV_EVENT_DEVICE_FATAL as usize),
            ("IBV_EVENT_PORT_ERR", IBV_EVENT_PORT_ERR as usize),
            ("IBV_EVENT_SRQ_ERR", IBV_EVENT_SRQ_ERR as usize),
            ("IBV_EVENT_PORT_ACTIVE", IBV_EVENT_PORT_ACTIVE as usize),
            ("IBV_EVENT_LID_CHANGE", IBV_EVENT_LID_CHANGE as usize),
            ("IBV_EVENT_PKEY_CHANGE", IBV_EVENT_PKEY_CHANGE as usize),
            ("IBV_EVENT_SM_CHANGE", IBV_EVENT_SM_CHANGE as usize),
            (
                "IBV_EVENT_CLIENT_REREGISTER",
                IBV_EVENT_CLIENT_REREGISTER as usize,
            ),
            ("IBV_EVENT_GID_CHANGE", IBV_EVENT_GID_CHANGE as usize),
            ("offsetof(struct ibv_port_attr, state)", port_attr::STATE),
            (
                "offsetof(struct ibv_port_attr, active_mtu)",
                port_attr::ACTIVE_MTU,
            ),
            ("offsetof(struct ibv_port_attr, lid)", port_attr::LID),
            (
                "offsetof(struct ibv_port_attr, link_layer)",
                port_attr::LINK_LAYER,
            ),
            // The port query writes the whole structure into a buffer of this size.
            (
                "sizeof(struct ibv_port_attr) <= DUALCOMM_PORT_ATTR_BYTES",
                1,
            ),
            ("IBV_PORT_ACTIVE", 4),
            ("IBV_LINK_LAYER_ETHERNET", 2),
            ("IBV_WR_RDMA_WRITE", IBV_WR_RDMA_WRITE as usize),
            ("IBV_QPS_ERR", super::super::qp::ERR as usize),
            (
                "IBV_WR_RDMA_WRITE_WITH_IMM",
                IBV_WR_RDMA_WRITE_WITH_IMM as usize,
            ),
            ("IBV_SEND_SIGNALED", IBV_SEND_SIGNALED as usize),
            ("IBV_WC_RDMA_WRITE", IBV_WC_RDMA_WRITE as usize),
            (
                "IBV_WC_RECV_RDMA_WITH_IMM",
                IBV_WC_RECV_RDMA_WITH_IMM as usize,
            ),
            ("IBV_WC_WITH_IMM", IBV_WC_WITH_IMM as usize),
            ("IBV_QPT_RC", IBV_QPT_RC as usize),
            ("IBV_ACCESS_LOCAL_WRITE", IBV_ACCESS_LOCAL_WRITE as usize),
            ("IBV_ACCESS_REMOTE_WRITE", IBV_ACCESS_REMOTE_WRITE as usize),
            ("IBV_QP_STATE", IBV_QP_STATE as usize),
            ("IBV_QP_ACCESS_FLAGS", IBV_QP_ACCESS_FLAGS as usize),
            ("IBV_QP_PKEY_INDEX", IBV_QP_PKEY_INDEX as usize),
            ("IBV_QP_PORT", IBV_QP_PORT as usize),
            ("IBV_QP_AV", IBV_QP_AV as usize),
            ("IBV_QP_PATH_MTU", IBV_QP_PATH_MTU as usize),
            ("IBV_QP_TIMEOUT", IBV_QP_TIMEOUT as usize),
            ("IBV_QP_RETRY_CNT", IBV_QP_RETRY_CNT as usize),
            ("IBV_QP_RNR_RETRY", IBV_QP_RNR_RETRY as usize),
            ("IBV_QP_RQ_PSN", IBV_QP_RQ_PSN as usize),
            ("IBV_QP_MAX_QP_RD_ATOMIC", IBV_QP_MAX_QP_RD_ATOMIC as usize),
            ("IBV_QP_MIN_RNR_TIMER", IBV_QP_MIN_RNR_TIMER as usize),
            ("IBV_QP_SQ_PSN", IBV_QP_SQ_PSN as usize),
            (
                "IBV_QP_MAX_DEST_RD_ATOMIC",
                IBV_QP_MAX_DEST_RD_ATOMIC as usize,
            ),
            ("IBV_QP_DEST_QPN", IBV_QP_DEST_QPN as usize),
            ("IBV_QPS_INIT", 1),
            ("IBV_QPS_RTR", 2),
            ("IBV_QPS_RTS", 3),
            ("IBV_MTU_4096", PathMtu::Mtu4096 as usize),
            ("IBV_WC_RETRY_EXC_ERR", 12),
        ]
    }

    /// Where the rdma-core headers are installed (the CI installs libibverbs-dev), every
    /// value of `ours` is compared with what the C compiler says.
    #[test]
    fn layouts_and_constants_match_the_installed_header() {
        let header = std::path::Path::new("/usr/include/infiniband/verbs.h");
        if !header.exists() {
            eprintln!("skipped: {} is not installed", header.display());
            return;
        }
        let ours = ours();
        let mut c = String::from(
            "#include <stddef.h>\n#include <stdio.h>\n#include <infiniband/verbs.h>\n",
        );
        c.push_str(&format!(
            "#define DUALCOMM_PORT_ATTR_BYTES {}\nint main(void) {{\n",
            port_attr::BYTES
        ));
        for (expr, _) in &ours {
            c.push_str(&format!("  printf(\"%zu\\n\", (size_t)({expr}));\n"));
        }
        c.push_str("  return 0;\n}\n");
        let dir = std::env::temp_dir().join(format!("dualcomm-abi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (src, exe) = (dir.join("abi.c"), dir.join("abi"));
        std::fs::write(&src, c).unwrap();
        let built = std::process::Command::new("cc")
            .arg(&src)
            .arg("-o")
            .arg(&exe)
            .output()
            .expect("a C compiler where the verbs header is installed");
        assert!(
            built.status.success(),
            "{}",
            String::from_utf8_lossy(&built.stderr)
        );
        let out = std::process::Command::new(&exe).output().unwrap();
        let theirs: Vec<usize> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|v| v.parse().unwrap())
            .collect();
        let wrong: Vec<String> = ours
            .iter()
            .zip(&theirs)
            .filter(|((_, a), b)| a != *b)
            .map(|((e, a), b)| format!("{e}: ours {a}, verbs.h {b}"))
            .collect();
        assert!(wrong.is_empty(), "{wrong:#?}");
        assert_eq!(theirs.len(), ours.len());
        std::fs::remove_dir_all(&dir).ok();
    }
}
