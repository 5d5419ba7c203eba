//! The device's asynchronous events, as the transport acts on them: a port that goes down, a
//! fatal device, a broken completion or shared receive queue lose every peer at once; a
//! queue pair that fails on its own loses its peer. Completions alone would tell the same
//! only when a write to each peer timed out (`QpConfig::silent_peer_seconds`), and never for
//! a peer this rank only receives from.

use super::abi;

/// One event, read from the device (`resources::Nic::async_events`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsyncEvent {
    pub event_type: u32,
    /// For queue pair events: the queue pair's number.
    pub qp_num: Option<u32>,
    /// For port events: the port's number.
    pub port: Option<u8>,
}

/// What an event means for the peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Every peer is unreachable, for this reason.
    Everyone(String),
    /// The peer on this queue pair is.
    QueuePair { qp_num: u32, reason: String },
}

/// Whether an event of this type concerns a queue pair (its element is an `ibv_qp *`).
pub fn names_queue_pair(event_type: u32) -> bool {
    matches!(
        event_type,
        abi::IBV_EVENT_QP_FATAL | abi::IBV_EVENT_QP_REQ_ERR | abi::IBV_EVENT_QP_ACCESS_ERR
    )
}

/// Whether an event of this type concerns a port (its element is a port number).
pub fn names_port(event_type: u32) -> bool {
    matches!(
        event_type,
        abi::IBV_EVENT_PORT_ERR
            | abi::IBV_EVENT_PORT_ACTIVE
            | abi::IBV_EVENT_LID_CHANGE
            | abi::IBV_EVENT_PKEY_CHANGE
            | abi::IBV_EVENT_SM_CHANGE
            | abi::IBV_EVENT_CLIENT_REREGISTER
            | abi::IBV_EVENT_GID_CHANGE
    )
}

/// The fault `event` is for this rank, which uses `port` of `device`; none for the events
/// that change nothing (a port coming up, a LID change, ...).
pub fn fault(event: &AsyncEvent, device: &str, port: u8) -> Option<Fault> {
    let everyone = |what: &str| Some(Fault::Everyone(format!("{what} on {device}")));
    match event.event_type {
        abi::IBV_EVENT_PORT_ERR if event.port == Some(port) => {
            everyone(&format!("port {port} went down"))
        }
        abi::IBV_EVENT_DEVICE_FATAL => everyone("a fatal device error"),
        abi::IBV_EVENT_CQ_ERR => everyone("the completion queue overran"),
        abi::IBV_EVENT_SRQ_ERR => everyone("the shared receive queue failed"),
        t if names_queue_pair(t) => event.qp_num.map(|qp_num| Fault::QueuePair {
            qp_num,
            reason: format!(
                "its queue pair failed ({} on {device})",
                match t {
                    abi::IBV_EVENT_QP_FATAL => "a fatal queue pair error",
                    abi::IBV_EVENT_QP_REQ_ERR => "an invalid request",
                    _ => "an access error",
                }
            ),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event_type: u32, qp_num: Option<u32>, port: Option<u8>) -> AsyncEvent {
        AsyncEvent {
            event_type,
            qp_num,
            port,
        }
    }

    #[test]
    fn a_port_going_down_loses_everyone_and_a_failed_queue_pair_its_peer() {
        let down = fault(&ev(abi::IBV_EVENT_PORT_ERR, None, Some(1)), "mlx5_0", 1);
        assert_eq!(
            down,
            Some(Fault::Everyone("port 1 went down on mlx5_0".into()))
        );
        // Another port of the device going down is not this rank's.
        assert_eq!(
            fault(&ev(abi::IBV_EVENT_PORT_ERR, None, Some(2)), "mlx5_0", 1),
            None
        );
        assert!(matches!(
            fault(&ev(abi::IBV_EVENT_DEVICE_FATAL, None, None), "mlx5_0", 1),
            Some(Fault::Everyone(r)) if r.contains("fatal device error")
        ));
        assert_eq!(
            fault(&ev(abi::IBV_EVENT_QP_FATAL, Some(77), None), "mlx5_0", 1),
            Some(Fault::QueuePair {
                qp_num: 77,
                reason: "its queue pair failed (a fatal queue pair error on mlx5_0)".into()
            })
        );
        // A port coming back up changes nothing.
        let up = ev(abi::IBV_EVENT_PORT_ACTIVE, None, Some(1));
        assert_eq!(fault(&up, "mlx5_0", 1), None);
        assert!(
            names_queue_pair(abi::IBV_EVENT_QP_ACCESS_ERR) && !names_port(abi::IBV_EVENT_QP_FATAL)
        );
    }
}
