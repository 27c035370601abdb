//! AdamW (Loshchilov & Hutter 2019) with two parameter groups and saved moments.
//!
//! Update per parameter, with bias correction, decoupled decay and `t` the step count:
//! `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
//! `θ ← θ·(1 − lr·wd) − lr·(m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε)`.
//! As open_clip, parameters with fewer than two dimensions, norms, biases and
//! `logit_scale` get no decay.
//!
//! candle's `AdamW` keeps its moments private, so a resumed run would restart them; here
//! they are tensors saved beside the weights. On the CPU with f32 the update runs in
//! place, as one pass over θ, g, m and v split into blocks across the rayon pool, with
//! the moments kept as host vectors: nothing is allocated per step. Elsewhere it is
//! composed from tensor ops.

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Layout, Tensor, Var};

use crate::{Result, TrainError};

/// Hyper-parameters other than the learning rate, which is given per step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// The first and second moments of one parameter.
enum Moments {
    /// CPU f32: updated in place with the parameter.
    Host { m: Vec<f32>, v: Vec<f32> },
    /// Any other device or dtype: tensors, replaced each step.
    Tensors { m: Tensor, v: Tensor },
}

struct ParamState {
    name: String,
    var: Var,
    decay: bool,
    moments: Moments,
}

/// Elements per block of the in-place update (one rayon task each).
const BLOCK: usize = 1 << 14;

/// One AdamW update in place: `θ` is the destination, the gradient the source, the
/// moments borrowed from the optimiser for the call.
struct InPlaceAdamW<'a> {
    moments: std::cell::RefCell<Option<(&'a mut [f32], &'a mut [f32])>>,
    lr: f32,
    decay: f32,
    betas: (f32, f32),
    eps: f32,
    bc: (f32, f32),
}

impl candle_core::InplaceOp2 for InPlaceAdamW<'_> {
    fn name(&self) -> &'static str {
        "adamw-in-place"
    }

    fn cpu_fwd(
        &self,
        theta: &mut candle_core::CpuStorage,
        tl: &Layout,
        grad: &candle_core::CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let (Some((t0, t1)), Some((g0, g1))) = (tl.contiguous_offsets(), gl.contiguous_offsets())
        else {
            candle_core::bail!("adamw: parameter or gradient is not contiguous")
        };
        let (candle_core::CpuStorage::F32(theta), candle_core::CpuStorage::F32(grad)) =
            (theta, grad)
        else {
            candle_core::bail!("adamw: the in-place update takes f32")
        };
        let (theta, grad) = (&mut theta[t0..t1], &grad[g0..g1]);
        let Some((m, v)) = self.moments.borrow_mut().take() else {
            candle_core::bail!("adamw: the update ran twice")
        };
        if grad.len() != theta.len() || m.len() != theta.len() || v.len() != theta.len() {
            candle_core::bail!("adamw: parameter, gradient and moments differ in size")
        }
        let (b1, b2) = self.betas;
        let (bc1, bc2) = self.bc;
        let (lr, decay, eps) = (self.lr, self.decay, self.eps);
        theta
            .par_chunks_mut(BLOCK)
            .zip(grad.par_chunks(BLOCK))
            .zip(m.par_chunks_mut(BLOCK))
            .zip(v.par_chunks_mut(BLOCK))
            .for_each(|(((t, g), m), v)| {
                for (((t, &g), m), v) in t.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    let upd = (*m / bc1) / ((*v / bc2).sqrt() + eps);
                    *t = *t * decay - lr * upd;
                }
            });
        Ok(())
    }
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

impl AdamW {
    /// `vars` in a stable order (e.g. sorted by name).
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                let decay = !exempt_from_decay(&name, &var);
                let moments = if var.device().is_cpu() && var.dtype() == DType::F32 {
                    let n = var.elem_count();
                    Moments::Host {
                        m: vec![0.0; n],
                        v: vec![0.0; n],
                    }
                } else {
                    Moments::Tensors {
                        m: var.as_tensor().zeros_like()?,
                        v: var.as_tensor().zeros_like()?,
                    }
                };
                Ok(ParamState {
                    name,
                    var,
                    decay,
                    moments,
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
            match &mut p.moments {
                Moments::Host { m, v } => {
                    let op = InPlaceAdamW {
                        moments: std::cell::RefCell::new(Some((m, v))),
                        lr: lr as f32,
                        decay: (1.0 - lr * wd) as f32,
                        betas: (beta1 as f32, beta2 as f32),
                        eps: eps as f32,
                        bc: (bc1 as f32, bc2 as f32),
                    };
                    p.var.as_tensor().inplace_op2(&g.contiguous()?, &op)?;
                }
                Moments::Tensors { m, v } => {
                    let m_next = ((&*m * beta1)? + (g * (1.0 - beta1))?)?;
                    let v_next = ((&*v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                    let update = ((&m_next / bc1)? / ((&v_next / bc2)?.sqrt()? + eps)?)?;
                    let theta = p.var.as_tensor();
                    let next = ((theta * (1.0 - lr * wd))? - (update * lr)?)?;
                    p.var.set(&next.detach())?;
                    *m = m_next.detach();
                    *v = v_next.detach();
                }
            }
        }
        Ok(())
    }

    /// Moments as `{name}.m` / `{name}.v` tensors, for a checkpoint.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for p in &self.params {
            let (m, v) = match &p.moments {
                Moments::Host { m, v } => {
                    let (shape, dev) = (p.var.shape(), p.var.device());
                    (
                        Tensor::from_slice(m, shape, dev)?,
                        Tensor::from_slice(v, shape, dev)?,
                    )
                }
                Moments::Tensors { m, v } => (m.clone(), v.clone()),
            };
            out.insert(format!("{}.m", p.name), m);
            out.insert(format!("{}.v", p.name), v);
        }
        Ok(out)
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
            let read = |suffix: &str| -> Result<Tensor> {
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
                Ok(t.to_dtype(DType::F32)?
                    .to_device(p.var.device())?
                    .to_dtype(p.var.dtype())?)
            };
            let (m, v) = (read("m")?, read("v")?);
            p.moments = match p.moments {
                Moments::Host { .. } => Moments::Host {
                    m: m.flatten_all()?.to_vec1::<f32>()?,
                    v: v.flatten_all()?.to_vec1::<f32>()?,
                },
                Moments::Tensors { .. } => Moments::Tensors { m, v },
            };
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
