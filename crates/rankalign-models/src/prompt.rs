//! Learned prompts for ordinal ranks: CoOp's context tokens, OrdinalCLIP's interpolated
//! rank embeddings, and L2RCLIP's RankFormer over frozen rank templates.
//!
//! Each of the `M` ranks has a prompt whose token sequence is
//!
//! ```text
//! [SOT]  G_1 … G_L  p_1 … p_P  r_1 … r_h  s_1 … [EOT] pad…
//! ```
//!
//! where `G` are `L` context tokens shared by all ranks (CoOp's "end" layout; Zhou et al.
//! 2022), `p` and `s` the template's tokens before and after the rank ("a photo of",
//! "years old face."), and `r` the rank's own tokens ("thirty one") — the *rank slot*,
//! the "ranking tokens of length h" of the L2RCLIP paper. Ranks may tokenize to different
//! lengths: the slot is `T` wide (the longest rank), starts at the same position for
//! every rank, and a per-rank mask says which of its positions hold rank tokens. Only
//! those change; the template's other tokens, the EOT and padding stay as tokenized, so
//! the text tower still pools at each rank's own EOT. How the slot is formed is the
//! [`RankSlotConfig`]:
//!
//! - `Fixed`: the rank embeddings as they are (zero-shot CLIP);
//! - `Learned`: rank embeddings plus a learned offset per rank (CoOp as an ordinal
//!   baseline, and L2RCLIP's "fine-tune the templates" ablation);
//! - `Interpolated`: OrdinalCLIP (Li et al. 2022): `K` learned base slots, each rank a
//!   fixed convex mix of them ([`interpolation_weights`]);
//! - `RankFormer`: L2RCLIP (Wang et al. 2023): frozen rank embeddings `R` refined as
//!   `R' = (1 − α)·R + α·FFN(TSA(LN(R)))`, where TSA attends across the `M` ranks at
//!   each slot position ([`RankFormer`]).
//!
//! Learned offsets start at zero, so CoOp's slot starts at the rank embeddings and weight
//! decay pulls it back towards them; OrdinalCLIP's bases start at the embeddings of the
//! ranks nearest their anchors (their own tokens only; zero where an anchor rank is
//! shorter than the slot), and the RankFormer at `(1 − α)R`. See
//! `docs/decisions.md` for each choice the L2RCLIP paper leaves open.

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::layers::{Attention, BiasInit, EncoderInit, LayerNorm, Linear, WeightInit, linear};

/// Token ids of every rank's prompt, with the layout's positions.
#[derive(Clone, Debug)]
pub struct PromptTokens {
    /// `(m, s)` u32: `[SOT] X×L prefix rank suffix [EOT] 0…`.
    pub ids: Tensor,
    /// `(m)` u32 flat EOT indices `row · s + position`.
    pub eot: Tensor,
    /// Context tokens `L`.
    pub n_ctx: usize,
    /// Position of every rank's first rank token (`1 + L +` the template prefix).
    pub slot_start: usize,
    /// Width `T` of the rank slot (the longest rank).
    pub slot_len: usize,
    /// Rank tokens of each rank.
    pub rank_lens: Vec<usize>,
}

impl PromptTokens {
    /// From each rank's full token row — `SOT`, `n_ctx` placeholder tokens, the
    /// template's `prefix_len` tokens before the rank, the rank's `rank_lens[i]`
    /// tokens, the rest of the template, `EOT` — e.g. "a photo of | thirty one | years
    /// old face." with `prefix_len` 3 and rank length 2.
    pub fn new(
        rows: &[Vec<u32>],
        n_ctx: usize,
        prefix_len: usize,
        rank_lens: &[usize],
        device: &Device,
    ) -> Result<Self> {
        if rows.len() < 2 {
            candle_core::bail!("prompts: need at least 2 ranks, got {}", rows.len())
        }
        if rank_lens.len() != rows.len() {
            candle_core::bail!(
                "prompts: {} rank lengths for {} ranks",
                rank_lens.len(),
                rows.len()
            )
        }
        let slot_start = 1 + n_ctx + prefix_len;
        let s = rows.iter().map(Vec::len).max().unwrap_or(0);
        for (i, (r, &len)) in rows.iter().zip(rank_lens).enumerate() {
            if len == 0 || r.len() < slot_start + len + 1 {
                candle_core::bail!(
                    "prompts: rank {i} has {} tokens, fewer than SOT + {n_ctx} context + {prefix_len} prefix + {len} rank token(s) + EOT (and a rank needs at least one token)",
                    r.len()
                )
            }
        }
        let slot_len = rank_lens.iter().copied().max().unwrap_or(1);
        if slot_start + slot_len > s {
            candle_core::bail!("prompts: the rank slot ends after the longest prompt")
        }
        let mut ids = vec![0u32; rows.len() * s];
        let mut eot = Vec::with_capacity(rows.len());
        for (i, r) in rows.iter().enumerate() {
            ids[i * s..i * s + r.len()].copy_from_slice(r);
            eot.push((i * s + r.len() - 1) as u32);
        }
        let m = rows.len();
        Ok(Self {
            ids: Tensor::from_vec(ids, (m, s), device)?,
            eot: Tensor::from_vec(eot, m, device)?,
            n_ctx,
            slot_start,
            slot_len,
            rank_lens: rank_lens.to_vec(),
        })
    }

