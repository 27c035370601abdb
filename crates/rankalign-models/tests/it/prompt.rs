//! The prompt learner: OrdinalCLIP's interpolation weights against hand values, the
//! prompt layout, the RankFormer's masking and start state, and gradients reaching
//! every learnable part through the text tower.

use candle_core::{DType, Device, Result, Tensor};
use rankalign_models::prompt::{Interpolation, interpolation_weights};
use rankalign_models::{
    ClipConfig, ClipModel, PromptLearner, PromptTokens, RankFormerConfig, RankSlotConfig,
    SeededVarMap,
};

const SOT: u32 = 49406;
const EOT: u32 = 49407;
const X: u32 = 343;

/// Three ranks with templates of 2, 3 and 2 tokens after `n_ctx` placeholders.
fn rows(n_ctx: usize) -> Vec<Vec<u32>> {
    let templates = [vec![320, 269], vec![320, 1125, 269], vec![530, 269]];
    templates
        .iter()
        .map(|t| {
            let mut r = vec![SOT];
            r.extend(std::iter::repeat_n(X, n_ctx));
            r.extend(t);
            r.push(EOT);
            r
        })
        .collect()
}

fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
    a.iter().zip(b).all(|(x, y)| (x - y).abs() < tol)
}

#[test]
fn interpolation_weights_match_hand_values() {
    // Spec §5.1: M = 5, K = 3, linear: rank 0 = 2/3·B0 + 1/3·B1, rank 2 = ¼, ½, ¼.
    let w = interpolation_weights(5, 3, Interpolation::Linear);
    assert!(
        close(&w[0..3], &[2.0 / 3.0, 1.0 / 3.0, 0.0], 1e-12),
        "{w:?}"
    );
    assert!(close(&w[6..9], &[0.25, 0.5, 0.25], 1e-12), "{w:?}");
    // inv_prop reproduces the anchors 0, 2, 4.
    let w = interpolation_weights(5, 3, Interpolation::InvProp);
    for (rank, base) in [(0, 0), (2, 1), (4, 2)] {
        assert!(w[rank * 3 + base] > 0.9999, "{w:?}");
    }
    // K = 1: every rank is the one base.
    assert!(
        interpolation_weights(4, 1, Interpolation::Linear)
            .iter()
            .all(|&x| (x - 1.0).abs() < 1e-12)
    );
    for row in interpolation_weights(7, 3, Interpolation::Linear).chunks(3) {
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }
}

struct Fixture {
    model: ClipModel,
}

fn tiny() -> Result<Fixture> {
    let vm = SeededVarMap::new(3);
    let model = ClipModel::new(
        &ClipConfig::tiny(),
        vm.var_builder(DType::F32, &Device::Cpu),
    )?;
    Ok(Fixture { model })
}

