//! The ordinal experiment file (`kind = "ordinal"`): data and protocol, the pretrained
//! model, prompts, the two stages' budgets, and the methods to compare over several seeds.
//!
//! Parsing is strict like the pre-training file's: unknown keys are errors naming their
//! line, and [`OrdinalConfig::validate`] names each bad value by its dotted key.

use std::path::{Path, PathBuf};

use rankalign_data::OrdinalTask;
use rankalign_data::lists::LabelRange;
use rankalign_losses::{CopWeights, OrdinalForm};
use rankalign_models::RankFormerConfig;
use rankalign_models::prompt::{Interpolation, RankSlotConfig};
use serde::{Deserialize, Serialize};

use crate::Result;
use crate::config::ModelConfig;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrdinalConfig {
    /// Always `"ordinal"`: tells this file from a pre-training experiment.
    pub kind: String,
    pub name: String,
    #[serde(default = "default_out_dir")]
    pub out_dir: PathBuf,
    /// One run of every method per seed (initialisation and batch order); the data and
    /// its split are fixed by `data.seed`.
    pub seeds: Vec<u64>,
    /// Runs trained at the same time, one compute thread each.
    #[serde(default = "default_parallel")]
    pub parallel_runs: usize,
    pub data: OrdinalDataConfig,
    pub model: ModelConfig,
    pub prompt: PromptConfig,
    pub stage1: StageConfig,
    pub stage2: StageConfig,
    #[serde(default)]
    pub eval: OrdinalEvalConfig,
    #[serde(rename = "method")]
    pub methods: Vec<MethodConfig>,
}

fn default_out_dir() -> PathBuf {
    PathBuf::from("runs")
}
fn default_parallel() -> usize {
    2
}

/// The images and their ranks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "kebab-case", deny_unknown_fields)]
pub enum OrdinalDataConfig {
    /// Generated ordinal digits (`rankalign_data::ordinal`), with MNIST glyphs held out
    /// between splits.
    Digits {
        task: OrdinalTask,
        seed: u64,
        image_size: usize,
        train_size: usize,
        test_size: usize,
        #[serde(default)]
        subsample: Subsample,
    },
    /// Image lists of the papers' benchmarks.
    List(ListDataConfig),
}

/// Few-shot or distribution-shifted training sets (OrdinalCLIP's protocols).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subsample {
    /// Keep this many training images per rank.
    #[serde(default)]
    pub few_shot: Option<usize>,
    /// Subsample the `top_k` most frequent ranks to `keep` of their images.
    #[serde(default)]
    pub shift: Option<ShiftConfig>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShiftConfig {
    pub top_k: usize,
    pub keep: f64,
}

/// A benchmark's list files, where its images are, and how train and test are formed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListDataConfig {
    pub format: ListFormat,
    /// Directory the listed image paths are relative to.
    pub image_root: PathBuf,
    /// Raw labels kept, mapped to ranks `0..=max-min`; others are dropped and counted.
    pub labels: LabelRange,
    pub protocol: Protocol,
    /// Seeds the protocol's random splits (k-fold, HCI).
    pub seed: u64,
    pub image_size: usize,
    /// Random horizontal flips of training images (L2RCLIP's only augmentation).
    #[serde(default)]
    pub flip: bool,
    #[serde(default)]
    pub subsample: Subsample,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ListFormat {
    /// MORPH II settings A and B (header `race gender age filename database`, or A's
    /// CSV variant with a pandas index column).
    MorphAb,
    /// MORPH II settings C and D (`<path> <age>`; basenames are kept).
    MorphCd,
    Clap2015,
    Adience,
    Hci,
    Crowdbeauty,
    /// OrdinalCLIP's `relpath label [label …]` lists.
    Oc,
}

