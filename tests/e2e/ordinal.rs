//! The ordinal pipeline end to end on a tiny random model: every method (zero-shot,
//! CoOp, OrdinalCLIP, L2RCLIP, L2RCLIP-I) on ordinal digits with a report and heatmaps;
//! run-by-run resumption; a benchmark-format list of real image files through the
//! leave-one-out protocol with flips; and clear errors for bad configs and bad lists.

use std::path::Path;

use rankalign_train::ordinal::{OrdinalConfig, OrdinalOptions, run_ordinal};

use crate::{TINY_MODEL, scratch};

const METHODS: &str = r#"
[stage1]
epochs = 2
batch_size = 16
lr = 1e-3
warmup_epochs = 1

[stage2]
epochs = 2
batch_size = 16
lr = 1e-3
milestones = [1]

[eval]
batch_size = 16

[[method]]
name = "zero-shot"
recipe = { kind = "zero-shot" }

[[method]]
name = "coop"
recipe = { kind = "coop" }

[[method]]
name = "ordinalclip"
recipe = { kind = "ordinalclip", slot = { kind = "interpolated", bases = 2, interpolation = "inv-prop" } }

[[method]]
name = "l2rclip"
recipe = { kind = "l2rclip", slot = { kind = "rankformer", heads = 2, alpha = 0.5 } }

[[method]]
name = "l2rclip-i"
recipe = { kind = "l2rclip", form = "paper", slot = { kind = "interpolated", bases = 2, interpolation = "linear" } }
"#;

fn digits_config(out: &Path, name: &str) -> String {
    format!(
        r#"
kind = "ordinal"
name = "{name}"
out_dir = "{out}"
seeds = [1, 2]
parallel_runs = 2

[data]
source = "digits"
task = "digit-count"
seed = 3
image_size = 24
train_size = 48
test_size = 20

[prompt]
template = "{{rank}} digits."
n_ctx = 2
{TINY_MODEL}
{METHODS}
"#,
        out = out.display()
    )
}

fn parse(text: &str) -> OrdinalConfig {
    OrdinalConfig::parse(text, Path::new("ordinal.toml")).unwrap()
}

#[test]
fn every_method_trains_reports_and_resumes_run_by_run() {
    let dir = scratch("ordinal-digits");
    let cfg = parse(&digits_config(&dir, "tiny-ordinal"));
    let out = run_ordinal(&cfg, &candle_core::Device::Cpu, &OrdinalOptions::default()).unwrap();
    assert_eq!(out.results.len(), 5 * 2);
    for r in &out.results {
        let s = &r.scores;
        assert!(s.mae_max >= 0.0 && s.mae_max <= 3.0, "{r:?}");
        assert!((0.0..=100.0).contains(&s.acc_max) && (0.0..=100.0).contains(&s.os));
        assert_eq!(s.test_images, 20);
        assert_eq!(r.similarity.len(), 16);
        let (s1, s2) = (r.stage1_steps, r.stage2_steps);
        match r.method.as_str() {
            "zero-shot" => assert_eq!((s1, s2), (0, 0)),
            "coop" | "ordinalclip" => assert_eq!((s1, s2), (0, 2 * 3)),
            _ => assert_eq!((s1, s2), (2 * 3, 2 * 3)),
        }
        let run = dir
            .join("tiny-ordinal")
            .join(&r.method)
            .join("digits")
            .join(format!("seed-{}", r.seed));
        assert!(run.join("heatmap.png").exists() && run.join("result.json").exists());
    }
    let report = std::fs::read_to_string(&out.report).unwrap();
    for m in ["zero-shot", "coop", "ordinalclip", "l2rclip", "l2rclip-i"] {
        assert!(report.contains(&format!("| {m} |")), "{report}");
    }
    assert!(report.contains("heatmap.png"));

    // Started again, every run is found done and nothing retrains.
    let again = run_ordinal(&cfg, &candle_core::Device::Cpu, &OrdinalOptions::default()).unwrap();
    for (a, b) in out.results.iter().zip(&again.results) {
        assert_eq!(a.scores, b.scores);
        assert_eq!(a.secs, b.secs, "{} was retrained", a.method);
    }
    // A changed method retrains that method only, and a run with the same settings
    // reproduces its scores exactly.
    let changed = digits_config(&dir, "tiny-ordinal").replace("alpha = 0.5", "alpha = 0.25");
    let third = run_ordinal(
        &parse(&changed),
        &candle_core::Device::Cpu,
        &OrdinalOptions::default(),
    )
    .unwrap();
    for (a, b) in out.results.iter().zip(&third.results) {
        if a.method == "l2rclip" {
            assert_ne!(a.secs, b.secs);
        } else {
            assert_eq!(a.secs, b.secs, "{}", a.method);
        }
    }
    // A fresh experiment, one run at a time instead of two and on a one-thread pool of
    // its own (as the CLI runs each run thread) instead of the caller's, reproduces
    // every score.
    let serial = digits_config(&scratch("ordinal-digits-2"), "tiny-ordinal")
        .replace("parallel_runs = 2", "parallel_runs = 1");
    let own_pool = OrdinalOptions {
        threads: 1,
        ..Default::default()
    };
    let fresh = run_ordinal(&parse(&serial), &candle_core::Device::Cpu, &own_pool).unwrap();
    for (a, b) in out.results.iter().zip(&fresh.results) {
        assert_eq!(a.scores, b.scores, "{} is not reproducible", a.method);
    }
}