fn learner(
    f: &Fixture,
    n_ctx: usize,
    slot: &RankSlotConfig,
    seed: u64,
) -> Result<(PromptLearner, SeededVarMap)> {
    let tokens = PromptTokens::new(&rows(n_ctx), n_ctx, 0, &[2, 3, 2], &Device::Cpu)?;
    let embeds = f.model.text_model()?.embed_tokens(&tokens.ids)?;
    let pm = SeededVarMap::new(seed);
    let p = PromptLearner::new(
        tokens,
        embeds,
        slot,
        pm.var_builder(DType::F32, &Device::Cpu),
    )?;
    Ok((p, pm))
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

#[test]
fn fixed_prompts_are_the_tokenized_templates() -> Result<()> {
    let f = tiny()?;
    let (p, pm) = learner(&f, 0, &RankSlotConfig::Fixed, 1)?;
    assert!(
        pm.named_vars().is_empty(),
        "zero-shot prompts learn nothing"
    );
    let tokens = p.tokens().clone();
    assert_eq!(tokens.slot_len, 3);
    assert_eq!(tokens.rank_lens, vec![2, 3, 2]);
    let direct = f.model.encode_text(&tokens.ids, &tokens.eot)?;
    let via = p.text_features(|e, eot| f.model.encode_text_embeds(e, eot))?;
    assert_eq!(max_diff(&direct, &via)?, 0.0);
    Ok(())
}

#[test]
fn layout_keeps_sot_eot_and_padding() -> Result<()> {
    let f = tiny()?;
    let (p, _) = learner(&f, 4, &RankSlotConfig::Learned, 1)?;
    let e = p.forward()?;
    let tok = f.model.text_model()?.embed_tokens(&p.tokens().ids)?;
    assert_eq!(e.dims(), tok.dims());
    assert_eq!(e.dims(), &[3, 1 + 4 + 3 + 1, 96]);
    // SOT, slot (offsets start at zero) and EOT/padding equal the tokenized prompt;
    // the context positions hold the learned context instead of the placeholders.
    assert_eq!(max_diff(&e.narrow(1, 0, 1)?, &tok.narrow(1, 0, 1)?)?, 0.0);
    assert_eq!(max_diff(&e.narrow(1, 5, 4)?, &tok.narrow(1, 5, 4)?)?, 0.0);
    assert!(max_diff(&e.narrow(1, 1, 4)?, &tok.narrow(1, 1, 4)?)? > 0.0);
    // The shared context is the same for every rank.
    assert_eq!(
        max_diff(
            &e.narrow(0, 0, 1)?.narrow(1, 1, 4)?,
            &e.narrow(0, 2, 1)?.narrow(1, 1, 4)?
        )?,
        0.0
    );
    Ok(())
}

#[test]
fn a_template_prefix_stays_frozen_and_the_slot_starts_after_it() -> Result<()> {
    let f = tiny()?;
    // "a | 7 | ." and "a | 1 7 | ." after two context tokens: prefix 1, ranks 1 and 2.
    let rows = vec![
        vec![SOT, X, X, 320, 275, 269, EOT],
        vec![SOT, X, X, 320, 272, 275, 269, EOT],
    ];
    let tokens = PromptTokens::new(&rows, 2, 1, &[1, 2], &Device::Cpu)?;
    assert_eq!((tokens.slot_start, tokens.slot_len), (4, 2));
    let embeds = f.model.text_model()?.embed_tokens(&tokens.ids)?;
    let pm = SeededVarMap::new(1);
    let p = PromptLearner::new(
        tokens,
        embeds.clone(),
        &RankSlotConfig::Learned,
        pm.var_builder(DType::F32, &Device::Cpu),
    )?;
    for (name, v) in pm.named_vars() {
        if name == "rank_offset" {
            v.set(&v.as_tensor().ones_like()?)?;
        }
    }
    let e = p.forward()?;
    let changed = (&e - &embeds)?.abs()?.sum(2)?.to_vec2::<f32>()?;
    // The context (1, 2) and the rank tokens move: rank 0's one (4), rank 1's two (4, 5).
    // SOT, the prefix (3), the suffix and EOT stay.
    for (row, moved) in changed.iter().zip([vec![1, 2, 4], vec![1, 2, 4, 5]]) {
        for (pos, &c) in row.iter().enumerate() {
            assert_eq!(c > 0.0, moved.contains(&pos), "{row:?} at {pos}");
        }
    }
    Ok(())
}

#[test]
fn rankformer_starts_as_scaled_templates_and_never_touches_eot() -> Result<()> {
    let f = tiny()?;
    let cfg = RankSlotConfig::RankFormer(RankFormerConfig {
        heads: 4,
        ffn_mult: 2,
        alpha: 0.25,
    });
    let (p, pm) = learner(&f, 2, &cfg, 1)?;
    let e = p.forward()?;
    let tok = f.model.text_model()?.embed_tokens(&p.tokens().ids)?;
    // Rank 1's three template tokens, scaled by 1 − α.
    let want = (tok.narrow(0, 1, 1)?.narrow(1, 3, 3)? * 0.75)?;
    assert!(max_diff(&e.narrow(0, 1, 1)?.narrow(1, 3, 3)?, &want)? < 1e-7);
    // Rank 0 has two template tokens; the slot's third position is its EOT: unchanged.
    assert_eq!(
        max_diff(
            &e.narrow(0, 0, 1)?.narrow(1, 5, 1)?,
            &tok.narrow(0, 0, 1)?.narrow(1, 5, 1)?
        )?,
        0.0
    );

    // With a non-zero output layer, an invalid slot position (rank 0's EOT at slot
    // position 2) is not a key: changing its embedding leaves every output alone.
    let vars = pm.named_vars();
    let fc2 = &vars
        .iter()
        .find(|(n, _)| n == "rankformer.fc2.weight")
        .unwrap()
        .1;
    fc2.set(&Tensor::randn(0f32, 0.05, fc2.shape(), &Device::Cpu)?)?;
    let rf = rankalign_models::RankFormer::new(
        96,
        &RankFormerConfig {
            heads: 4,
            ffn_mult: 2,
            alpha: 0.25,
        },
        pm.var_builder(DType::F32, &Device::Cpu).pp("rankformer"),
    )?;
    let r = tok.narrow(1, 3, 3)?;
    let valid = Tensor::new(
        &[
            [[1f32], [1.0], [0.0]],
            [[1.0], [1.0], [1.0]],
            [[1.0], [1.0], [0.0]],
        ],
        &Device::Cpu,
    )?;
    let out = rf.forward(&r, &valid)?;
    let bump = Tensor::zeros((3, 3, 96), DType::F32, &Device::Cpu)?.slice_assign(
        &[0..1, 2..3, 0..96],
        &Tensor::ones((1, 1, 96), DType::F32, &Device::Cpu)?,
    )?;
    let out2 = rf.forward(&(&r + &bump)?, &valid)?;
    let changed = (&out2 - &out)?.abs()?;
    // Only the bumped (pass-through) entry moves, by exactly the bump.
    let total = changed.sum_all()?.to_scalar::<f32>()?;
    assert!((total - 96.0).abs() < 1e-3, "{total}");
    assert!(
        max_diff(
            &out.narrow(1, 0, 2)?,
            &rf.forward(&r, &valid)?.narrow(1, 0, 2)?
        )? == 0.0
    );
    Ok(())
}

#[test]
fn gradients_reach_every_learnable_part_through_the_text_tower() -> Result<()> {
    let f = tiny()?;
    for slot in [
        RankSlotConfig::Learned,
        RankSlotConfig::Interpolated {
            bases: 2,
            interpolation: Interpolation::Linear,
        },
        RankSlotConfig::RankFormer(RankFormerConfig {
            heads: 4,
            ffn_mult: 2,
            alpha: 0.5,
        }),
    ] {
        let (p, pm) = learner(&f, 3, &slot, 5)?;
        // The RankFormer's output layer starts at zero, which blocks the gradient to
        // the layers before it; give it a value as one optimiser step would.
        for (name, v) in pm.named_vars() {
            if name.ends_with("fc2.weight") {
                v.set(&Tensor::randn(0f32, 0.05, v.shape(), &Device::Cpu)?)?;
            }
        }
        let feats = p.text_features(|e, eot| f.model.encode_text_embeds(e, eot))?;
        let target = Tensor::randn(0f32, 1.0, feats.shape(), &Device::Cpu)?;
        let loss = (feats * target)?.sum_all()?;
        let grads = loss.backward()?;
        let vars = pm.named_vars();
        assert!(!vars.is_empty());
        for (name, v) in vars {
            let g = grads
                .get(&v)
                .unwrap_or_else(|| panic!("{slot:?}: no gradient for {name}"));
            let n = g.abs()?.sum_all()?.to_scalar::<f32>()?;
            assert!(n > 0.0, "{slot:?}: zero gradient for {name}");
        }
    }
    Ok(())
}

#[test]
fn bad_prompts_are_errors() {
    let e = PromptTokens::new(&rows(0)[..1], 0, 0, &[2], &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("at least 2 ranks"), "{e}");
    let e = PromptTokens::new(&rows(0), 4, 0, &[2, 3, 2], &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank 0"), "{e}");
    let f = tiny().unwrap();
    let err = learner(
        &f,
        0,
        &RankSlotConfig::Interpolated {
            bases: 5,
            interpolation: Interpolation::Linear,
        },
        1,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("bases"), "{err}");
}

/// OrdinalCLIP's bases start from the anchor ranks' own tokens only: rank 0 (two
/// tokens) contributes nothing at the third slot position, where its prompt has EOT.
#[test]
fn interpolated_bases_never_start_from_template_words() -> Result<()> {
    let f = tiny()?;
    let slot = RankSlotConfig::Interpolated {
        bases: 3,
        interpolation: Interpolation::Linear,
    };
    let (p, _) = learner(&f, 0, &slot, 1)?;
    let e = p.forward()?;
    let tok = f.model.text_model()?.embed_tokens(&p.tokens().ids)?;
    // Rank 1 = ¼·B0 + ½·B1 + ¼·B2; at slot position 2 only B1 (rank 1, three tokens)
    // has a token, so the mix is half of rank 1's own third token.
    let at = |t: &Tensor, r: usize| t.narrow(0, r, 1)?.narrow(1, 1 + 2, 1);
    let want = (at(&tok, 1)? * 0.5)?;
    assert!(max_diff(&at(&e, 1)?, &want)? < 1e-6);
    Ok(())
}
