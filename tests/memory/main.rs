//! Peak memory of a training step falls with `train.micro_batch` under `train.recompute`:
//! one step of the tiny CLIP at B = 128 (RankCLIP's loss over the whole batch), measured
//! by a counting allocator, whole and as 4 × 32 and 8 × 16 on one thread.

use rankalign_train::losses::{RankClipConfig, RankClipObjective};
use rankalign_train::memory::{Counting, peak_during};
use rankalign_train::step::{StepPlan, loss_and_grads};

#[path = "../common/tiny_step.rs"]
mod tiny_step;
use tiny_step::{Tiny, ctx, scene_batches, tiny};

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn peak_memory_falls_with_the_micro_batch() {
    let Tiny {
        model,
        params,
        logit_scale,
        ..
    } = tiny(4);
    let data = scene_batches(2, 1, 128).remove(0);
    let objective = RankClipObjective(RankClipConfig::rankclip());
    let ctx = ctx(0);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let peak = |micro_batch: Option<usize>| -> f64 {
        let plan = StepPlan {
            micro_batch,
            recompute: micro_batch.is_some(),
        };
        let (out, bytes) = pool.install(|| {
            peak_during(|| {
                loss_and_grads(&model, &params, &logit_scale, &objective, &data, &ctx, plan)
                    .unwrap()
            })
        });
        drop(out);
        bytes as f64 / 1048576.0
    };
    let (whole, m32, m16) = (peak(None), peak(Some(32)), peak(Some(16)));
    eprintln!("peak MB of one step at B = 128: whole {whole:.1}, 4 × 32 {m32:.1}, 8 × 16 {m16:.1}");
    assert!(whole > 0.0, "the counting allocator saw nothing");
    assert!(
        m32 < 0.75 * whole,
        "4 × 32 peaks at {m32:.1} MB, the whole batch at {whole:.1}"
    );
    assert!(m16 < m32, "8 × 16 peaks at {m16:.1} MB, 4 × 32 at {m32:.1}");
}
