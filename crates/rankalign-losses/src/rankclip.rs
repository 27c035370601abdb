//! RankCLIP's objective (spec `rankclip.md` §1.2–1.5): InfoNCE plus list-wise
//! Plackett–Luce (ListMLE) consistency between similarity rankings.
//!
//! With `S = s·V̂T̂ᵀ`, `S_II = s·V̂V̂ᵀ`, `S_TT = s·T̂T̂ᵀ` and `s = exp(logit_scale)`:
//!
//! ```text
//! L_cross = λ_c · ½ [ListMLE(S, Sᵀ) + ListMLE(Sᵀ, S)]
//! L_in    = λ_i · ½ [ListMLE(S_II, S_TT) + ListMLE(S_TT, S_II)]
//! L       = L_CLIP + w(e) · (L_cross + L_in) / B        (the 1/B is optional)
//! ```
//!
//! `ListMLE(P, R)` is the mean over rows of the Plackett–Luce NLL of `P`'s row in the
//! order that sorts `R`'s row descending. The reference enters only through that sort,
//! so no gradient flows into it. Ties in `R` are broken by one random column
//! permutation per call ([`ListPerms`]), generated on the host from a seed, and a stable
//! sort — the authors' `randperm` + sort, made reproducible.
//!
//! λ = 1/16 on the two-direction mean is the paper's λ_c = λ_i = 1/16 as the code
//! realises it (`/32` on the sum). `w(e)` is the code's ramp
//! `clamp(3·(e − 1)/(E − 1), 0, 2)` over epochs, absent from the paper.

use candle_core::{Result, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rankalign_kernels::{PlMode, pl_nll, pl_order};
use serde::{Deserialize, Serialize};

use crate::info_nce::clip_loss;

/// Parity (ε = 1e-10, max shift, as the authors' code) or exact (ε = 0, f64).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RankMode {
    #[default]
    Parity,
    Exact,
}

/// Per-position weights μ_k (k 1-based in reference order), multiplied into each term.
/// The paper's Eq. 4 puts μ inside the product, where it has no effect on gradients;
/// Algorithm 1 multiplies per-position terms, which is what this does. The authors'
/// code has none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RankDecay {
    #[default]
    None,
    /// μ_k = 1 / ln(k + 1).
    Ln,
    /// μ_k = 1 / log2(k + 1).
    Log2,
}

/// The weight `w` on the ranking terms as a function of the epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum WeightSchedule {
    /// The authors' code: `clamp(3·(e − 1)/(E − 1), 0, 2)`, `e` = 1..E.
    #[default]
    Ramp,
    /// A fixed weight.
    Constant { value: f64 },
}

fn one_sixteenth() -> f64 {
    1.0 / 16.0
}

fn yes() -> bool {
    true
}

/// RankCLIP's knobs; the defaults are the authors' code.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankClipConfig {
    /// λ_c on the mean of the two cross-modal directions (0 gives RankCLIP_I).
    #[serde(default = "one_sixteenth")]
    pub lambda_cross: f64,
    /// λ_i on the mean of the two in-modal directions (0 gives RankCLIP_C).
    #[serde(default = "one_sixteenth")]
    pub lambda_in: f64,
    #[serde(default)]
    pub mode: RankMode,
    #[serde(default)]
    pub decay: RankDecay,
    /// Divide the ranking terms by B (a per-position mean instead of a row sum).
    #[serde(default = "yes")]
    pub per_position_mean: bool,
    #[serde(default)]
    pub weight_schedule: WeightSchedule,
}

impl RankClipConfig {
    /// RankCLIP as the authors' code trains it.
    pub fn rankclip() -> Self {
        Self {
            lambda_cross: one_sixteenth(),
            lambda_in: one_sixteenth(),
            mode: RankMode::Parity,
            decay: RankDecay::None,
            per_position_mean: true,
            weight_schedule: WeightSchedule::Ramp,
        }
    }

    /// RankCLIP_I: in-modal consistency only (λ_c = 0).
    pub fn rankclip_i() -> Self {
        Self {
            lambda_cross: 0.0,
            ..Self::rankclip()
        }
    }

    /// RankCLIP_C: cross-modal consistency only (λ_i = 0).
    pub fn rankclip_c() -> Self {
        Self {
            lambda_in: 0.0,
            ..Self::rankclip()
        }
    }

    /// Check values; the message names the field.
    pub fn validate(&self, epochs: usize) -> std::result::Result<(), String> {
        for (name, v) in [
            ("lambda_cross", self.lambda_cross),
            ("lambda_in", self.lambda_in),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{name} must be a finite number >= 0, got {v}"));
            }
        }
        match self.weight_schedule {
            WeightSchedule::Ramp if epochs < 2 => Err(format!(
                "weight_schedule ramp needs at least 2 epochs, the run has {epochs}"
            )),
            WeightSchedule::Constant { value } if !(value.is_finite() && value >= 0.0) => Err(
                format!("weight_schedule constant value must be finite and >= 0, got {value}"),
            ),
            _ => Ok(()),
        }
    }

    /// `w(e)` for the 1-based epoch `epoch` of `epochs`.
    pub fn weight(&self, epoch: usize, epochs: usize) -> f64 {
        match self.weight_schedule {
            WeightSchedule::Constant { value } => value,
            WeightSchedule::Ramp => {
                let denom = epochs.saturating_sub(1).max(1) as f64;
                (3.0 * (epoch.saturating_sub(1)) as f64 / denom).clamp(0.0, 2.0)
            }
        }
    }

    fn decay_weights(&self, m: usize) -> Option<Vec<f64>> {
        let f: fn(f64) -> f64 = match self.decay {
            RankDecay::None => return None,
            RankDecay::Ln => f64::ln,
            RankDecay::Log2 => f64::log2,
        };
        Some((1..=m).map(|k| 1.0 / f((k + 1) as f64)).collect())
    }
}

