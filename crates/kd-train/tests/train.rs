//! The training loop's promises: gradient accumulation equals one big batch; a run killed
//! with SIGKILL and resumed equals an uninterrupted one; a kill while a checkpoint is being
//! written leaves a loadable one; a non-finite loss stops the run with a message naming the
//! step and the loss parts; validation, best and last-N checkpoints are kept as configured.
//!
//! The kills hit a child process: this test binary re-run with `KD_TRAIN_CHILD` set, which
//! makes the ignored test [`child`] train instead of returning.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor};
use kd_imdb::{Example, IGNORE_INDEX};
use kd_loss::{Divergence, KdConfig, Reduction};
use kd_qwen::{LoraConfig, Qwen, QwenConfig, attach_lora, has_lora, load_checkpoint};
use kd_train::checkpoint::{self, OPTIMIZER_FILE};
use kd_train::{
    Objective, Optimizer, RunOptions, StepMetrics, TrainConfig, Validation, step_gradients, train,
};

const VOCAB: usize = 40;

/// Model initialisation and dropout draw from the device's RNG, which every test in this
/// binary shares: tests that compare two runs hold this lock so no other test draws in
/// between.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}
const PAD: u32 = 0;
/// Label token ids the validation scores compare.
const LABELS: [u32; 2] = [3, 4];

fn config(vocab: usize) -> QwenConfig {
    let mut c = QwenConfig::qwen3_shaped(16, 32, 1, 2, 1, 8);
    c.vocab_size = vocab;
    c.initializer_range = 0.3;
    c
}

fn model(vocab: usize, seed: u64, device: &Device) -> Qwen {
    device.seed(seed);
    Qwen::new(&config(vocab), device)
}

/// `n` examples of lengths 5..=12 over ids 5..vocab: a prompt, then a label token (3 or 4,
/// decided by the first id's parity) and an end token 2, both supervised.
fn examples(n: usize, vocab: u32) -> Vec<Example> {
    (0..n)
        .map(|i| {
            let len = 5 + (i * 7) % 8;
            let mut ids: Vec<u32> = (0..len - 2)
                .map(|j| 5 + ((i * 31 + j * 17) as u32 % (vocab - 5)))
                .collect();
            let label = LABELS[(ids[0] % 2) as usize];
            ids.extend([label, 2]);
            let mut labels = vec![IGNORE_INDEX; len];
            labels[len - 2] = i64::from(label);
            labels[len - 1] = 2;
            Example {
                input_ids: ids,
                labels,
                answer_pos: len - 2,
                truncated: false,
                label: None,
            }
        })
        .collect()
}

/// Validation prompts: the examples without their answer, and the labels.
fn prompts(examples: &[Example]) -> (Vec<Example>, Vec<usize>) {
    let prompts = examples
        .iter()
        .map(|e| {
            let n = e.answer_pos;
            Example {
                input_ids: e.input_ids[..n].to_vec(),
                labels: vec![IGNORE_INDEX; n],
                answer_pos: n,
                truncated: false,
                label: None,
            }
        })
        .collect();
    let labels = examples
        .iter()
        .map(|e| usize::from(e.input_ids[e.answer_pos] == LABELS[1]))
        .collect();
    (prompts, labels)
}

fn train_config(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        batch_size: 6,
        micro_batch_size: Some(4),
        lr: 1e-2,
        warmup_steps: 2,
        min_lr_ratio: 0.1,
        weight_decay: 0.1,
        grad_clip: Some(0.5),
        seed: 7,
        eval_every: None,
        checkpoint_every: Some(1),
        keep_last: 2,
    }
}

/// All float parameters flattened, in visiting order.
fn params(model: &Qwen) -> Vec<f32> {
    struct Collect(Vec<f32>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            self.0.extend(
                p.val()
                    .into_data()
                    .convert::<f32>()
                    .try_to_vec::<f32>()
                    .unwrap(),
            );
        }
    }
    let mut c = Collect(Vec::new());
    model.visit(&mut c);
    c.0
}

