//! The proxy: drains a command ring and posts each command on a transport, as the CPU path
//! posts its own writes (the same regions, offsets, immediates and flushes).

use std::time::Instant;

use super::command::{Command, CommandKind};
use super::ring::{CommandRing, STATUS_FAILED};
use crate::error::{Error, Result};
use crate::transport::{MemKey, Sge, Transport};

pub struct Proxy<'t> {
    t: &'t dyn Transport,
    world: usize,
    /// The send buffer the kernels pack into, registered with the transport.
    send: MemKey,
    send_len: usize,
    commands: Vec<Command>,
    posted: u64,
}

impl<'t> Proxy<'t> {
    pub fn new(t: &'t dyn Transport, world: usize, send: MemKey, send_len: usize) -> Self {
        Self {
            t,
            world,
            send,
            send_len,
            commands: Vec::new(),
            posted: 0,
        }
    }

    /// Writes posted so far.
    pub fn posted(&self) -> u64 {
        self.posted
    }

    /// Handles every command the ring holds now; returns how many. A command the proxy
    /// cannot carry out stops it: the ring's status tells the kernel, the error says why.
    pub fn drain(&mut self, ring: &CommandRing, deadline: Instant) -> Result<usize> {
        self.commands.clear();
        let mut cmds = std::mem::take(&mut self.commands);
        let outcome = ring.pop(&mut cmds).and_then(|n| {
            cmds.iter()
                .try_for_each(|c| self.handle(ring, c, deadline))
                .map(|()| n)
        });
        self.commands = cmds;
        if outcome.is_err() {
            ring.set_status(STATUS_FAILED);
        }
        outcome
    }

    fn handle(&mut self, ring: &CommandRing, c: &Command, deadline: Instant) -> Result<()> {
        let me = self.t.rank();
        match c.kind {
            CommandKind::Write => {
                let bad = |what: String| Error::Internal {
                    rank: me,
                    detail: format!("proxy command {}: {what}", c.seq),
                };
                let peer = c.peer as usize;
                if peer >= self.world || peer == me {
                    return Err(bad(format!("peer {peer} in a world of {}", self.world)));
                }
                let (offset, len) = (c.src_offset as usize, c.len as usize);
                if len == 0
                    || offset
                        .checked_add(len)
                        .is_none_or(|end| end > self.send_len)
                {
                    return Err(bad(format!(
                        "{len} bytes at {offset} of a {}-byte send buffer",
                        self.send_len
                    )));
                }
                // The transport checks the destination against the region plan itself.
                let src = Sge {
                    key: self.send,
                    offset,
                    len,
                };
                self.t
                    .write_with_imm(peer, c.region, c.dst_offset as usize, &[src], c.imm)?;
                self.posted += 1;
            }
            CommandKind::Flush => {
                self.t.flush(deadline)?;
                ring.acknowledge_flush(c.seq);
            }
        }
        Ok(())
    }
}
