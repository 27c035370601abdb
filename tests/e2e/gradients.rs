//! Every parameter of the CLIP model receives a non-zero gradient from both objectives
//! (candle's own LayerNorm silently dropped most of them).

use std::sync::Arc;

use candle_core::{DType, Device};
use rankalign_train::data::{
    ClipTokenizer, Dataset, DigitScenes, Digits, SceneConfig, Split, collate_pairs,
};
use rankalign_train::losses::{ListPerms, RankClipConfig, clip_loss, rankclip_loss};
use rankalign_train::models::{ClipConfig, ClipModel, SeededVarMap};

#[test]
fn every_parameter_receives_a_gradient() {
    let dev = Device::Cpu;
    let cfg = ClipConfig::tiny();
    let digits = Arc::new(Digits::embedded().unwrap());
    let scenes = DigitScenes::new(
        digits,
        SceneConfig {
            seed: 3,
            image_size: 48,
            train_size: 16,
            val_size: 0,
            test_size: 0,
        },
        Split::Train,
    )
    .unwrap();
    let tok = ClipTokenizer::new(cfg.text.context_length).unwrap();
    let items: Vec<_> = (0..8).map(|i| scenes.get(i)).collect();
    let images: Vec<_> = items.iter().map(|i| &i.image).collect();
    let captions: Vec<_> = items.iter().map(|i| i.caption.as_str()).collect();
    let batch = collate_pairs(&images, &captions, 48, &tok, &dev).unwrap();

    let vm = SeededVarMap::new(1);
    let model = ClipModel::new(&cfg, vm.var_builder(DType::F32, &dev)).unwrap();
    let vars = vm.named_vars();
    // 3 layers × 16 tensors per tower; text: 2 embeddings + final norm (2); vision: class,
    // patch and position embeddings + pre/post norms (4); 2 projections; logit_scale.
    assert_eq!(
        vars.len(),
        2 * 3 * 16 + 4 + 7 + 2 + 1,
        "{:?}",
        vars.iter().map(|v| &v.0).collect::<Vec<_>>()
    );
    let img = model.encode_image(&batch.pixels).unwrap();
    let txt = model.encode_text(&batch.ids, &batch.eot).unwrap();
    let rank = rankclip_loss(
        &RankClipConfig::rankclip(),
        &img,
        &txt,
        model.logit_scale(),
        1.0,
        &ListPerms::from_seed(8, 0),
    )
    .unwrap();
    let v = rankalign_train::kernels::l2_normalize(&img).unwrap();
    let t = rankalign_train::kernels::l2_normalize(&txt).unwrap();
    let clip = clip_loss(
        &v.matmul(&t.t().unwrap())
            .unwrap()
            .broadcast_mul(&model.logit_scale().exp().unwrap())
            .unwrap(),
    )
    .unwrap();
    for (name, loss) in [("rankclip", rank.total), ("clip", clip)] {
        let grads = loss.backward().unwrap();
        let missing: Vec<&str> = vars
            .iter()
            .filter(|(_, var)| {
                grads.get(var.as_tensor()).is_none_or(|g| {
                    g.abs()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                        == 0.0
                })
            })
            .map(|(n, _)| n.as_str())
            .collect();
        assert!(missing.is_empty(), "{name}: no gradient for {missing:?}");
    }
}
