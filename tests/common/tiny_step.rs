//! The tiny-CLIP setup the step tests share (micro-batch equivalence, peak memory):
//! the model with its variables, batches of digit scenes, and a step context. Each test
//! binary includes it with `#[path]` and uses part of it.

#![allow(dead_code)]

use std::sync::Arc;

use candle_core::{DType, Device, Var};
use rankalign_train::data::{
    Batch, ClipTokenizer, Dataset, DigitScenes, Digits, SceneConfig, Split, collate_pairs,
};
use rankalign_train::losses::StepContext;
use rankalign_train::models::{ClipConfig, ClipModel, SeededVarMap};

/// The tiny preset, initialised from `seed`, with its named variables, all of them as
/// the step's parameters, and `logit_scale`.
pub struct Tiny {
    pub model: ClipModel,
    pub vars: Vec<(String, Var)>,
    pub params: Vec<Var>,
    pub logit_scale: Var,
}

pub fn tiny(seed: u64) -> Tiny {
    let vm = SeededVarMap::new(seed);
    let model = ClipModel::new(
        &ClipConfig::tiny(),
        vm.var_builder(DType::F32, &Device::Cpu),
    )
    .unwrap();
    let vars = vm.named_vars();
    let params = vars.iter().map(|(_, v)| v.clone()).collect();
    let logit_scale = vars
        .iter()
        .find(|(n, _)| n == "logit_scale")
        .unwrap()
        .1
        .clone();
    Tiny {
        model,
        vars,
        params,
        logit_scale,
    }
}

/// `count` batches of `b` digit scenes (scene seed `seed`) at the tiny preset's 48 px.
pub fn scene_batches(seed: u64, count: usize, b: usize) -> Vec<Batch> {
    let scenes = DigitScenes::new(
        Arc::new(Digits::embedded().unwrap()),
        SceneConfig {
            seed,
            image_size: 48,
            train_size: b * count,
            val_size: 0,
            test_size: 0,
        },
        Split::Train,
    )
    .unwrap();
    let tok = ClipTokenizer::new(ClipConfig::tiny().text.context_length).unwrap();
    (0..count)
        .map(|s| {
            let items: Vec<_> = (s * b..(s + 1) * b).map(|i| scenes.get(i)).collect();
            let images: Vec<_> = items.iter().map(|i| &i.image).collect();
            let captions: Vec<_> = items.iter().map(|i| i.caption.as_str()).collect();
            collate_pairs(&images, &captions, 48, &tok, &Device::Cpu).unwrap()
        })
        .collect()
}

/// The context of a step in a one-epoch run, with tie-breaking seed `tie_seed`.
pub fn ctx(tie_seed: u64) -> StepContext<'static> {
    StepContext {
        epoch: 1,
        epochs: 1,
        tie_seed,
        labels: None,
    }
}
