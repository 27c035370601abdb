//! Learning-rate schedule: linear warm-up `lr·(t + 1)/W` for `t < W`, then half a cosine
//! from `lr` to 0 over the remaining steps (open_clip's `cosine_lr`, CyCLIP's scheduler,
//! without CyCLIP's one-epoch offset).

/// The learning rate at 0-based step `step` of `total`.
pub fn cosine_with_warmup(base_lr: f64, warmup: usize, total: usize, step: usize) -> f64 {
    if step < warmup {
        return base_lr * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) * base_lr
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_zero() {
        assert_eq!(cosine_with_warmup(1.0, 10, 110, 0), 0.1);
        assert_eq!(cosine_with_warmup(1.0, 10, 110, 9), 1.0);
        assert_eq!(cosine_with_warmup(1.0, 10, 110, 10), 1.0);
        assert!((cosine_with_warmup(1.0, 10, 110, 60) - 0.5).abs() < 1e-12);
        assert!(cosine_with_warmup(1.0, 10, 110, 110).abs() < 1e-12);
        assert_eq!(cosine_with_warmup(2.0, 0, 4, 0), 2.0);
    }
}