    pub fn num_ranks(&self) -> usize {
        self.rank_lens.len()
    }

    /// `(m, T, 1)`: 1 where the slot holds a rank token of that rank.
    fn slot_mask(&self, device: &Device) -> Result<Tensor> {
        let t = self.slot_len;
        let v: Vec<f32> = self
            .rank_lens
            .iter()
            .flat_map(|&len| (0..t).map(move |j| if j < len { 1.0 } else { 0.0 }))
            .collect();
        Tensor::from_vec(v, (self.num_ranks(), t, 1), device)
    }
}

/// OrdinalCLIP's weighting of `K` base ranks for each of `M` ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Interpolation {
    /// `f = 1 − d/(M−1)`: blends all bases; does not reproduce a base at its anchor.
    Linear,
    /// `f = 1/(d + 1e-5)`: reproduces the anchors (weight ≈ 1).
    InvProp,
}

/// Row-normalised weights `(M, K)` (row-major) of OrdinalCLIP's rank interpolation:
/// anchors `b_k = linspace(0, M−1, K)` (`(M−1)/2` for `K = 1`), `d_ik = |i − b_k|`,
/// `W_ik = f(d_ik) / Σ_k f(d_ik)`.
pub fn interpolation_weights(m: usize, k: usize, kind: Interpolation) -> Vec<f64> {
    let top = (m.max(2) - 1) as f64;
    let anchors: Vec<f64> = if k == 1 {
        vec![top / 2.0]
    } else {
        (0..k).map(|j| top * j as f64 / (k - 1) as f64).collect()
    };
    let mut w = Vec::with_capacity(m * k);
    for i in 0..m {
        let f: Vec<f64> = anchors
            .iter()
            .map(|&b| {
                let d = (i as f64 - b).abs();
                match kind {
                    Interpolation::Linear => 1.0 - d / top,
                    Interpolation::InvProp => 1.0 / (d + 1e-5),
                }
            })
            .collect();
        let sum: f64 = f.iter().sum();
        w.extend(f.iter().map(|x| x / sum));
    }
    w
}

/// Shape of the RankFormer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankFormerConfig {
    /// Attention heads (must divide the text width).
    pub heads: usize,
    /// FFN hidden width as a multiple of the text width.
    #[serde(default = "default_ffn_mult")]
    pub ffn_mult: usize,
    /// Residual ratio α in `R' = (1 − α)R + α·f(R)`.
    pub alpha: f64,
}

fn default_ffn_mult() -> usize {
    4
}

impl Default for RankFormerConfig {
    fn default() -> Self {
        Self {
            heads: 8,
            ffn_mult: 4,
            alpha: 0.1,
        }
    }
}

/// L2RCLIP's RankFormer: LayerNorm, one token-wise self-attention layer across the `M`
/// templates at each slot position, and an FFN (GELU), blended into the templates with
/// ratio α. The FFN's output layer starts at zero, so `R' = (1 − α)R` at step 0.
#[derive(Clone, Debug)]
pub struct RankFormer {
    ln: LayerNorm,
    attn: Attention,
    fc1: Linear,
    fc2: Linear,
    alpha: f64,
}

