//! Launchers for the CUDA kernels of `src/cuda/*.cu` (compiled to PTX by `build.rs`):
//! the `cuda_fwd` of every fused op. Inputs must be contiguous; f32 and f64 run, other
//! dtypes are refused with the op's name.
#![allow(unsafe_code)] // kernel launches; each has a SAFETY comment.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result, Shape};

use crate::pairwise::PairwiseForm;
use crate::plackett_luce::PlMode;

mod ptx {
    pub const PLACKETT_LUCE: &str = include_str!(concat!(env!("OUT_DIR"), "/plackett_luce.ptx"));
    pub const LAYER_NORM: &str = include_str!(concat!(env!("OUT_DIR"), "/layer_norm.ptx"));
    pub const PAIRWISE: &str = include_str!(concat!(env!("OUT_DIR"), "/pairwise.ptx"));
}

fn view<'a, T: CudaDType + DeviceRepr>(
    s: &'a CudaStorage,
    l: &Layout,
    op: &str,
) -> Result<CudaView<'a, T>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input must be contiguous")))?;
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

fn suffix(dtype: DType, op: &str) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::F64 => Ok("f64"),
        dt => candle_core::bail!("{op}: CUDA kernels run on f32 or f64, got {dt:?}"),
    }
}

/// Calls `$f::<f32>` or `$f::<f64>` by the dtype of `$s`, refusing other dtypes with `$op`.
macro_rules! by_dtype {
    ($s:expr, $op:literal, $f:ident ( $($arg:expr),* )) => {
        match $s.dtype() {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            dt => candle_core::bail!(concat!($op, ": CUDA kernels run on f32 or f64, got {:?}"), dt),
        }
    };
}

fn blocks(n: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(threads).max(1), 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn weights(dev: &CudaDevice, weights: Option<&[f64]>, m: usize) -> Result<CudaSlice<f64>> {
    let host: Vec<f64> = weights.map_or_else(|| vec![1.0; m.max(1)], <[f64]>::to_vec);
    dev.clone_htod(&host)
}

fn pl_fwd_typed<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
    mode: PlMode,
    mu: Option<&[f64]>,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (n, m) = l1.shape().dims2()?;
    let scores = view::<T>(s1, l1, "pl_nll")?;
    let order = view::<u32>(s2, l2, "pl_nll")?;
    let mu = weights(&dev, mu, m)?;
    let out = dev.alloc_zeros::<T>(n)?;
    let name = format!("pl_nll_fwd_{}", suffix(s1.dtype(), "pl_nll")?);
    let func = dev.get_or_load_custom_func(&name, "rankalign_plackett_luce", ptx::PLACKETT_LUCE)?;
    let mut b = func.builder();
    b.arg(&scores);
    b.arg(&order);
    b.arg(&mu);
    b.arg(&out);
    candle_core::builder_arg!(b, n as i32, m as i32, i32::from(mode == PlMode::Exact));
    // SAFETY: the arguments match `pl_nll_fwd_*(const T*, const uint32_t*, const double*,
    // T*, int, int, int)`; every buffer holds n·m (or n, or m) elements.
    unsafe { b.launch(blocks(n, 128)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(n)))
}

pub fn pl_nll_fwd(
    mode: PlMode,
    mu: Option<&[f64]>,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    by_dtype!(s1, "pl_nll", pl_fwd_typed(mode, mu, s1, l1, s2, l2))
}

#[allow(clippy::too_many_arguments)]
fn pl_bwd_typed<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
    mode: PlMode,
    mu: Option<&[f64]>,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (n, m) = l1.shape().dims2()?;
    let scores = view::<T>(s1, l1, "pl_nll")?;
    let order = view::<u32>(s2, l2, "pl_nll")?;
    let upstream = view::<T>(s3, l3, "pl_nll")?;
    let mu = weights(&dev, mu, m)?;
    let scratch = dev.alloc_zeros::<f64>(n * m)?;
    let grad = dev.alloc_zeros::<T>(n * m)?;
    let name = format!("pl_nll_bwd_{}", suffix(s1.dtype(), "pl_nll")?);
    let func = dev.get_or_load_custom_func(&name, "rankalign_plackett_luce", ptx::PLACKETT_LUCE)?;
    let mut b = func.builder();
    b.arg(&scores);
    b.arg(&order);
    b.arg(&upstream);
    b.arg(&mu);
    b.arg(&scratch);
    b.arg(&grad);
    candle_core::builder_arg!(b, n as i32, m as i32, i32::from(mode == PlMode::Exact));
    // SAFETY: the arguments match `pl_nll_bwd_*(const T*, const uint32_t*, const T*,
    // const double*, double*, T*, int, int, int)`; scratch and grad hold n·m elements.
    unsafe { b.launch(blocks(n, 128)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(grad, dev), Shape::from((n, m))))
}

#[allow(clippy::too_many_arguments)]
pub fn pl_nll_bwd(
    mode: PlMode,
    mu: Option<&[f64]>,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    by_dtype!(s1, "pl_nll", pl_bwd_typed(mode, mu, s1, l1, s2, l2, s3, l3))
}

const LN_THREADS: u32 = 256;

fn ln_fwd_typed<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
    eps: f64,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let d = l2.shape().elem_count();
    let rows = l1.shape().elem_count() / d.max(1);
    let (x, w, bias) = (
        view::<T>(s1, l1, "layer_norm")?,
        view::<T>(s2, l2, "layer_norm")?,
        view::<T>(s3, l3, "layer_norm")?,
    );
    let y = dev.alloc_zeros::<T>(rows * d)?;
    let name = format!("layer_norm_fwd_{}", suffix(s1.dtype(), "layer_norm")?);
    let func = dev.get_or_load_custom_func(&name, "rankalign_layer_norm", ptx::LAYER_NORM)?;
    let mut b = func.builder();
    b.arg(&x);
    b.arg(&w);
    b.arg(&bias);
    b.arg(&y);
    candle_core::builder_arg!(b, rows as i32, d as i32, eps);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (LN_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches `layer_norm_fwd_*(const T*, const T*, const T*, T*, int, int,
    // double)`; one block of LN_THREADS (the kernel's shared array size) per row.
    unsafe { b.launch(cfg) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(y, dev), l1.shape().clone()))
}

