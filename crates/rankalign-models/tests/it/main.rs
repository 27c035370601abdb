//! Model shapes and presets: parameter counts against the published checkpoints, the
//! HF key layout, output shapes, errors on wrong input, and a forward pass against
//! Hugging Face `transformers.CLIPModel` and open_clip on their own checkpoints.

mod minilm;
mod parity;
mod prompt;
mod resnet;
mod rn_clip;

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use rankalign_models::{ClipConfig, ClipModel, SeededVarMap};

/// A backend that hands out zeros and remembers every parameter's name and shape.
#[derive(Default)]
pub(crate) struct Recorder(pub(crate) std::sync::Mutex<Vec<(String, Vec<usize>)>>);

impl SimpleBackend for Recorder {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.0
            .lock()
            .unwrap()
            .push((name.to_string(), s.dims().to_vec()));
        Tensor::zeros(s, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("{name}: not recorded")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

/// A [`Recorder`] shared with the test that reads it afterwards.
pub(crate) struct Shared(pub(crate) std::sync::Arc<Recorder>);

impl SimpleBackend for Shared {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.0.get(s, name, h, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.0.get_unchecked(name, dtype, dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}

fn params(cfg: &ClipConfig) -> Vec<(String, Vec<usize>)> {
    let rec = std::sync::Arc::new(Recorder::default());
    let vb = VarBuilder::from_backend(Box::new(Shared(rec.clone())), DType::F32, Device::Cpu);
    ClipModel::new(cfg, vb).unwrap();

    rec.0.lock().unwrap().clone()
}

/// 149,620,737 is the parameter count of `openai/clip-vit-base-patch16` (151,277,313 of
/// `-patch32`, 427,616,513 of `clip-vit-large-patch14`) as Hugging Face's `CLIPModel`
/// reports it.
#[test]
fn vit_b_presets_have_the_published_parameter_counts() {
    let count = |cfg: &ClipConfig| {
        params(cfg)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum::<usize>()
    };
    assert_eq!(count(&ClipConfig::vit_b16()), 149_620_737);
    assert_eq!(count(&ClipConfig::vit_b32()), 151_277_313);
    assert_eq!(count(&ClipConfig::vit_l14()), 427_616_513);
}

#[test]
fn keys_follow_the_hugging_face_layout() {
    let names: Vec<String> = params(&ClipConfig::vit_b16())
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for key in [
        "logit_scale",
        "visual_projection.weight",
        "text_projection.weight",
        "vision_model.embeddings.class_embedding",
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.embeddings.position_embedding.weight",
        "vision_model.pre_layrnorm.weight",
        "vision_model.encoder.layers.11.self_attn.q_proj.bias",
        "vision_model.encoder.layers.0.mlp.fc2.weight",
        "vision_model.post_layernorm.bias",
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
        "text_model.encoder.layers.11.layer_norm2.weight",
        "text_model.final_layer_norm.weight",
    ] {
        assert!(names.iter().any(|n| n == key), "missing {key}");
    }
}

#[test]
fn tiny_forward_shapes_and_bad_input() -> Result<()> {
    let dev = Device::Cpu;
    let cfg = ClipConfig::tiny();
    let vm = SeededVarMap::new(0);
    let model = ClipModel::new(&cfg, vm.var_builder(DType::F32, &dev))?;
    let pixels = Tensor::zeros((2, 3, 48, 48), DType::F32, &dev)?;
    assert_eq!(model.encode_image(&pixels)?.dims(), [2, 64]);
    let ids = Tensor::new(&[[49406u32, 320, 49407, 0], [49406, 320, 275, 49407]], &dev)?;
    let eot = Tensor::new(&[2u32, 7], &dev)?;
    assert_eq!(model.encode_text(&ids, &eot)?.dims(), [2, 64]);

    let wrong = Tensor::zeros((2, 3, 32, 32), DType::F32, &dev)?;
    let err = model.encode_image(&wrong).unwrap_err().to_string();
    assert!(
        err.contains("vision tower") && err.contains("48") && err.contains("32"),
        "{err}"
    );
    let long = Tensor::zeros((1, 40), DType::U32, &dev)?;
    let err = model
        .encode_text(&long, &Tensor::new(&[39u32], &dev)?)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("40 tokens exceed the context length 32"),
        "{err}"
    );
    Ok(())
}

/// The EOT feature does not depend on padding after it (causal attention).
#[test]
fn padding_after_eot_does_not_change_the_text_feature() -> Result<()> {
    let dev = Device::Cpu;
    let model = ClipModel::new(
        &ClipConfig::tiny(),
        SeededVarMap::new(4).var_builder(DType::F32, &dev),
    )?;
    let short = model.encode_text(
        &Tensor::new(&[[49406u32, 320, 275, 49407]], &dev)?,
        &Tensor::new(&[3u32], &dev)?,
    )?;
    let padded = model.encode_text(
        &Tensor::new(&[[49406u32, 320, 275, 49407, 0, 0, 0]], &dev)?,
        &Tensor::new(&[3u32], &dev)?,
    )?;
    let diff = (short - padded)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff < 1e-5, "{diff}");
    Ok(())
}

/// Inference weights (plain tensors, no graph) take the fused softmax in attention, a
/// pre-transposed weight in `Linear` and the inference forms that fold the residual add
/// and QuickGELU into the products; a model of `Var`s takes the composed ops and the
/// transposed view. Both towers give the same embeddings either way.
#[test]
fn inference_forward_matches_the_differentiable_one() -> Result<()> {
    let dev = Device::Cpu;
    let cfg = ClipConfig::tiny();
    let vm = SeededVarMap::new(7);
    let trainable = ClipModel::new(&cfg, vm.var_builder(DType::F32, &dev))?;
    let weights = vm
        .named_vars()
        .into_iter()
        .map(|(name, var)| (name, var.as_tensor().detach()))
        .collect();
    let frozen = ClipModel::new(&cfg, VarBuilder::from_tensors(weights, DType::F32, &dev))?;
    let pixels = Tensor::randn(0f32, 1.0, (3, 3, 48, 48), &dev)?;
    let ids = Tensor::new(
        &[
            [49406u32, 320, 275, 1125, 49407, 0],
            [49406, 8, 49407, 0, 0, 0],
            [49406, 12, 13, 14, 15, 49407],
        ],
        &dev,
    )?;
    let eot = Tensor::new(&[4u32, 8, 17], &dev)?;
    let pairs = [
        (
            trainable.encode_image(&pixels)?,
            frozen.encode_image(&pixels)?,
        ),
        (
            trainable.encode_text(&ids, &eot)?,
            frozen.encode_text(&ids, &eot)?,
        ),
    ];
    for (graph, plain) in pairs {
        assert!(graph.track_op() && !plain.track_op());
        let scale = graph.abs()?.max_all()?.to_scalar::<f32>()?;
        let diff = (graph - plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
        // The two softmax forms agree bit for bit; the frozen `Linear`'s matmul reads a
        // contiguous Wᵀ, which gemm may sum in another order, and the inference forms
        // add the residual and the bias in another order (the bound is the same).
        assert!(diff <= 1e-5 * scale, "max |Δ| = {diff} at scale {scale}");
    }
    Ok(())
}

/// The encoder's pooled path (the last layer's queries, output projection and MLP on
/// the kept rows only) gives the full forward's rows, and the same gradients for every
/// parameter and for the input: without a mask, with a causal one, and with a padding
/// mask per item.
#[test]
fn pooled_rows_match_the_full_encoder() -> Result<()> {
    use rankalign_models::layers::{Encoder, EncoderInit, EncoderShape};
    let dev = Device::Cpu;
    let (b, s, w) = (3, 7, 16);
    let shape = EncoderShape {
        width: w,
        layers: 2,
        heads: 2,
        mlp_dim: 32,
        eps: 1e-5,
    };
    let vm = SeededVarMap::new(3);
    let encoder = Encoder::new(
        &shape,
        EncoderInit::OpenAiText,
        vm.var_builder(DType::F32, &dev),
    )?;
    // Fixed inputs (candle's CPU randn takes no seed): a hash of each index in [-1, 1).
    let fixed = |shape: (usize, usize), salt: f64| -> Result<Tensor> {
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|i| {
                ((((i as f64 + salt) * 12.9898).sin() * 43758.5453).fract() * 2.0 - 1.0) as f32
            })
            .collect();
        Tensor::from_vec(v, shape, &dev)
    };
    let xs = candle_core::Var::from_tensor(&fixed((b * s, w), 0.5)?.reshape((b, s, w))?)?;
    let rows = Tensor::new(&[0u32, 9, 20, 9], &dev)?;
    let causal: Vec<f32> = (0..s * s)
        .map(|i| {
            if i % s > i / s {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let causal = Tensor::from_vec(causal, (s, s), &dev)?;
    // One per item (the last `item + 1` tokens hidden): the full attention's path.
    let padding: Vec<f32> = (0..b * s)
        .map(|i| {
            if i % s + i / s + 1 >= s {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let padding = Tensor::from_vec(padding, (b, 1, 1, s), &dev)?;
    let weights = fixed((4, w), 1000.5)?;
    let close = |a: &Tensor, b: &Tensor, what: &str| -> Result<()> {
        let scale = a.abs()?.max_all()?.to_scalar::<f32>()?;
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(scale > 0.0, "{what}: all zero");
        assert!(
            diff <= 1e-5 * scale,
            "{what}: max |Δ| = {diff} at scale {scale}"
        );
        Ok(())
    };
    for mask in [None, Some(&causal), Some(&padding)] {
        let full = encoder
            .forward(xs.as_tensor(), mask)?
            .reshape((b * s, w))?
            .index_select(&rows, 0)?;
        let pooled = encoder.forward_rows(xs.as_tensor(), mask, &rows)?;
        assert_eq!(pooled.dims(), [4, w]);
        close(&full, &pooled, "values")?;
        let g_full = (full * &weights)?.sum_all()?.backward()?;
        let g_pooled = (pooled * &weights)?.sum_all()?.backward()?;
        close(
            g_full.get(&xs).expect("input gradient"),
            g_pooled.get(&xs).expect("input gradient"),
            "input",
        )?;
        let grads: Vec<_> = vm
            .named_vars()
            .into_iter()
            .map(|(name, var)| {
                let pair = (g_full.get(&var).cloned(), g_pooled.get(&var).cloned());
                (name, pair)
            })
            .collect();
        let mut largest = 0f32;
        for (name, (a, _)) in &grads {
            let a = a.as_ref().expect(name);
            largest = largest.max(a.abs()?.max_all()?.to_scalar::<f32>()?);
        }
        for (name, (a, p)) in &grads {
            let (a, p) = (a.as_ref().expect(name), p.as_ref().expect(name));
            if name.ends_with("k_proj.bias") {
                // Softmax ignores a shift shared by every key: zero up to rounding.
                for g in [a, p] {
                    let g = g.abs()?.max_all()?.to_scalar::<f32>()?;
                    assert!(g <= 1e-5 * largest, "{name}: {g} against {largest}");
                }
                continue;
            }
            close(a, p, name)?;
        }
    }
    Ok(())
}
