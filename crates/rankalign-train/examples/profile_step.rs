//! Times the parts of one tiny-CLIP training step (forward, loss, backward, optimiser).
//! `cargo run --release -p rankalign-train --example profile_step -- [batch]`

use std::time::Instant;

use candle_core::{DType, Device};
use rankalign_train::data::{
    ClipTokenizer, Dataset, DigitScenes, Digits, SceneConfig, Split, collate_pairs,
};
use rankalign_train::losses::{ListPerms, RankClipConfig, clip_loss, rankclip_loss};
use rankalign_train::models::{ClipConfig, ClipModel, SeededVarMap};
use rankalign_train::optim::{AdamW, AdamWConfig};

fn main() -> anyhow::Result<()> {
    let b: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(128);
    let dev = Device::Cpu;
    let mut cfg = ClipConfig::tiny();
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    if let rankalign_train::models::VisionConfig::Vit(vision) = &mut cfg.vision {
        vision.patch_size = env("PATCH", vision.patch_size);
        vision.width = env("VW", vision.width);
        vision.mlp_dim = 4 * vision.width;
        vision.layers = env("VL", vision.layers);
    }
    cfg.text.width = env("TW", cfg.text.width);
    cfg.text.mlp_dim = 4 * cfg.text.width;
    cfg.text.layers = env("TL", cfg.text.layers);
    let digits = std::sync::Arc::new(Digits::embedded()?);
    let scenes = DigitScenes::new(
        digits,
        SceneConfig {
            seed: 1,
            image_size: 48,
            train_size: 1024,
            val_size: 0,
            test_size: 0,
        },
        Split::Train,
    )
    .map_err(anyhow::Error::msg)?;
    let tok = ClipTokenizer::new(32)?;
    let items: Vec<_> = (0..b).map(|i| scenes.get(i)).collect();
    let t = Instant::now();
    let images: Vec<_> = items.iter().map(|i| &i.image).collect();
    let caps: Vec<_> = items.iter().map(|i| i.caption.as_str()).collect();
    let batch = collate_pairs(&images, &caps, 48, &tok, &dev)?;
    eprintln!(
        "collate {:.1} ms, ids {:?}",
        t.elapsed().as_secs_f64() * 1e3,
        batch.ids.dims()
    );
    let vm = SeededVarMap::new(0);
    let model = ClipModel::new(&cfg, vm.var_builder(DType::F32, &dev))?;
    let mut opt = AdamW::new(
        vm.named_vars(),
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.1,
        },
    )?;
    for it in 0..4 {
        let t0 = Instant::now();
        let img = model.encode_image(&batch.pixels)?;
        let t1 = Instant::now();
        let txt = model.encode_text(&batch.ids, &batch.eot)?;
        let t2 = Instant::now();
        let loss = if it % 2 == 0 {
            let v = rankalign_train::kernels::l2_normalize(&img)?;
            let t = rankalign_train::kernels::l2_normalize(&txt)?;
            clip_loss(&(v.matmul(&t.t()?)? * 14.0)?)?
        } else {
            rankclip_loss(
                &RankClipConfig::rankclip(),
                &img,
                &txt,
                model.logit_scale(),
                1.0,
                &ListPerms::from_seed(b, 1),
            )?
            .total
        };
        let _ = loss.to_scalar::<f32>()?;
        let t3 = Instant::now();
        let grads = loss.backward()?;
        let t4 = Instant::now();
        opt.step(&grads, 1e-4)?;
        let t5 = Instant::now();
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        eprintln!(
            "{} vision {:.0} text {:.0} loss {:.0} backward {:.0} optim {:.0} total {:.0} ms",
            if it % 2 == 0 { "clip    " } else { "rankclip" },
            ms(t0, t1),
            ms(t1, t2),
            ms(t2, t3),
            ms(t3, t4),
            ms(t4, t5),
            ms(t0, t5)
        );
    }
    Ok(())
}
