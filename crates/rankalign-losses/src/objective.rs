//! The interface between a training loop and its loss.
//!
//! An [`Objective`] takes a batch's raw (unnormalised) image and text embeddings, the
//! raw `logit_scale`, and the step's [`StepContext`] (epoch, budget, the seed of any
//! tie-breaking draw, labels where an objective needs them), and returns [`LossTerms`]:
//! the scalar to back-propagate and its named parts for logging. Each objective does its
//! own normalisation and scaling, so a loop that calls it treats every objective alike.
//!
//! [`LossConfig::objective`](crate::LossConfig::objective) turns a config into one.

use candle_core::{Result, Tensor};

use crate::info_nce::clip_loss;
use crate::rankclip::{ListPerms, RankClipConfig, rankclip_loss};

/// What besides the embeddings a step knows.
#[derive(Clone, Copy, Debug)]
pub struct StepContext<'a> {
    /// 1-based epoch of the step.
    pub epoch: usize,
    /// Epochs in the whole run.
    pub epochs: usize,
    /// Seed of the step's random draws (RankCLIP's tie-breaking permutations).
    pub tie_seed: u64,
    /// Per-item labels `(b)`, for objectives that use them.
    pub labels: Option<&'a Tensor>,
}

/// A loss and its named parts, each a scalar tensor. Parts are for logging; only
/// `total` is differentiated.
#[derive(Clone, Debug)]
pub struct LossTerms {
    pub total: Tensor,
    /// In a fixed order per objective, e.g. `clip`, `cross`, `inmodal`, `rank_weight`.
    pub parts: Vec<(&'static str, Tensor)>,
}

impl LossTerms {
    /// The part called `name`, if the objective reports it.
    pub fn part(&self, name: &str) -> Option<&Tensor> {
        self.parts.iter().find(|(n, _)| *n == name).map(|(_, t)| t)
    }
}

/// A training objective over a batch of paired embeddings.
pub trait Objective: Send + Sync {
    /// `image`, `text`: `(b, d)` raw embeddings; `logit_scale`: the raw (log) scale.
    fn loss(
        &self,
        image: &Tensor,
        text: &Tensor,
        logit_scale: &Tensor,
        ctx: &StepContext<'_>,
    ) -> Result<LossTerms>;
}

/// CLIP's symmetric InfoNCE on `exp(logit_scale) · V̂ T̂ᵀ`; reports `clip`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClipObjective;

impl Objective for ClipObjective {
    fn loss(
        &self,
        image: &Tensor,
        text: &Tensor,
        logit_scale: &Tensor,
        _ctx: &StepContext<'_>,
    ) -> Result<LossTerms> {
        let v = rankalign_kernels::l2_normalize(image)?;
        let t = rankalign_kernels::l2_normalize(text)?;
        let logits = v.matmul(&t.t()?)?.broadcast_mul(&logit_scale.exp()?)?;
        let l = clip_loss(&logits)?;
        Ok(LossTerms {
            total: l.clone(),
            parts: vec![("clip", l)],
        })
    }
}

/// RankCLIP (and its ablations, by configuration); reports `clip`, `cross`, `inmodal`
/// and the epoch's ranking weight `rank_weight`.
#[derive(Clone, Debug)]
pub struct RankClipObjective(pub RankClipConfig);

impl Objective for RankClipObjective {
    fn loss(
        &self,
        image: &Tensor,
        text: &Tensor,
        logit_scale: &Tensor,
        ctx: &StepContext<'_>,
    ) -> Result<LossTerms> {
        let w = self.0.weight(ctx.epoch, ctx.epochs);
        let perms = ListPerms::from_seed(image.dim(0)?, ctx.tie_seed);
        let terms = rankclip_loss(&self.0, image, text, logit_scale, w, &perms)?;
        let w = Tensor::new(w, image.device())?.to_dtype(image.dtype())?;
        Ok(LossTerms {
            total: terms.total,
            parts: vec![
                ("clip", terms.clip),
                ("cross", terms.cross),
                ("inmodal", terms.inmodal),
                ("rank_weight", w),
            ],
        })
    }
}
