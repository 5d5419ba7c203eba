//! The 32-bit immediate: `kind:2 | epoch:2 | value:28`. The epoch (operation number mod 4)
//! lets a rank tell a fast peer's next operation from the current one.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImmKind {
    /// `value` records were written to the ring.
    Data = 1,
    /// `value` records of ring space are free again.
    Credit = 2,
    /// The operation's metadata was written to the meta region.
    Meta = 3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Imm(pub u32);

impl Imm {
    pub const MAX_VALUE: u32 = (1 << 28) - 1;

    pub fn new(kind: ImmKind, epoch: u32, value: u32) -> Self {
        debug_assert!(value <= Self::MAX_VALUE);
        Imm(((kind as u32) << 30) | ((epoch & 3) << 28) | (value & Self::MAX_VALUE))
    }

    pub fn kind(self) -> Option<ImmKind> {
        match self.0 >> 30 {
            1 => Some(ImmKind::Data),
            2 => Some(ImmKind::Credit),
            3 => Some(ImmKind::Meta),
            _ => None,
        }
    }

    pub fn epoch(self) -> u32 {
        (self.0 >> 28) & 3
    }

    pub fn value(self) -> u32 {
        self.0 & Self::MAX_VALUE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips(epoch in 0u32..4, value in 0u32..=Imm::MAX_VALUE, k in 0usize..3) {
            let kind = [ImmKind::Data, ImmKind::Credit, ImmKind::Meta][k];
            let imm = Imm::new(kind, epoch, value);
            prop_assert_eq!(imm.kind(), Some(kind));
            prop_assert_eq!(imm.epoch(), epoch);
            prop_assert_eq!(imm.value(), value);
        }
    }

    #[test]
    fn kind_zero_is_invalid() {
        assert_eq!(Imm(5).kind(), None);
    }
}
