//! The ModifiedResNet image tower against open_clip v3.3.0 on a small random-weight model
//! (`tests/fixtures/gen_open_clip_rn50.py`): eval- and train-mode features, the BatchNorm
//! running-statistics update, and every parameter's gradient; then RN50's parameter count and
//! keys, which gradients OpenAI's initialisation leaves at zero, and errors on wrong input.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use rankalign_models::resnet::is_buffer;
use rankalign_models::{ModifiedResNet, ResNetConfig, SeededVarMap};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// The shape `gen_open_clip_rn50.py` builds.
fn small() -> ResNetConfig {
    ResNetConfig {
        layers: [2, 1, 1, 1],
        width: 6,
        image_size: 64,
        heads: 2,
        embed_dim: 32,
    }
}

fn load(name: &str) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(format!("{FIXTURES}/{name}"), &Device::Cpu)
}

fn max_abs(a: &Tensor) -> Result<f32> {
    a.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    max_abs(&(a - b)?)
}

/// The small model on the fixture's weights, loaded the way the trainer loads a checkpoint.
fn small_from_fixture() -> Result<(ModifiedResNet, SeededVarMap, HashMap<String, Tensor>)> {
    let dev = Device::Cpu;
    let state = load("open_clip_rn_small.safetensors")?;
    let vm = SeededVarMap::new(0);
    vm.preload(state.clone(), DType::F32, &dev)?;
    let model = ModifiedResNet::new(&small(), vm.var_builder(DType::F32, &dev).pp("visual"))?;
    // The checkpoint's `num_batches_tracked` are not model variables: dropped, not an error.
    vm.finish_preload()?;
    Ok((model, vm, state))
}

#[test]
fn matches_open_clip_in_eval_and_train_mode_with_gradients() -> Result<()> {
    let (model, vm, state) = small_from_fixture()?;
    let io = load("open_clip_rn_small_io.safetensors")?;
    let grads_ref = load("open_clip_rn_small_grads.safetensors")?;
    let vars: HashMap<String, Var> = vm.named_vars().into_iter().collect();
    let used = state
        .keys()
        .filter(|k| !k.ends_with("num_batches_tracked"))
        .count();
    assert_eq!(
        vars.len(),
        used,
        "every checkpoint tensor is a model variable"
    );
    let buffers = model.buffer_names();
    let snapshot = |name: &String| vars[name].as_tensor().to_vec1::<f32>();
    let before: Vec<Vec<f32>> = buffers.iter().map(snapshot).collect::<Result<_>>()?;

    let pixels = &io["pixel_values"];
    let eval = model.forward_t(pixels, false)?;
    let e_eval = max_abs_diff(&eval, &io["eval_features"])?;
    let after_eval: Vec<Vec<f32>> = buffers.iter().map(snapshot).collect::<Result<_>>()?;
    assert_eq!(
        before, after_eval,
        "eval mode leaves the running statistics alone"
    );

    let train = model.forward_t(pixels, true)?;
    let e_train = max_abs_diff(&train, &io["train_features"])?;
    assert!(max_abs_diff(&eval, &train)? > 1e-2, "modes should differ");

    // The VarMap's own variables now hold open_clip's updated statistics.
    let mut e_stats = 0f32;
    for name in &buffers {
        let reference = &io[&format!("after_train.{name}")];
        e_stats = e_stats.max(max_abs_diff(vars[name].as_tensor(), reference)?);
    }
    let n_ref = io.keys().filter(|k| k.starts_with("after_train.")).count();
    assert_eq!(buffers.len(), n_ref);

    // d(sum(train · w))/dθ for every parameter; error relative to the tensor's largest
    // reference entry, or to a thousandth of the largest gradient overall for tensors whose
    // gradient is (mathematically) zero, like attnpool.k_proj.bias.
    let loss = (&train * &io["loss_weights"])?.sum_all()?;
    let grads = loss.backward()?;
    let scale = grads_ref
        .values()
        .map(max_abs)
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .fold(0f32, f32::max);
    let mut e_grad = (0f32, String::new());
    for (name, var) in &vars {
        if is_buffer(name) {
            assert!(
                grads.get(var).is_none(),
                "{name} is a buffer but got a gradient"
            );
            continue;
        }
        let got = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let reference = &grads_ref[&format!("grad.{name}")];
        let rel = max_abs_diff(got, reference)? / max_abs(reference)?.max(1e-3 * scale);
        if rel > e_grad.0 {
            e_grad = (rel, name.clone());
        }
    }
    assert_eq!(
        vars.keys().filter(|k| !is_buffer(k)).count(),
        grads_ref.len()
    );
    eprintln!(
        "resnet parity with open_clip, max |Δ|: eval {e_eval:e}, train {e_train:e}, \
         running stats {e_stats:e}; gradients: max relative {:e} ({})",
        e_grad.0, e_grad.1
    );
    assert!(
        e_eval < 1e-4 && e_train < 1e-4 && e_stats < 1e-5 && e_grad.0 < 1e-3,
        "eval {e_eval:e}, train {e_train:e}, stats {e_stats:e}, grad {e_grad:?}"
    );
    Ok(())
}