fn losses(dir: &Path) -> Vec<(usize, f64)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let m: StepMetrics = serde_json::from_str(l).unwrap();
            (m.step, m.loss)
        })
        .collect()
}

fn lora_config() -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.1,
        targets: vec!["q_proj".into(), "v_proj".into(), "gate_proj".into()],
    }
}

/// The resume tests' model before training, with LoRA adapters when `lora`.
fn initial(device: &Device, lora: bool) -> Qwen {
    let base = model(VOCAB, 11, device);
    if lora {
        // burn initialises parameters lazily: draw the base's now, before the adapters',
        // so that the base is the plain seed-11 model.
        let _ = params(&base);
        attach_lora(base, &lora_config()).unwrap()
    } else {
        base
    }
}

/// Trains the resume test's model: `steps` steps, checkpoint every step, in `dir`.
fn run(
    dir: &Path,
    steps: usize,
    resume: bool,
    lora: bool,
    on_step: &mut dyn FnMut(&StepMetrics),
) -> Qwen {
    let device = Device::flex().autodiff();
    let data = examples(20, VOCAB as u32);
    let student = initial(&device, lora);
    let run = RunOptions {
        dir: Some(dir.to_path_buf()),
        resume,
        validation: None,
        on_step,
    };
    let (model, _) = train(
        student,
        &data,
        PAD,
        &train_config(steps),
        &Objective::Labels,
        run,
    )
    .unwrap();
    model
}

const RESUME_STEPS: usize = 8;

