//! CLIP's ModifiedResNet image tower (Radford et al. 2021, "Learning Transferable Visual
//! Models From Natural Language Supervision", §2.4; reference: openai/CLIP `model.py` and
//! open_clip v3.3.0 `modified_resnet.py`, commit 30573618).
//!
//! Changes from torchvision's ResNet: a stem of three 3×3 convolutions and an average pool
//! instead of one 7×7 convolution and a max pool; anti-aliased downsampling (every strided
//! convolution becomes an average pool followed by a stride-1 convolution, in the main branch
//! and in the shortcut); and an attention pool instead of global average pooling.
//!
//! Parameter names are the OpenAI / open_clip state-dict keys (`conv1.weight`,
//! `layer1.0.downsample.1.running_var`, `attnpool.q_proj.weight`, …), so an open_clip or
//! OpenAI checkpoint's `visual.*` subtree loads with `vb.pp("visual")`.
//!
//! BatchNorm has real train and eval modes ([`ModifiedResNet::forward_t`]). Running statistics
//! come through the `VarBuilder` like parameters, so a `VarMap` saves and loads them under their
//! checkpoint names, but they are buffers: they never receive a gradient, train mode overwrites
//! them in place, and an optimiser should be given the variables that are not in
//! [`ModifiedResNet::buffer_names`] (see [`is_buffer`]).
//!
//! Only average pools are used, whose backward in candle 0.11 is right when the pooled size
//! divides the input (it upsamples the gradient with nearest-neighbour); [`ResNetConfig`]
//! therefore requires the image size to be a multiple of 32, which makes every pooled
//! feature map even.

use candle_core::{D, DType, Module, ModuleT, Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::layers::{BiasInit, Linear, WeightInit, linear};

/// Shape of the ModifiedResNet image tower.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResNetConfig {
    /// Bottleneck blocks in each of the four stages.
    pub layers: [usize; 4],
    /// Channels of the stem output and of the first stage's bottleneck; the feature map
    /// entering the attention pool has `32 · width` channels.
    pub width: usize,
    pub image_size: usize,
    /// Attention-pool heads (open_clip: `32 · width / 64`).
    pub heads: usize,
    /// Output dimension of the attention pool's `c_proj`.
    pub embed_dim: usize,
}

impl ResNetConfig {
    /// OpenAI CLIP RN50 at 224 px.
    pub fn rn50() -> Self {
        Self {
            layers: [3, 4, 6, 3],
            width: 64,
            image_size: 224,
            heads: 32,
            embed_dim: 1024,
        }
    }

    /// A tiny tower for tests: 64 px, feature width 256.
    pub fn tiny() -> Self {
        Self {
            layers: [1, 1, 1, 1],
            width: 8,
            image_size: 64,
            heads: 2,
            embed_dim: 32,
        }
    }

    /// Channels entering the attention pool.
    pub fn feature_dim(&self) -> usize {
        self.width * 32
    }

    /// Side of the feature map entering the attention pool.
    pub fn grid(&self) -> usize {
        self.image_size / 32
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.image_size == 0 || !self.image_size.is_multiple_of(32) {
            candle_core::bail!(
                "resnet: image size {} is not a positive multiple of 32",
                self.image_size
            )
        }
        if self.width < 2 || !self.width.is_multiple_of(2) {
            candle_core::bail!("resnet: width {} is not a positive even number", self.width)
        }
        if self.heads == 0 || !self.feature_dim().is_multiple_of(self.heads) {
            candle_core::bail!(
                "resnet: feature width {} (32 · width {}) is not divisible by {} heads",
                self.feature_dim(),
                self.width,
                self.heads
            )
        }
        if self.layers.contains(&0) || self.embed_dim == 0 {
            candle_core::bail!(
                "resnet: every stage needs a block and embed_dim must be positive, got layers {:?}, embed_dim {}",
                self.layers,
                self.embed_dim
            )
        }
        Ok(())
    }
}

/// Whether a parameter name is a BatchNorm buffer (`running_mean`, `running_var`,
/// `num_batches_tracked`) rather than a trainable parameter.
pub fn is_buffer(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    matches!(last, "running_mean" | "running_var" | "num_batches_tracked")
}

