//! Building blocks shared by both towers: LayerNorm, Linear, multi-head attention,
//! the QuickGELU MLP, and the pre-LN transformer encoder.
//!
//! Parameter names follow Hugging Face `CLIPEncoderLayer` (`layer_norm1`,
//! `self_attn.{q,k,v,out}_proj`, `layer_norm2`, `mlp.fc1`, `mlp.fc2`).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// `y = x Wᵀ + b` over the last dimension, with `W` `(out, in)`: one fused node
/// (`rankalign_kernels::linear`), which flattens input of any rank to one matmul and adds
/// the bias in place. (`candle_nn::Linear` broadcasts `W` over the batch instead, and
/// the backward of that broadcast materialises one weight-sized gradient per batch row
/// before summing: measured here, it made the backward pass of the tiny CLIP 4× slower
/// than its forward.)
///
/// A weight that is not a `Var` (inference: weights from a file) is frozen, so its
/// storage is made `Wᵀ` `(in, out)`, contiguous, and `W` is kept as a transposed view of
/// it: gemm then packs its right-hand side from rows instead of gathering a transposed
/// view on every call (measured on one thread: the ViT-B/16 forward at batch 1 from 360
/// to 300 ms; at batch 8 no change, as each packed block serves more rows). `Var`
/// weights change in place during training and keep their `(out, in)` storage.
#[derive(Clone, Debug)]
pub struct Linear {
    /// `W` `(out, in)`; for a frozen weight, a transposed view of a contiguous `Wᵀ`.
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let weight = if weight.is_variable() {
            weight
        } else {
            weight.t()?.contiguous()?.t()?
        };
        Ok(Self { weight, bias })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `residual + self(xs)`: without a graph, one product onto `residual + b`
    /// (`rankalign_kernels::linear_add`).
    pub fn forward_add(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        rankalign_kernels::linear_add(xs, &self.weight, self.bias.as_ref(), residual)
    }

    /// `quick_gelu(self(xs))`: without a graph, the bias and QuickGELU in one pass
    /// after the product (`rankalign_kernels::linear_quick_gelu`).
    pub fn forward_quick_gelu(&self, xs: &Tensor) -> Result<Tensor> {
        rankalign_kernels::linear_quick_gelu(xs, &self.weight, self.bias.as_ref())
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        rankalign_kernels::linear(xs, &self.weight, self.bias.as_ref())
    }
}

/// LayerNorm with a backward pass (see `rankalign_kernels::layer_norm`).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        rankalign_kernels::layer_norm(xs, &self.weight, &self.bias, self.eps)
    }
}

/// How a layer's weights are drawn at initialisation.
#[derive(Clone, Copy, Debug)]
pub enum WeightInit {
    /// N(0, std²), as OpenAI's text-tower initialisation.
    Normal(f64),
    /// PyTorch's `nn.Linear` default: U(±1/√fan_in).
    TorchDefault,
    /// Xavier-uniform, PyTorch's default for `nn.MultiheadAttention.in_proj_weight`.
    XavierUniform,
}

/// How a layer's bias is drawn at initialisation.
#[derive(Clone, Copy, Debug)]
pub enum BiasInit {
    Zero,
    /// PyTorch's `nn.Linear` default: U(±1/√fan_in).
    TorchDefault,
}

/// A `Linear` layer `(out, in)` with explicit initialisation.
pub fn linear(
    in_dim: usize,
    out_dim: usize,
    weight: WeightInit,
    bias: Option<BiasInit>,
    vb: VarBuilder,
) -> Result<Linear> {
    let bound = 1.0 / (in_dim as f64).sqrt();
    let w_init = match weight {
        WeightInit::Normal(std) => Init::Randn {
            mean: 0.0,
            stdev: std,
        },
        WeightInit::TorchDefault => Init::Uniform {
            lo: -bound,
            up: bound,
        },
        WeightInit::XavierUniform => {
            let a = (6.0 / (in_dim + out_dim) as f64).sqrt();
            Init::Uniform { lo: -a, up: a }
        }
    };
    let w = vb.get_with_hints((out_dim, in_dim), "weight", w_init)?;
    let b = match bias {
        None => None,
        Some(BiasInit::Zero) => Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?),
        Some(BiasInit::TorchDefault) => Some(vb.get_with_hints(
            out_dim,
            "bias",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?),
    };
    Linear::new(w, b)
}

/// Initialisation of one encoder, as OpenAI CLIP does it per tower.
#[derive(Clone, Copy, Debug)]
pub enum EncoderInit {
    /// The text tower: attention std width^-½, output projections std
    /// width^-½·(2·layers)^-½, `fc1` std (2·width)^-½; biases keep PyTorch defaults.
    OpenAiText,
    /// The vision tower, which OpenAI leaves at PyTorch's module defaults.
    TorchDefault,
}