/// The child side of the kill tests; does nothing in a normal test run.
#[test]
#[ignore = "run by the kill tests as a child process"]
fn child() {
    let Ok(dir) = std::env::var("KD_TRAIN_CHILD") else {
        return;
    };
    let stop_at: usize = std::env::var("KD_TRAIN_STOP_AT").unwrap().parse().unwrap();
    let steps: usize = std::env::var("KD_TRAIN_STEPS").unwrap().parse().unwrap();
    let lora = std::env::var_os("KD_TRAIN_LORA").is_some();
    run(Path::new(&dir), steps, false, lora, &mut |m| {
        if m.step == stop_at {
            // Wait here to be killed; the checkpoint of this step is already on disk.
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    });
}

fn spawn_child(dir: &Path, steps: usize, stop_at: usize, lora: bool) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    if lora {
        cmd.env("KD_TRAIN_LORA", "1");
    }
    cmd.args(["--exact", "child", "--ignored", "--nocapture"])
        .env("KD_TRAIN_CHILD", dir)
        .env("KD_TRAIN_STEPS", steps.to_string())
        .env("KD_TRAIN_STOP_AT", stop_at.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn killed_and_resumed_run_equals_an_uninterrupted_one() {
    let _rng = rng_lock();
    kill_and_resume(false);
}

#[test]
fn lora_run_killed_and_resumed_trains_only_the_adapters_and_equals_an_uninterrupted_one() {
    let _rng = rng_lock();
    let resumed = kill_and_resume(true);
    assert!(has_lora(&resumed));
    // The base weights are those of the untrained model, bit for bit.
    let mut base = resumed.clone();
    base.lora = None;
    // burn initialises parameters lazily, on first access: materialise them right after
    // seeding, as `initial` does, so that both draw the same numbers.
    let untrained = params(&model(VOCAB, 11, &Device::flex().autodiff()));
    let trained_base = params(&base);
    let first = trained_base
        .iter()
        .zip(&untrained)
        .position(|(a, b)| a != b);
    assert_eq!(trained_base.len(), untrained.len());
    assert_eq!(
        first, None,
        "base weights changed, first at flat index {first:?}"
    );
}

/// Straight run vs. a child killed half-way and resumed here; returns the resumed model.
fn kill_and_resume(lora: bool) -> Qwen {
    let tmp = tempfile::tempdir().unwrap();
    let straight_dir = tmp.path().join("straight");
    let straight = run(&straight_dir, RESUME_STEPS, false, lora, &mut |_| {});

    // SIGKILL the child once it has checkpointed half the steps.
    let killed_dir = tmp.path().join("killed");
    let half = RESUME_STEPS / 2;
    let mut child = spawn_child(&killed_dir, RESUME_STEPS, half, lora);
    wait_for("the half-way checkpoint", || {
        checkpoint::step_dir(&killed_dir, half).exists()
    });
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    assert_eq!(losses(&killed_dir).len(), half);

    let mut resumed_steps = Vec::new();
    let resumed = run(&killed_dir, RESUME_STEPS, true, lora, &mut |m| {
        resumed_steps.push(m.step)
    });
    assert_eq!(
        resumed_steps,
        ((half + 1)..=RESUME_STEPS).collect::<Vec<_>>()
    );

    // Same ops on the same CPU backend in the same order: the results are bitwise equal,
    // so the tolerance is zero. (A backend with non-deterministic reductions would need one.)
    assert_eq!(losses(&killed_dir), losses(&straight_dir));
    let (a, b) = (params(&straight), params(&resumed));
    assert_eq!(a.len(), b.len());
    let max_diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert_eq!(max_diff, 0.0, "parameters differ by up to {max_diff}");

    // Only the last two checkpoints are kept (no validation, so no best to keep).
    let kept: Vec<usize> = checkpoint::list(&killed_dir)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(kept, [RESUME_STEPS - 1, RESUME_STEPS]);
    resumed
}

#[test]
fn kill_during_a_checkpoint_write_leaves_a_loadable_checkpoint() {
    let _rng = rng_lock();
    const STEPS: usize = 40;
    let tmp = tempfile::tempdir().unwrap();
    let partial = |dir: &Path| -> bool {
        std::fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.path().extension().is_some_and(|x| x == "partial"))
        })
    };
    // Kill the child the moment a checkpoint folder is seen half-written (it checkpoints
    // every step, so most of its time is spent writing). Should a child finish before that
    // is seen, try again in a fresh folder.
    let mut caught = None;
    for attempt in 0..5 {
        let dir = tmp.path().join(format!("run{attempt}"));
        let mut child = spawn_child(&dir, STEPS, usize::MAX, false);
        let start = Instant::now();
        loop {
            if partial(&dir) && !checkpoint::list(&dir).unwrap().is_empty() {
                child.kill().unwrap(); // SIGKILL on Unix
                child.wait().unwrap();
                caught = Some(dir);
                break;
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(120), "child hung");
            std::thread::sleep(Duration::from_micros(200));
        }
        if caught.is_some() {
            break;
        }
    }
    let dir = caught.expect("never saw a checkpoint being written in 5 runs");

    // The newest complete checkpoint loads: model, optimizer, state.
    let (step, newest) = checkpoint::list(&dir).unwrap().pop().unwrap();
    let state = checkpoint::read_state(&newest).unwrap();
    assert_eq!(state.step, step);
    load_checkpoint(&newest, &Device::flex().autodiff()).unwrap();
    Optimizer::adamw(0.1, None)
        .load(&newest.join(OPTIMIZER_FILE))
        .unwrap();

    // The run resumes right after it, drops the half-written folder and logs every step
    // exactly once.
    let mut first = None;
    run(&dir, STEPS, true, false, &mut |m| {
        first.get_or_insert(m.step);
    });
    assert_eq!(first, Some(step + 1));
    assert!(!partial(&dir));
    let steps: Vec<usize> = losses(&dir).into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, (1..=STEPS).collect::<Vec<_>>());
}

