//! The linear probe: multinomial logistic regression on frozen features.
//!
//! The objective is scikit-learn's `LogisticRegression(solver="lbfgs")` objective:
//! `mean_i CE(softmax(W x_i + b), y_i) + λ/2 ‖W‖²` with the intercept `b` not
//! penalised and `λ = 1 / (C · n)`. It is minimised by full-batch L-BFGS (memory 10,
//! Armijo backtracking, start at zero): parameters, softmax and loss in f64, the
//! features and the two matrix products per evaluation with them in f32 on candle's CPU
//! GEMM. A fit has no randomness (a repeated fit gives the same weights); whether GEMM's
//! rounding changes with the thread count has not been measured.
//!
//! The protocol ([`probe`]): `λ` is chosen on a validation split, from the log-spaced
//! grid `logspace(-6, 2, 97)` searched as CLIP_benchmark does (7 coarse points, then the
//! peak refined with spans 8, 4, 2, 1; ties keep the earlier point); the classifier is
//! then refit on train + validation with that `λ` and scored on the test set.

use candle_core::{DType, Device, Tensor};

use super::metrics::classification;
use crate::Result;

/// Settings of one L-BFGS fit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FitOptions {
    /// L2 strength on the weights (not the intercept).
    pub lambda: f64,
    pub max_iter: usize,
    /// Stop when the largest gradient entry is below this.
    pub tol: f64,
}

impl Default for FitOptions {
    fn default() -> Self {
        FitOptions {
            lambda: 1e-4,
            max_iter: 1000,
            tol: 1e-6,
        }
    }
}

/// A fitted classifier: `logits = x·W + b`.
#[derive(Clone, Debug)]
pub struct LinearClassifier {
    /// `(d, k)`.
    pub weight: Tensor,
    /// `(k,)`.
    pub bias: Tensor,
    pub iterations: usize,
    pub converged: bool,
}

impl LinearClassifier {
    /// Class scores `(n, k)` of features `(n, d)` as rows.
    pub fn logits(&self, x: &Tensor) -> Result<Vec<Vec<f32>>> {
        let z = x
            .to_dtype(DType::F64)?
            .matmul(&self.weight)?
            .broadcast_add(&self.bias)?;
        Ok(z.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    }
}

/// Loss and gradient at `theta = [W (d·k, row-major) ; b (k)]`. The features stay
/// f32 (as scikit-learn keeps f32 input) and so do the two products with them; the
/// softmax, the loss and the parameters are f64.
struct Problem {
    x: Tensor,
    onehot: Tensor,
    n: usize,
    d: usize,
    k: usize,
    lambda: f64,
}

impl Problem {
    fn new(x: &Tensor, labels: &[usize], k: usize, lambda: f64) -> Result<Self> {
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let (n, d) = x.dims2()?;
        if let Some(&y) = labels.iter().find(|&&y| y >= k) {
            return Err(crate::TrainError::Invalid(format!(
                "linear probe: label {y} is outside the {k} classes"
            )));
        }
        let mut onehot = vec![0f64; n * k];
        for (i, &y) in labels.iter().enumerate() {
            onehot[i * k + y] = 1.0;
        }
        Ok(Problem {
            x,
            onehot: Tensor::from_vec(onehot, (n, k), &Device::Cpu)?,
            n,
            d,
            k,
            lambda,
        })
    }