/// Parameters upstream of a bottleneck's `bn3` in its residual branch: with OpenAI's
/// `bn3.weight = 0` the branch outputs a constant, so their gradient is exactly zero until
/// `bn3.weight` moves. `bn3` itself, the shortcut, the stem and the pool do get gradients.
fn residual_branch_before_bn3(name: &str) -> bool {
    let mut parts = name.split('.');
    let (Some(stage), Some(_block), Some(module)) = (parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    stage.starts_with("layer") && matches!(module, "conv1" | "conv2" | "conv3" | "bn1" | "bn2")
}

/// `attnpool.k_proj.bias` adds the same `q·b` to every attention logit of a query, which
/// softmax ignores: its gradient is zero up to rounding, in open_clip too.
const SOFTMAX_INVARIANT: &str = "attnpool.k_proj.bias";

#[test]
fn gradients_reach_every_parameter_that_openai_init_does_not_block() -> Result<()> {
    let dev = Device::Cpu;
    let vm = SeededVarMap::new(5);
    let model = ModifiedResNet::new(&small(), vm.var_builder(DType::F32, &dev))?;
    let io = load("open_clip_rn_small_io.safetensors")?;
    let vars = vm.named_vars();

    let grad_sizes = || -> Result<Vec<(String, f32)>> {
        let out = model.forward_t(&io["pixel_values"], true)?;
        let grads = (out * &io["loss_weights"])?.sum_all()?.backward()?;
        let mut sizes = Vec::new();
        for (name, var) in &vars {
            match (is_buffer(name), grads.get(var)) {
                (true, None) => {}
                (true, Some(_)) => candle_core::bail!("{name} is a buffer but got a gradient"),
                (false, None) => candle_core::bail!("{name}: no gradient"),
                (false, Some(g)) => sizes.push((name.clone(), max_abs(g)?)),
            }
        }
        Ok(sizes)
    };

    let sizes = grad_sizes()?;
    let top = sizes.iter().map(|(_, g)| *g).fold(0f32, f32::max);
    assert!(top > 0.0);
    for (name, g) in &sizes {
        if residual_branch_before_bn3(name) {
            assert_eq!(*g, 0.0, "{name}: blocked by bn3.weight = 0");
        } else if name == SOFTMAX_INVARIANT {
            assert!(*g <= 1e-5 * top, "{name}: {g:e}");
        } else {
            assert!(*g > 1e-7 * top, "{name}: gradient {g:e}");
        }
    }
    assert!(sizes.iter().any(|(n, _)| residual_branch_before_bn3(n)));

    // Once bn3 moves off zero, everything but the softmax-invariant bias learns.
    for (name, var) in &vars {
        if name.ends_with("bn3.weight") && name.starts_with("layer") {
            var.set(&Tensor::full(0.5f32, var.shape(), &dev)?)?;
        }
    }
    let sizes = grad_sizes()?;
    let top = sizes.iter().map(|(_, g)| *g).fold(0f32, f32::max);
    for (name, g) in &sizes {
        if name == SOFTMAX_INVARIANT {
            assert!(*g <= 1e-5 * top, "{name}: {g:e}");
        } else {
            assert!(*g > 1e-7 * top, "{name}: gradient {g:e}");
        }
    }
    Ok(())
}

/// Every parameter name with its shape, in the order the model asked for them.
type Recorded = Vec<(String, Vec<usize>)>;

/// A backend that hands out zeros and remembers every name and shape.
#[derive(Clone, Default)]
struct Names(Arc<Mutex<Recorded>>);

impl SimpleBackend for Names {
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

#[test]
fn rn50_has_open_clip_parameter_count_and_keys() -> Result<()> {
    let names = Names::default();
    let vb = VarBuilder::from_backend(Box::new(names.clone()), DType::F32, Device::Cpu);
    let model = ModifiedResNet::new(&ResNetConfig::rn50(), vb.pp("visual"))?;
    let recorded = names.0.lock().unwrap().clone();
    let params: usize = recorded
        .iter()
        .filter(|(n, _)| !is_buffer(n))
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    // sum(p.numel() for p in open_clip.create_model("RN50").visual.parameters()) with
    // open_clip 3.3.0, printed by gen_open_clip_rn50.py; running statistics are buffers.
    assert_eq!(params, 38_316_896);

    let mut buffers: Vec<String> = recorded
        .iter()
        .filter(|(n, _)| is_buffer(n))
        .map(|(n, _)| n.clone())
        .collect();
    let mut listed = model.buffer_names();
    buffers.sort();
    listed.sort();
    assert_eq!(listed, buffers);

    let shapes: HashMap<String, Vec<usize>> = recorded.into_iter().collect();
    for (key, shape) in [
        ("visual.conv1.weight", &[32, 3, 3, 3][..]),
        ("visual.bn3.running_var", &[64]),
        ("visual.layer1.0.downsample.0.weight", &[256, 64, 1, 1]),
        ("visual.layer1.0.downsample.1.running_mean", &[256]),
        ("visual.layer3.5.conv2.weight", &[256, 256, 3, 3]),
        ("visual.layer4.2.bn3.weight", &[2048]),
        ("visual.attnpool.positional_embedding", &[50, 2048]),
        ("visual.attnpool.q_proj.weight", &[2048, 2048]),
        ("visual.attnpool.c_proj.weight", &[1024, 2048]),
        ("visual.attnpool.c_proj.bias", &[1024]),
    ] {
        assert_eq!(shapes.get(key).map(|s| &s[..]), Some(shape), "{key}");
    }
    assert!(!shapes.contains_key("visual.layer1.1.downsample.0.weight"));
    Ok(())
}

#[test]
fn wrong_input_is_an_error_naming_the_shapes() -> Result<()> {
    let dev = Device::Cpu;
    let vb = SeededVarMap::new(1).var_builder(DType::F32, &dev);
    let model = ModifiedResNet::new(&ResNetConfig::tiny(), vb.clone())?;
    let ok = Tensor::zeros((1, 3, 64, 64), DType::F32, &dev)?;
    assert_eq!(model.forward_t(&ok, false)?.dims(), [1, 32]);
    assert_eq!(model.forward_t(&ok, true)?.dims(), [1, 32]);

    for dims in [&[2, 3, 32, 32][..], &[2, 1, 64, 64], &[3, 64, 64]] {
        let bad = Tensor::zeros(dims, DType::F32, &dev)?;
        let err = model.forward_t(&bad, false).unwrap_err().to_string();
        assert!(
            err.contains("resnet image tower")
                && err.contains("(b, 3, 64, 64)")
                && err.contains(&format!("{dims:?}")),
            "{err}"
        );
    }

    let cfg = ResNetConfig {
        image_size: 100,
        ..ResNetConfig::tiny()
    };
    let err = ModifiedResNet::new(&cfg, vb).unwrap_err().to_string();
    assert!(err.contains("image size 100"), "{err}");
    Ok(())
}
