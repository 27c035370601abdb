//! The GPU engine: NCCL through cudarc's `Comm` (the `nccl` feature), one GPU a rank.
//!
//! The ranks first connect over TCP as for [`TcpCollective`]; rank 0 makes NCCL's
//! unique id and sends it to the others over that connection (so it works across nodes,
//! through `MASTER_ADDR:MASTER_PORT`, not through a shared file). Each rank then makes
//! its communicator on its GPU, on candle's stream, so that the collectives are ordered
//! with the step's kernels. Tensors on the CPU (the trainer's barrier and start check)
//! go over TCP; tensors on the GPU over NCCL. Gathers pad every rank's rows to the largest count (NCCL
//! gathers equal parts) and drop the padding after; row counts travel over TCP.
//!
//! NCCL sums in its own order (ring or tree), so unlike the TCP engine a sum over ranks
//! is not bit-identical to the same sum over micro-batches in one process; it agrees to
//! f32 rounding.
#![allow(unsafe_code)] // `Send` for the communicator handle; see `SendComm`.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::{Collective, TcpCollective, dist_error};
use crate::Result;

/// The communicator, sendable to the thread that trains. NCCL communicators may be used
/// from any thread but not from two at once; the mutex around it sees to that.
struct SendComm(Comm);

// SAFETY: `Comm` is a handle to NCCL state and an `Arc<CudaStream>`; it is `!Send` only
// because it holds a raw pointer. NCCL allows a communicator to be used from another
// thread, one call at a time, which `NcclCollective`'s mutex enforces.
unsafe impl Send for SendComm {}

pub struct NcclCollective {
    tcp: TcpCollective,
    comm: Arc<Mutex<SendComm>>,
}

impl NcclCollective {
    /// NCCL over the ranks that `tcp` connects, each on its own GPU `device`.
    pub fn new(tcp: TcpCollective, device: &Device) -> Result<Self> {
        let rank = tcp.rank();
        let fail =
            |what: &str, e: &dyn std::fmt::Debug| dist_error(rank, format!("NCCL {what}: {e:?}"));
        let cuda = device
            .as_cuda_device()
            .map_err(|_| dist_error(rank, format!("NCCL needs a CUDA device, got {device:?}")))?;
        // Rank 0's id, sent to the others as a sum to which they add zeros.
        let mine = if rank == 0 {
            let id = Id::new().map_err(|e| fail("unique id", &e))?;
            id.internal().iter().map(|&c| f32::from(c as u8)).collect()
        } else {
            vec![0f32; 128]
        };
        let summed = tcp.all_reduce_sum(&Tensor::from_vec(mine, 128, &Device::Cpu)?)?;
        let bytes = summed.to_vec1::<f32>()?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (c, b) in internal.iter_mut().zip(&bytes) {
            *c = *b as u8 as std::ffi::c_char;
        }
        let comm = Comm::from_rank(
            cuda.cuda_stream(),
            rank,
            tcp.world_size(),
            Id::uninit(internal),
        )
        .map_err(|e| fail("communicator", &e))?;
        Ok(Self {
            tcp,
            comm: Arc::new(Mutex::new(SendComm(comm))),
        })
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.tcp.rank()
    }

    fn world_size(&self) -> usize {
        self.tcp.world_size()
    }