    fn eval(&self, theta: &[f64]) -> Result<(f64, Vec<f64>)> {
        let (d, k) = (self.d, self.k);
        let w = Tensor::from_slice(&theta[..d * k], (d, k), &Device::Cpu)?;
        let b = Tensor::from_slice(&theta[d * k..], k, &Device::Cpu)?;
        let z = self
            .x
            .matmul(&w.to_dtype(DType::F32)?)?
            .to_dtype(DType::F64)?
            .broadcast_add(&b)?;
        // Stable log-softmax.
        let m = z.max_keepdim(1)?;
        let shifted = z.broadcast_sub(&m)?;
        let lse = shifted.exp()?.sum_keepdim(1)?.log()?;
        let logp = shifted.broadcast_sub(&lse)?;
        let nll = -(logp.mul(&self.onehot)?.sum_all()?.to_scalar::<f64>()?) / self.n as f64;
        let p = logp.exp()?;
        let r = ((p - &self.onehot)? / self.n as f64)?;
        let gw = self
            .x
            .t()?
            .matmul(&r.to_dtype(DType::F32)?)?
            .to_dtype(DType::F64)?;
        let gb = r.sum(0)?;
        let mut grad = gw.flatten_all()?.to_vec1::<f64>()?;
        let sq: f64 = theta[..d * k].iter().map(|v| v * v).sum();
        for (g, &t) in grad.iter_mut().zip(&theta[..d * k]) {
            *g += self.lambda * t;
        }
        grad.extend(gb.to_vec1::<f64>()?);
        Ok((nll + 0.5 * self.lambda * sq, grad))
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Fit `k`-class logistic regression on features `x` `(n, d)`.
pub fn fit(x: &Tensor, labels: &[usize], k: usize, opts: FitOptions) -> Result<LinearClassifier> {
    let p = Problem::new(x, labels, k, opts.lambda)?;
    let dim = p.d * p.k + p.k;
    let mut theta = vec![0f64; dim];
    let (mut f, mut g) = p.eval(&theta)?;
    let mut s_hist: Vec<Vec<f64>> = Vec::new();
    let mut y_hist: Vec<Vec<f64>> = Vec::new();
    let memory = 10;
    let mut converged = false;
    let mut iterations = 0;
    for it in 0..opts.max_iter {
        // Steps taken so far.
        iterations = it;
        if g.iter().fold(0f64, |m, v| m.max(v.abs())) < opts.tol {
            converged = true;
            break;
        }
        // Two-loop recursion: direction = -H g.
        let mut q = g.clone();
        let mut alphas = Vec::with_capacity(s_hist.len());
        for (s, y) in s_hist.iter().zip(&y_hist).rev() {
            let rho = 1.0 / dot(y, s);
            let a = rho * dot(s, &q);
            for (qi, yi) in q.iter_mut().zip(y) {
                *qi -= a * yi;
            }
            alphas.push((a, rho));
        }
        let gamma = match (s_hist.last(), y_hist.last()) {
            (Some(s), Some(y)) => dot(s, y) / dot(y, y),
            _ => 1.0 / g.iter().map(|v| v.abs()).fold(0f64, f64::max).max(1.0),
        };
        for v in q.iter_mut() {
            *v *= gamma;
        }
        for ((s, y), (a, rho)) in s_hist.iter().zip(&y_hist).zip(alphas.into_iter().rev()) {
            let b = rho * dot(y, &q);
            for (qi, si) in q.iter_mut().zip(s) {
                *qi += (a - b) * si;
            }
        }
        let mut dir: Vec<f64> = q.into_iter().map(|v| -v).collect();
        let mut slope = dot(&g, &dir);
        if slope >= 0.0 {
            // Not a descent direction (rounding): restart from steepest descent.
            s_hist.clear();
            y_hist.clear();
            dir = g.iter().map(|v| -v).collect();
            slope = -dot(&g, &g);
        }
        // Armijo backtracking from the unit step.
        let mut step = 1.0;
        let (next, f_new, g_new) = loop {
            let cand: Vec<f64> = theta.iter().zip(&dir).map(|(t, d)| t + step * d).collect();
            let (fc, gc) = p.eval(&cand)?;
            if fc <= f + 1e-4 * step * slope || step < 1e-12 {
                break (cand, fc, gc);
            }
            step *= 0.5;
        };
        let s: Vec<f64> = next.iter().zip(&theta).map(|(a, b)| a - b).collect();
        let y: Vec<f64> = g_new.iter().zip(&g).map(|(a, b)| a - b).collect();
        let decrease = f - f_new;
        theta = next;
        g = g_new;
        f = f_new;
        if dot(&s, &y) > 1e-12 {
            s_hist.push(s);
            y_hist.push(y);
            if s_hist.len() > memory {
                s_hist.remove(0);
                y_hist.remove(0);
            }
        }
        iterations = it + 1;
        if decrease.abs() <= 1e-12 * f.abs().max(1.0) && step < 1e-10 {
            break;
        }
    }
    let (d, kk) = (p.d, p.k);
    Ok(LinearClassifier {
        weight: Tensor::from_slice(&theta[..d * kk], (d, kk), &Device::Cpu)?,
        bias: Tensor::from_slice(&theta[d * kk..], kk, &Device::Cpu)?,
        iterations,
        converged,
    })
}

/// The regularisation grid: `logspace(-6, 2, 97)`.
pub fn lambda_grid() -> Vec<f64> {
    (0..97)
        .map(|i| 10f64.powf(-6.0 + 8.0 * i as f64 / 96.0))
        .collect()
}

/// Features and labels of one split.
pub struct Split<'a> {
    pub x: &'a Tensor,
    pub labels: &'a [usize],
}

/// The validation search over the grid, each point fitted once.
struct Sweep<'a> {
    grid: Vec<f64>,
    memo: Vec<Option<f64>>,
    train: &'a Split<'a>,
    val: &'a Split<'a>,
    k: usize,
    opts: FitOptions,
}

impl Sweep<'_> {
    /// Validation top-1 at grid point `i`.
    fn score(&mut self, i: usize, tried: &mut Vec<(f64, f64)>) -> Result<f64> {
        if let Some(a) = self.memo[i] {
            return Ok(a);
        }
        let opts = FitOptions {
            lambda: self.grid[i],
            ..self.opts
        };
        let c = fit(self.train.x, self.train.labels, self.k, opts)?;
        let acc = classification(&c.logits(self.val.x)?, self.val.labels, "")?[0].1;
        self.memo[i] = Some(acc);
        tried.push((self.grid[i], acc));
        Ok(acc)
    }

