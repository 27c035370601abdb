//! Training objectives for vision–language alignment.
//!
//! - [`info_nce`]: CLIP's symmetric InfoNCE over a batch of paired embeddings;
//! - [`rankclip`]: RankCLIP (Zhang et al., ICCV 2025): InfoNCE plus list-wise
//!   Plackett–Luce consistency between the cross-modal and in-modal similarity
//!   rankings, in the authors' parity form or the exact form;
//! - [`ordinal`]: L2RCLIP's L_cop / L_scop and asymmetric contrastive loss, and
//!   OrdinalCLIP's cross-entropy + KL, as the authors' code computes them;
//! - [`objective`]: the [`Objective`] interface a training loop calls, implemented by
//!   CLIP and RankCLIP;
//! - [`LossConfig`]: the serialisable choice between them (RankCLIP_I and RankCLIP_C
//!   are RankCLIP configurations).
//!
//! Losses take embeddings and the raw `logit_scale`, and return scalar tensors that
//! autograd differentiates. Architecture invariant: no model, data or training code here.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use rankalign_losses::{ListPerms, RankClipConfig, RankMode, clip_loss, listmle, rankclip_loss};
//! let dev = Device::Cpu;
//! let image = Tensor::randn(0f32, 1.0, (8, 16), &dev)?;
//! let text = Tensor::randn(0f32, 1.0, (8, 16), &dev)?;
//! let logit_scale = Tensor::new(2.659f32, &dev)?; // ln(1/0.07)
//! // RankCLIP: InfoNCE plus the four ListMLE terms, ties broken by seeded permutations
//! // (`ListPerms::identity` keeps the index order).
//! let perms = ListPerms::from_seed(8, 17);
//! let cfg = RankClipConfig::rankclip();
//! let terms = rankclip_loss(&cfg, &image, &text, &logit_scale, 1.0, &perms)?;
//! assert!(terms.total.to_scalar::<f32>()?.is_finite());
//! // One ListMLE term: the image–image similarities ranked in the text–text order.
//! let (i, t) = (rankalign_kernels::l2_normalize(&image)?, rankalign_kernels::l2_normalize(&text)?);
//! let ii = i.matmul(&i.t()?)?;
//! let tt = t.matmul(&t.t()?)?;
//! let term = listmle(&ii, &tt, &ListPerms::identity(8).0[0], RankMode::Parity, None)?;
//! assert!(term.to_scalar::<f32>()? > 0.0);
//! let contrastive = clip_loss(&(i.matmul(&t.t()?)? * 14.3)?)?;
//! assert!(contrastive.to_scalar::<f32>()? > 0.0);
//! # Ok::<(), candle_core::Error>(())
//! ```

pub mod info_nce;
pub mod objective;
pub mod ordinal;
pub mod rankclip;

pub use info_nce::clip_loss;
pub use objective::{ClipObjective, LossTerms, Objective, RankClipObjective, StepContext};
pub use ordinal::{CopWeights, OrdinalForm, cop_stage1, cross_entropy, ordinal_kl, scop, sup_con};
pub use rankclip::{
    ListPerms, RankClipConfig, RankClipTerms, RankDecay, RankMode, WeightSchedule, listmle,
    rankclip_loss,
};

use serde::{Deserialize, Serialize};

/// Which objective a run trains with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum LossConfig {
    /// Symmetric InfoNCE only.
    Clip,
    /// InfoNCE plus RankCLIP's ranking-consistency terms.
    Rankclip(RankClipConfig),
}

impl LossConfig {
    /// The objective this config describes.
    pub fn objective(&self) -> Box<dyn Objective> {
        match self {
            LossConfig::Clip => Box::new(ClipObjective),
            LossConfig::Rankclip(cfg) => Box::new(RankClipObjective(cfg.clone())),
        }
    }
}
