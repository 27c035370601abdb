//! Fused kernels against their references (values and gradients, f32 and f64) and
//! against central finite differences.

mod layer_norm;
mod pairwise;
mod plackett_luce;