    /// The best of `idxs` (the first on ties).
    fn peak(&mut self, idxs: &[usize], tried: &mut Vec<(f64, f64)>) -> Result<usize> {
        let mut best = (idxs[0], f64::NEG_INFINITY);
        for &i in idxs {
            let a = self.score(i, tried)?;
            if a > best.1 {
                best = (i, a);
            }
        }
        Ok(best.0)
    }
}

/// What [`probe`] found.
#[derive(Clone, Debug)]
pub struct ProbeOutcome {
    pub metrics: Vec<(String, f64)>,
    pub lambda: f64,
    /// Validation accuracy at each grid point tried, in the order tried.
    pub tried: Vec<(f64, f64)>,
}

/// The protocol of the module docs. `val` is `None` to fit once at `opts.lambda`.
pub fn probe(
    train: Split,
    val: Option<Split>,
    test: Split,
    k: usize,
    opts: FitOptions,
) -> Result<ProbeOutcome> {
    let mut tried = Vec::new();
    let lambda = match &val {
        None => opts.lambda,
        Some(v) => {
            let grid = lambda_grid();
            let mut sweep = Sweep {
                memo: vec![None; grid.len()],
                grid,
                train: &train,
                val: v,
                k,
                opts,
            };
            let coarse: Vec<usize> = (0..7).map(|j| j * 16).collect();
            let mut at = sweep.peak(&coarse, &mut tried)?;
            let mut span = 8usize;
            while span > 0 {
                let (lo, hi) = (
                    at.saturating_sub(span),
                    (at + span).min(sweep.grid.len() - 1),
                );
                at = sweep.peak(&[lo, at, hi], &mut tried)?;
                span /= 2;
            }
            sweep.grid[at]
        }
    };
    let (x, labels) = match &val {
        None => (train.x.clone(), train.labels.to_vec()),
        Some(v) => (
            Tensor::cat(&[train.x, v.x], 0)?,
            train.labels.iter().chain(v.labels).copied().collect(),
        ),
    };
    let c = fit(&x, &labels, k, FitOptions { lambda, ..opts })?;
    let mut metrics = classification(&c.logits(test.x)?, test.labels, "lp_")?;
    metrics.push(("lp_lambda".into(), lambda));
    metrics.push(("lp_iterations".into(), c.iterations as f64));
    Ok(ProbeOutcome {
        metrics,
        lambda,
        tried,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blobs(n: usize, k: usize, d: usize, seed: u64) -> (Tensor, Vec<usize>) {
        let mut state = seed;
        let mut next = || {
            state = rankalign_data::mix_seed(&[state]);
            (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..n {
            let c = i % k;
            for j in 0..d {
                let centre = if j % k == c { 1.5 } else { 0.0 };
                x.push((centre + next()) as f32);
            }
            y.push(c);
        }
        (Tensor::from_vec(x, (n, d), &Device::Cpu).unwrap(), y)
    }

    #[test]
    fn the_gradient_matches_finite_differences() {
        let (x, y) = blobs(30, 3, 4, 1);
        let p = Problem::new(&x, &y, 3, 0.3).unwrap();
        let theta: Vec<f64> = (0..15).map(|i| (i as f64 * 0.37).sin() * 0.5).collect();
        let (_, g) = p.eval(&theta).unwrap();
        for i in 0..theta.len() {
            // The products run in f32, so the loss carries ~1e-7 of rounding: a wide
            // step keeps it out of the difference quotient.
            let h = 1e-3;
            let mut a = theta.clone();
            let mut b = theta.clone();
            a[i] += h;
            b[i] -= h;
            let fd = (p.eval(&a).unwrap().0 - p.eval(&b).unwrap().0) / (2.0 * h);
            assert!(
                (fd - g[i]).abs() < 1e-4 + 1e-3 * g[i].abs(),
                "{i}: {fd} vs {}",
                g[i]
            );
        }
    }

    #[test]
    fn a_fit_reaches_a_stationary_point_and_separates_blobs() {
        let (x, y) = blobs(200, 4, 8, 2);
        let c = fit(
            &x,
            &y,
            4,
            FitOptions {
                lambda: 1e-2,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(c.converged, "{} iterations", c.iterations);
        let acc = classification(&c.logits(&x).unwrap(), &y, "").unwrap()[0].1;
        assert!(acc > 95.0, "{acc}");
    }
}
