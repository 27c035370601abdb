//! LayerNorm over the last dimension, composed from differentiable candle ops.
//!
//! `candle_nn::LayerNorm` dispatches contiguous input to a fused op that has no
//! backward, so gradients stop there without an error. This version is slower per
//! call but always differentiable; it is the reference a fused kernel must match.

use candle_core::{D, DType, Result, Tensor};

/// `y = (x - mean) / sqrt(var + eps) * weight + bias` over the last dimension.
///
/// `xs` is `(.., d)`; `weight` and `bias` are `(d)`. The variance is the biased one, as
/// in PyTorch. Half-precision input is normalised in f32 and cast back.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let d = xs.dim(D::Minus1)?;
    if weight.dims() != [d] || bias.dims() != [d] {
        candle_core::bail!(
            "layer_norm: input {:?} needs weight and bias of shape [{d}], got {:?} and {:?}",
            xs.dims(),
            weight.dims(),
            bias.dims()
        )
    }
    let dtype = xs.dtype();
    let xs = match dtype {
        DType::F16 | DType::BF16 => xs.to_dtype(DType::F32)?,
        _ => xs.clone(),
    };
    let mean = xs.mean_keepdim(D::Minus1)?;
    let centred = xs.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed
        .to_dtype(dtype)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_hand_values_and_has_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::new(&[[1f32, 2., 3., 6.]], &dev)?;
        let w = Var::new(&[1f32, 2., 1., 1.], &dev)?;
        let b = Var::new(&[0f32, 0., 1., 0.], &dev)?;
        let y = layer_norm(&x, &w, &b, 0.0)?;
        // mean 3, biased var 3.5, std 1.8708287
        let s = 3.5f32.sqrt();
        let want = [-2.0 / s, 2.0 * (-1.0 / s), 1.0, 3.0 / s];
        let got = y.flatten_all()?.to_vec1::<f32>()?;
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
        let grads = y.sum_all()?.backward()?;
        for v in [&x, &w, &b] {
            assert!(grads.get(v).is_some());
        }
        Ok(())
    }

    #[test]
    fn rejects_mismatched_weight() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        let w = Tensor::zeros(3, DType::F32, &dev).unwrap();
        let err = layer_norm(&x, &w, &w, 1e-5).unwrap_err().to_string();
        assert!(err.contains("layer_norm") && err.contains("[4]"), "{err}");
    }
}
