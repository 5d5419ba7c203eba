//! The InfiniBand verbs transport (issue 10). Its pure parts are tested on any machine:
//! what a rank tells its peers to connect an RC queue pair (`address`), the queue pair's
//! INIT -> RTR -> RTS transitions as data (`qp`), the mapping from the transport contract's
//! writes to work requests and from work completions back to the contract's completions
//! (`work`), and the accounting of posted receives and outstanding sends (`queues`).
//!
//! libibverbs itself is loaded at run time (`library`), so no build needs rdma-core and no
//! import fails without it; `device` finds the device and port a rank uses, or says what is
//! missing; `abi` lays out verbs.h's structures (checked against the header by a test) and
//! translates the values above into them; `resources` owns the verbs objects (device,
//! protection domain, memory regions, completion and shared receive queues, RC queue pairs);
//! `setup` makes them in two steps around the bootstrap, and `transport` is the contract's
//! `Transport` over them, which `Endpoint::verbs` and `Endpoint::shm_verbs` run the protocol on.
//! `tests/verbs_device.rs` and the verbs cases of `tests/loopback_world.rs` run on a machine
//! with an RDMA device and say why they skipped elsewhere.

pub mod abi;
pub mod address;
pub mod device;
pub mod events;
pub mod library;
pub mod qp;
pub mod queues;
pub mod resources;
pub mod setup;
pub mod transport;
pub mod work;