/// The four column permutations used to break ties, one per ListMLE call, in the order
/// cross `(S, Sᵀ)`, cross `(Sᵀ, S)`, in-modal `(S_II, S_TT)`, in-modal `(S_TT, S_II)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListPerms(pub [Vec<u32>; 4]);

impl ListPerms {
    /// Four random permutations of `0..b` from `seed`.
    pub fn from_seed(b: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Self(std::array::from_fn(|_| {
            let mut p: Vec<u32> = (0..b as u32).collect();
            p.shuffle(&mut rng);
            p
        }))
    }

    pub fn identity(b: usize) -> Self {
        Self(std::array::from_fn(|_| (0..b as u32).collect()))
    }
}

/// The loss and its parts, each a scalar tensor. `cross` and `inmodal` already carry
/// their λ (the two-direction mean times λ) but not `w` or the `1/B`.
#[derive(Clone, Debug)]
pub struct RankClipTerms {
    pub total: Tensor,
    pub clip: Tensor,
    pub cross: Tensor,
    pub inmodal: Tensor,
}

/// `ListMLE(P, R)`: the mean over rows of the Plackett–Luce NLL of `P` in `R`'s order.
pub fn listmle(
    pred: &Tensor,
    reference: &Tensor,
    perm: &[u32],
    mode: RankMode,
    decay: Option<&Tensor>,
) -> Result<Tensor> {
    if pred.dims() != reference.dims() {
        candle_core::bail!(
            "listmle: prediction {:?} and reference {:?} differ",
            pred.dims(),
            reference.dims()
        )
    }
    let order = pl_order(reference, perm)?;
    let mode = match mode {
        RankMode::Parity => PlMode::Parity,
        RankMode::Exact => PlMode::Exact,
    };
    pl_nll(pred, &order, mode, decay)?.mean_all()
}

/// RankCLIP's loss for unnormalised embeddings `image`, `text` `(b, d)` and the raw
/// `logit_scale`, with ranking weight `w` (see [`RankClipConfig::weight`]).
pub fn rankclip_loss(
    cfg: &RankClipConfig,
    image: &Tensor,
    text: &Tensor,
    logit_scale: &Tensor,
    w: f64,
    perms: &ListPerms,
) -> Result<RankClipTerms> {
    let (b, _) = image.dims2()?;
    if image.dims() != text.dims() {
        candle_core::bail!(
            "rankclip_loss: image {:?} and text {:?} embeddings differ",
            image.dims(),
            text.dims()
        )
    }
    if perms.0.iter().any(|p| p.len() != b) {
        candle_core::bail!("rankclip_loss: permutations must have length {b}")
    }
    let v = rankalign_kernels::l2_normalize(image)?;
    let t = rankalign_kernels::l2_normalize(text)?;
    // The scale multiplies a (b, d) factor, not the (b, b) products: half the
    // elementwise work forward and backward, the same matrices up to rounding. `S` is a
    // linear layer's product (`x Wᵀ`, both gradients as plain gemms); the in-modal ones
    // are Gram matrices of the rows scaled by `√s` (one gemm backward instead of two).
    let scaled = rankalign_kernels::scale(&v, &logit_scale.exp()?)?;
    let s = rankalign_kernels::linear(&scaled, &t, None)?;
    let st = rankalign_kernels::transpose(&s)?;
    let root = (logit_scale * 0.5)?.exp()?;
    let gram = |a: &Tensor| rankalign_kernels::gram(&rankalign_kernels::scale(a, &root)?);
    let clip = clip_loss(&s)?;
    let decay = cfg
        .decay_weights(b)
        .map(|mu| Tensor::from_vec(mu, b, image.device())?.to_dtype(image.dtype()))
        .transpose()?;
    let zero = || Tensor::zeros((), image.dtype(), image.device());
    let pair = |p: &Tensor, r: &Tensor, k: usize, lambda: f64| -> Result<Tensor> {
        let forward = listmle(p, r, &perms.0[k], cfg.mode, decay.as_ref())?;
        let backward = listmle(r, p, &perms.0[k + 1], cfg.mode, decay.as_ref())?;
        (forward + backward)? * (lambda / 2.0)
    };
    let cross = if cfg.lambda_cross > 0.0 {
        pair(&s, &st, 0, cfg.lambda_cross)?
    } else {
        zero()?
    };
    let inmodal = if cfg.lambda_in > 0.0 {
        pair(&gram(&v)?, &gram(&t)?, 2, cfg.lambda_in)?
    } else {
        zero()?
    };
    let per_position = if cfg.per_position_mean {
        1.0 / b as f64
    } else {
        1.0
    };
    let rank = ((&cross + &inmodal)? * (w * per_position))?;
    let total = (&clip + rank)?;
    Ok(RankClipTerms {
        total,
        clip,
        cross,
        inmodal,
    })
}
