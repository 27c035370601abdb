//! Benchmarks of the fused kernels against their composed-candle references: forward +
//! backward time (median of several runs after warm-up) and peak resident memory.
//!
//! Peak memory is exact: a counting global allocator tracks live heap bytes, and the
//! peak growth over the live bytes before the run is reported.
//!
//! Prints one JSON object per line. `cargo xtask bench` runs this next to the PyTorch
//! script `benches/torch_reference.py` with the same thread count and writes the table.
//! Usage: `bench [--quick] [--only OP] [--fused-only]` (`--only` runs one op's rows,
//! `--fused-only` skips the composed references: both for profiling).

#![allow(unsafe_code)] // the counting allocator below

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use candle_core::{Device, Result, Tensor, Var};
use rankalign_kernels::{
    PairwiseForm, PlMode, layer_norm, layer_norm_reference, linear, linear_reference, pl_nll,
    pl_nll_reference, pl_order, weighted_pairwise, weighted_pairwise_reference,
};

/// The system allocator, counting live bytes and their high-water mark.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call forwards to `System` with the same layout; the counters are only
// bookkeeping and never affect the pointers returned.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged to the system allocator.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Median seconds and peak extra memory of `f` after `warmup` runs.
fn measure(mut f: impl FnMut() -> Result<()>, warmup: usize, runs: usize) -> Result<(f64, u64)> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(runs);
    let mut peak = 0;
    for _ in 0..runs {
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
        peak = peak.max(PEAK.load(Ordering::Relaxed).saturating_sub(base) as u64);
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], peak))
}

fn emit(op: &str, size: &str, imp: &str, secs: f64, peak: u64) {
    #[allow(clippy::print_stdout)]
    {
        println!(
            r#"{{"op":"{op}","size":"{size}","impl":"{imp}","ms":{:.4},"peak_mb":{:.2}}}"#,
            secs * 1e3,
            peak as f64 / 1048576.0
        );
    }
}

fn random(shape: (usize, usize), seed: u64) -> Result<Tensor> {
    // A cheap deterministic generator: sin of a scaled index.
    let n = shape.0 * shape.1;
    let v: Vec<f32> = (0..n)
        .map(|i| ((i as f64 * 12.9898 + seed as f64 * 78.233).sin() * 43758.5453).fract() as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

fn permutations(n: usize, m: usize) -> Result<Tensor> {
    let mut v = Vec::with_capacity(n * m);
    for i in 0..n {
        let stride = (2 * i + 1) % m.max(1);
        let stride = if stride == 0 { 1 } else { stride };
        // A bijection of 0..m when gcd(stride, m) = 1; otherwise fall back to identity.
        let coprime = (2..=m).all(|d| !(m.is_multiple_of(d) && stride.is_multiple_of(d)));
        v.extend((0..m).map(|k| {
            if coprime {
                ((k * stride + i) % m) as u32
            } else {
                k as u32
            }
        }));
    }
    Tensor::from_vec(v, (n, m), &Device::Cpu)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1).cloned());
    let fused_only = args.iter().any(|a| a == "--fused-only");
    let impls: &[(&str, bool)] = if fused_only {
        &[("fused", true)]
    } else {
        &[("fused", true), ("candle", false)]
    };
    let wanted = |op: &str| only.as_deref().is_none_or(|o| o == op);
    let (warmup, runs) = if quick { (1, 3) } else { (3, 15) };
    let sizes: &[usize] = if quick {
        &[128, 512]
    } else {
        &[128, 512, 1024, 2048]
    };
    for &b in sizes {
        // Scores and reference scores like scaled similarities; the sort by the reference
        // (with a tie-breaking column permutation) is part of every measured run, as
        // PyTorch's shuffle + sort is part of its.
        let scores = Var::from_tensor(&(random((b, b), 1)? * 14.0)?)?;
        let reference = random((b, b), 9)?;
        let perm: Vec<u32> = permutations(1, b)?.flatten_all()?.to_vec1::<u32>()?;
        let size = format!("{b}x{b}");
        for &(imp, fused) in impls.iter().filter(|_| wanted("pl_nll")) {
            let (t, p) = measure(
                || {
                    let order = pl_order(&reference, &perm)?;
                    let rows = if fused {
                        pl_nll(&scores, &order, PlMode::Parity, None)?
                    } else {
                        pl_nll_reference(&scores, &order, PlMode::Parity, None)?
                    };
                    rows.sum_all()?.backward()?;
                    Ok(())
                },
                warmup,
                runs,
            )?;
            emit("pl_nll", &size, imp, t, p);
        }
        let a = Var::from_tensor(&random((b, 512), 2)?)?;
        let c = Var::from_tensor(&random((b, 512), 3)?)?;
        let w = random((b, b), 4)?.abs()?;
        for &(imp, fused) in impls.iter().filter(|_| wanted("pairwise_dist")) {
            let (t, p) = measure(
                || {
                    let l = if fused {
                        weighted_pairwise(&a, &c, &w, PairwiseForm::Euclidean)?
                    } else {
                        weighted_pairwise_reference(&a, &c, &w, PairwiseForm::Euclidean)?
                    };
                    l.backward()?;
                    Ok(())
                },
                warmup,
                runs,
            )?;
            emit("pairwise_dist", &format!("{b}x{b}x512"), imp, t, p);
        }
    }
    let ln_shapes: &[(usize, usize)] = if quick {
        &[(2048, 512)]
    } else {
        &[(2048, 512), (8192, 512), (16384, 512), (4096, 768)]
    };
    for &(rows, d) in ln_shapes {
        let x = Var::from_tensor(&random((rows, d), 5)?)?;
        let w = Var::from_tensor(&(random((1, d), 6)?.squeeze(0)? + 1.0)?)?;
        let bias = Var::from_tensor(&random((1, d), 7)?.squeeze(0)?)?;
        for &(imp, fused) in impls.iter().filter(|_| wanted("layer_norm")) {
            let (t, p) = measure(
                || {
                    let y = if fused {
                        layer_norm(&x, &w, &bias, 1e-5)?
                    } else {
                        layer_norm_reference(&x, &w, &bias, 1e-5)?
                    };
                    // Upstream gradient of ones, as PyTorch's `y.backward(ones_like(y))`.
                    y.backward()?;
                    Ok(())
                },
                warmup,
                runs,
            )?;
            emit("layer_norm", &format!("{rows}x{d}"), imp, t, p);
        }
    }
    // The matmul floor: `x Wᵀ` forward at ViT-B/16 shapes (rows = tokens), the product
    // every tower's time is bounded by.
    let mm_shapes: &[(usize, usize, usize)] = if quick {
        &[(197, 768, 2304)]
    } else {
        &[(197, 768, 2304), (1576, 768, 3072), (3152, 3072, 768)]
    };
    for &(rows, k, n) in mm_shapes {
        let x = random((rows, k), 8)?;
        let w = random((n, k), 9)?;
        for &(imp, fused) in impls.iter().filter(|_| wanted("matmul")) {
            let (t, p) = measure(
                || {
                    let _y = if fused {
                        linear(&x, &w, None)?
                    } else {
                        linear_reference(&x, &w, None)?
                    };
                    Ok(())
                },
                warmup,
                runs,
            )?;
            emit("matmul", &format!("{rows}x{k}x{n}"), imp, t, p);
        }
    }
    Ok(())
}
