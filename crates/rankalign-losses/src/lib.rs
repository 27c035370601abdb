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
