//! The loss and the gradients of one training step, over the batch in one piece, over
//! micro-batches, or over this rank's part of a data-parallel batch
//! ([`loss_and_grads_across`]: the same construction, with the embeddings gathered and
//! the gradients summed across ranks through a [`Collective`]).
//!
//! Every step is the GradCache construction, exact for losses over the whole batch;
//! the batch in one piece is its case of one micro-batch ([`StepPlan::micro_batch`]):
//! 1. each micro-batch runs its two towers forward, each tower one task of the current
//!    rayon pool (the pool's threads take the tasks; gemm's and the kernels' own splits
//!    go to the same pool, never to more threads);
//! 2. the objective runs once, on the detached embeddings of the whole batch, and its
//!    backward gives `logit_scale`'s gradient and each embedding's gradient;
//! 3. each micro-batch back-propagates `Σ (embedding ∘ its gradient)` through each of
//!    its towers, again one task per tower;
//! 4. the parameters' gradients are summed over the micro-batches in their order.
//!
//! The loss is computed once over all B rows, so InfoNCE's and RankCLIP's list-wise
//! terms see the global batch and `logit_scale` gets one gradient (open_clip's
//! `--accum-freq` recomputes the loss per micro-batch instead). The micro-batch count is
//! fixed by the config and the sums run in a fixed order, so the result does not depend
//! on how many threads run it; it equals the one-piece step up to f32 rounding. In one
//! piece it is the arithmetic of one backward through the whole graph, bit for bit
//! (tested): the towers share no parameter, and the embeddings' gradients are the
//! loss's. Running the towers as two tasks took the tiny preset's step on 2 threads
//! from about 157 to 112 ms (decision 86).
//!
//! With [`StepPlan::recompute`], step 1 keeps no graph and step 3 runs the forward again,
//! so that at most one micro-batch's activations per thread are alive: a batch of B
//! costs the activation memory of the micro-batch, at one more forward pass.
//! Without it, every micro-batch keeps its graph from step 1 to step 3 (the memory of
//! the whole batch, and no extra work): that is the data-parallel speed-up alone.
//!
//! With micro-batches or across ranks, a tower with BatchNorm (a ResNet) is refused: its
//! statistics would be the micro-batch's, which changes the model, and a recomputed
//! forward would update the running statistics twice. In one piece it trains as before.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use rankalign_data::batch::Batch;
use rankalign_losses::{LossTerms, Objective, StepContext};
use rankalign_models::ClipModel;
use rayon::prelude::*;

use crate::dist::Collective;
use crate::{Result, TrainError};

/// How a step splits its batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepPlan {
    /// Rows per micro-batch (the last may be shorter); `None`: the batch in one piece.
    pub micro_batch: Option<usize>,
    /// Keep no activations between the forward and the backward of a micro-batch; run
    /// its forward again instead.
    pub recompute: bool,
}

impl StepPlan {
    /// An error if `model` cannot be split this way.
    pub fn check(&self, model: &ClipModel) -> Result<()> {
        if self.micro_batch == Some(0) {
            return Err(TrainError::Invalid(
                "train.micro_batch must be at least 1".into(),
            ));
        }
        if self.micro_batch.is_some() && !model.buffer_names().is_empty() {
            return Err(TrainError::Invalid(
                "train.micro_batch: the image tower has BatchNorm (a ResNet), which would \
                 normalise each micro-batch by its own statistics and so change the model; \
                 leave micro_batch unset for this tower"
                    .into(),
            ));
        }
        if self.recompute && self.micro_batch.is_none() {
            return Err(TrainError::Invalid(
                "train.recompute needs train.micro_batch (the rows per micro-batch)".into(),
            ));
        }
        Ok(())
    }
}

/// A step's loss terms and the gradients of the parameters and `logit_scale`.
pub struct StepGrads {
    pub terms: LossTerms,
    pub grads: GradStore,
}

/// Both towers on `batch`, in training mode: `(image, text)` embeddings. The towers
/// share nothing, so they run as two tasks of the current pool.
fn encode(model: &ClipModel, batch: &Batch) -> Result<(Tensor, Tensor)> {
    let (image, text) = rayon::join(
        || model.encode_image_t(&batch.pixels, true),
        || model.encode_text(&batch.ids, &batch.eot),
    );
    Ok((image?, text?))
}

/// The loss of `batch` under `objective` and its gradients, split as `plan` says.
/// `params` are the variables whose gradients are summed over micro-batches; the
/// returned store holds their gradients and those of the loss's own inputs
/// (`logit_scale`), not those of tower variables left out of `params`.
pub fn loss_and_grads(
    model: &ClipModel,
    params: &[Var],
    logit_scale: &Var,
    objective: &dyn Objective,
    batch: &Batch,
    ctx: &StepContext<'_>,
    plan: StepPlan,
) -> Result<StepGrads> {
    split_step(
        model,
        params,
        logit_scale,
        objective,
        batch,
        ctx,
        plan,
        None,
    )
}