/// `x · sigmoid(1.702 x)`, OpenAI CLIP's activation (one fused node on the CPU).
pub fn quick_gelu(xs: &Tensor) -> Result<Tensor> {
    rankalign_kernels::quick_gelu(xs)
}

/// Multi-head self-attention with separate q/k/v projections (HF layout).
#[derive(Clone, Debug)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

impl Attention {
    pub fn new(
        width: usize,
        heads: usize,
        layers: usize,
        init: EncoderInit,
        vb: VarBuilder,
    ) -> Result<Self> {
        if heads == 0 || !width.is_multiple_of(heads) {
            candle_core::bail!("attention: width {width} is not divisible by {heads} heads")
        }
        let (qkv, out) = match init {
            EncoderInit::OpenAiText => {
                let attn_std = (width as f64).powf(-0.5);
                let proj_std = attn_std * ((2 * layers) as f64).powf(-0.5);
                (WeightInit::Normal(attn_std), WeightInit::Normal(proj_std))
            }
            EncoderInit::TorchDefault => (WeightInit::XavierUniform, WeightInit::TorchDefault),
        };
        // PyTorch's MultiheadAttention zeroes its in-projection and out-projection biases.
        let bias = Some(BiasInit::Zero);
        Ok(Self {
            q_proj: linear(width, width, qkv, bias, vb.pp("q_proj"))?,
            k_proj: linear(width, width, qkv, bias, vb.pp("k_proj"))?,
            v_proj: linear(width, width, qkv, bias, vb.pp("v_proj"))?,
            out_proj: linear(width, width, out, bias, vb.pp("out_proj"))?,
            heads,
        })
    }

    /// `xs` is `(b, s, width)`; `mask`, if any, is an additive `(s, s)` mask.
    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        self.out_proj.forward(&self.attend(xs, mask)?)
    }

    /// The heads' outputs for the query rows `rows` alone (u32 flat indices
    /// `item · s + position`), `(rows, width)`, before the output projection: each row
    /// attends over its own item's keys under its position's mask row. Only those rows'
    /// queries are projected; the keys and values are every token's. A mask that is not
    /// one `(s, s)` for all items and heads takes the full attention and keeps the rows.
    fn attend_rows(&self, xs: &Tensor, mask: Option<&Tensor>, rows: &Tensor) -> Result<Tensor> {
        let (b, s, w) = xs.dims3()?;
        let mask = match mask.map(|m| m.broadcast_as((1, 1, s, s))) {
            None => None,
            Some(Ok(m)) => Some(m.reshape((s, s))?),
            Some(Err(_)) => {
                return self
                    .attend(xs, mask)?
                    .reshape((b * s, w))?
                    .index_select(rows, 0);
            }
        };
        let (h, d) = (self.heads, w / self.heads);
        let r = rows.dim(0)?;
        // Each row's item and position, in u32 on the rows' device (no copy to the host).
        let s_u32 = Tensor::new(s as u32, rows.device())?;
        let items = rows.broadcast_div(&s_u32)?;
        let positions = (rows - items.broadcast_mul(&s_u32)?)?;
        let (q, (k, v)) = rayon::join(
            || {
                self.q_proj
                    .forward(&xs.reshape((b * s, w))?.index_select(rows, 0)?)
            },
            || rayon::join(|| self.k_proj.forward(xs), || self.v_proj.forward(xs)),
        );
        // (r, heads, s, d): each row's item's keys or values.
        let per_row = |t: Tensor| -> Result<Tensor> {
            t.index_select(&items, 0)?
                .reshape((r, s, h, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = (q? * (d as f64).powf(-0.5))?.reshape((r, h, 1, d))?;
        let mut att = q.matmul(&per_row(k?)?.t()?)?;
        if let Some(m) = mask {
            let m = m.to_dtype(att.dtype())?.index_select(&positions, 0)?;
            att = att.broadcast_add(&m.reshape((r, 1, 1, s))?)?;
        }
        rankalign_kernels::softmax_last_dim(&att)?
            .matmul(&per_row(v?)?)?
            .reshape((r, w))
    }

    /// The heads' outputs `(b, s, width)` before the output projection.
    fn attend(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        // One node (ours): the heads read through strides of the projections' layout, in
        // parallel, with a backward; the composed reference's values to f32 rounding
        // (tested in rankalign-kernels).
        // The three projections as parallel tasks: one fork-join for the three, and
        // a thread done with its share of one takes work from the others.
        let (q, (k, v)) = rayon::join(
            || self.q_proj.forward(xs),
            || rayon::join(|| self.k_proj.forward(xs), || self.v_proj.forward(xs)),
        );
        rankalign_kernels::attention(&q?, &k?, &v?, self.heads, mask)
    }
}

/// `fc2(quick_gelu(fc1(x)))`.
#[derive(Clone, Debug)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    pub fn new(
        width: usize,
        hidden: usize,
        layers: usize,
        init: EncoderInit,
        vb: VarBuilder,
    ) -> Result<Self> {
        let (w1, w2) = match init {
            EncoderInit::OpenAiText => {
                let fc_std = (2.0 * width as f64).powf(-0.5);
                let proj_std = (width as f64).powf(-0.5) * ((2 * layers) as f64).powf(-0.5);
                (WeightInit::Normal(fc_std), WeightInit::Normal(proj_std))
            }
            EncoderInit::TorchDefault => (WeightInit::TorchDefault, WeightInit::TorchDefault),
        };
        let bias = Some(BiasInit::TorchDefault);
        Ok(Self {
            fc1: linear(width, hidden, w1, bias, vb.pp("fc1"))?,
            fc2: linear(hidden, width, w2, bias, vb.pp("fc2"))?,
        })
    }
}

