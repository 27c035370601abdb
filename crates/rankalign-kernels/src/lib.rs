//! Tensor kernels behind rankalign's ranking losses and transformer blocks.
//!
//! Each op is a candle `CustomOp` with a CPU forward, a hand-written backward and (with
//! the `cuda` feature) CUDA kernels, next to a `*_reference` built only from plain candle
//! ops, which autograd differentiates and which the fused op is tested against:
//!
//! - [`plackett_luce`]: the Plackett–Luce negative log-likelihood of a given order
//!   (ListMLE), in the authors' *parity* form (max shift, ε = 1e-10) and the *exact* form,
//!   O(m) per row forward and backward;
//! - [`layer_norm`](mod@layer_norm): LayerNorm with a backward pass (candle 0.11.1's fused LayerNorm has
//!   none on contiguous input, which silently froze most of a CLIP's parameters);
//! - [`linear`](mod@linear), [`activation`], [`attention`](mod@attention): a transformer block's linear layers,
//!   QuickGELU, softmax and multi-head attention as one node each with a hand-written backward (candle's composed versions
//!   cost a zero tensor plus an add per node in the backward, and a strided reduction
//!   for the bias gradient);
//! - [`embedding`](mod@embedding): the token-embedding lookup, whose backward writes the table's
//!   gradient as rows into one zeroed buffer (candle's `index_add` rule copies a
//!   table-sized zero tensor first);
//! - [`pairwise`]: L2RCLIP's weighted pairwise-distance diversity term, in the code's
//!   Euclidean form and the paper's meanNN (log) form;
//! - [`similarity`]: the ops of a contrastive loss over a batch's similarity matrices:
//!   row L2 normalisation, scaling by a learned scalar, the Gram matrix `X Xᵀ`, a tiled
//!   transpose and CLIP's symmetric InfoNCE.
//!
//! Architecture invariant: this crate depends on no other workspace crate; every op has
//! a CPU path and a reference; the CUDA code only adds a device.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use rankalign_kernels::{PlMode, l2_normalize, pl_nll, pl_nll_reference};
//! let scores = Tensor::new(&[[2.0f32, 0.5, -1.0], [0.1, 0.3, 0.2]], &Device::Cpu)?;
//! // Each row's order (most preferred first) as indices.
//! let order = Tensor::new(&[[0u32, 1, 2], [1, 2, 0]], &Device::Cpu)?;
//! let fused = pl_nll(&scores, &order, PlMode::Exact, None)?;
//! let composed = pl_nll_reference(&scores, &order, PlMode::Exact, None)?;
//! let diff = (fused - composed)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(diff < 1e-5);
//! let unit = l2_normalize(&scores)?.sqr()?.sum(1)?.to_vec1::<f32>()?;
//! assert!(unit.iter().all(|v| (v - 1.0).abs() < 1e-5));
//! # Ok::<(), candle_core::Error>(())
//! ```

pub mod activation;
pub mod attention;
mod cpu;
pub mod embedding;
pub mod layer_norm;
pub mod linear;
pub mod order;
pub mod pairwise;
pub mod plackett_luce;
mod products;
pub mod similarity;

#[cfg(feature = "cuda")]
mod cuda;

pub use activation::{
    quick_gelu, quick_gelu_reference, softmax_last_dim, softmax_last_dim_reference,
};
pub use attention::{attention, attention_reference};
pub use embedding::{embedding, embedding_reference};
pub use layer_norm::{layer_norm, layer_norm_reference};
pub use linear::{linear, linear_add, linear_quick_gelu, linear_reference};
pub use order::pl_order;
pub use pairwise::{PairwiseForm, weighted_pairwise, weighted_pairwise_reference};
pub use plackett_luce::{PlMode, pl_nll, pl_nll_reference};
pub use similarity::{
    gram, gram_reference, info_nce, info_nce_reference, l2_normalize, l2_normalize_reference,
    scale, scale_reference, transpose, transpose_reference,
};
