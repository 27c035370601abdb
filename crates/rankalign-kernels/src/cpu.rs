//! Helpers shared by the CPU kernels: reading a contiguous f32/f64 argument (as it is, or
//! widened to f64), building an output of the input's dtype, the float element types
//! the generic kernels run on and the dispatch on them (`float_dispatch!`), sums in
//! independent lanes (a fixed order), a row's softmax, branch-free f32 `exp`/`ln` that vectorise, outputs
//! written without a zero fill ([`written_vec`], [`map_blocks`] over parallel blocks, and
//! [`filled`] for blocks zeroed just before use), and [`vectorised`], which runs a block loop as AVX2 code when the CPU
//! has it.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result};
use rayon::prelude::*;

use std::mem::MaybeUninit;

/// The contiguous f32 or f64 data of a kernel argument, widened to f64; errors name the
/// op and the argument.
pub(crate) fn f64_data(
    storage: &CpuStorage,
    layout: &Layout,
    op: &str,
    what: &str,
) -> Result<Vec<f64>> {
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: {what} must be contiguous")))?;
    Ok(match storage {
        CpuStorage::F32(v) => v[a..b].iter().map(|&x| f64::from(x)).collect(),
        CpuStorage::F64(v) => v[a..b].to_vec(),
        _ => candle_core::bail!("{op}: {what} must be f32 or f64, got {:?}", storage.dtype()),
    })
}

/// f64 results as a storage of `dtype` (f32 narrows, anything else stays f64).
pub(crate) fn storage_of(values: Vec<f64>, dtype: DType) -> CpuStorage {
    match dtype {
        DType::F32 => CpuStorage::F32(values.into_iter().map(|v| v as f32).collect()),
        _ => CpuStorage::F64(values),
    }
}

/// The contiguous data of a kernel argument of element type `T`; errors name the op and
/// the argument.
pub(crate) fn slice<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
    what: &str,
) -> Result<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: {what} must be contiguous")))?;
    Ok(&s.as_slice::<T>()?[a..b])
}

/// `$body` with the type name `$T` standing for f32 or f64, as `$dtype` says; any other
/// dtype is an error naming `$op`: the element-type dispatch every CPU kernel makes.
macro_rules! float_dispatch {
    ($dtype:expr, $op:expr, |$T:ident| $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $T = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $T = f64;
                $body
            }
            dt => candle_core::bail!("{}: fused kernel runs on f32 or f64, got {dt:?}", $op),
        }
    };
}
pub(crate) use float_dispatch;

/// Float element types the generic CPU kernels run on; the arithmetic is done in the
/// element type itself (f32 for f32 input, as PyTorch does), which lets loops vectorise.
pub(crate) trait Float:
    candle_core::WithDType
    + num_traits::Float
    + std::ops::AddAssign
    + std::ops::MulAssign
    + std::iter::Sum
    + Send
    + Sync
{
    fn storage(v: Vec<Self>) -> CpuStorage;
    /// `eˣ` as a loop can vectorise it: [`exp_f32`] for f32, libm's for f64.
    fn exp_v(self) -> Self;
    fn of_usize(n: usize) -> Self {
        Self::from(n).expect("invariant: row widths fit any float")
    }
}

impl Float for f32 {
    fn storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(v)
    }
    #[inline(always)]
    fn exp_v(self) -> Self {
        exp_f32(self)
    }
}

impl Float for f64 {
    fn storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F64(v)
    }
    #[inline(always)]
    fn exp_v(self) -> Self {
        self.exp()
    }
}

/// Accumulators of [`sum_map`]: independent partial sums let the loop run in vector
/// registers (a single running float sum cannot be reordered, so it runs one add per
/// element at the add's latency).
pub(crate) const LANES: usize = 32;

/// `Σ f(a_i, b_i)` over two equally long slices with [`LANES`] partial sums combined in
/// a fixed tree: the same order, and so the same bits, on every call.
#[inline(always)]
pub(crate) fn sum_map<T: Float>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> T {
    let mut acc = [T::zero(); LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for k in 0..LANES {
            acc[k] += f(xa[k], xb[k]);
        }
    }
    for (k, (&x, &y)) in ra.iter().zip(rb).enumerate() {
        acc[k] += f(x, y);
    }
    lanes_total(acc)
}