/// A bias-free convolution weight `(c_out, c_in, k, k)` with PyTorch's `Conv2d` default
/// initialisation, which OpenAI keeps: kaiming-uniform with a = √5, i.e. U(±1/√fan_in).
fn conv_weight(c_in: usize, c_out: usize, k: usize, vb: &VarBuilder) -> Result<Tensor> {
    let bound = 1.0 / ((c_in * k * k) as f64).sqrt();
    vb.get_with_hints(
        (c_out, c_in, k, k),
        "weight",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )
}

/// `BatchNorm2d` with PyTorch's semantics (eps 1e-5, momentum 0.1).
///
/// Train mode normalises with the batch statistics (biased variance over `(b, h, w)`) and
/// moves the running statistics towards them, using the unbiased variance; eval mode uses the
/// running statistics. Either way the gradient reaches `weight`, `bias` and the input, and
/// never the running statistics.
///
/// candle's `candle_nn::BatchNorm` computes the same thing (checked in candle-nn 0.11.1:
/// biased variance for normalising, `n/(n-1)` for the running variance, differentiable), but
/// its constructor from a `VarBuilder` fixes the weight's initialisation at one, while CLIP
/// zero-initialises `bn3`, and it transposes the whole activation to `(c, b·h·w)` and back.
#[derive(Clone, Debug)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    channels: usize,
    name: String,
}

const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

impl BatchNorm2d {
    /// `weight_init` is the weight's initial value (1, or 0 for CLIP's `bn3`).
    pub fn new(channels: usize, weight_init: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", Init::Const(weight_init))?;
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.0))?;
        // From a `VarMap` these are the map's own variables, so `set` below updates what the
        // map saves; from a plain tensor source `Var::from_tensor` takes a private copy.
        let running_mean =
            Var::from_tensor(&vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?)?;
        let running_var =
            Var::from_tensor(&vb.get_with_hints(channels, "running_var", Init::Const(1.0))?)?;
        Ok(Self {
            weight,
            bias,
            running_mean,
            running_var,
            channels,
            name: vb.prefix(),
        })
    }

    /// The checkpoint names of the two running statistics.
    pub fn buffer_names(&self) -> [String; 2] {
        let join = |s: &str| {
            if self.name.is_empty() {
                s.to_string()
            } else {
                format!("{}.{s}", self.name)
            }
        };
        [join("running_mean"), join("running_var")]
    }

    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }

    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }

    fn forward_train(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let n = b * h * w;
        if n < 2 {
            candle_core::bail!(
                "batch norm {}: train mode needs more than one value per channel, got input {:?}",
                self.name,
                xs.dims()
            )
        }
        // Statistics in f32 for half-precision inputs, as PyTorch does.
        let dtype = xs.dtype();
        let xs = match dtype {
            DType::F16 | DType::BF16 => xs.to_dtype(DType::F32)?,
            _ => xs.clone(),
        };
        // Reduce over the contiguous last axis first, then over the batch: candle's fast path.
        let per_channel = |t: &Tensor| -> Result<Tensor> {
            (t.reshape((b, c, h * w))?.sum_keepdim(2)?.sum_keepdim(0)? / n as f64)?
                .reshape((1, c, 1, 1))
        };
        let mean = per_channel(&xs)?;
        let centered = xs.broadcast_sub(&mean)?;
        let var = per_channel(&centered.sqr()?)?;
        let weight = self.weight.to_dtype(xs.dtype())?.reshape((1, c, 1, 1))?;
        let bias = self.bias.to_dtype(xs.dtype())?.reshape((1, c, 1, 1))?;
        let scale = (var.affine(1.0, BN_EPS)?.sqrt()?.recip()? * weight)?;
        let ys = centered.broadcast_mul(&scale)?.broadcast_add(&bias)?;

        let stat_dtype = self.running_mean.dtype();
        let update = |running: &Var, batch: Tensor| -> Result<()> {
            let batch = batch.detach().flatten_all()?.to_dtype(stat_dtype)?;
            let next =
                ((running.as_detached_tensor() * (1.0 - BN_MOMENTUM))? + (batch * BN_MOMENTUM)?)?;
            running.set(&next)
        };
        update(&self.running_mean, mean)?;
        update(&self.running_var, (var * (n as f64 / (n - 1) as f64))?)?;
        ys.to_dtype(dtype)
    }

    fn forward_eval(&self, xs: &Tensor) -> Result<Tensor> {
        let c = self.channels;
        let dtype = xs.dtype();
        let mean = self.running_mean.as_detached_tensor().to_dtype(dtype)?;
        let var = self.running_var.as_detached_tensor().to_dtype(dtype)?;
        let scale = (var.affine(1.0, BN_EPS)?.sqrt()?.recip()? * &self.weight)?;
        let shift = (&self.bias - (mean * &scale)?)?;
        xs.broadcast_mul(&scale.reshape((1, c, 1, 1))?)?
            .broadcast_add(&shift.reshape((1, c, 1, 1))?)
    }
}