/// [`loss_and_grads`] on this rank's part of a global batch in a data-parallel run: the
/// ranks' detached embeddings are gathered (in rank order) so that the loss is the
/// global batch's, each rank back-propagates its own rows' embedding gradients, and the
/// parameters' gradients are summed over the ranks in rank order; `logit_scale`'s (and
/// any other gradient of the loss itself) is the same on every rank and counted once.
/// With equal parts, R ranks of B/R rows give the bits of one process with
/// `micro_batch = B/R` (tested), and the one-piece step to f32 rounding.
#[allow(clippy::too_many_arguments)]
pub fn loss_and_grads_across(
    model: &ClipModel,
    params: &[Var],
    logit_scale: &Var,
    objective: &dyn Objective,
    local: &Batch,
    ctx: &StepContext<'_>,
    plan: StepPlan,
    comm: &dyn Collective,
) -> Result<StepGrads> {
    if !model.buffer_names().is_empty() {
        return Err(TrainError::Invalid(
            "data parallel: the image tower has BatchNorm (a ResNet), whose statistics would \
             be each rank's; it is not supported across ranks yet"
                .into(),
        ));
    }
    split_step(
        model,
        params,
        logit_scale,
        objective,
        local,
        ctx,
        plan,
        Some(comm),
    )
}

#[allow(clippy::too_many_arguments)]
fn split_step(
    model: &ClipModel,
    params: &[Var],
    logit_scale: &Var,
    objective: &dyn Objective,
    batch: &Batch,
    ctx: &StepContext<'_>,
    plan: StepPlan,
    comm: Option<&dyn Collective>,
) -> Result<StepGrads> {
    let rows = batch.len();
    if rows == 0 {
        return Err(TrainError::Invalid(
            "a training step got an empty batch (0 rows)".into(),
        ));
    }
    let micro = match plan.micro_batch {
        Some(m) if m < rows => m,
        _ => rows,
    };
    let one_piece = micro >= rows && comm.is_none();
    let plan = if one_piece {
        // The batch in one piece: what `micro_batch` and `recompute` mean does not apply.
        StepPlan::default()
    } else {
        plan.check(model)?;
        plan
    };
    let pieces: Vec<(usize, Batch)> = (0..rows)
        .step_by(micro)
        .map(|start| Ok((start, batch.narrow(start, micro.min(rows - start))?)))
        .collect::<Result<_>>()?;

    // 1. Forward per micro-batch; the graphs are kept unless they are to be recomputed.
    let forward: Vec<(Tensor, Tensor)> = pieces
        .par_iter()
        .map(|(_, piece)| {
            let (image, text) = encode(model, piece)?;
            Ok(if plan.recompute {
                (image.detach(), text.detach())
            } else {
                (image, text)
            })
        })
        .collect::<Result<_>>()?;

    // 2. The objective once, on the whole batch's detached embeddings (all ranks').
    let mut offset = 0;
    let mut gather = |side: fn(&(Tensor, Tensor)) -> &Tensor| -> Result<Var> {
        let parts: Vec<Tensor> = forward.iter().map(|p| side(p).detach()).collect();
        let local = Tensor::cat(&parts, 0)?;
        let all = match comm {
            Some(comm) => {
                let (all, counts) = comm.all_gather_rows(&local)?;
                offset = counts[..comm.rank()].iter().sum();
                all
            }
            None => local,
        };
        Ok(Var::from_tensor(&all)?)
    };
    let image = gather(|p| &p.0)?;
    let text = gather(|p| &p.1)?;
    let terms = objective.loss(
        image.as_tensor(),
        text.as_tensor(),
        logit_scale.as_tensor(),
        ctx,
    )?;
    let mut grads = terms.total.backward()?;
    let d_image = grads.remove(image.as_tensor());
    let d_text = grads.remove(text.as_tensor());

    // 3. Back through each micro-batch's towers against its slice of those gradients,
    //    as many at a time as the pool has threads; 4. each wave's gradients are added
    //    to the sums in micro-batch order, so the sums do not depend on the wave size and
    //    at most one wave of gradient stores is alive.
    let mut sums: Vec<Option<Tensor>> = vec![None; params.len()];
    let wave = rayon::current_num_threads().max(1);
    let mut kept = forward.into_iter();
    for chunk in pieces.chunks(wave) {
        let work: Vec<_> = chunk.iter().zip(kept.by_ref()).collect();
        let stores: Vec<[GradStore; 2]> = work
            .into_par_iter()
            .map(|((start, piece), kept)| {
                let (img, txt) = if plan.recompute {
                    encode(model, piece)?
                } else {
                    kept
                };
                // Each tower back-propagates `Σ (embedding ∘ its gradient)` as its own
                // task: the towers share no parameter, so the two stores are disjoint.
                let back = |emb: &Tensor, grad: &Option<Tensor>| -> Result<GradStore> {
                    match grad {
                        Some(g) => {
                            let g = g.narrow(0, offset + *start, piece.len())?;
                            Ok((emb * g)?.sum_all()?.backward()?)
                        }
                        None => Ok(GradStore::default()),
                    }
                };
                let (image, text) = rayon::join(|| back(&img, &d_image), || back(&txt, &d_text));
                Ok([image?, text?])
            })
            .collect::<Result<_>>()?;
        for mut store in stores.into_iter().flatten() {
            for (var, sum) in params.iter().zip(sums.iter_mut()) {
                if let Some(g) = store.remove(var.as_tensor()) {
                    *sum = Some(match sum.take() {
                        Some(acc) => accumulate(acc, &g)?,
                        None => g,
                    });
                }
            }
        }
    }
    if let Some(comm) = comm {
        // The loss-side gradients (`logit_scale`'s) are every rank's own copy of one
        // number; rank 0's is sent to all with the sums (the others add zeros), so that
        // no rank's rounding can make the replicas drift apart.
        let loss_side: Vec<Option<Tensor>> = params
            .iter()
            .map(|v| {
                grads
                    .get(v.as_tensor())
                    .map(|g| {
                        if comm.rank() == 0 {
                            Ok(g.clone())
                        } else {
                            g.zeros_like()
                        }
                    })
                    .transpose()
            })
            .collect::<candle_core::Result<_>>()?;
        let n = params.len();
        let mut reduced = all_reduce(comm, sums.into_iter().chain(loss_side).collect())?;
        for (var, g) in params.iter().zip(reduced.split_off(n)) {
            if let Some(g) = g {
                grads.insert(var.as_tensor(), g);
            }
        }
        sums = reduced;
    }
    for (var, sum) in params.iter().zip(sums) {
        let Some(mut sum) = sum else { continue };
        let t = var.as_tensor();
        if let Some(loss_side) = grads.get(t) {
            // `logit_scale`, or a parameter the objective itself uses.
            sum = (loss_side + sum)?;
        }
        grads.insert(t, sum);
    }
    Ok(StepGrads { terms, grads })
}

