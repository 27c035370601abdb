//! AdamW (Loshchilov & Hutter 2019) with two parameter groups and saved moments.
//!
//! Update per parameter, with bias correction, decoupled decay and `t` the step count:
//! `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
//! `θ ← θ·(1 − lr·wd) − lr·(m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε)`.
//! As open_clip, parameters with fewer than two dimensions, norms, biases and
//! `logit_scale` get no decay.
//!
//! candle's `AdamW` keeps its moments private, so a resumed run would restart them; here
//! they are tensors saved beside the weights. On the CPU with f32 the update runs as one
//! fused pass over the slices (one read of θ, g, m, v and one write each), instead of a
//! dozen tensor ops that each allocate; elsewhere it is composed from tensor ops.

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Layout, Storage, Tensor, Var};

use crate::{Result, TrainError};

/// Hyper-parameters other than the learning rate, which is given per step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

struct ParamState {
    name: String,
    var: Var,
    decay: bool,
    m: Tensor,
    v: Tensor,
}

/// AdamW over named variables.
pub struct AdamW {
    params: Vec<ParamState>,
    cfg: AdamWConfig,
    t: usize,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("params", &self.params.len())
            .field("t", &self.t)
            .finish()
    }
}

/// Whether a parameter is exempt from weight decay (open_clip's rule).
pub fn exempt_from_decay(name: &str, var: &Var) -> bool {
    var.rank() < 2
        || ["bias", "norm", "layrnorm", "logit_scale"]
            .iter()
            .any(|k| name.contains(k))
}

fn f32_slice<'a>(storage: &'a Storage, layout: &Layout) -> Option<&'a [f32]> {
    match storage {
        Storage::Cpu(cpu) => {
            let (a, b) = layout.contiguous_offsets()?;
            cpu.as_slice::<f32>().ok().map(|s| &s[a..b])
        }
        _ => None,
    }
}

impl AdamW {
    /// `vars` in a stable order (e.g. sorted by name).
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                let decay = !exempt_from_decay(&name, &var);
                let m = var.as_tensor().zeros_like()?;
                let v = var.as_tensor().zeros_like()?;
                Ok(ParamState {
                    name,
                    var,
                    decay,
                    m,
                    v,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { params, cfg, t: 0 })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> usize {
        self.t
    }

    /// Names of the parameters that receive weight decay.
    pub fn decayed(&self) -> impl Iterator<Item = &str> {
        self.params
            .iter()
            .filter(|p| p.decay)
            .map(|p| p.name.as_str())
    }

    /// One update with learning rate `lr`; parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.t += 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        let bc1 = 1.0 - beta1.powi(self.t as i32);
        let bc2 = 1.0 - beta2.powi(self.t as i32);
        for p in &mut self.params {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let wd = if p.decay { weight_decay } else { 0.0 };
            if !Self::fused_cpu(p, g, lr, wd, (beta1, beta2, eps), (bc1, bc2))? {
                let m = ((&p.m * beta1)? + (g * (1.0 - beta1))?)?;
                let v = ((&p.v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + eps)?)?;
                let theta = p.var.as_tensor();
                let next = ((theta * (1.0 - lr * wd))? - (update * lr)?)?;
                p.var.set(&next.detach())?;
                p.m = m.detach();
                p.v = v.detach();
            }
        }
        Ok(())
    }

    /// The update in one pass over CPU f32 slices; `false` if the tensors are not that.
    fn fused_cpu(
        p: &mut ParamState,
        g: &Tensor,
        lr: f64,
        wd: f64,
        betas: (f64, f64, f64),
        bc: (f64, f64),
    ) -> Result<bool> {
        let (beta1, beta2, eps) = (betas.0 as f32, betas.1 as f32, betas.2 as f32);
        let (bc1, bc2) = (bc.0 as f32, bc.1 as f32);
        let (lr, decay) = (lr as f32, (1.0 - lr * wd) as f32);
        let theta = p.var.as_tensor();
        let (new_t, new_m, new_v) = {
            let (ts, tl) = theta.storage_and_layout();
            let (gs, gl) = g.storage_and_layout();
            let (ms, ml) = p.m.storage_and_layout();
            let (vs, vl) = p.v.storage_and_layout();
            let (Some(t), Some(g), Some(m), Some(v)) = (
                f32_slice(&ts, tl),
                f32_slice(&gs, gl),
                f32_slice(&ms, ml),
                f32_slice(&vs, vl),
            ) else {
                return Ok(false);
            };
            if g.len() != t.len() {
                return Ok(false);
            }
            let n = t.len();
            let (mut nt, mut nm, mut nv) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            for i in 0..n {
                let mi = beta1 * m[i] + (1.0 - beta1) * g[i];
                let vi = beta2 * v[i] + (1.0 - beta2) * g[i] * g[i];
                let upd = (mi / bc1) / ((vi / bc2).sqrt() + eps);
                nt.push(t[i] * decay - lr * upd);
                nm.push(mi);
                nv.push(vi);
            }
            (nt, nm, nv)
        };
        let shape = theta.shape().clone();
        let dev = theta.device().clone();
        p.var.set(&Tensor::from_vec(new_t, shape.clone(), &dev)?)?;
        p.m = Tensor::from_vec(new_m, shape.clone(), &dev)?;
        p.v = Tensor::from_vec(new_v, shape, &dev)?;
        Ok(true)
    }