impl ModuleT for BatchNorm2d {
    /// `xs`: `(b, channels, h, w)`.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let dims = xs.dims();
        if dims.len() != 4 || dims[1] != self.channels {
            candle_core::bail!(
                "batch norm {}: expected (b, {}, h, w), got {:?}",
                self.name,
                self.channels,
                dims
            )
        }
        if train {
            self.forward_train(xs)
        } else {
            self.forward_eval(xs)
        }
    }
}

/// `avg_pool2d(k)` that refuses sizes it would floor: candle's backward assumes none.
/// A bias-free convolution (`padding`, `stride`) followed by BatchNorm in the given mode.
fn conv_bn(
    xs: &Tensor,
    conv: &Tensor,
    bn: &BatchNorm2d,
    padding: usize,
    stride: usize,
    train: bool,
) -> Result<Tensor> {
    bn.forward_t(&xs.conv2d(conv, padding, stride, 1, 1)?, train)
}

fn avg_pool(xs: &Tensor, k: usize) -> Result<Tensor> {
    let (_, _, h, w) = xs.dims4()?;
    if !h.is_multiple_of(k) || !w.is_multiple_of(k) {
        candle_core::bail!("resnet: average pool {k} does not divide the feature map {h}×{w}")
    }
    xs.avg_pool2d(k)
}

/// One bottleneck block: 1×1, 3×3 (then an average pool when strided), 1×1 expanding 4×,
/// each followed by BatchNorm; ReLU after the first two and after the residual sum.
#[derive(Clone, Debug)]
struct Bottleneck {
    conv1: Tensor,
    bn1: BatchNorm2d,
    conv2: Tensor,
    bn2: BatchNorm2d,
    conv3: Tensor,
    bn3: BatchNorm2d,
    /// Average pool (if strided), 1×1 convolution, BatchNorm: keys `downsample.{0,1}`.
    downsample: Option<(Tensor, BatchNorm2d)>,
    stride: usize,
}

const EXPANSION: usize = 4;

impl Bottleneck {
    fn new(in_planes: usize, planes: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let out = planes * EXPANSION;
        let downsample = if stride > 1 || in_planes != out {
            let vb = vb.pp("downsample");
            Some((
                conv_weight(in_planes, out, 1, &vb.pp("0"))?,
                BatchNorm2d::new(out, 1.0, vb.pp("1"))?,
            ))
        } else {
            None
        };
        Ok(Self {
            conv1: conv_weight(in_planes, planes, 1, &vb.pp("conv1"))?,
            bn1: BatchNorm2d::new(planes, 1.0, vb.pp("bn1"))?,
            conv2: conv_weight(planes, planes, 3, &vb.pp("conv2"))?,
            bn2: BatchNorm2d::new(planes, 1.0, vb.pp("bn2"))?,
            conv3: conv_weight(planes, out, 1, &vb.pp("conv3"))?,
            // OpenAI's initialisation: each residual branch starts as zero.
            bn3: BatchNorm2d::new(out, 0.0, vb.pp("bn3"))?,
            downsample,
            stride,
        })
    }

    fn batch_norms(&self) -> impl Iterator<Item = &BatchNorm2d> {
        [&self.bn1, &self.bn2, &self.bn3]
            .into_iter()
            .chain(self.downsample.as_ref().map(|(_, bn)| bn))
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let ys = conv_bn(xs, &self.conv1, &self.bn1, 0, 1, train)?.relu()?;
        let ys = conv_bn(&ys, &self.conv2, &self.bn2, 1, 1, train)?.relu()?;
        let ys = if self.stride > 1 {
            avg_pool(&ys, self.stride)?
        } else {
            ys
        };
        let ys = conv_bn(&ys, &self.conv3, &self.bn3, 0, 1, train)?;
        let shortcut = match &self.downsample {
            None => xs.clone(),
            Some((conv, bn)) => {
                let xs = if self.stride > 1 {
                    avg_pool(xs, self.stride)?
                } else {
                    xs.clone()
                };
                conv_bn(&xs, conv, bn, 0, 1, train)?
            }
        };
        (ys + shortcut)?.relu()
    }
}

