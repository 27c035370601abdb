//! A `VarMap` backend whose fresh parameters are drawn from a seeded generator.
//!
//! candle's `VarMap` draws initial values from the thread RNG, so two runs with the same
//! seed start from different weights. [`SeededVarMap`] keeps a `VarMap` (so saving,
//! loading and `all_vars` work as usual) and creates each missing variable from a ChaCha
//! stream keyed by `(seed, name)`: values do not depend on the order in which modules
//! are built. Parameters already in the map (e.g. loaded from a checkpoint) are reused.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::{Init, VarBuilder, VarMap, var_builder::SimpleBackend};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A `VarMap` whose new variables are initialised from `(seed, name)`.
#[derive(Clone)]
pub struct SeededVarMap {
    map: VarMap,
    seed: u64,
    /// Names the model asked for, and names that came from [`SeededVarMap::preload`].
    requested: Arc<Mutex<HashSet<String>>>,
    preloaded: Arc<Mutex<HashSet<String>>>,
}

impl SeededVarMap {
    pub fn new(seed: u64) -> Self {
        Self {
            map: VarMap::new(),
            seed,
            requested: Arc::default(),
            preloaded: Arc::default(),
        }
    }

    /// Start from pretrained values: each tensor becomes a trainable variable under its
    /// name, and the model built afterwards uses it instead of a fresh draw. Call before
    /// building the model; the model's `VarBuilder` then checks every shape.
    pub fn preload(
        &self,
        tensors: impl IntoIterator<Item = (String, Tensor)>,
        dtype: DType,
        device: &Device,
    ) -> Result<()> {
        let mut data = self
            .map
            .data()
            .lock()
            .expect("invariant: var map lock is never poisoned");
        let mut preloaded = self
            .preloaded
            .lock()
            .expect("invariant: lock is never poisoned");
        for (name, t) in tensors {
            data.insert(
                name.clone(),
                Var::from_tensor(&t.to_dtype(dtype)?.to_device(device)?)?,
            );
            preloaded.insert(name);
        }
        Ok(())
    }

    /// After building a model on preloaded values: fail, naming them, if the model asked
    /// for parameters that were not preloaded (they would silently start random), and
    /// drop preloaded tensors the model did not use.
    pub fn finish_preload(&self) -> Result<()> {
        let requested = self
            .requested
            .lock()
            .expect("invariant: lock is never poisoned");
        let preloaded = self
            .preloaded
            .lock()
            .expect("invariant: lock is never poisoned");
        let mut missing: Vec<&String> = requested
            .iter()
            .filter(|n| !preloaded.contains(*n))
            .collect();
        if !missing.is_empty() {
            missing.sort();
            candle_core::bail!(
                "the checkpoint has no tensor for {} parameter(s): {missing:?}",
                missing.len()
            )
        }
        let mut data = self
            .map
            .data()
            .lock()
            .expect("invariant: var map lock is never poisoned");
        data.retain(|k, _| requested.contains(k));
        Ok(())
    }

    /// The underlying map: save/load, and the list of trainable variables.
    pub fn var_map(&self) -> &VarMap {
        &self.map
    }

    /// A `VarBuilder` that creates missing variables in this map.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// All variables with their names, sorted by name (a stable order for optimisers).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let data = self
            .map
            .data()
            .lock()
            .expect("invariant: var map lock is never poisoned");
        let mut vars: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }
}

/// FNV-1a, to turn a parameter name into a stream id.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Draw `n` values for `init` from `rng`. Kaiming hints are read as PyTorch's default
/// `Linear` init, U(±1/√fan_in), which is what every `Kaiming` use in this crate means.
fn sample(init: &Init, shape: &Shape, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let n = shape.elem_count();
    match *init {
        Init::Const(c) => vec![c as f32; n],
        Init::Uniform { lo, up } => (0..n).map(|_| rng.random_range(lo..up) as f32).collect(),
        Init::Randn { mean, stdev } => (0..n)
            .map(|_| {
                // Box–Muller; u1 in (0, 1] keeps the log finite.
                let u1: f64 = 1.0 - rng.random::<f64>();
                let u2: f64 = rng.random();
                let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                (mean + stdev * z) as f32
            })
            .collect(),
        Init::Kaiming { .. } => {
            let dims = shape.dims();
            let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
            let bound = 1.0 / (fan_in as f64).sqrt();
            (0..n)
                .map(|_| rng.random_range(-bound..bound) as f32)
                .collect()
        }
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.requested
            .lock()
            .expect("invariant: lock is never poisoned")
            .insert(name.to_string());
        let mut data = self
            .map
            .data()
            .lock()
            .expect("invariant: var map lock is never poisoned");
        if let Some(var) = data.get(name) {
            if var.shape() != &s {
                candle_core::bail!(
                    "parameter {name}: the model expects shape {:?}, the stored tensor has {:?}",
                    s.dims(),
                    var.shape().dims()
                )
            }
            return Ok(var.as_tensor().clone());
        }
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ name_hash(name));
        let values = sample(&h, &s, &mut rng);
        let tensor = Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&tensor)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let data = self
            .map
            .data()
            .lock()
            .expect("invariant: var map lock is never poisoned");
        match data.get(name) {
            Some(var) => var.as_tensor().to_dtype(dtype)?.to_device(dev),
            None => candle_core::bail!("parameter {name} is not in the var map"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        let data = self
            .map
            .data()
            .lock()
            .expect("invariant: var map lock is never poisoned");
        data.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_values_in_any_order() -> Result<()> {
        let dev = Device::Cpu;
        let a = SeededVarMap::new(7);
        let b = SeededVarMap::new(7);
        let va = a.var_builder(DType::F32, &dev);
        let vb = b.var_builder(DType::F32, &dev);
        let init = Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let x1 = va.get_with_hints(8, "x", init)?;
        let _ = va.get_with_hints(3, "y", init)?;
        let _ = vb.get_with_hints(3, "y", init)?;
        let x2 = vb.get_with_hints(8, "x", init)?;
        assert_eq!(x1.to_vec1::<f32>()?, x2.to_vec1::<f32>()?);
        let c = SeededVarMap::new(8)
            .var_builder(DType::F32, &dev)
            .get_with_hints(8, "x", init)?;
        assert_ne!(x1.to_vec1::<f32>()?, c.to_vec1::<f32>()?);
        Ok(())
    }

    #[test]
    fn shape_mismatch_names_parameter_and_shapes() {
        let dev = Device::Cpu;
        let m = SeededVarMap::new(0);
        let vb = m.var_builder(DType::F32, &dev);
        vb.get_with_hints((2, 3), "w", Init::Const(0.0)).unwrap();
        let err = vb
            .get_with_hints((3, 2), "w", Init::Const(0.0))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("w") && err.contains("[3, 2]") && err.contains("[2, 3]"),
            "{err}"
        );
    }
}