/// How the lists become folds of train and test sets. Every fold is one run per method
/// and seed; the report averages over folds and seeds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Protocol {
    /// Explicit train and test files per fold (e.g. MORPH setting A's fold files).
    Files { folds: Vec<FileFold> },
    /// Each file is a fold's test set, the others its training set (Adience's five
    /// folds, MORPH C/D). `folds` picks which (default: all).
    LeaveOneOut {
        files: Vec<PathBuf>,
        #[serde(default)]
        folds: Option<Vec<usize>>,
    },
    /// The split named in each entry (CLAP2015's `database` column); val is unused.
    Column { files: Vec<PathBuf> },
    /// A seeded `k`-fold split of all entries.
    KFold {
        files: Vec<PathBuf>,
        k: usize,
        #[serde(default)]
        folds: Option<Vec<usize>>,
    },
    /// HCI's standard random splits: 210 / 5 / 50 per decade, `splits` of the ten.
    Hci {
        files: Vec<PathBuf>,
        #[serde(default)]
        splits: Option<Vec<usize>>,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileFold {
    pub train: Vec<PathBuf>,
    pub test: Vec<PathBuf>,
}

/// Rank templates and context.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptConfig {
    /// A template with one `{rank}`, e.g. "a photo of {rank} years old face."
    pub template: String,
    /// The word(s) of each rank, in rank order. Default: the task's own (digits), or the
    /// number words of the label range (lists).
    #[serde(default)]
    pub ranks: Option<Vec<String>>,
    /// Learned context tokens `L` of the learned-prompt methods.
    pub n_ctx: usize,
}

/// Budget and optimiser of one stage (Adam with decoupled weight decay). Which keys a
/// stage reads is checked: `[stage1]` gives L2RCLIP's stage 1 its budget and every
/// learned-prompt method its prompt learning rate, weight decay and warm-up; `[stage2]`
/// gives the image encoder its budget, learning rate and step decay.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// Required for stage 2, and for stage 1 when an L2RCLIP method runs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    pub lr: f64,
    #[serde(default)]
    pub weight_decay: f64,
    /// Stage 1: linear warm-up epochs before the cosine decay.
    #[serde(default)]
    pub warmup_epochs: usize,
    /// Stage 2: epochs after which the learning rate is multiplied by `gamma`.
    #[serde(default)]
    pub milestones: Vec<usize>,
    /// Stage 2: the step decay's factor (default 0.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gamma: Option<f64>,
}

impl StageConfig {
    pub fn epochs(&self) -> usize {
        self.epochs.unwrap_or(0)
    }
    pub fn batch_size(&self) -> usize {
        self.batch_size.unwrap_or(0)
    }
    pub fn gamma(&self) -> f64 {
        self.gamma.unwrap_or_else(default_gamma)
    }
}

fn default_gamma() -> f64 {
    0.1
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrdinalEvalConfig {
    pub batch_size: usize,
}

impl Default for OrdinalEvalConfig {
    fn default() -> Self {
        Self { batch_size: 250 }
    }
}

/// One method to compare.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodConfig {
    pub name: String,
    pub recipe: Recipe,
}

/// How a method trains.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Recipe {
    /// The templates as they are, no training.
    ZeroShot,
    /// CoOp as OrdinalCLIP runs it for ordinal tasks: context and rank embeddings learned
    /// together with the image encoder (stage 2's budget), cross-entropy.
    Coop {
        #[serde(default = "learned_slot")]
        slot: RankSlotConfig,
    },
    /// OrdinalCLIP: interpolated rank embeddings, context and image encoder trained
    /// together (stage 2's budget), cross-entropy + `kl_weight`·KL.
    Ordinalclip {
        #[serde(default = "interpolated_slot")]
        slot: RankSlotConfig,
        #[serde(default = "one")]
        kl_weight: f64,
    },
    /// L2RCLIP: stage 1 learns the prompts (RankFormer by default) on cached image
    /// features; stage 2 adapts the image encoder to the frozen rank features.
    L2rclip(L2rclipRecipe),
}