    /// Moments as `{name}.m` / `{name}.v` tensors, for a checkpoint.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for p in &self.params {
            out.insert(format!("{}.m", p.name), p.m.clone());
            out.insert(format!("{}.v", p.name), p.v.clone());
        }
        out
    }

    /// Restore moments and the step count; every parameter must be present with its shape.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        t: usize,
        path: &Path,
    ) -> Result<()> {
        let err = |msg: String| TrainError::Checkpoint {
            path: path.to_path_buf(),
            msg,
        };
        for p in &mut self.params {
            for (suffix, slot) in [("m", &mut p.m), ("v", &mut p.v)] {
                let key = format!("{}.{suffix}", p.name);
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| err(format!("optimizer state has no tensor {key}")))?;
                if t.shape() != p.var.shape() {
                    return Err(err(format!(
                        "{key} has shape {:?}, the parameter has {:?}",
                        t.dims(),
                        p.var.dims()
                    )));
                }
                *slot = t
                    .to_dtype(DType::F32)?
                    .to_device(p.var.device())?
                    .to_dtype(p.var.dtype())?;
            }
        }
        self.t = t;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The fused CPU pass and the composed ops give the same update, and both match
    /// a hand computation of the first step (m̂ = g, v̂ = g², so θ moves by lr·g/(|g|+ε)).
    #[test]
    fn fused_and_composed_agree_with_hand_values() -> Result<()> {
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let run = |dtype: DType| -> Result<Vec<f32>> {
            let w = Var::from_tensor(
                &Tensor::new(&[[1.0f32, -2.0], [0.5, 3.0]], &Device::Cpu)?.to_dtype(dtype)?,
            )?;
            let mut opt = AdamW::new(vec![("w".into(), w.clone())], cfg)?;
            for _ in 0..3 {
                let loss = w.as_tensor().sqr()?.sum_all()?;
                opt.step(&loss.backward()?, 0.01)?;
            }
            Ok(w.as_tensor()
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?)
        };
        let fused = run(DType::F32)?;
        let composed = run(DType::F64)?;
        for (a, b) in fused.iter().zip(&composed) {
            assert!((a - b).abs() < 1e-6, "{fused:?} vs {composed:?}");
        }
        // One step by hand: θ₁ = θ₀(1 − 0.01·0.1) − 0.01·sign(θ₀).
        let w = Var::new(&[[2.0f32]], &Device::Cpu)?;
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], cfg)?;
        opt.step(&w.as_tensor().sqr()?.sum_all()?.backward()?, 0.01)?;
        let got = w.as_tensor().flatten_all()?.to_vec1::<f32>()?[0];
        assert!((got - (2.0 * 0.999 - 0.01)).abs() < 1e-6, "{got}");
        Ok(())
    }

    #[test]
    fn decay_groups_follow_open_clip() {
        let dev = Device::Cpu;
        let mat = Var::zeros((2, 2), DType::F32, &dev).unwrap();
        let vec = Var::zeros(2, DType::F32, &dev).unwrap();
        assert!(!exempt_from_decay(
            "text_model.encoder.layers.0.mlp.fc1.weight",
            &mat
        ));
        assert!(exempt_from_decay(
            "text_model.encoder.layers.0.mlp.fc1.bias",
            &vec
        ));
        assert!(exempt_from_decay(
            "vision_model.embeddings.class_embedding",
            &vec
        ));
        assert!(exempt_from_decay(
            "logit_scale",
            &Var::zeros((), DType::F32, &dev).unwrap()
        ));
    }
}