impl RankFormer {
    pub fn new(width: usize, cfg: &RankFormerConfig, vb: VarBuilder) -> Result<Self> {
        if !(0.0..=1.0).contains(&cfg.alpha) {
            candle_core::bail!("rankformer: alpha must be in [0, 1], got {}", cfg.alpha)
        }
        let hidden = width * cfg.ffn_mult.max(1);
        Ok(Self {
            ln: LayerNorm::new(width, 1e-5, vb.pp("ln"))?,
            attn: Attention::new(
                width,
                cfg.heads,
                1,
                EncoderInit::TorchDefault,
                vb.pp("attn"),
            )?,
            fc1: linear(
                width,
                hidden,
                WeightInit::TorchDefault,
                Some(BiasInit::TorchDefault),
                vb.pp("fc1"),
            )?,
            fc2: linear(
                hidden,
                width,
                WeightInit::Normal(0.0),
                Some(BiasInit::Zero),
                vb.pp("fc2"),
            )?,
            alpha: cfg.alpha,
        })
    }

    /// `r`: `(m, T, d)` template embeddings; `valid`: `(m, T, 1)` slot mask. Returns the
    /// refined `(m, T, d)`. Invalid positions are neither attended to nor changed.
    pub fn forward(&self, r: &Tensor, valid: &Tensor) -> Result<Tensor> {
        let (m, t, _) = r.dims3()?;
        // Token-wise layout: each slot position is a batch row, the templates a sequence.
        let x = r.transpose(0, 1)?.contiguous()?;
        // Additive key mask (T, 1, 1, m): -inf where template j has no token at t.
        let keys = valid.squeeze(2)?.t()?.contiguous()?;
        let neg = ((keys.ones_like()? - &keys)? * -1e9)?
            .reshape((t, 1, 1, m))?
            .to_dtype(r.dtype())?;
        let h = self.attn.forward(&self.ln.forward(&x)?, Some(&neg))?;
        let f = self.fc2.forward(&self.fc1.forward(&h)?.gelu_erf()?)?;
        let f = f.transpose(0, 1)?;
        let refined = ((r * (1.0 - self.alpha))? + (f * self.alpha)?)?;
        // Keep invalid positions as they were.
        let valid = valid.to_dtype(r.dtype())?;
        refined.broadcast_mul(&valid)? + r.broadcast_mul(&(valid.ones_like()? - &valid)?)?
    }
}

/// How the rank slot is formed (see the module docs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum RankSlotConfig {
    Fixed,
    Learned,
    Interpolated {
        bases: usize,
        interpolation: Interpolation,
    },
    #[serde(rename = "rankformer")]
    RankFormer(RankFormerConfig),
}

enum RankSlot {
    Fixed,
    Learned(Tensor),
    Interpolated {
        delta: Tensor,
        weights: Tensor,
        anchors: Tensor,
    },
    RankFormer(RankFormer),
}

/// The prompts of all ranks and their learnable parts. Parameters (under `vb`):
/// `context` `(L, d)` ~ N(0, 0.02²); `rank_offset` `(M, T, d)` or `base_offset`
/// `(K, T, d)` at zero; `rankformer.*`.
pub struct PromptLearner {
    tokens: PromptTokens,
    /// `(m, s, d)` embeddings of the tokenized prompts (constants).
    embeds: Tensor,
    mask: Tensor,
    context: Option<Tensor>,
    slot: RankSlot,
}

