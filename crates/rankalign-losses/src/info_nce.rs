//! CLIP's symmetric InfoNCE: `½ [CE(S, diag) + CE(Sᵀ, diag)]` over a square matrix of
//! scaled similarities `S` (row `i`: image `i` against every text), averaged over rows.

use candle_core::{Result, Tensor};

/// Symmetric cross-entropy with the diagonal as targets. `logits_per_image` is `(b, b)`.
/// One fused op on CPU ([`rankalign_kernels::info_nce`]: the row and column
/// log-sum-exps in one read each, the gradient in one pass).
pub fn clip_loss(logits_per_image: &Tensor) -> Result<Tensor> {
    rankalign_kernels::info_nce(logits_per_image)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn hand_value() -> Result<()> {
        // Rows [[2, 0], [1, 3]]: i2t = ½[(log(e²+1) − 2) + (log(e+e³) − 3)],
        // t2i uses columns [[2, 1], [0, 3]].
        let s = Tensor::new(&[[2.0f64, 0.0], [1.0, 3.0]], &Device::Cpu)?;
        let lse = |a: f64, b: f64| (a.exp() + b.exp()).ln();
        let i2t = 0.5 * ((lse(2.0, 0.0) - 2.0) + (lse(1.0, 3.0) - 3.0));
        let t2i = 0.5 * ((lse(2.0, 1.0) - 2.0) + (lse(0.0, 3.0) - 3.0));
        let got = clip_loss(&s)?.to_scalar::<f64>()?;
        assert!((got - 0.5 * (i2t + t2i)).abs() < 1e-12, "{got}");
        Ok(())
    }
}