/// The total of [`LANES`] partial sums (element `i` of a slice in lane `i % LANES`), in
/// [`sum_map`]'s fixed tree: a kernel that keeps its own lanes gets `sum_map`'s bits.
#[inline(always)]
pub(crate) fn lanes_total<T: Float>(mut acc: [T; LANES]) -> T {
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for k in 0..width {
            let upper = acc[k + width];
            acc[k] += upper;
        }
    }
    acc[0]
}

/// Softmax of one row in place, shifted by the row's maximum: `x ← eˣ⁻ᵐᵃˣ / Σ eˣ⁻ᵐᵃˣ`.
#[inline(always)]
pub(crate) fn softmax_in_place<T: Float>(row: &mut [T]) {
    let max = row
        .iter()
        .copied()
        .fold(T::neg_infinity(), num_traits::Float::max);
    for x in row.iter_mut() {
        *x = (*x - max).exp_v();
    }
    let inv = sum(row).recip();
    for x in row.iter_mut() {
        *x *= inv;
    }
}

/// `Σ a_i`, as [`sum_map`].
#[inline(always)]
pub(crate) fn sum<T: Float>(a: &[T]) -> T {
    sum_map(a, a, |x, _| x)
}

/// A vector of `len` values (room for `spare` more) that `fill` writes, without filling
/// it with zeros first: a kernel that writes its whole output would otherwise pay one
/// more pass over memory the size of that output.
///
/// # Safety
/// `fill` must write every element of the slice it is given before it returns.
#[allow(unsafe_code)]
pub(crate) unsafe fn written_vec<T, R>(
    len: usize,
    spare: usize,
    fill: impl FnOnce(&mut [MaybeUninit<T>]) -> R,
) -> (Vec<T>, R) {
    let mut v = Vec::with_capacity(len + spare);
    let r = fill(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: the first `len` elements are initialised (the caller's promise), and
    // `len` is within the capacity.
    unsafe { v.set_len(len) };
    (v, r)
}

/// An output as long as `inputs[0]`, made by `f(blocks of the inputs, output block)` over
/// parallel blocks of `block` elements, each run as [`vectorised`] code, and not
/// zero-filled first. An empty input is absent (its blocks are empty); the others must
/// be as long as the first.
///
/// # Safety
/// `f` must write every element of the output block it is given.
#[allow(unsafe_code)] // `written_vec`
pub(crate) unsafe fn map_blocks<T: Float, const N: usize>(
    inputs: [&[T]; N],
    block: usize,
    f: impl Fn([&[T]; N], &mut [MaybeUninit<T>]) + Sync,
) -> Vec<T> {
    let len = inputs.first().map_or(0, |x| x.len());
    // The whole output that `written_vec`'s promise rests on: a shorter input would
    // leave its blocks' outputs unwritten (the ops check shapes before they get here).
    assert!(
        inputs.iter().all(|x| x.is_empty() || x.len() == len),
        "map_blocks: inputs of different lengths"
    );
    let block = block.max(1);
    // SAFETY: the blocks tile the output and `f` writes each whole (the caller's promise).
    let (out, ()) = unsafe {
        written_vec(len, 0, |out| {
            out.par_chunks_mut(block).enumerate().for_each(|(k, o)| {
                let parts = inputs.map(|x| span(x, k * block, (k + 1) * block));
                vectorised(
                    #[inline(always)]
                    || f(parts, o),
                )
            })
        })
    };
    out
}

/// `x[from..to]` clipped to `x`; an empty `x` (an absent input) stays empty.
#[inline(always)]
pub(crate) fn span<T>(x: &[T], from: usize, to: usize) -> &[T] {
    if x.is_empty() {
        x
    } else {
        &x[from..to.min(x.len())]
    }
}

/// `block` filled with `value`, handed back initialised: a kernel whose output is built
/// from zeros can fill each block just before it writes it (in cache, on the block's
/// thread) instead of the whole output up front on the caller's.
#[allow(unsafe_code)]
pub(crate) fn filled<T: Copy>(block: &mut [MaybeUninit<T>], value: T) -> &mut [T] {
    block.fill(MaybeUninit::new(value));
    // SAFETY: every element was just written, and `MaybeUninit<T>` has `T`'s layout.
    unsafe { &mut *(block as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// Runs `f` as code compiled for AVX2 and FMA when this CPU has them (detected at run
/// time), else as compiled for the baseline, so the binary runs on any x86-64. The loops
/// inside `f` (and the `#[inline(always)]` helpers they call) then use 256-bit vectors.
/// The floating-point operations and their order are the same on both paths (Rust never
/// fuses a multiply and an add on its own), so the results are the same bits.
#[inline(always)]
#[allow(unsafe_code)] // the call into `with_avx2`, after the CPU check
pub(crate) fn vectorised<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA, the only features `with_avx2` enables.
        return unsafe { with_avx2(f) };
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(unsafe_code)] // enabling target features needs the CPU check in `vectorised`
unsafe fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `eˣ` in f32 without branches or calls, so that a loop of it vectorises: `2ᵏ·p(r)` with
/// `k = round(x·log₂e)`, `r = x − k·ln 2` (ln 2 split in two for exactness) and Cephes'
/// degree-6 minimax polynomial; within 2 ulp of the correctly rounded value. Below
/// −87.3 (and at −∞) it is 0, above 88.7 (and at +∞) it saturates to the largest power it
/// can build times p, NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LO: f32 = -87.336_55;
    const HI: f32 = 88.722_83;
    let xc = f32::clamp(x, LO, HI);
    let k = (xc * std::f32::consts::LOG2_E + 0.5).floor();
    let r = xc - k * 0.693_359_4 - k * -2.121_944_4e-4;
    let r2 = r * r;
    let p = (((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 0.166_666_65)
        * r
        + 0.5)
        * r2
        + r
        + 1.0;
    // k ∈ [−126, 128] as an integer, read from the low mantissa bits of k + 1.5·2²³
    // (exact there): `k as i32` saturates NaN and out-of-range values, and that check
    // does not vectorise (it went element by element through scalar registers).
    let k = (k + 12_582_912.0).to_bits() as i32 - 0x4B40_0000;
    // Split 2ᵏ in two factors so that both are normal floats.
    let half = k / 2;
    let pow = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    let y = p * pow(half) * pow(k - half);
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        y
    }
}

/// `ln x` in f32 without calls, so that a loop of it vectorises: `x = 2ᵉ·m` with
/// `m ∈ [√½, √2)`, Cephes' polynomial for `ln m`; within 2 ulp for positive x. `ln 0 = −∞`,
/// `ln x` of a negative x or NaN is NaN, `ln ∞ = ∞`.
#[inline(always)]
pub(crate) fn ln_f32(x: f32) -> f32 {
    // Subnormals are scaled into the normal range first.
    let sub = x < f32::MIN_POSITIVE;
    let xs = if sub { x * 8_388_608.0 } else { x };
    let bits = xs.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 126 - if sub { 23 } else { 0 };
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000); // [0.5, 1)
    if m < std::f32::consts::FRAC_1_SQRT_2 {
        e -= 1;
        m = m + m - 1.0;
    } else {
        m -= 1.0;
    }
    let z = m * m;
    let p = (((((((7.037_683_6e-2 * m - 0.115_146_1) * m + 0.116_769_98) * m - 0.124_201_41)
        * m
        + 0.142_493_23)
        * m
        - 0.166_680_57)
        * m
        + 0.200_007_15)
        * m
        - 0.249_999_94)
        * m
        + 0.333_333_3;
    let ef = e as f32;
    let y = m * z * p + ef * -2.121_944_4e-4 - 0.5 * z;
    let r = m + y + ef * 0.693_359_4;
    if x.is_nan() || x < 0.0 {
        f32::NAN
    } else if x == 0.0 {
        f32::NEG_INFINITY
    } else if x == f32::INFINITY {
        f32::INFINITY
    } else {
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_f32_is_within_two_ulp_of_libm() {
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let (got, want) = (exp_f32(x), (x as f64).exp() as f32);
            assert!(ulps(got, want) <= 2, "exp({x}) = {got}, want {want}");
        }
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-200.0), 0.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn ln_f32_is_within_two_ulp_of_libm() {
        let mut x = 1e-40f32;
        while x < 1e38 {
            let (got, want) = (ln_f32(x), (x as f64).ln() as f32);
            assert!(ulps(got, want) <= 2, "ln({x}) = {got}, want {want}");
            x *= 1.001_3;
        }
        assert_eq!(ln_f32(1.0), 0.0);
        assert_eq!(ln_f32(0.0), f32::NEG_INFINITY);
        assert_eq!(ln_f32(f32::INFINITY), f32::INFINITY);
        assert!(ln_f32(-1.0).is_nan() && ln_f32(f32::NAN).is_nan());
    }
}