#[test]
fn weighted_labels_average_each_example_then_weight_the_examples() {
    let _rng = rng_lock();
    let device = Device::flex().autodiff();
    let student = model(VOCAB, 4, &device);
    // Six examples; the last three get extra supervised tokens (a "rationale"), so plain
    // token-mean CE would weight them 2-4x more than the others.
    let mut data = examples(6, VOCAB as u32);
    for (extra, e) in data.iter_mut().skip(3).enumerate() {
        for t in 1..=extra + 1 {
            let p = e.answer_pos - t;
            e.labels[p] = i64::from(e.input_ids[p]);
        }
    }
    let weights = [1.0, 1.0, 1.0, 0.5, 0.5, 2.0];
    // Each example's token-mean CE on its own (one example per step: Labels divides by its
    // supervised tokens).
    let mean_ce: Vec<f64> = (0..data.len())
        .map(|i| {
            step_gradients(&student, &data, &[i], PAD, 1, &Objective::Labels)
                .unwrap()
                .loss
        })
        .collect();
    let expected: f64 = mean_ce
        .iter()
        .zip(&weights)
        .map(|(m, w)| m * w)
        .sum::<f64>()
        / weights.iter().sum::<f64>();
    let picked: Vec<usize> = (0..data.len()).collect();
    let objective = Objective::WeightedLabels { weights: &weights };
    // Whole batch and uneven micro-batches give the same value.
    for micro in [6, 4, 1] {
        let got = step_gradients(&student, &data, &picked, PAD, micro, &objective)
            .unwrap()
            .loss;
        // f32 sums of a few terms, then f64 on top: 1e-6 relative.
        const TOL: f64 = 1e-6;
        assert!(
            (got - expected).abs() <= TOL * expected.abs(),
            "micro-batch {micro}: {got} vs {expected}"
        );
    }
}

#[test]
fn four_uneven_micro_batches_give_the_gradient_of_one_batch() {
    let _rng = rng_lock();
    let plain = Device::flex();
    let device = plain.clone().autodiff();
    let teacher = model(VOCAB, 3, &plain);
    let student = model(VOCAB, 4, &device);
    // 8 examples of lengths 5..=12, so the micro-batches of 2 have uneven lengths and
    // padding, and (with two supervised tokens each) the same supervised count; the last
    // example gets a third supervised token so the counts differ too.
    let mut data = examples(8, VOCAB as u32);
    let last = data.last_mut().unwrap();
    let t = last.answer_pos - 1;
    last.labels[t] = i64::from(last.input_ids[t]);
    let picked: Vec<usize> = (0..data.len()).collect();
    let objective = Objective::Distill {
        teacher: &teacher,
        kd: KdConfig {
            divergence: Divergence::ReverseKl,
            temperature: 2.0,
            t_squared: true,
            reduction: Reduction::TokenMean,
            chunk_positions: 1024,
        },
        alpha: 0.5,
    };
    let whole = step_gradients(&student, &data, &picked, PAD, 8, &objective).unwrap();
    let split = step_gradients(&student, &data, &picked, PAD, 2, &objective).unwrap();
    assert_eq!(whole.supervised, 17);
    assert_eq!(split.supervised, 17);

    // The losses are sums of per-token terms divided by the same 17: equal up to f32
    // summation order, 1e-6 relative.
    const LOSS_TOL: f64 = 1e-6;
    assert!((whole.loss - split.loss).abs() <= LOSS_TOL * whole.loss.abs());

    let flat = |g: &kd_train::StepGradients| {
        struct Grads<'a>(&'a burn::optim::GradientsParams, Vec<f32>);
        impl ModuleVisitor for Grads<'_> {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
                let g = self
                    .0
                    .get::<D>(p.id)
                    .expect("every parameter has a gradient");
                self.1
                    .extend(g.into_data().convert::<f32>().try_to_vec::<f32>().unwrap());
            }
        }
        let mut v = Grads(&g.grads, Vec::new());
        student.visit(&mut v);
        v.1
    };
    let (a, b) = (flat(&whole), flat(&split));
    let scale = a.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let max_diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    // Each gradient entry is a sum of a few hundred f32 products whose order differs between
    // the two splits; 1e-5 of the largest entry is two orders above f32 rounding there and
    // far below the 1/4 factor a per-micro-batch normalisation would introduce.
    const GRAD_TOL: f32 = 1e-5;
    assert!(scale > 1e-4, "gradients vanish: {scale}");
    assert!(
        max_diff <= GRAD_TOL * scale,
        "max diff {max_diff} vs largest gradient {scale}"
    );
}

