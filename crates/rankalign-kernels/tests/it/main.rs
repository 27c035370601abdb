//! Fused kernels against their references (values and gradients, f32 and f64) and
//! against central finite differences.

mod block_ops;
#[cfg(feature = "cuda")]
mod cuda;
mod layer_norm;
mod pairwise;
mod plackett_luce;

/// Central differences `(f(x + h·e_i) − f(x − h·e_i)) / 2h` for every coordinate `i`.
pub fn central_differences(
    f: impl Fn(&[f64]) -> candle_core::Result<f64>,
    x: &[f64],
    h: f64,
) -> candle_core::Result<Vec<f64>> {
    (0..x.len())
        .map(|i| {
            let (mut up, mut down) = (x.to_vec(), x.to_vec());
            up[i] += h;
            down[i] -= h;
            Ok((f(&up)? - f(&down)?) / (2.0 * h))
        })
        .collect()
}
