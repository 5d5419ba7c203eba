//! The CPU proxy of the GPU path's rdma tier (the UCCL-EP pattern): GPU kernels pack token
//! records into a registered send buffer and push small commands into a ring in pinned host
//! memory; the proxy drains the ring and turns each command into a transport write, so the
//! protocol's writes, immediates and flushes are the same ones the CPU path posts.
//!
//! `command` is the wire format of one command (shared with `cuda/command_ring.cuh`), `ring`
//! the single-producer single-consumer ring, `proxy` the consumer that posts the writes.

pub mod command;
pub mod drain;
pub mod ring;

pub use command::{COMMAND_BYTES, Command, CommandKind};
pub use drain::Proxy;
pub use ring::CommandRing;
