//! The 32-bit immediate: `kind:3 | epoch:2 | value:27`. The epoch (operation number mod 4)
//! lets a rank tell a fast peer's next operation from the current one. Kinds 5 to 7 are
//! unused, room for more control messages.

use crate::transport::OpCount;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImmKind {
    /// `value` records were written to the ring.
    Data = 1,
    /// `value` records of ring space are free again.
    Credit = 2,
    /// The operation's metadata was written to the meta region.
    Meta = 3,
    /// Control: the sender leaves after completing `value` operations (mod 2^27). A
    /// transport without a goodbye of its own (verbs: an immediate with no bytes) consumes
    /// it and reports the departure; it never reaches the protocol.
    Goodbye = 4,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Imm(pub u32);

impl Imm {
    pub const VALUE_BITS: u32 = 27;
    pub const MAX_VALUE: u32 = (1 << Self::VALUE_BITS) - 1;

    pub fn new(kind: ImmKind, epoch: u32, value: u32) -> Self {
        debug_assert!(value <= Self::MAX_VALUE);
        Imm(((kind as u32) << 29) | ((epoch & 3) << Self::VALUE_BITS) | (value & Self::MAX_VALUE))
    }

    pub fn kind(self) -> Option<ImmKind> {
        match self.0 >> 29 {
            1 => Some(ImmKind::Data),
            2 => Some(ImmKind::Credit),
            3 => Some(ImmKind::Meta),
            4 => Some(ImmKind::Goodbye),
            _ => None,
        }
    }

    pub fn epoch(self) -> u32 {
        (self.0 >> Self::VALUE_BITS) & 3
    }

    pub fn value(self) -> u32 {
        self.0 & Self::MAX_VALUE
    }

    /// The goodbye of a rank that completed `completed_ops` operations.
    pub fn goodbye(completed_ops: u64) -> Self {
        Self::new(
            ImmKind::Goodbye,
            0,
            (completed_ops & Self::MAX_VALUE as u64) as u32,
        )
    }

    /// The operations a goodbye says its sender completed, read by a rank that has
    /// completed `mine`: linked ranks are never more than one operation apart, so the
    /// count is the one nearest `mine` with the goodbye's low bits.
    pub fn goodbye_ops(self, mine: u64) -> u64 {
        self.goodbye_count().near(mine)
    }

    /// What a goodbye says of its sender's count.
    pub fn goodbye_count(self) -> OpCount {
        OpCount::Modulo {
            low: self.value() as u64,
            bits: Self::VALUE_BITS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips(epoch in 0u32..4, value in 0u32..=Imm::MAX_VALUE, k in 0usize..4) {
            let kind = [ImmKind::Data, ImmKind::Credit, ImmKind::Meta, ImmKind::Goodbye][k];
            let imm = Imm::new(kind, epoch, value);
            prop_assert_eq!(imm.kind(), Some(kind));
            prop_assert_eq!(imm.epoch(), epoch);
            prop_assert_eq!(imm.value(), value);
        }
    }

    #[test]
    fn unused_kinds_are_invalid() {
        assert_eq!(Imm(5).kind(), None);
        for k in 5..8u32 {
            assert_eq!(Imm(k << 29).kind(), None);
        }
    }

    proptest! {
        #[test]
        fn goodbye_counts_survive_the_wrap(mine in 0u64..1 << 40, delta in -1i64..=1) {
            let theirs = mine.saturating_add_signed(delta);
            prop_assert_eq!(Imm::goodbye(theirs).goodbye_ops(mine), theirs);
        }
    }
}