fn write_image(path: &Path, shade: u8) {
    let img = image::RgbImage::from_fn(30, 26, |x, y| {
        image::Rgb([shade, (x * 8) as u8, (y * 9) as u8])
    });
    img.save(path).unwrap();
}

/// Adience-format lists over real PNG files, two folds, flips on.
#[test]
fn benchmark_lists_train_through_their_protocol() {
    let dir = scratch("ordinal-lists");
    let images = dir.join("faces");
    std::fs::create_dir_all(images.join("u1")).unwrap();
    let mut lists = Vec::new();
    for f in 0..2 {
        let mut text = String::new();
        for i in 0..12 {
            let name = format!("u1/landmark_aligned_face.{f}{i}.x.jpg");
            let group = i % 4;
            write_image(
                &images.join(&name).with_extension("png"),
                (group * 60) as u8,
            );
            text.push_str(&format!(
                "{} {group}\n",
                Path::new(&name).with_extension("png").display()
            ));
        }
        let list = dir.join(format!("simplified_adience_{f}.txt"));
        std::fs::write(&list, text).unwrap();
        lists.push(list);
    }
    let cfg_text = format!(
        r#"
kind = "ordinal"
name = "tiny-adience"
out_dir = "{out}"
seeds = [1]
parallel_runs = 1

[data]
source = "list"
format = "adience"
image_root = "{root}"
labels = {{ min = 0, max = 3 }}
seed = 0
image_size = 24
flip = true

[data.protocol]
kind = "leave-one-out"
files = ["{a}", "{b}"]

[prompt]
template = "a face in age group {{rank}}."
ranks = ["one", "two", "three", "four"]
n_ctx = 2
{TINY_MODEL}
{METHODS}
"#,
        out = dir.display(),
        root = images.display(),
        a = lists[0].display(),
        b = lists[1].display()
    );
    let out = run_ordinal(
        &parse(&cfg_text),
        &candle_core::Device::Cpu,
        &OrdinalOptions::default(),
    )
    .unwrap();
    assert_eq!(out.results.len(), 5 * 2);
    assert!(
        out.results
            .iter()
            .all(|r| r.train_images == 12 && r.scores.test_images == 12)
    );
    let folds: std::collections::BTreeSet<_> = out.results.iter().map(|r| r.fold.clone()).collect();
    assert_eq!(
        folds.into_iter().collect::<Vec<_>>(),
        vec!["fold0", "fold1"]
    );

    // A bad line names the list file and the line; a missing or corrupt image names
    // the image.
    let fails_with = |list: &str| {
        std::fs::write(&lists[1], list).unwrap();
        let opts = OrdinalOptions {
            overwrite: true,
            ..Default::default()
        };
        run_ordinal(&parse(&cfg_text), &candle_core::Device::Cpu, &opts)
            .unwrap_err()
            .to_string()
    };
    let err = fails_with("u1/a.png 2\nu1/b.png seven\n");
    assert!(err.contains("simplified_adience_1.txt:2"), "{err}");
    let err = fails_with("u1/missing.png 2\n");
    assert!(err.contains("missing.png"), "{err}");
    std::fs::write(images.join("u1/corrupt.png"), b"not a png").unwrap();
    let err = fails_with("u1/corrupt.png 2\n");
    assert!(
        err.contains("corrupt.png") && err.contains("not a readable"),
        "{err}"
    );
}

