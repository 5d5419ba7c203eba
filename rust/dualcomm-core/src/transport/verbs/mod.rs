//! The InfiniBand verbs transport's pure parts (issue 10), written and tested before any NIC:
//! what a rank tells its peers to connect an RC queue pair (`address`), the queue pair's
//! INIT -> RTR -> RTS transitions as data (`qp`), the mapping from the transport contract's
//! writes to work requests and from work completions back to the contract's completions
//! (`work`), and the accounting of posted receives and outstanding sends (`queues`).
//!
//! The binding to libibverbs (ibverbs-sys, behind a cargo feature) only copies these values
//! into and out of `ibv_*` structures; every decision is made, and tested, here.

pub mod address;
pub mod qp;
pub mod queues;
pub mod work;
