//! Data parallel across ranks (`step::loss_and_grads_across` over `dist::TcpCollective`,
//! two ranks talking TCP on localhost): 2 ranks × 64 give the weights of one process
//! with micro-batches of 64 bit for bit, and those of the one-piece 1 × 128 step to f32
//! rounding, after 5 AdamW steps, for InfoNCE and RankCLIP; a rank that stops makes the
//! other's next step fail with an error naming it.

use std::collections::HashMap;
use std::net::TcpListener;

use rankalign_train::data::Batch;
use rankalign_train::dist::{Collective, DistEnv, TcpCollective, Timeouts};
use rankalign_train::losses::{ClipObjective, Objective, RankClipConfig, RankClipObjective};
use rankalign_train::step::{StepPlan, loss_and_grads_across};

use super::micro_batch::{B, batches, train, train_with, worst_relative};

/// Two connected ranks of one run: rank 0's and rank 1's collectives.
pub fn pair() -> (TcpCollective, TcpCollective) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let env = DistEnv {
        rank: 1,
        world_size: 2,
        local_rank: 1,
        master_addr: "127.0.0.1".into(),
        master_port: port,
    };
    let peer = std::thread::spawn(move || TcpCollective::connect(&env, Timeouts::default()));
    let root = TcpCollective::accept(&listener, 2, Timeouts::default()).unwrap();
    (root, peer.join().unwrap().unwrap())
}

/// Rank `comm.rank()`'s half of every batch.
fn half(data: &[Batch], rank: usize) -> Vec<Batch> {
    data.iter()
        .map(|b| b.narrow(rank * B / 2, B / 2).unwrap())
        .collect()
}

/// Both ranks trained side by side, each on its half; their weights.
fn train_two_ranks(objective: &dyn Objective, data: &[Batch]) -> [HashMap<String, Vec<f32>>; 2] {
    let (root, peer) = pair();
    std::thread::scope(|s| {
        let run = |comm: TcpCollective| {
            let local = half(data, comm.rank());
            s.spawn(move || {
                train_with(&local, |t, batch, ctx| {
                    loss_and_grads_across(
                        &t.model,
                        &t.params,
                        &t.logit_scale,
                        objective,
                        batch,
                        ctx,
                        StepPlan::default(),
                        &comm,
                    )
                })
            })
        };
        let (r0, r1) = (run(root), run(peer));
        [r0.join().unwrap(), r1.join().unwrap()]
    })
}

#[test]
fn two_ranks_of_64_equal_one_process_of_128() {
    let data = batches();
    let rankclip = RankClipObjective(RankClipConfig::rankclip());
    let objectives: [(&str, &dyn Objective); 2] =
        [("clip", &ClipObjective), ("rankclip", &rankclip)];
    for (name, objective) in objectives {
        let [rank0, rank1] = train_two_ranks(objective, &data);
        assert_eq!(rank0, rank1, "{name}: the ranks' weights differ");
        let micro = StepPlan {
            micro_batch: Some(B / 2),
            recompute: false,
        };
        assert_eq!(
            rank0,
            train(objective, micro, 2, &data),
            "{name}: 2 ranks × 64 differ from one process with micro-batches of 64"
        );
        let (rel, at) = worst_relative(&rank0, &train(objective, StepPlan::default(), 2, &data));
        assert!(
            rel < 1e-5,
            "{name}: 2 × 64 differs from 1 × 128 by {rel:e} (relative) in {at}"
        );
    }
}

#[test]
fn a_stopped_rank_stops_the_other_with_its_name() {
    let (root, peer) = pair();
    drop(peer); // rank 1 dies before the first collective
    let t = rankalign_train::losses::StepContext {
        epoch: 1,
        epochs: 1,
        tie_seed: 0,
        labels: None,
    };
    let tiny = super::micro_batch::tiny_step::tiny(4);
    let data = half(&batches()[..1], 0);
    let err = loss_and_grads_across(
        &tiny.model,
        &tiny.params,
        &tiny.logit_scale,
        &ClipObjective,
        &data[0],
        &t,
        StepPlan::default(),
        &root,
    )
    .err()
    .expect("the step must fail")
    .to_string();
    assert!(
        err.contains("rank 1") && err.contains("closed the connection"),
        "{err}"
    );
}

/// A rank that does not see rank 0's run directory (here: another `out_dir`) would start
/// over while rank 0 resumes; the run stops at once, saying so.
#[test]
fn ranks_that_start_from_different_checkpoints_are_refused() {
    let (shared, alone) = (crate::scratch("dp-shared"), crate::scratch("dp-alone"));
    // Rank 0's directory holds a checkpoint at step 4; rank 1's is empty.
    let variant = "[[variant]]\nname = \"clip\"\nloss = { kind = \"clip\" }\n";
    crate::train_tiny(&shared, "dp", variant, 4);
    let cfg = |dir: &std::path::Path| {
        rankalign_train::ExperimentConfig::parse(
            &crate::tiny_config("dp", dir, variant),
            std::path::Path::new("tiny.toml"),
        )
        .unwrap()
    };
    let (root, peer) = pair();
    let run = |dir: std::path::PathBuf, comm: TcpCollective| {
        std::thread::spawn(move || {
            let opts = rankalign_train::RunOptions {
                comm: Some(std::sync::Arc::new(comm)),
                ..Default::default()
            };
            rankalign_train::run_experiment(&cfg(&dir), &candle_core::Device::Cpu, &opts)
                .err()
                .map(|e| e.to_string())
        })
    };
    let (r0, r1) = (run(shared, root), run(alone, peer));
    let err = r1.join().unwrap().expect("rank 1 must fail");
    assert!(
        err.contains("rank 1 does not start where rank 0 does")
            && err.contains("another step: step 0 against rank 0's 4"),
        "{err}"
    );
    assert!(r0.join().unwrap().is_some(), "rank 0 must fail too");
}

/// A global batch that the ranks cannot share evenly is refused on every rank, naming
/// the key, before any step.
#[test]
fn a_batch_the_ranks_cannot_split_is_refused() {
    let variant = "[[variant]]\nname = \"clip\"\nloss = { kind = \"clip\" }\n";
    let (root, peer) = pair();
    let run = |comm: TcpCollective| {
        let dir = crate::scratch(&format!("dp-odd-{}", comm.rank()));
        let text =
            crate::tiny_config("odd", &dir, variant).replace("batch_size = 16", "batch_size = 15");
        std::thread::spawn(move || {
            let cfg =
                rankalign_train::ExperimentConfig::parse(&text, std::path::Path::new("odd.toml"))
                    .unwrap();
            let opts = rankalign_train::RunOptions {
                comm: Some(std::sync::Arc::new(comm)),
                ..Default::default()
            };
            rankalign_train::run_experiment(&cfg, &candle_core::Device::Cpu, &opts)
                .err()
                .map(|e| e.to_string())
        })
    };
    let (r0, r1) = (run(root), run(peer));
    for err in [r0.join().unwrap(), r1.join().unwrap()] {
        let err = err.expect("every rank must refuse the batch");
        assert!(
            err.contains("train.batch_size 15") && err.contains("2 ranks"),
            "{err}"
        );
    }
}
