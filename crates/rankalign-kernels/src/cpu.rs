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