#[test]
fn bad_ordinal_configs_name_the_key() {
    let dir = scratch("ordinal-errors");
    let good = digits_config(&dir, "bad");
    let cases = [
        (
            good.replace("template = \"{rank} digits.\"", "template = \"digits.\""),
            "prompt.template",
        ),
        (
            good.replace("heads = 2, alpha = 0.5", "heads = 3, alpha = 0.5"),
            "heads 3 must divide",
        ),
        (
            good.replace(
                "bases = 2, interpolation = \"inv-prop\"",
                "bases = 9, interpolation = \"inv-prop\"",
            ),
            "bases must be in 1..=4",
        ),
        (good.replace("seeds = [1, 2]", "seeds = []"), "seeds"),
        (
            good.replace("lr = 1e-3\nwarmup", "lr = -1.0\nwarmup"),
            "stage1.lr",
        ),
        (
            good.replace("n_ctx = 2", "n_ctx = 2\nranks = [\"a\"]"),
            "prompt.ranks has 1 words for 4 ranks",
        ),
        (
            good.replace("kind = \"ordinal\"", "kind = \"ordinal\"\nseedz = 3"),
            "seedz",
        ),
    ];
    for (text, want) in cases {
        let err = OrdinalConfig::parse(&text, Path::new("bad.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bad.toml") && err.contains(want),
            "{want}: {err}"
        );
    }
    // Too many context tokens for the 24-token tower: an error at run time, not a panic.
    let long = good.replace("n_ctx = 2", "n_ctx = 30");
    let err = run_ordinal(
        &parse(&long),
        &candle_core::Device::Cpu,
        &OrdinalOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("context tokens") && err.contains("24"),
        "{err}"
    );
}

/// From a pretrained (here: exported random) model: zero-shot runs once, L2RCLIP shares
/// the cached stage-1 features across seeds, and the language side stays frozen.
#[test]
fn runs_from_a_pretrained_model_share_its_frozen_parts() {
    use std::collections::HashMap;

    let dir = scratch("ordinal-pretrained");
    let text = digits_config(&dir, "from-pretrained");
    let cfg = parse(&text);
    let clip = cfg.model.resolve().unwrap();
    let vm = rankalign_train::models::SeededVarMap::new(11);
    rankalign_train::models::ClipModel::new(
        &clip,
        vm.var_builder(candle_core::DType::F32, &candle_core::Device::Cpu),
    )
    .unwrap();
    let tensors: HashMap<String, candle_core::Tensor> = vm
        .named_vars()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect();
    let model_dir = dir.join("pretrained");
    rankalign_train::export::export_hf(&clip, &tensors, &model_dir).unwrap();
    let with_init = text.replace(
        "[model.clip]",
        &format!(
            "[model]\ninit_from = \"{}\"\n\n[model.clip]",
            model_dir.display()
        ),
    );
    let out = run_ordinal(
        &parse(&with_init),
        &candle_core::Device::Cpu,
        &OrdinalOptions::default(),
    )
    .unwrap();
    let count = |m: &str| out.results.iter().filter(|r| r.method == m).count();
    assert_eq!(
        count("zero-shot"),
        1,
        "zero-shot from fixed weights runs once"
    );
    assert_eq!(count("l2rclip"), 2);
    // The pretrained directory is untouched: training works on copies.
    let (_, after) =
        rankalign_train::export::load_hf(&model_dir, &candle_core::Device::Cpu).unwrap();
    for (k, v) in &tensors {
        let d = (v - &after[k])
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{k}");
    }
}

/// Stage keys that no method reads are errors that say which keys are read instead.
#[test]
fn unread_stage_options_are_errors() {
    let dir = scratch("ordinal-unread");
    let base = digits_config(&dir, "x");
    let parse = |text: &str| {
        OrdinalConfig::parse(text, Path::new("o.toml"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert_eq!(parse(&base), "", "the base config is valid");
    let err = parse(&base.replace(
        "warmup_epochs = 1\n",
        "warmup_epochs = 1\nmilestones = [1]\ngamma = 0.5\n",
    ));
    assert!(
        err.contains("stage1.milestones and stage1.gamma are not read"),
        "{err}"
    );
    let err = parse(&base.replace(
        "milestones = [1]\n",
        "milestones = [1]\nwarmup_epochs = 1\n",
    ));
    assert!(err.contains("stage2.warmup_epochs is not read"), "{err}");
    // Without an L2RCLIP method, stage 1's budget is not read …
    let no_l2r = base
        .split("[[method]]\nname = \"l2rclip\"")
        .next()
        .unwrap()
        .to_string();
    let err = parse(&no_l2r);
    assert!(
        err.contains("stage1.epochs and stage1.batch_size are read only by L2RCLIP"),
        "{err}"
    );
    // … and leaving it out is valid; with L2RCLIP it is required.
    let trimmed = no_l2r.replacen(
        "epochs = 2\nbatch_size = 16\nlr = 1e-3\nwarmup_epochs",
        "lr = 1e-3\nwarmup_epochs",
        1,
    );
    assert_eq!(parse(&trimmed), "");
    let err = parse(&base.replacen(
        "epochs = 2\nbatch_size = 16\nlr = 1e-3\nwarmup_epochs",
        "lr = 1e-3\nwarmup_epochs",
        1,
    ));
    assert!(err.contains("stage1.epochs must be given"), "{err}");
}
