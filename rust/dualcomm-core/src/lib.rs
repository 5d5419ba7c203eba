//! dualcomm-core: expert-parallel dispatch and combine for Mixture-of-Experts training,
//! routed the way a multi-node cluster needs it (one network crossing per destination node,
//! then forwarding inside the node), over pluggable RDMA-shaped transports. No Python here.

pub mod channels;
pub mod endpoint;
pub mod engine;
pub mod error;
pub mod handoff;
pub mod low_latency;
pub mod mask;
pub mod protocol;
pub mod proxy;
pub mod routing;
pub mod topology;
pub mod transport;

pub use channels::{
    ChannelDispatchOutput, ChannelHandle, ChannelRoute, Channels, QueuedChannelRoute, channel_range,
};
pub use endpoint::{Config, Endpoint, QueuedRoute, Stats};
pub use engine::{Driven, Engine, Ticket};
pub use error::{Error, Result};
pub use handoff::{
    PendingHandle, RawBuffer, RecvHandoff, RecvMemory, RecvRequest, ShapeWait, recv_handoff,
};
pub use low_latency::LowLatencyCombineArgs;
pub use mask::RankMask;
pub use protocol::combine::{CombineArgs, CombineOut};
pub use protocol::dispatch::{
    DispatchArgs, DispatchHandle, DispatchOutput, RecvBuffers, RecvShape, RecvSink, Route,
    TopkArgs, VecSink,
};
pub use protocol::op::OpKind;
pub use protocol::record::{ElemType, RecordFormat};
pub use protocol::reduce::Dtype;
pub use routing::{DispatchLayout, SendPlan};
pub use topology::Topology;