/// The gradient sums over all ranks, in one message: every rank has a gradient for the
/// same parameters (the same model and code), so they are flattened in parameter order.
fn all_reduce(comm: &dyn Collective, sums: Vec<Option<Tensor>>) -> Result<Vec<Option<Tensor>>> {
    let flat: Vec<Tensor> = sums
        .iter()
        .flatten()
        .map(|g| g.flatten_all())
        .collect::<candle_core::Result<_>>()?;
    if flat.is_empty() {
        return Ok(sums);
    }
    let total = comm.all_reduce_sum(&Tensor::cat(&flat, 0)?)?;
    let mut at = 0;
    sums.into_iter()
        .map(|g| {
            g.map(|g| {
                let n = g.elem_count();
                let part = total.narrow(0, at, n)?.reshape(g.shape())?;
                at += n;
                Ok(part)
            })
            .transpose()
        })
        .collect()
}

/// `acc + g`, in place in `acc` for CPU f32 (the sums are parameter-sized, and the token
/// embedding's is 19 MB at the tiny preset).
fn accumulate(acc: Tensor, g: &Tensor) -> Result<Tensor> {
    let in_place = acc.device().is_cpu()
        && acc.dtype() == DType::F32
        && g.dtype() == DType::F32
        && acc.shape() == g.shape()
        && acc.is_contiguous()
        && g.is_contiguous();
    if !in_place {
        return Ok((acc + g)?);
    }
    acc.inplace_op2(g, &AddAssign)?;
    Ok(acc)
}

/// `dst += src` over contiguous CPU f32 storages.
struct AddAssign;

impl candle_core::InplaceOp2 for AddAssign {
    fn name(&self) -> &'static str {
        "add-assign"
    }

    fn cpu_fwd(
        &self,
        dst: &mut candle_core::CpuStorage,
        dl: &candle_core::Layout,
        src: &candle_core::CpuStorage,
        sl: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let (Some((d0, d1)), Some((s0, s1))) = (dl.contiguous_offsets(), sl.contiguous_offsets())
        else {
            candle_core::bail!("add-assign: both sides must be contiguous")
        };
        let (candle_core::CpuStorage::F32(dst), candle_core::CpuStorage::F32(src)) = (dst, src)
        else {
            candle_core::bail!("add-assign: f32 only")
        };
        dst[d0..d1]
            .par_chunks_mut(1 << 14)
            .zip(src[s0..s1].par_chunks(1 << 14))
            .for_each(|(d, s)| {
                for (d, s) in d.iter_mut().zip(s) {
                    *d += s;
                }
            });
        Ok(())
    }
}