fn learned_slot() -> RankSlotConfig {
    RankSlotConfig::Learned
}
fn interpolated_slot() -> RankSlotConfig {
    RankSlotConfig::Interpolated {
        bases: 3,
        interpolation: Interpolation::Linear,
    }
}
fn one() -> f64 {
    1.0
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L2rclipRecipe {
    #[serde(default = "rankformer_slot")]
    pub slot: RankSlotConfig,
    /// Weight of each of L_i2t and L_t2i in stage 1 (0.1 for Adience/HCI/CrowdBeauty,
    /// 0.03 for MORPH/CLAP; spec §2.6).
    #[serde(default = "default_contrastive")]
    pub contrastive_weight: f64,
    /// Weight of L_cop in stage 1 (3; 0 switches it off).
    #[serde(default = "default_cop")]
    pub cop_weight: f64,
    #[serde(default)]
    pub cop: CopWeights,
    /// Weight of L_scop in stage 2 (1; 0 switches it off).
    #[serde(default = "one")]
    pub scop_weight: f64,
    #[serde(default)]
    pub form: OrdinalForm,
    /// Train stage 2 (the image encoder); `false` evaluates after stage 1.
    #[serde(default = "yes")]
    pub stage2: bool,
}

fn rankformer_slot() -> RankSlotConfig {
    RankSlotConfig::RankFormer(RankFormerConfig::default())
}
fn default_contrastive() -> f64 {
    0.1
}
fn default_cop() -> f64 {
    3.0
}
fn yes() -> bool {
    true
}

impl Protocol {
    /// Every list file the protocol reads.
    pub fn files(&self) -> Vec<&PathBuf> {
        match self {
            Protocol::Files { folds } => folds
                .iter()
                .flat_map(|f| f.train.iter().chain(&f.test))
                .collect(),
            Protocol::LeaveOneOut { files, .. }
            | Protocol::Column { files }
            | Protocol::KFold { files, .. }
            | Protocol::Hci { files, .. } => files.iter().collect(),
        }
    }

    /// The fold (or split) indices chosen, if the protocol picks some.
    fn chosen(&self) -> Option<&Vec<usize>> {
        match self {
            Protocol::LeaveOneOut { folds, .. } | Protocol::KFold { folds, .. } => folds.as_ref(),
            Protocol::Hci { splits, .. } => splits.as_ref(),
            _ => None,
        }
    }
}

impl OrdinalDataConfig {
    pub fn image_size(&self) -> usize {
        match self {
            OrdinalDataConfig::Digits { image_size, .. } => *image_size,
            OrdinalDataConfig::List(l) => l.image_size,
        }
    }

    pub fn subsample(&self) -> &Subsample {
        match self {
            OrdinalDataConfig::Digits { subsample, .. } => subsample,
            OrdinalDataConfig::List(l) => &l.subsample,
        }
    }

    /// Number of ranks `M`.
    pub fn num_ranks(&self) -> usize {
        match self {
            OrdinalDataConfig::Digits { task, .. } => task.num_ranks(),
            OrdinalDataConfig::List(l) => l.labels.num_ranks(),
        }
    }
}

impl OrdinalConfig {
    /// Read and validate a config file; errors name the file.
    pub fn load(path: &Path) -> Result<Self> {
        crate::config::load_toml(path, Self::validate)
    }

    /// Parse and validate TOML text; `path` is used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        crate::config::parse_toml(text, path, Self::validate)
    }

    /// The rank words: configured, or the data's own.
    pub fn rank_words(&self) -> Vec<String> {
        if let Some(r) = &self.prompt.ranks {
            return r.clone();
        }
        match &self.data {
            OrdinalDataConfig::Digits { task, .. } => match task {
                OrdinalTask::DigitValue => (0..10).map(|d| d.to_string()).collect(),
                OrdinalTask::DigitCount => ["one", "two", "three", "four"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            },
            OrdinalDataConfig::List(l) => match l.format {
                ListFormat::Crowdbeauty => rankalign_data::lists::CROWDBEAUTY_WORDS
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                ListFormat::Hci => rankalign_data::lists::HCI_DECADES
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                _ => l.labels.words(),
            },
        }
    }

    /// The prompt text of each rank.
    pub fn rank_texts(&self) -> Vec<String> {
        self.rank_words()
            .iter()
            .map(|w| self.prompt.template.replace("{rank}", w))
            .collect()
    }

    pub fn run_dir(&self) -> PathBuf {
        self.out_dir.join(&self.name)
    }

    /// Check every value; the message lists each problem with its key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        // Everything below allocates per rank.
        if self.data.num_ranks() > 10_000 {
            return Err(format!(
                "data: {} ranks is more than 10000",
                self.data.num_ranks()
            ));
        }
        let mut errs = Vec::new();
        let mut need = |ok: bool, msg: String| {
            if !ok {
                errs.push(msg)
            }
        };
        need(
            self.kind == "ordinal",
            format!("kind must be \"ordinal\", got {:?}", self.kind),
        );
        need(
            !self.name.is_empty() && !self.name.contains(['/', '\\']),
            format!("name must be a non-empty file name, got {:?}", self.name),
        );
        need(
            !self.seeds.is_empty(),
            "seeds must list at least one seed".into(),
        );
        need(
            self.parallel_runs >= 1,
            "parallel_runs must be at least 1".into(),
        );
        let m = self.data.num_ranks();
        need(m >= 2, format!("data: need at least 2 ranks, got {m}"));
        match &self.data {
            OrdinalDataConfig::Digits {
                train_size,
                test_size,
                ..
            } => {
                need(
                    *train_size >= 2,
                    "data.train_size must be at least 2".into(),
                );
                need(*test_size >= 1, "data.test_size must be at least 1".into());
            }
            OrdinalDataConfig::List(l) => {
                need(
                    self.prompt.ranks.is_some()
                        || !matches!(l.format, ListFormat::Adience | ListFormat::Oc),
                    "prompt.ranks: Adience and OrdinalCLIP lists label groups, not numbers; name each rank".into(),
                );
                if let Some(ix) = l.protocol.chosen() {
                    let mut seen = std::collections::HashSet::new();
                    need(
                        ix.iter().all(|i| seen.insert(*i)),
                        format!("data.protocol: fold/split indices {ix:?} repeat"),
                    );
                }
                let empty = match &l.protocol {
                    Protocol::Files { folds } => {
                        folds.is_empty()
                            || folds
                                .iter()
                                .any(|f| f.train.is_empty() || f.test.is_empty())
                    }
                    Protocol::LeaveOneOut { files, .. } => files.len() < 2,
                    Protocol::Column { files } | Protocol::Hci { files, .. } => files.is_empty(),
                    Protocol::KFold { files, k, .. } => files.is_empty() || *k < 2,
                };
                need(
                    !empty,
                    "data.protocol: every fold needs train and test files (leave-one-out: 2 files or more; k-fold: k ≥ 2)".into(),
                );
            }
        }
        let sub = self.data.subsample();
        if let Some(s) = sub.few_shot {
            need(s >= 1, "data.subsample.few_shot must be at least 1".into());
        }
        if let Some(s) = sub.shift {
            need(
                s.keep > 0.0 && s.keep <= 1.0,
                format!(
                    "data.subsample.shift.keep must be in (0, 1], got {}",
                    s.keep
                ),
            );
        }
        match self.model.resolve() {
            Ok(c) => need(
                c.vision.image_size() == self.data.image_size(),
                format!(
                    "model image size {} differs from data.image_size {}",
                    c.vision.image_size(),
                    self.data.image_size()
                ),
            ),
            Err(e) => need(false, e),
        }
        let p = &self.prompt;
        need(
            p.template.matches("{rank}").count() == 1,
            format!(
                "prompt.template must contain {{rank}} once, got {:?}",
                p.template
            ),
        );
        let words = self.rank_words();
        need(
            words.len() == m,
            format!("prompt.ranks has {} words for {m} ranks", words.len()),
        );
        let stage1_runs = self
            .methods
            .iter()
            .any(|m| matches!(m.recipe, Recipe::L2rclip(_)));
        for (key, s) in [("stage1", &self.stage1), ("stage2", &self.stage2)] {
            let budget = key == "stage2" || stage1_runs;
            if budget {
                need(
                    s.epochs.is_some_and(|e| e >= 1),
                    format!("{key}.epochs must be given and at least 1"),
                );
                need(
                    s.batch_size.is_some_and(|b| b >= 2),
                    format!("{key}.batch_size must be given and at least 2"),
                );
            } else {
                need(
                    s.epochs.is_none() && s.batch_size.is_none(),
                    "stage1.epochs and stage1.batch_size are read only by L2RCLIP's stage 1, and no method here runs it: CoOp and OrdinalCLIP train prompts and image encoder together for stage2.epochs at stage2.batch_size (stage1 gives them lr, weight_decay and warmup_epochs); remove them".into(),
                );
            }
            need(
                s.lr.is_finite() && s.lr > 0.0,
                format!("{key}.lr must be > 0, got {}", s.lr),
            );
            need(
                s.weight_decay >= 0.0,
                format!("{key}.weight_decay must be >= 0"),
            );
            need(
                s.gamma().is_finite() && s.gamma() > 0.0 && s.gamma() <= 1.0,
                format!("{key}.gamma must be in (0, 1]"),
            );
        }
        need(
            self.stage1.milestones.is_empty() && self.stage1.gamma.is_none(),
            "stage1.milestones and stage1.gamma are not read: stage 1 uses warm-up and cosine decay; the step decay is stage 2's".into(),
        );
        need(
            self.stage2.warmup_epochs == 0,
            "stage2.warmup_epochs is not read: stage 2 uses step decay (milestones, gamma); the prompts' warm-up is stage1.warmup_epochs".into(),
        );
        need(
            self.eval.batch_size >= 1,
            "eval.batch_size must be at least 1".into(),
        );
        need(
            !self.methods.is_empty(),
            "at least one [[method]] is needed".into(),
        );
        let mut names = std::collections::HashSet::new();
        for (i, meth) in self.methods.iter().enumerate() {
            need(
                !meth.name.is_empty() && !meth.name.contains(['/', '\\']),
                format!("method[{i}].name must be a non-empty file name"),
            );
            need(
                names.insert(&meth.name),
                format!("method[{i}].name {:?} is used twice", meth.name),
            );
            let slot = match &meth.recipe {
                Recipe::ZeroShot => None,
                Recipe::Coop { slot } => Some(slot),
                Recipe::Ordinalclip { slot, kl_weight } => {
                    need(
                        kl_weight.is_finite() && *kl_weight >= 0.0,
                        format!("method[{i}].recipe.kl_weight must be >= 0, got {kl_weight}"),
                    );
                    Some(slot)
                }
                Recipe::L2rclip(r) => {
                    need(
                        !(matches!(r.slot, RankSlotConfig::Fixed) && self.prompt.n_ctx == 0),
                        format!(
                            "method[{i}].recipe: a fixed slot without context tokens leaves stage 1 nothing to train"
                        ),
                    );
                    for (k, w) in [
                        ("contrastive_weight", r.contrastive_weight),
                        ("cop_weight", r.cop_weight),
                        ("scop_weight", r.scop_weight),
                    ] {
                        need(
                            w.is_finite() && w >= 0.0,
                            format!("method[{i}].recipe.{k} must be >= 0, got {w}"),
                        );
                    }
                    need(
                        r.contrastive_weight + r.cop_weight > 0.0,
                        format!(
                            "method[{i}].recipe: stage 1 needs a loss (contrastive_weight or cop_weight > 0)"
                        ),
                    );
                    Some(&r.slot)
                }
            };
            match slot {
                Some(RankSlotConfig::Interpolated { bases, .. }) => need(
                    *bases >= 1 && *bases <= m,
                    format!("method[{i}].recipe.slot.bases must be in 1..={m}, got {bases}"),
                ),
                Some(RankSlotConfig::RankFormer(rf)) => {
                    need(
                        (0.0..=1.0).contains(&rf.alpha),
                        format!(
                            "method[{i}].recipe.slot.alpha must be in [0, 1], got {}",
                            rf.alpha
                        ),
                    );
                    if let Ok(c) = self.model.resolve() {
                        need(
                            rf.heads >= 1 && c.text.width % rf.heads == 0,
                            format!(
                                "method[{i}].recipe.slot.heads {} must divide the text width {}",
                                rf.heads, c.text.width
                            ),
                        );
                    }
                }
                _ => {}
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("; "))
        }
    }
}