/// Attention pooling: the mean of the feature map, prepended as a token, queries the
/// `(h·w + 1)` tokens (with a learned position embedding) through multi-head attention;
/// `c_proj` maps the result to `embed_dim`.
#[derive(Clone, Debug)]
struct AttentionPool2d {
    positional_embedding: Tensor,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    c_proj: Linear,
    heads: usize,
}

impl AttentionPool2d {
    fn new(cfg: &ResNetConfig, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.feature_dim();
        let tokens = cfg.grid() * cfg.grid() + 1;
        let positional_embedding = vb.get_with_hints(
            (tokens, dim),
            "positional_embedding",
            Init::Randn {
                mean: 0.0,
                stdev: (dim as f64).powf(-0.5),
            },
        )?;
        // OpenAI's initialize_parameters: N(0, c_proj.in_features^-1) for the four weights;
        // biases keep PyTorch's Linear default.
        let w = WeightInit::Normal((dim as f64).powf(-0.5));
        let b = Some(BiasInit::TorchDefault);
        Ok(Self {
            positional_embedding,
            q_proj: linear(dim, dim, w, b, vb.pp("q_proj"))?,
            k_proj: linear(dim, dim, w, b, vb.pp("k_proj"))?,
            v_proj: linear(dim, dim, w, b, vb.pp("v_proj"))?,
            c_proj: linear(dim, cfg.embed_dim, w, b, vb.pp("c_proj"))?,
            heads: cfg.heads,
        })
    }

    /// `xs`: `(b, c, h, w)`. Returns `(b, embed_dim)`.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let tokens = xs.reshape((b, c, h * w))?.transpose(1, 2)?;
        let mean = tokens.mean_keepdim(1)?;
        let tokens = Tensor::cat(&[&mean, &tokens], 1)?
            .broadcast_add(&self.positional_embedding)?
            .contiguous()?;
        let len = h * w + 1;
        let head_dim = c / self.heads;
        // Only the mean token's output is kept, so it is the only query.
        let q = (self.q_proj.forward(&tokens.narrow(1, 0, 1)?)? * (head_dim as f64).powf(-0.5))?
            .reshape((b, self.heads, 1, head_dim))?;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, len, self.heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let k = split(self.k_proj.forward(&tokens)?)?;
        let v = split(self.v_proj.forward(&tokens)?)?;
        // `softmax_last_dim` has no backward in candle-nn 0.11; `softmax` is plain ops.
        let att = candle_nn::ops::softmax(&q.matmul(&k.t()?)?, D::Minus1)?;
        let out = att.matmul(&v)?.reshape((b, c))?;
        self.c_proj.forward(&out)
    }
}

/// The ModifiedResNet image tower, from pixels to the attention pool's output.
#[derive(Clone, Debug)]
pub struct ModifiedResNet {
    conv1: Tensor,
    bn1: BatchNorm2d,
    conv2: Tensor,
    bn2: BatchNorm2d,
    conv3: Tensor,
    bn3: BatchNorm2d,
    stages: [Vec<Bottleneck>; 4],
    attnpool: AttentionPool2d,
    cfg: ResNetConfig,
}