impl PromptLearner {
    /// `embeds`: the frozen token embeddings of `tokens.ids` (`(m, s, d)`).
    pub fn new(
        tokens: PromptTokens,
        embeds: Tensor,
        cfg: &RankSlotConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let embeds = embeds.detach();
        let (m, s, d) = embeds.dims3()?;
        if tokens.ids.dims() != [m, s] {
            candle_core::bail!(
                "prompts: embeddings {:?} do not match token ids {:?}",
                embeds.dims(),
                tokens.ids.dims()
            )
        }
        let (l, t, start) = (tokens.n_ctx, tokens.slot_len, tokens.slot_start);
        let context = (l > 0)
            .then(|| {
                vb.get_with_hints(
                    (l, d),
                    "context",
                    Init::Randn {
                        mean: 0.0,
                        stdev: 0.02,
                    },
                )
            })
            .transpose()?;
        let slot = match cfg {
            RankSlotConfig::Fixed => RankSlot::Fixed,
            RankSlotConfig::Learned => {
                RankSlot::Learned(vb.get_with_hints((m, t, d), "rank_offset", Init::Const(0.0))?)
            }
            RankSlotConfig::Interpolated {
                bases,
                interpolation,
            } => {
                let k = *bases;
                if k == 0 || k > m {
                    candle_core::bail!("prompts: need 1 ≤ bases ≤ {m} ranks, got {k}")
                }
                let w = interpolation_weights(m, k, *interpolation);
                let weights =
                    Tensor::from_vec(w, (m, k), embeds.device())?.to_dtype(embeds.dtype())?;
                // Base k starts at the template of the rank nearest its anchor.
                let top = (m - 1) as f64;
                let idx: Vec<u32> = (0..k)
                    .map(|j| {
                        let b = if k == 1 {
                            top / 2.0
                        } else {
                            top * j as f64 / (k - 1) as f64
                        };
                        b.round() as u32
                    })
                    .collect();
                let idx = Tensor::from_vec(idx, k, embeds.device())?;
                // Only the anchor rank's own tokens: where it is shorter than the slot,
                // the base starts at zero rather than at the template word (or EOT)
                // that follows it there (decision 21: ranks never mix with templates).
                let own = tokens
                    .slot_mask(embeds.device())?
                    .to_dtype(embeds.dtype())?
                    .index_select(&idx, 0)?;
                let anchors = embeds
                    .narrow(1, start, t)?
                    .contiguous()?
                    .index_select(&idx, 0)?
                    .broadcast_mul(&own)?;
                RankSlot::Interpolated {
                    delta: vb.get_with_hints((k, t, d), "base_offset", Init::Const(0.0))?,
                    weights,
                    anchors,
                }
            }
            RankSlotConfig::RankFormer(c) => {
                RankSlot::RankFormer(RankFormer::new(d, c, vb.pp("rankformer"))?)
            }
        };
        let mask = tokens
            .slot_mask(embeds.device())?
            .to_dtype(embeds.dtype())?;
        Ok(Self {
            tokens,
            embeds,
            mask,
            context,
            slot,
        })
    }

    pub fn tokens(&self) -> &PromptTokens {
        &self.tokens
    }

    /// Prompt embeddings `(m, s, d)` for the text tower's `forward_embeds`.
    pub fn forward(&self) -> Result<Tensor> {
        let (m, s, d) = self.embeds.dims3()?;
        let (l, t, start) = (
            self.tokens.n_ctx,
            self.tokens.slot_len,
            self.tokens.slot_start,
        );
        let templates = self.embeds.narrow(1, start, t)?;
        let slot = match &self.slot {
            RankSlot::Fixed => templates.clone(),
            RankSlot::Learned(offset) => (&templates + offset.broadcast_mul(&self.mask)?)?,
            RankSlot::Interpolated {
                delta,
                weights,
                anchors,
            } => {
                let k = delta.dim(0)?;
                let bases = (anchors + delta)?.reshape((k, t * d))?;
                let mixed = weights.matmul(&bases)?.reshape((m, t, d))?;
                let keep = (self.mask.ones_like()? - &self.mask)?;
                (mixed.broadcast_mul(&self.mask)? + templates.broadcast_mul(&keep)?)?
            }
            RankSlot::RankFormer(rf) => rf.forward(&templates, &self.mask)?,
        };
        let mut parts = vec![self.embeds.narrow(1, 0, 1)?];
        if let Some(ctx) = &self.context {
            parts.push(ctx.unsqueeze(0)?.broadcast_as((m, l, d))?);
        }
        if start > 1 + l {
            parts.push(self.embeds.narrow(1, 1 + l, start - 1 - l)?);
        }
        parts.push(slot);
        let rest = s - start - t;
        if rest > 0 {
            parts.push(self.embeds.narrow(1, start + t, rest)?);
        }
        Tensor::cat(&parts, 1)
    }

    /// The ranks' unnormalised text features `(m, e)` through `encode`, which maps
    /// prompt embeddings and EOT indices to features (e.g. `ClipModel::encode_text_embeds`).
    pub fn text_features(
        &self,
        encode: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        encode(&self.forward()?, &self.tokens.eot)
    }
}