#[test]
fn non_finite_loss_names_the_step_and_the_parts() {
    let _rng = rng_lock();
    let device = Device::flex().autodiff();
    let mut student = model(VOCAB, 4, &device);
    let shape = student.model.embed_tokens.weight.val().shape();
    student.model.embed_tokens.weight = Param::from_tensor(Tensor::full(shape, f32::NAN, &device));
    let data = examples(6, VOCAB as u32);
    let tmp = tempfile::tempdir().unwrap();
    let run = RunOptions {
        dir: Some(tmp.path().to_path_buf()),
        resume: false,
        validation: None,
        on_step: &mut |_| {},
    };
    let err = train(
        student,
        &data,
        PAD,
        &train_config(3),
        &Objective::Labels,
        run,
    )
    .expect_err("a NaN loss must stop the run");
    let message = err.to_string();
    assert!(message.contains("at step 1"), "{message}");
    assert!(message.contains("ce NaN"), "{message}");
    assert!(message.contains("No checkpoint"), "{message}");
    assert!(checkpoint::list(tmp.path()).unwrap().is_empty());
}

#[test]
fn examples_longer_than_the_models_positions_are_refused_before_training() {
    let _rng = rng_lock();
    let device = Device::flex().autodiff();
    let mut c = config(VOCAB);
    // The examples are 5 to 12 tokens long.
    c.max_position_embeddings = 11;
    device.seed(4);
    let student = Qwen::new(&c, &device);
    let run = RunOptions {
        dir: None,
        resume: false,
        validation: None,
        on_step: &mut |_| panic!("no step may run"),
    };
    let err = train(
        student,
        &examples(8, VOCAB as u32),
        PAD,
        &train_config(2),
        &Objective::Labels,
        run,
    )
    .expect_err("a 12-token example cannot fit 11 positions");
    let message = err.to_string();
    assert!(
        message.contains("12 tokens") && message.contains("max_position_embeddings of 11"),
        "{message}"
    );
}

#[test]
fn validation_is_logged_and_the_best_checkpoint_survives_pruning() {
    let _rng = rng_lock();
    let plain = Device::flex();
    let device = plain.clone().autodiff();
    let data = examples(20, VOCAB as u32);
    let (val_prompts, val_labels) = prompts(&data[..10]);
    let tmp = tempfile::tempdir().unwrap();
    let mut config = train_config(6);
    config.eval_every = Some(2);
    config.checkpoint_every = Some(1);
    config.keep_last = 1;
    let run = RunOptions {
        dir: Some(tmp.path().to_path_buf()),
        resume: false,
        validation: Some(Validation {
            prompts: &val_prompts,
            labels: &val_labels,
            label_ids: LABELS,
            batch_size: 4,
            device: plain,
        }),
        on_step: &mut |_| {},
    };
    let (_, summary) = train(
        model(VOCAB, 5, &device),
        &data,
        PAD,
        &config,
        &Objective::Labels,
        run,
    )
    .unwrap();
    let logged: Vec<(usize, Option<f64>)> =
        std::fs::read_to_string(tmp.path().join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let m: StepMetrics = serde_json::from_str(l).unwrap();
                (m.step, m.val_accuracy)
            })
            .collect();
    let validated: Vec<usize> = logged
        .iter()
        .filter(|(_, a)| a.is_some())
        .map(|(s, _)| *s)
        .collect();
    assert_eq!(validated, [2, 4, 6]);
    let (best_step, best_acc) = summary.best_val.unwrap();
    let best_logged = logged
        .iter()
        .filter_map(|(_, a)| *a)
        .fold(f64::MIN, f64::max);
    assert_eq!(best_acc, best_logged);
    let mut kept: Vec<usize> = checkpoint::list(tmp.path())
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    kept.dedup();
    let mut want = vec![best_step, 6];
    want.sort_unstable();
    want.dedup();
    assert_eq!(kept, want);
}