impl Mlp {
    /// `residual + self(xs)`, the MLP's residual connection fused as in
    /// [`Linear::forward_add`].
    pub fn forward_add(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.fc2
            .forward_add(&self.fc1.forward_quick_gelu(xs)?, residual)
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward_quick_gelu(xs)?)
    }
}

/// One pre-LN residual block: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Clone, Debug)]
pub struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    mlp: Mlp,
}

/// Shape of a transformer encoder.
#[derive(Clone, Copy, Debug)]
pub struct EncoderShape {
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub mlp_dim: usize,
    pub eps: f64,
}

impl EncoderLayer {
    pub fn new(shape: &EncoderShape, init: EncoderInit, vb: VarBuilder) -> Result<Self> {
        let EncoderShape {
            width,
            layers,
            heads,
            mlp_dim,
            eps,
        } = *shape;
        Ok(Self {
            layer_norm1: LayerNorm::new(width, eps, vb.pp("layer_norm1"))?,
            self_attn: Attention::new(width, heads, layers, init, vb.pp("self_attn"))?,
            layer_norm2: LayerNorm::new(width, eps, vb.pp("layer_norm2"))?,
            mlp: Mlp::new(width, mlp_dim, layers, init, vb.pp("mlp"))?,
        })
    }

    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let heads = self
            .self_attn
            .attend(&self.layer_norm1.forward(xs)?, mask)?;
        self.mlp_block(&self.self_attn.out_proj.forward_add(&heads, xs)?)
    }

    /// As [`EncoderLayer::forward`], keeping only the rows `rows` (u32 flat indices
    /// `item · s + position`): returns `(rows, width)`. The keys and values are every
    /// token's, but the queries, the output projection and the MLP run on the kept rows
    /// alone.
    pub fn forward_rows(
        &self,
        xs: &Tensor,
        mask: Option<&Tensor>,
        rows: &Tensor,
    ) -> Result<Tensor> {
        let (b, s, w) = xs.dims3()?;
        let keep = |t: &Tensor| t.reshape((b * s, w))?.index_select(rows, 0);
        let heads = self
            .self_attn
            .attend_rows(&self.layer_norm1.forward(xs)?, mask, rows)?;
        self.mlp_block(&self.self_attn.out_proj.forward_add(&heads, &keep(xs)?)?)
    }

    /// `x + mlp(ln2(x))`.
    fn mlp_block(&self, xs: &Tensor) -> Result<Tensor> {
        self.mlp.forward_add(&self.layer_norm2.forward(xs)?, xs)
    }
}

/// A stack of [`EncoderLayer`]s under `encoder.layers.{i}`.
#[derive(Clone, Debug)]
pub struct Encoder {
    layers: Vec<EncoderLayer>,
}

impl Encoder {
    pub fn new(shape: &EncoderShape, init: EncoderInit, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("layers");
        let layers = (0..shape.layers)
            .map(|i| EncoderLayer::new(shape, init, vb.pp(i.to_string())))
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        self.layers
            .iter()
            .try_fold(xs.clone(), |xs, layer| layer.forward(&xs, mask))
    }

    /// The rows `rows` (u32 flat indices `item · s + position`) of
    /// [`Encoder::forward`]'s output, `(rows, width)`: what a tower pooling one token
    /// per item (CLIP's class or end-of-text token) reads. The last layer runs its
    /// queries, output projection and MLP on those rows only (see
    /// [`EncoderLayer::forward_rows`]; under a mask that differs by item, every
    /// token's queries), which skips about 7% of a ViT-B/16's work; the values are the
    /// full forward's to rounding.
    pub fn forward_rows(
        &self,
        xs: &Tensor,
        mask: Option<&Tensor>,
        rows: &Tensor,
    ) -> Result<Tensor> {
        let Some((last, rest)) = self.layers.split_last() else {
            let (b, s, w) = xs.dims3()?;
            return xs.reshape((b * s, w))?.index_select(rows, 0);
        };
        let xs = rest
            .iter()
            .try_fold(xs.clone(), |xs, layer| layer.forward(&xs, mask))?;
        last.forward_rows(&xs, mask, rows)
    }
}