impl ModifiedResNet {
    /// Parameters and running statistics live under `vb` as OpenAI's `visual.*` keys (without
    /// the `visual.` prefix: pass `vb.pp("visual")` for a whole-CLIP checkpoint).
    ///
    /// Fresh parameters follow OpenAI's `initialize_parameters`: convolutions keep PyTorch's
    /// default U(±1/√fan_in), BatchNorm weights are one except each block's `bn3` (zero),
    /// biases zero, running statistics (0, 1); the attention pool's four weights are
    /// N(0, 1/(32·width)), its biases U(±1/√fan_in) and its position embedding N(0, 1/(32·width)).
    pub fn new(cfg: &ResNetConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let half = cfg.width / 2;
        let mut in_planes = cfg.width;
        let mut make_stage = |i: usize| -> Result<Vec<Bottleneck>> {
            let planes = cfg.width << i;
            let stride = if i == 0 { 1 } else { 2 };
            let vb = vb.pp(format!("layer{}", i + 1));
            (0..cfg.layers[i])
                .map(|j| {
                    let block = Bottleneck::new(
                        in_planes,
                        planes,
                        if j == 0 { stride } else { 1 },
                        vb.pp(j.to_string()),
                    )?;
                    in_planes = planes * EXPANSION;
                    Ok(block)
                })
                .collect()
        };
        let stages = [
            make_stage(0)?,
            make_stage(1)?,
            make_stage(2)?,
            make_stage(3)?,
        ];
        Ok(Self {
            conv1: conv_weight(3, half, 3, &vb.pp("conv1"))?,
            bn1: BatchNorm2d::new(half, 1.0, vb.pp("bn1"))?,
            conv2: conv_weight(half, half, 3, &vb.pp("conv2"))?,
            bn2: BatchNorm2d::new(half, 1.0, vb.pp("bn2"))?,
            conv3: conv_weight(half, cfg.width, 3, &vb.pp("conv3"))?,
            bn3: BatchNorm2d::new(cfg.width, 1.0, vb.pp("bn3"))?,
            stages,
            attnpool: AttentionPool2d::new(cfg, vb.pp("attnpool"))?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ResNetConfig {
        &self.cfg
    }

    /// Every BatchNorm, stem first, then the blocks in order.
    pub fn batch_norms(&self) -> Vec<&BatchNorm2d> {
        let mut out = vec![&self.bn1, &self.bn2, &self.bn3];
        for block in self.stages.iter().flatten() {
            out.extend(block.batch_norms());
        }
        out
    }

    /// Full names of the running statistics (`…bn1.running_mean`, `…running_var`): variables
    /// that a `VarMap` holds and saves but an optimiser must not be given.
    pub fn buffer_names(&self) -> Vec<String> {
        self.batch_norms()
            .into_iter()
            .flat_map(|bn| bn.buffer_names())
            .collect()
    }

    /// `pixels`: `(b, 3, image_size, image_size)`. Returns `(b, embed_dim)`.
    ///
    /// With `train` BatchNorm normalises with batch statistics and updates its running
    /// statistics in place; without it, it uses them and changes nothing.
    pub fn forward_t(&self, pixels: &Tensor, train: bool) -> Result<Tensor> {
        let s = self.cfg.image_size;
        let dims = pixels.dims();
        if dims.len() != 4 || dims[1] != 3 || dims[2] != s || dims[3] != s {
            candle_core::bail!("resnet image tower: expected images (b, 3, {s}, {s}), got {dims:?}")
        }
        let xs = conv_bn(pixels, &self.conv1, &self.bn1, 1, 2, train)?.relu()?;
        let xs = conv_bn(&xs, &self.conv2, &self.bn2, 1, 1, train)?.relu()?;
        let xs = conv_bn(&xs, &self.conv3, &self.bn3, 1, 1, train)?.relu()?;
        let mut xs = avg_pool(&xs, 2)?;
        for block in self.stages.iter().flatten() {
            xs = block.forward_t(&xs, train)?;
        }
        self.attnpool.forward(&xs)
    }
}

impl ModuleT for ModifiedResNet {
    fn forward_t(&self, pixels: &Tensor, train: bool) -> Result<Tensor> {
        ModifiedResNet::forward_t(self, pixels, train)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_recognised_by_name() {
        assert!(is_buffer("visual.layer1.0.bn3.running_var"));
        assert!(is_buffer("bn1.num_batches_tracked"));
        assert!(!is_buffer("visual.layer1.0.bn3.weight"));
        assert!(!is_buffer("attnpool.positional_embedding"));
    }

    #[test]
    fn configs_are_checked() {
        assert!(ResNetConfig::rn50().validate().is_ok());
        let bad = ResNetConfig {
            image_size: 200,
            ..ResNetConfig::rn50()
        };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("200") && err.contains("32"), "{err}");
        let bad = ResNetConfig {
            heads: 3,
            ..ResNetConfig::tiny()
        };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("256") && err.contains("3 heads"), "{err}");
    }
}
