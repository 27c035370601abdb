//! Peak memory of a training step falls with `train.micro_batch` under `train.recompute`:
//! one step of the tiny CLIP at B = 128 (RankCLIP's loss over the whole batch), measured
//! by a counting allocator, whole and as 4 × 32 and 8 × 16 on one thread.

use candle_core::{DType, Device};
use rankalign_train::data::{
    Batch, ClipTokenizer, Dataset, DigitScenes, Digits, SceneConfig, Split, collate_pairs,
};
use rankalign_train::losses::{RankClipConfig, RankClipObjective, StepContext};
use rankalign_train::memory::{Counting, peak_during};
use rankalign_train::models::{ClipConfig, ClipModel, SeededVarMap};
use rankalign_train::step::{StepPlan, loss_and_grads};

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn batch(cfg: &ClipConfig) -> Batch {
    let scenes = DigitScenes::new(
        std::sync::Arc::new(Digits::embedded().unwrap()),
        SceneConfig {
            seed: 2,
            image_size: 48,
            train_size: 128,
            val_size: 0,
            test_size: 0,
        },
        Split::Train,
    )
    .unwrap();
    let tok = ClipTokenizer::new(cfg.text.context_length).unwrap();
    let items: Vec<_> = (0..128).map(|i| scenes.get(i)).collect();
    let images: Vec<_> = items.iter().map(|i| &i.image).collect();
    let captions: Vec<_> = items.iter().map(|i| i.caption.as_str()).collect();
    collate_pairs(&images, &captions, 48, &tok, &Device::Cpu).unwrap()
}

#[test]
fn peak_memory_falls_with_the_micro_batch() {
    let cfg = ClipConfig::tiny();
    let vm = SeededVarMap::new(4);
    let model = ClipModel::new(&cfg, vm.var_builder(DType::F32, &Device::Cpu)).unwrap();
    let vars = vm.named_vars();
    let params: Vec<_> = vars.iter().map(|(_, v)| v.clone()).collect();
    let logit_scale = vars
        .iter()
        .find(|(n, _)| n == "logit_scale")
        .unwrap()
        .1
        .clone();
    let data = batch(&cfg);
    let objective = RankClipObjective(RankClipConfig::rankclip());
    let ctx = StepContext {
        epoch: 1,
        epochs: 1,
        tie_seed: 0,
        labels: None,
    };
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
