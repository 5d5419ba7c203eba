//! The two-hop protocol over any [`Transport`](crate::transport::Transport): rings with
//! credits, token records, and the dispatch and combine state machines.

pub mod combine;
pub mod dispatch;
pub mod imm;
pub mod layout;
pub mod meta;
pub mod op;
pub mod record;
pub mod reduce;
pub mod ring;
pub mod sources;
