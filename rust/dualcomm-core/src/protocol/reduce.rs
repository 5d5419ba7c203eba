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

#[inline(always)]
fn add_into_body(acc: &mut [f32], row: &[u8], dtype: Dtype) {
    accumulate::<false>(acc, row, dtype)
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

/// One term of a fixed-order sum: a row in the sum's dtype, or the fp32 sum (from zero, in
/// order) of several rows (the partial of this rank's own node, which is never rounded).
#[derive(Clone, Copy)]
pub enum Term<'a> {
    Row(&'a [u8]),
    Sum(&'a [&'a [u8]]),
}

/// What `sum_terms` sums: its terms, or plain rows (each a term of its own), so that a
/// caller with rows need not build terms of them on every call.
pub trait AsTerm {
    fn as_term(&self) -> Term<'_>;
}

impl AsTerm for Term<'_> {
    fn as_term(&self) -> Term<'_> {
        *self
    }
}

impl AsTerm for &[u8] {
    fn as_term(&self) -> Term<'_> {
        Term::Row(self)
    }
}

/// Elements summed per block of [`sum_terms`]: its accumulators stay in L1.
const BLOCK: usize = 1024;

/// `out = (((0 + t0) + t1) + ...)` element by element, stored as `out_dtype`, every term in
/// `dtype`; a `Term::Sum` is `((0 + r0) + r1) + ...` in fp32 first. The same bits as
/// summing whole rows term by term into an fp32 row, but taken in blocks, so each byte of
/// the terms and of `out` passes through memory once. No terms: zeros.
pub fn sum_terms<T: AsTerm>(out: &mut [u8], out_dtype: Dtype, terms: &[T], dtype: Dtype) {
    with_best_simd!(sum_terms_body(out, out_dtype, terms, dtype))
}

#[inline(always)]
fn sum_terms_body<T: AsTerm>(out: &mut [u8], out_dtype: Dtype, terms: &[T], dtype: Dtype) {
    let (es, os) = (dtype.size(), out_dtype.size());
    let n = out.len() / os;
    let mut acc = [0f32; BLOCK];
    let mut inner = [0f32; BLOCK];
    for start in (0..n).step_by(BLOCK) {
        let len = BLOCK.min(n - start);
        let at = start * es..(start + len) * es;
        let acc = &mut acc[..len];
        if terms.is_empty() {
            acc.fill(0.0);
        }
        for (i, term) in terms.iter().enumerate() {
            match term.as_term() {
                Term::Row(r) if i == 0 => accumulate::<true>(acc, &r[at.clone()], dtype),
                Term::Row(r) => accumulate::<false>(acc, &r[at.clone()], dtype),
                Term::Sum(rows) => {
                    let inner = &mut inner[..len];
                    if rows.is_empty() {
                        inner.fill(0.0);
                    }
                    for (j, &r) in rows.iter().enumerate() {
                        match j {
                            0 => accumulate::<true>(inner, &r[at.clone()], dtype),
                            _ => accumulate::<false>(inner, &r[at.clone()], dtype),
                        }
                    }
                    let inner: &[u8] = bytemuck::cast_slice(inner);
                    match i {
                        0 => accumulate::<true>(acc, inner, Dtype::F32),
                        _ => accumulate::<false>(acc, inner, Dtype::F32),
                    }
                }
            }
        }
        store_body(acc, &mut out[start * os..(start + len) * os], out_dtype);
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

    /// Rows of `n` values in `dtype` from a seed, with -0, NaN and infinities among them.
    fn rows(n: usize, count: usize, dtype: Dtype, seed: u64) -> Vec<Vec<u8>> {
        let mut s = seed;
        (0..count)
            .map(|_| {
                let vals: Vec<f32> = (0..n)
                    .map(|i| {
                        s = s
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        match (s >> 60, i % 97) {
                            (_, 5) => -0.0,
                            (_, 17) => f32::NAN,
                            (_, 41) => f32::NEG_INFINITY,
                            (k, _) => ((s >> 33) as i32 as f32) * 1.0e-9 * (1 << k) as f32,
                        }
                    })
                    .collect();
                let mut row = vec![0u8; n * dtype.size()];
                store(&vals, &mut row, dtype);
                row
            })
            .collect()
    }

    #[test]
    fn sum_terms_has_the_bits_of_summing_row_by_row() {
        // Past one block, and not a multiple of it.
        let n = 2 * BLOCK + 333;
        for (dtype, out_dtype) in [
            (Dtype::Bf16, Dtype::Bf16),
            (Dtype::Bf16, Dtype::F32),
            (Dtype::F32, Dtype::F32),
            (Dtype::F32, Dtype::Bf16),
        ] {
            let r = rows(n, 5, dtype, 7);
            // Row, nested sum of three rows, row: the shape of a token's final sum.
            let own: Vec<&[u8]> = vec![&r[1], &r[2], &r[3]];
            let terms = [Term::Row(&r[0]), Term::Sum(&own), Term::Row(&r[4])];
            let mut own_sum = vec![0.0f32; n];
            for row in &own {
                add_into(&mut own_sum, row, dtype);
            }
            let mut want = vec![0.0f32; n];
            add_into(&mut want, &r[0], dtype);
            add_into(&mut want, bytemuck::cast_slice(&own_sum), Dtype::F32);
            add_into(&mut want, &r[4], dtype);
            let mut want_bytes = vec![0u8; n * out_dtype.size()];
            store(&want, &mut want_bytes, out_dtype);
            let mut got = vec![0xAAu8; n * out_dtype.size()];
            sum_terms(&mut got, out_dtype, &terms, dtype);
            assert_eq!(got, want_bytes, "{dtype:?} -> {out_dtype:?}");
            // The nested sum first, then rows; and no terms at all.
            let terms = [Term::Sum(&own), Term::Row(&r[0])];
            let mut want = own_sum.iter().map(|v| 0.0 + v).collect::<Vec<_>>();
            add_into(&mut want, &r[0], dtype);
            store(&want, &mut want_bytes, out_dtype);
            sum_terms(&mut got, out_dtype, &terms, dtype);
            assert_eq!(got, want_bytes, "{dtype:?} -> {out_dtype:?}, sum first");
            sum_terms::<Term<'_>>(&mut got, out_dtype, &[], dtype);
            assert!(got.iter().all(|&b| b == 0));
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
