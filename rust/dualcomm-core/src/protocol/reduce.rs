//! The arithmetic of combine: rows of bf16 or fp32 summed in fp32, in a fixed order.

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    Bf16,
    F32,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::Bf16 => 2,
            Dtype::F32 => 4,
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "bfloat16" => Ok(Dtype::Bf16),
            "float32" => Ok(Dtype::F32),
            other => Err(Error::invalid("dtype", "bfloat16 or float32", other)),
        }
    }
}

/// Runs `$body` compiled for AVX2 where the CPU has it (checked once, then cached by std),
/// else for the baseline target: a wheel built for any x86-64 still gets 256-bit loops.
/// Only the width changes, never the operations (no FMA, no reassociation), so both
/// versions give the same bits.
macro_rules! with_best_simd {
    ($body:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2")]
            unsafe fn wide(f: impl FnOnce()) {
                f()
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2 (checked just above).
                return unsafe { wide(|| $body($($arg),*)) };
            }
        }
        $body($($arg),*)
    }};
}

/// `acc[i] += row[i]` with `row` in `dtype`.
pub fn add_into(acc: &mut [f32], row: &[u8], dtype: Dtype) {
    with_best_simd!(add_into_body(acc, row, dtype))
}

/// `acc[i] = 0 + row[i]`: the first term of a sum, in one pass over `acc` where zeroing it
/// and adding would take two, with the same bits (adding to zero turns -0 into +0).
pub fn start_sum(acc: &mut [f32], row: &[u8], dtype: Dtype) {
    with_best_simd!(start_sum_body(acc, row, dtype))
}

#[inline(always)]
fn add_into_body(acc: &mut [f32], row: &[u8], dtype: Dtype) {
    accumulate::<false>(acc, row, dtype)
}

#[inline(always)]
fn start_sum_body(acc: &mut [f32], row: &[u8], dtype: Dtype) {
    accumulate::<true>(acc, row, dtype)
}

/// `acc[i] = (0 if FIRST else acc[i]) + row[i]`.
#[inline(always)]
fn accumulate<const FIRST: bool>(acc: &mut [f32], row: &[u8], dtype: Dtype) {
    let base = |a: f32| if FIRST { 0.0 } else { a };
    match dtype {
        Dtype::Bf16 => {
            // bf16 is the top half of an f32: widening is a shift (and vectorizes).
            for (a, b) in acc.iter_mut().zip(row.chunks_exact(2)) {
                *a = base(*a) + f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        Dtype::F32 => {
            for (a, b) in acc.iter_mut().zip(row.chunks_exact(4)) {
                *a = base(*a) + f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
    }
}

/// `acc[i] += w * row[i]` with `row` in `dtype` (one rounding per term: product, then sum).
pub fn add_scaled_into(acc: &mut [f32], row: &[u8], w: f32, dtype: Dtype) {
    with_best_simd!(add_scaled_into_body(acc, row, w, dtype))
}

#[inline(always)]
fn add_scaled_into_body(acc: &mut [f32], row: &[u8], w: f32, dtype: Dtype) {
    match dtype {
        Dtype::Bf16 => {
            for (a, b) in acc.iter_mut().zip(row.chunks_exact(2)) {
                *a += w * f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        Dtype::F32 => {
            for (a, b) in acc.iter_mut().zip(row.chunks_exact(4)) {
                *a += w * f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
    }
}

/// Copies little-endian f32s out of bytes that may sit at any alignment (ring records do).
pub fn read_f32s(dst: &mut [f32], src: &[u8]) {
    for (d, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

/// Writes `acc` as `dtype` (bf16 rounds to nearest even, as torch does).
pub fn store(acc: &[f32], out: &mut [u8], dtype: Dtype) {
    with_best_simd!(store_body(acc, out, dtype))
}

#[inline(always)]
fn store_body(acc: &[f32], out: &mut [u8], dtype: Dtype) {
    match dtype {
        Dtype::Bf16 => {
            for (a, o) in acc.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&f32_to_bf16_bits(*a).to_le_bytes());
            }
        }
        Dtype::F32 => {
            for (a, o) in acc.iter().zip(out.chunks_exact_mut(4)) {
                o.copy_from_slice(&a.to_le_bytes());
            }
        }
    }
}

/// Round to nearest even, NaN kept quiet: the same bits as `half` and torch, branch-light.
#[inline(always)]
fn f32_to_bf16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    if v.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let round = 0x7FFF + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_round_trip_and_sum() {
        let vals = [1.0f32, -2.5, 3.0e-3, 65280.0];
        let mut row = vec![0u8; 8];
        store(&vals, &mut row, Dtype::Bf16);
        let mut acc = vec![1.0f32; 4];
        add_into(&mut acc, &row, Dtype::Bf16);
        let expect: Vec<f32> = vals
            .iter()
            .map(|v| 1.0 + half::bf16::from_f32(*v).to_f32())
            .collect();
        assert_eq!(acc, expect);
        assert!(Dtype::parse("float16").is_err());
    }

    #[test]
    fn starting_a_sum_has_the_bits_of_adding_to_zero() {
        let vals = [-0.0f32, 0.0, -1.5, f32::NAN, f32::INFINITY, 1.0e-40];
        for dtype in [Dtype::Bf16, Dtype::F32] {
            let mut row = vec![0u8; vals.len() * dtype.size()];
            match dtype {
                Dtype::Bf16 => store(&vals, &mut row, dtype),
                Dtype::F32 => row.copy_from_slice(bytemuck::cast_slice(&vals)),
            }
            let mut zero_then_add = vec![0.0f32; vals.len()];
            add_into(&mut zero_then_add, &row, dtype);
            let mut started = vec![7.0f32; vals.len()];
            start_sum(&mut started, &row, dtype);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&started), bits(&zero_then_add), "{dtype:?}");
            // -0 really is turned into +0, so a plain copy would not do.
            assert_eq!(started[0].to_bits(), 0);
        }
    }

    #[test]
    fn rounding_matches_half_everywhere_that_matters() {
        let mut s = 1u64;
        for _ in 0..200_000 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let v = f32::from_bits((s >> 32) as u32);
            let want = half::bf16::from_f32(v).to_bits();
            let got = f32_to_bf16_bits(v);
            if v.is_nan() {
                assert!(half::bf16::from_bits(got).is_nan());
            } else {
                assert_eq!(got, want, "{v:e}");
            }
        }
    }
}
