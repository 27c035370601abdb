//! Compiles the CUDA kernels in `src/cuda/*.cu` to PTX with `nvcc` when the `cuda`
//! feature is on; without it, this does nothing and no CUDA tool is needed.
//!
//! `NVCC` names the compiler (default: `nvcc` on the PATH); `RANKALIGN_CUDA_ARCH` the
//! virtual architecture (default `compute_80`, which the driver JIT-compiles for any
//! GPU from Ampere on).

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    ptx::compile();
}

#[cfg(feature = "cuda")]
mod ptx {
    use std::path::PathBuf;
    use std::process::Command;

    pub const KERNELS: [&str; 3] = ["plackett_luce", "layer_norm", "pairwise"];

    pub fn compile() {
        println!("cargo::rerun-if-env-changed=NVCC");
        println!("cargo::rerun-if-env-changed=RANKALIGN_CUDA_ARCH");
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
        let arch = std::env::var("RANKALIGN_CUDA_ARCH").unwrap_or_else(|_| "compute_80".into());
        for name in KERNELS {
            let src = format!("src/cuda/{name}.cu");
            println!("cargo::rerun-if-changed={src}");
            let dst = out.join(format!("{name}.ptx"));
            let status = Command::new(&nvcc)
                .args(["--ptx", &format!("-arch={arch}"), "-O3", "-std=c++17", "-o"])
                .arg(&dst)
                .arg(&src)
                .status()
                .unwrap_or_else(|e| panic!("cannot run {nvcc} to compile {src} (set NVCC or put nvcc on the PATH; see README, GPUs): {e}"));
            assert!(status.success(), "{nvcc} failed on {src} with {status}");
        }
    }
}