    fn all_gather_rows(&self, t: &Tensor) -> Result<(Tensor, Vec<usize>)> {
        if t.device().is_cpu() {
            return self.tcp.all_gather_rows(t);
        }
        let rank = self.rank();
        let Some((&rows, _)) = t.dims().split_first() else {
            return Err(dist_error(rank, "a gather needs a tensor with rows"));
        };
        // Row counts over TCP: a rank-indexed vector that every rank fills in its slot.
        let mut slots = vec![0f32; self.world_size()];
        slots[rank] = rows as f32;
        let counts: Vec<usize> = self
            .tcp
            .all_reduce_sum(&Tensor::from_vec(slots, self.world_size(), &Device::Cpu)?)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|c| c as usize)
            .collect();
        let most = counts.iter().copied().max().unwrap_or(0);
        let padded = if rows < most {
            let mut dims = t.dims().to_vec();
            dims[0] = most - rows;
            Tensor::cat(&[t, &Tensor::zeros(dims, t.dtype(), t.device())?], 0)?
        } else {
            t.clone()
        };
        let wide = matches!(t.dtype(), DType::F32 | DType::F64);
        let padded = if wide {
            padded
        } else {
            padded.to_dtype(DType::F32)?
        };
        let gathered = padded.contiguous()?.apply_op1_no_bwd(&AllGather {
            comm: self.comm.clone(),
            world: self.world_size(),
        })?;
        let gathered = if wide {
            gathered
        } else {
            gathered.to_dtype(t.dtype())?
        };
        let parts = counts
            .iter()
            .enumerate()
            .map(|(r, &n)| gathered.narrow(0, r * most, n))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((Tensor::cat(&parts, 0)?, counts))
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        if t.device().is_cpu() {
            return self.tcp.all_reduce_sum(t);
        }
        // bf16 and f16 are summed in f32 (NCCL here runs on f32 and f64).
        let wide = matches!(t.dtype(), DType::F32 | DType::F64);
        let x = if wide {
            t.clone()
        } else {
            t.to_dtype(DType::F32)?
        };
        let sum = x.contiguous()?.apply_op1_no_bwd(&AllReduce {
            comm: self.comm.clone(),
        })?;
        Ok(if wide { sum } else { sum.to_dtype(t.dtype())? })
    }
}

/// The contiguous device buffer of a CUDA tensor, as a typed view.
fn view<'a, T: candle_core::cuda_backend::CudaDType + DeviceRepr>(
    s: &'a CudaStorage,
    l: &Layout,
) -> candle_core::Result<CudaView<'a, T>> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("NCCL collectives take contiguous tensors".into())
    })?;
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

fn nccl_error(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("NCCL {what}: {e:?}"))
}

fn locked(comm: &Mutex<SendComm>) -> std::sync::MutexGuard<'_, SendComm> {
    comm.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Calls `$f::<f32>` or `$f::<f64>` by dtype; NCCL runs on f32 and f64 here.
macro_rules! by_dtype {
    ($s:expr, $what:literal, $f:ident ( $($arg:expr),* )) => {
        match $s.dtype() {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            dt => candle_core::bail!(concat!("NCCL ", $what, " runs on f32 or f64, got {:?}"), dt),
        }
    };
}

struct AllReduce {
    comm: Arc<Mutex<SendComm>>,
}

fn all_reduce<T: candle_core::cuda_backend::CudaDType + DeviceRepr + ValidAsZeroBits + NcclType>(
    comm: &Mutex<SendComm>,
    s: &CudaStorage,
    l: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = s.device().clone();
    let src = view::<T>(s, l)?;
    let mut dst: CudaSlice<T> = dev.alloc_zeros::<T>(l.shape().elem_count())?;
    locked(comm)
        .0
        .all_reduce(&src, &mut dst, &ReduceOp::Sum)
        .map_err(|e| nccl_error("all-reduce", e))?;
    Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
}

impl CustomOp1 for AllReduce {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL collectives run on CUDA tensors; use the TCP engine on the CPU")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        by_dtype!(s, "all-reduce", all_reduce(&self.comm, s, l))
    }
}

struct AllGather {
    comm: Arc<Mutex<SendComm>>,
    world: usize,
}

fn all_gather<T: candle_core::cuda_backend::CudaDType + DeviceRepr + ValidAsZeroBits + NcclType>(
    comm: &Mutex<SendComm>,
    world: usize,
    s: &CudaStorage,
    l: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = s.device().clone();
    let src = view::<T>(s, l)?;
    let mut dst: CudaSlice<T> = dev.alloc_zeros::<T>(world * l.shape().elem_count())?;
    locked(comm)
        .0
        .all_gather(&src, &mut dst)
        .map_err(|e| nccl_error("all-gather", e))?;
    let mut dims = l.dims().to_vec();
    dims[0] *= world;
    Ok((CudaStorage::wrap_cuda_slice(dst, dev), Shape::from(dims)))
}

impl CustomOp1 for AllGather {
    fn name(&self) -> &'static str {
        "nccl-all-gather"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL collectives run on CUDA tensors; use the TCP engine on the CPU")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        by_dtype!(s, "all-gather", all_gather(&self.comm, self.world, s, l))
    }
}
