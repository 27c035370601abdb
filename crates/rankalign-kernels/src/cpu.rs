//! Helpers shared by the CPU kernels: reading a contiguous f32/f64 argument (as it is, or
//! widened to f64), building an output of the input's dtype, and the float element types
//! the generic kernels run on.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result};

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
    fn of_usize(n: usize) -> Self {
        Self::from(n).expect("invariant: row widths fit any float")
    }
}

impl Float for f32 {
    fn storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(v)
    }
}

impl Float for f64 {
    fn storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F64(v)
    }
}

/// Accumulators of [`sum_map`]: independent partial sums let the loop run in vector
/// registers (a single running float sum cannot be reordered, so it runs one add per
/// element at the add's latency).
const LANES: usize = 32;

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

/// `Σ a_i`, as [`sum_map`].
#[inline(always)]
pub(crate) fn sum<T: Float>(a: &[T]) -> T {
    sum_map(a, a, |x, _| x)
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
