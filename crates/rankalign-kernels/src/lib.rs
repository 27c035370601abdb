//! Tensor kernels behind rankalign's ranking losses and transformer blocks.
//!
//! Every op here has a reference built only from plain candle ops, which autograd
//! differentiates; that reference is the ground truth that fused kernels are tested
//! against. Today the crate holds the references:
//!
//! - [`plackett_luce`]: the Plackett–Luce negative log-likelihood of a given order
//!   (ListMLE), in the authors' *parity* form (max shift, ε = 1e-10) and the *exact* form;
//! - [`layer_norm`]: LayerNorm with a backward pass (candle 0.11.1's fused LayerNorm has
//!   none on contiguous input, which silently froze most of a CLIP's parameters).
//!
//! Architecture invariant: this crate depends on no other workspace crate, and every
//! op has a CPU path.

pub mod layer_norm;
pub mod plackett_luce;

pub use layer_norm::layer_norm;
pub use plackett_luce::{PlMode, pl_nll, pl_nll_reference};

/// Rows of `xs` `(.., d)` divided by their L2 norm.
pub fn l2_normalize(xs: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    xs.broadcast_div(&xs.sqr()?.sum_keepdim(candle_core::D::Minus1)?.sqrt()?)
}