pub fn layer_norm_fwd(
    eps: f64,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    by_dtype!(s1, "layer_norm", ln_fwd_typed(eps, s1, l1, s2, l2, s3, l3))
}

fn ln_bwd_typed<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
    eps: f64,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let d = l2.shape().elem_count();
    let rows = l1.shape().elem_count() / d.max(1);
    let sfx = suffix(s1.dtype(), "layer_norm")?;
    let (x, w, dy) = (
        view::<T>(s1, l1, "layer_norm")?,
        view::<T>(s2, l2, "layer_norm")?,
        view::<T>(s3, l3, "layer_norm")?,
    );
    let out = dev.alloc_zeros::<T>(rows * d + 2 * d)?;
    let stats = dev.alloc_zeros::<f64>(2 * rows.max(1))?;
    let per_row = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (LN_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };

    let func = dev.get_or_load_custom_func(
        &format!("layer_norm_bwd_dx_{sfx}"),
        "rankalign_layer_norm",
        ptx::LAYER_NORM,
    )?;
    let mut b = func.builder();
    b.arg(&x);
    b.arg(&w);
    b.arg(&dy);
    b.arg(&out);
    candle_core::builder_arg!(b, rows as i32, d as i32, eps);
    // SAFETY: matches `layer_norm_bwd_dx_*(const T*, const T*, const T*, T*, int, int,
    // double)`; `out` holds rows·d + 2d elements.
    unsafe { b.launch(per_row) }.w()?;

    let func = dev.get_or_load_custom_func(
        &format!("layer_norm_stats_{sfx}"),
        "rankalign_layer_norm",
        ptx::LAYER_NORM,
    )?;
    let mut b = func.builder();
    b.arg(&x);
    b.arg(&stats);
    candle_core::builder_arg!(b, rows as i32, d as i32, eps);
    // SAFETY: matches `layer_norm_stats_*(const T*, double*, int, int, double)`; `stats`
    // holds 2·rows doubles.
    unsafe { b.launch(per_row) }.w()?;

    let func = dev.get_or_load_custom_func(
        &format!("layer_norm_bwd_wb_{sfx}"),
        "rankalign_layer_norm",
        ptx::LAYER_NORM,
    )?;
    let mut b = func.builder();
    b.arg(&x);
    b.arg(&dy);
    b.arg(&stats);
    b.arg(&out);
    candle_core::builder_arg!(b, rows as i32, d as i32);
    // SAFETY: matches `layer_norm_bwd_wb_*(const T*, const T*, const double*, T*, int,
    // int)`; one thread per column.
    unsafe { b.launch(blocks(d, 128)) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev),
        Shape::from(rows * d + 2 * d),
    ))
}

pub fn layer_norm_bwd(
    eps: f64,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    by_dtype!(s1, "layer_norm", ln_bwd_typed(eps, s1, l1, s2, l2, s3, l3))
}

fn form_code(form: PairwiseForm) -> i32 {
    match form {
        PairwiseForm::Euclidean => 0,
        PairwiseForm::LogSquared => 1,
    }
}

fn pw_fwd_typed<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
    form: PairwiseForm,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (n, m) = l1.shape().dims2()?;
    let (s, w) = (
        view::<T>(s1, l1, "weighted_pairwise")?,
        view::<T>(s2, l2, "weighted_pairwise")?,
    );
    let out = dev.alloc_zeros::<T>(n)?;
    let name = format!("pairwise_fwd_{}", suffix(s1.dtype(), "weighted_pairwise")?);
    let func = dev.get_or_load_custom_func(&name, "rankalign_pairwise", ptx::PAIRWISE)?;
    let mut b = func.builder();
    b.arg(&s);
    b.arg(&w);
    b.arg(&out);
    candle_core::builder_arg!(b, n as i32, m as i32, form_code(form));
    // SAFETY: matches `pairwise_fwd_*(const T*, const T*, T*, int, int, int)`.
    unsafe { b.launch(blocks(n, 128)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(n)))
}

pub fn pairwise_fwd(
    form: PairwiseForm,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    by_dtype!(s1, "weighted_pairwise", pw_fwd_typed(form, s1, l1, s2, l2))
}

fn pw_bwd_typed<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
    form: PairwiseForm,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let len = l1.shape().elem_count();
    let (s, c) = (
        view::<T>(s1, l1, "weighted_pairwise")?,
        view::<T>(s2, l2, "weighted_pairwise")?,
    );
    let out = dev.alloc_zeros::<T>(len)?;
    let name = format!("pairwise_bwd_{}", suffix(s1.dtype(), "weighted_pairwise")?);
    let func = dev.get_or_load_custom_func(&name, "rankalign_pairwise", ptx::PAIRWISE)?;
    let mut b = func.builder();
    b.arg(&s);
    b.arg(&c);
    b.arg(&out);
    candle_core::builder_arg!(b, len, form_code(form));
    // SAFETY: matches `pairwise_bwd_*(const T*, const T*, T*, size_t, int)`.
    unsafe { b.launch(blocks(len, 256)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), l1.shape().clone()))
}

pub fn pairwise_bwd(
    form: PairwiseForm,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    by_dtype!(s1, "weighted_pairwise", pw_bwd_typed(form, s1, l1, s2, l2))
}
