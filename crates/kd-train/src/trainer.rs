//! The training loop shared by teacher fine-tuning and student distillation.
//!
//! One optimizer step takes `batch_size` examples in a seeded order, split into micro-batches
//! of at most `micro_batch_size`; every micro-batch's loss is a *sum* over its supervised
//! tokens divided by the supervised tokens of the whole step, so the accumulated gradient is
//! the gradient of the token mean over the step, whatever the split. Then the global gradient
//! norm is clipped and AdamW updates the weights ([`crate::optim`]).
//!
//! With a run folder the loop appends every step to `metrics.jsonl`, validates every
//! `eval_every` steps and checkpoints every `checkpoint_every` steps ([`crate::checkpoint`]);
//! `resume` continues from the newest complete checkpoint with the same weights, optimizer
//! moments, schedule position, data position and randomness, so the continued run computes
//! what the uninterrupted run would have.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Tensor};
use kd_imdb::{Example, IGNORE_INDEX, PadSide, collate};
use kd_loss::{
    KdConfig, Reduction, cross_entropy, kd_loss, sparse_kd_loss, weighted_cross_entropy,
};
use kd_qwen::{
    ADAPTER_CONFIG, ForwardOptions, Qwen, has_lora, load_adapters, load_checkpoint, save_adapters,
    save_checkpoint,
};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::Error;
use crate::batch::StepBatch;
use crate::cache::AlignedCache;
use crate::checkpoint::{self, OPTIMIZER_FILE, TrainState, io_error};
use crate::optim::{Optimizer, stable_param_ids};
use crate::schedule::WarmupCosine;

/// Optimisation settings of one training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Examples per optimizer step.
    pub batch_size: usize,
    /// Examples per forward/backward pass; the step's gradient is accumulated over
    /// `ceil(batch_size / micro_batch_size)` of them. Default: the whole batch at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub micro_batch_size: Option<usize>,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// Final learning rate as a fraction of the peak.
    pub min_lr_ratio: f64,
    /// AdamW decoupled weight decay (not applied to norms and biases).
    pub weight_decay: f64,
    /// Clip the global L2 norm of all gradients to this value.
    pub grad_clip: Option<f64>,
    /// Seed for initialisation, data order and dropout.
    pub seed: u64,
    /// Validate every this many steps (and after the last), when validation data is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_every: Option<usize>,
    /// Checkpoint every this many steps (and after the last), when a run folder is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_every: Option<usize>,
    /// Checkpoints kept besides the best by validation accuracy.
    #[serde(default = "default_keep_last")]
    pub keep_last: usize,
}

fn default_keep_last() -> usize {
    2
}

impl TrainConfig {
    /// Settings whose change would make a resumed run differ from an uninterrupted one.
    fn resume_differences(&self, saved: &TrainConfig) -> Vec<String> {
        let mut diffs = Vec::new();
        let mut check = |name: &str, a: String, b: String| {
            if a != b {
                diffs.push(format!("{name}: checkpoint has {b}, this run has {a}"));
            }
        };
        check("steps", self.steps.to_string(), saved.steps.to_string());
        check(
            "batch_size",
            self.batch_size.to_string(),
            saved.batch_size.to_string(),
        );
        check(
            "micro_batch_size",
            format!("{:?}", self.micro_batch_size),
            format!("{:?}", saved.micro_batch_size),
        );
        check("lr", self.lr.to_string(), saved.lr.to_string());
        check(
            "warmup_steps",
            self.warmup_steps.to_string(),
            saved.warmup_steps.to_string(),
        );
        check(
            "min_lr_ratio",
            self.min_lr_ratio.to_string(),
            saved.min_lr_ratio.to_string(),
        );
        check(
            "weight_decay",
            self.weight_decay.to_string(),
            saved.weight_decay.to_string(),
        );
        check(
            "grad_clip",
            format!("{:?}", self.grad_clip),
            format!("{:?}", saved.grad_clip),
        );
        check("seed", self.seed.to_string(), saved.seed.to_string());
        diffs
    }
}

/// What the student is trained on.
pub enum Objective<'a> {
    /// Cross-entropy on the supervised tokens only.
    Labels,
    /// Cross-entropy where every example's supervised tokens share that example's weight:
    /// `Σ_e w_e · mean_t CE(e, t) / Σ_e w_e` over the examples of a step. A multi-task run
    /// (label-only and rationale + label examples, "distilling step-by-step") weights its two
    /// tasks this way, so that a rationale's hundred tokens do not drown a label's two.
    WeightedLabels {
        /// One weight per training example, in the order of `examples`.
        weights: &'a [f64],
    },
    /// `alpha * KD + (1 - alpha) * CE`, the KD term from a frozen teacher.
    Distill {
        /// The teacher, on a device without autodiff: it builds no graph.
        teacher: &'a Qwen,
        /// Divergence, temperature and T² settings. Its reduction is replaced by the
        /// step's token normalisation.
        kd: KdConfig,
        /// Weight of the KD term.
        alpha: f64,
    },
    /// `alpha * KD + (1 - alpha) * CE` against a teacher cache (its top-k log-probabilities
    /// at every supervised position; `kd_loss::sparse_kd_loss`), without the teacher.
    CachedTeacher {
        /// The cache, aligned with the training examples.
        cache: &'a AlignedCache<'a>,
        /// Divergence, temperature (must equal the cache's) and T² settings.
        kd: KdConfig,
        /// Weight of the KD term.
        alpha: f64,
    },
}

/// Held-out prompts scored during training.
pub struct Validation<'a> {
    /// Prompts without the answer.
    pub prompts: &'a [Example],
    /// 0 = negative, 1 = positive, one per prompt.
    pub labels: &'a [usize],
    /// Token ids of the negative and positive label words.
    pub label_ids: [u32; 2],
    /// Prompts per forward pass.
    pub batch_size: usize,
    /// Plain (non-autodiff) device to score on.
    pub device: Device,
}

/// Where and how a run keeps its records.
pub struct RunOptions<'a> {
    /// Folder for `metrics.jsonl` and the `step-*` checkpoints; `None` writes nothing.
    pub dir: Option<PathBuf>,
    /// Continue from the newest complete checkpoint in `dir`, if there is one.
    pub resume: bool,
    /// Validation data, scored every `eval_every` steps.
    pub validation: Option<Validation<'a>>,
    /// Called after every step.
    pub on_step: &'a mut dyn FnMut(&StepMetrics),
}

/// What one step reports (one line of `metrics.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepMetrics {
    /// 1-based step number.
    pub step: usize,
    /// Total loss.
    pub loss: f64,
    /// Cross-entropy part.
    pub ce: f64,
    /// KD part (already multiplied by T² when that is on), when distilling.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub kd: Option<f64>,
    /// Learning rate used for this step.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Supervised tokens in the step.
    pub supervised_tokens: usize,
    /// Non-padding tokens per second over this step.
    pub tokens_per_s: f64,
    /// Training seconds so far.
    pub elapsed_s: f64,
    /// Validation accuracy, on steps where validation ran.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_accuracy: Option<f64>,
}

/// Totals of a finished run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Steps run.
    pub steps: usize,
    /// Step the run resumed from, if it did.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub resumed_from: Option<usize>,
    /// Non-padding tokens processed.
    pub tokens: usize,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Mean tokens per second.
    pub tokens_per_s: f64,
    /// Mean loss over the last tenth of the steps.
    pub final_loss: f64,
    /// Best validation accuracy and its step.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub best_val: Option<(usize, f64)>,
}

/// The seeded data order: epoch `e` visits the examples in a permutation that depends only on
/// `(seed, e)`, so `(epoch, cursor)` is all that a checkpoint needs to store.
struct DataOrder {
    seed: u64,
    epoch: usize,
    cursor: usize,
    order: Vec<usize>,
}

impl DataOrder {
    fn new(len: usize, seed: u64, epoch: usize, cursor: usize) -> Self {
        let mut this = Self {
            seed,
            epoch,
            cursor,
            order: (0..len).collect(),
        };
        this.shuffle();
        this
    }

    fn shuffle(&mut self) {
        self.order.sort_unstable();
        let epoch_seed = self
            .seed
            .wrapping_add((self.epoch as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        self.order.shuffle(&mut StdRng::seed_from_u64(epoch_seed));
    }

    fn next(&mut self, n: usize) -> Vec<usize> {
        let mut picked = Vec::with_capacity(n);
        while picked.len() < n {
            if self.cursor == self.order.len() {
                self.epoch += 1;
                self.cursor = 0;
                self.shuffle();
            }
            picked.push(self.order[self.cursor]);
            self.cursor += 1;
        }
        picked
    }
}

/// Supervised tokens of an example: labels after the first position (the shift of
/// [`crate::supervised_positions`]).
fn supervised_count(example: &Example) -> usize {
    example
        .labels
        .iter()
        .skip(1)
        .filter(|&&l| l != IGNORE_INDEX)
        .count()
}

/// Trains `model` (built on an autodiff device) on `examples` and returns it.
///
/// With `run.resume` and a checkpoint in `run.dir`, `model` only supplies the device: the
/// weights, optimizer state and data position come from the checkpoint.
pub fn train(
    model: Qwen,
    examples: &[Example],
    pad_id: u32,
    config: &TrainConfig,
    objective: &Objective<'_>,
    run: RunOptions<'_>,
) -> Result<(Qwen, TrainSummary), Error> {
    if examples.is_empty() {
        return Err(Error::NoData);
    }
    let longest = examples
        .iter()
        .map(|e| e.input_ids.len())
        .max()
        .unwrap_or(0);
    model.check_positions(longest)?;
    if let Objective::Distill { teacher, .. } = objective {
        teacher.check_positions(longest)?;
    }
    if let Objective::WeightedLabels { weights } = objective {
        assert_eq!(
            weights.len(),
            examples.len(),
            "one weight per training example"
        );
    }
    let RunOptions {
        dir,
        resume,
        validation,
        on_step,
    } = run;
    let device = model.devices().into_iter().next().unwrap_or_default();
    let schedule = WarmupCosine {
        peak: config.lr,
        warmup: config.warmup_steps,
        total: config.steps,
        min_ratio: config.min_lr_ratio,
    };
    let micro = config.micro_batch_size.unwrap_or(config.batch_size).max(1);

    // 1. Fresh start or resume.
    let mut model = stable_param_ids(model);
    let mut optim = Optimizer::adamw(config.weight_decay, config.grad_clip);
    let mut state = TrainState {
        step: 0,
        epoch: 0,
        cursor: 0,
        config: config.clone(),
        losses: Vec::new(),
        tokens: 0,
        seconds: 0.0,
        val_accuracy: None,
        best: None,
    };
    let mut last_good: Option<PathBuf> = None;
    if let (true, Some(dir)) = (resume, dir.as_deref()) {
        checkpoint::remove_partials(dir)?;
        if let Some((saved_state, ckpt)) = newest_loadable(dir)? {
            let diffs = config.resume_differences(&saved_state.config);
            if !diffs.is_empty() {
                return Err(Error::Resume {
                    path: ckpt,
                    message: diffs.join("; "),
                });
            }
            model = stable_param_ids(load_model(&ckpt, &device)?);
            optim =
                optim
                    .load(&ckpt.join(OPTIMIZER_FILE))
                    .map_err(|message| Error::Checkpoint {
                        path: ckpt.join(OPTIMIZER_FILE),
                        message,
                    })?;
            info!(checkpoint = %ckpt.display(), step = saved_state.step, "resuming");
            state = saved_state;
            last_good = Some(ckpt);
        }
    }
    let resumed_from = (state.step > 0).then_some(state.step);
    let mut metrics = match dir.as_deref() {
        Some(dir) => Some(open_metrics(dir, state.step)?),
        None => None,
    };
    let mut data = DataOrder::new(examples.len(), config.seed, state.epoch, state.cursor);

    // 2. The steps.
    let started = Instant::now();
    let seconds_before = state.seconds;
    let tokens_before = state.tokens;
    while state.step < config.steps {
        let step = state.step; // 0-based index of the step being taken
        let step_started = Instant::now();
        // Dropout (LoRA) draws from the device RNG: seeding it per step makes the draws a
        // function of (seed, step), which a resumed run reproduces.
        device.seed(config.seed.wrapping_add(step as u64));

        let picked = data.next(config.batch_size);
        let grads = step_gradients(&model, examples, &picked, pad_id, micro, objective)?;
        let StepGradients {
            loss: loss_sum,
            ce: ce_sum,
            kd: kd_sum,
            supervised: step_supervised,
            tokens: step_tokens,
            ..
        } = grads;
        if !loss_sum.is_finite() {
            return Err(Error::NonFinite {
                step: step + 1,
                loss: loss_sum,
                ce: ce_sum,
                kd: kd_sum,
                last_checkpoint: last_good,
            });
        }
        let lr = schedule.lr(step);
        let (updated, grad_norm) = optim.step(lr, model, grads.grads);
        model = updated;
        let step_seconds = step_started.elapsed().as_secs_f64();

        state.step += 1;
        state.epoch = data.epoch;
        state.cursor = data.cursor;
        state.losses.push(loss_sum);
        state.tokens += step_tokens;
        state.seconds = seconds_before + started.elapsed().as_secs_f64();
        let last = state.step == config.steps;

        // 3. Validation, best tracking, checkpoint.
        state.val_accuracy = None;
        if let Some(v) = &validation
            && (config
                .eval_every
                .is_some_and(|n| n > 0 && state.step.is_multiple_of(n))
                || last)
        {
            let acc = validate(&model, v, pad_id)?;
            state.val_accuracy = Some(acc);
            if state.best.is_none_or(|(_, best)| acc > best) {
                state.best = Some((state.step, acc));
            }
        }
        // 4. Report, before the checkpoint: a kill between the two then leaves a metrics line
        // the resume drops and logs again, never a checkpointed step without its line.
        let metrics_line = StepMetrics {
            step: state.step,
            loss: loss_sum,
            ce: ce_sum,
            kd: kd_sum,
            lr,
            grad_norm,
            supervised_tokens: step_supervised,
            tokens_per_s: step_tokens as f64 / step_seconds,
            elapsed_s: state.seconds,
            val_accuracy: state.val_accuracy,
        };
        debug!(
            step = state.step,
            loss = loss_sum,
            ce = ce_sum,
            lr,
            grad_norm,
            "step"
        );
        if let (Some(file), Some(dir)) = (metrics.as_mut(), dir.as_deref()) {
            let path = dir.join("metrics.jsonl");
            let line = serde_json::to_string(&metrics_line).map_err(|e| Error::Checkpoint {
                path: path.clone(),
                message: e.to_string(),
            })?;
            // One flushed line per step: a crash loses nothing already reported.
            writeln!(file, "{line}")
                .and_then(|()| file.flush())
                .map_err(|e| io_error(&path, e))?;
        }
        // 5. Checkpoint.
        if let Some(dir) = dir.as_deref() {
            let periodic = config
                .checkpoint_every
                .is_some_and(|n| n > 0 && state.step.is_multiple_of(n));
            if periodic
                || last
                || (state.val_accuracy.is_some() && config.checkpoint_every.is_some())
            {
                let written = checkpoint::write(dir, &state, |tmp| {
                    save_model(&model, tmp)?;
                    optim
                        .save(&tmp.join(OPTIMIZER_FILE))
                        .map_err(|message| Error::Checkpoint {
                            path: tmp.join(OPTIMIZER_FILE),
                            message,
                        })
                })?;
                checkpoint::prune(dir, config.keep_last, state.best.map(|(s, _)| s))?;
                last_good = Some(written);
            }
        }

        on_step(&metrics_line);
    }

    let seconds = state.seconds;
    let tokens = state.tokens;
    let tail = (state.losses.len() / 10).max(1);
    let final_loss = state.losses[state.losses.len().saturating_sub(tail)..]
        .iter()
        .sum::<f64>()
        / tail as f64;
    let run_tokens = tokens - tokens_before;
    let run_seconds = (seconds - seconds_before).max(f64::EPSILON);
    let summary = TrainSummary {
        steps: config.steps,
        resumed_from,
        tokens,
        seconds,
        tokens_per_s: if run_tokens > 0 {
            run_tokens as f64 / run_seconds
        } else {
            tokens as f64 / seconds.max(f64::EPSILON)
        },
        final_loss,
        best_val: state.best,
    };
    info!(
        steps = summary.steps,
        seconds, final_loss, "training finished"
    );
    Ok((model, summary))
}

/// The accumulated gradient of one optimizer step and its loss figures.
pub struct StepGradients {
    /// Gradients of the step's token-mean loss, summed over its micro-batches.
    pub grads: GradientsParams,
    /// Total loss of the step (token mean over the whole step).
    pub loss: f64,
    /// Its cross-entropy part.
    pub ce: f64,
    /// Its KD part, when distilling.
    pub kd: Option<f64>,
    /// Supervised tokens in the step.
    pub supervised: usize,
    /// Non-padding tokens in the step.
    pub tokens: usize,
}

/// Runs forward and backward over `rows` in micro-batches of at most `micro` examples and
/// accumulates the gradients. Each micro-batch's loss is its sum over supervised tokens
/// divided by the supervised tokens of *all* `rows`, so the result does not depend on how
/// the rows are split (up to f32 summation order).
pub fn step_gradients(
    model: &Qwen,
    examples: &[Example],
    picked: &[usize],
    pad_id: u32,
    micro: usize,
    objective: &Objective<'_>,
) -> Result<StepGradients, Error> {
    let device = model.devices().into_iter().next().unwrap_or_default();
    let teacher_device: Option<Device> = match objective {
        Objective::Distill { teacher, .. } => teacher.devices().into_iter().next(),
        Objective::Labels | Objective::WeightedLabels { .. } | Objective::CachedTeacher { .. } => {
            None
        }
    };
    let supervised: usize = picked.iter().map(|&i| supervised_count(&examples[i])).sum();
    let normalizer = match objective {
        Objective::WeightedLabels { weights } => {
            let total: f64 = picked.iter().map(|&i| weights[i]).sum();
            if total > 0.0 { total } else { 1.0 }
        }
        _ => supervised.max(1) as f64,
    };
    let mut accumulator = GradientsAccumulator::<Qwen>::new();
    let (mut loss, mut ce, mut kd) = (0.0, 0.0, None::<f64>);
    let mut tokens = 0;
    for chunk in picked.chunks(micro.max(1)) {
        let rows: Vec<&Example> = chunk.iter().map(|&i| &examples[i]).collect();
        let batch = StepBatch::new(&collate(&rows, pad_id, PadSide::Right), &device)
            .with_examples(chunk.to_vec());
        tokens += batch.tokens;
        let parts = step_loss(
            model,
            &batch,
            objective,
            teacher_device.as_ref(),
            normalizer,
        )?;
        loss += scalar(&parts.total);
        ce += scalar(&parts.ce);
        if let Some(k) = &parts.kd {
            *kd.get_or_insert(0.0) += scalar(k);
        }
        let grads = GradientsParams::from_grads(parts.total.backward(), model);
        accumulator.accumulate(model, grads);
    }
    Ok(StepGradients {
        grads: accumulator.grads(),
        loss,
        ce,
        kd,
        supervised,
        tokens,
    })
}

/// Writes the model into a checkpoint folder: the weights in Hugging Face layout and, for a
/// LoRA model, the frozen base there and the adapters beside it in PEFT's layout.
fn save_model(model: &Qwen, dir: &Path) -> Result<(), Error> {
    if has_lora(model) {
        let mut base = model.clone();
        base.lora = None;
        save_checkpoint(&base, dir)?;
        save_adapters(model, dir)?;
    } else {
        save_checkpoint(model, dir)?;
    }
    Ok(())
}

/// Reads what [`save_model`] wrote, on `device`; with adapters the base comes back frozen.
fn load_model(dir: &Path, device: &Device) -> Result<Qwen, Error> {
    let model = load_checkpoint(dir, device)?;
    if dir.join(ADAPTER_CONFIG).exists() {
        Ok(load_adapters(model, dir)?)
    } else {
        Ok(model)
    }
}

/// The newest checkpoint under `dir` whose state parses, with its folder. A checkpoint that
/// cannot be read is reported and skipped in favour of the one before it.
fn newest_loadable(dir: &Path) -> Result<Option<(TrainState, PathBuf)>, Error> {
    for (_, ckpt) in checkpoint::list(dir)?.into_iter().rev() {
        match checkpoint::read_state(&ckpt) {
            Ok(state) => return Ok(Some((state, ckpt))),
            Err(e) => {
                warn!(checkpoint = %ckpt.display(), error = %e, "skipping unreadable checkpoint")
            }
        }
    }
    Ok(None)
}

/// Opens `dir/metrics.jsonl` for appending, first dropping lines of steps after `step` (a
/// killed run may have logged steps its last checkpoint does not contain; the resumed run
/// logs them again).
fn open_metrics(dir: &Path, step: usize) -> Result<File, Error> {
    std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
    let path = dir.join("metrics.jsonl");
    if step == 0 {
        return File::create(&path).map_err(|e| io_error(&path, e));
    }
    let mut kept = String::new();
    if let Ok(file) = File::open(&path) {
        for line in BufReader::new(file).lines() {
            let line = line.map_err(|e| io_error(&path, e))?;
            // A torn last line (killed mid-write) does not parse and is dropped.
            match serde_json::from_str::<StepMetrics>(&line) {
                Ok(m) if m.step <= step => {
                    kept.push_str(&line);
                    kept.push('\n');
                }
                _ => {}
            }
        }
    }
    let tmp = path.with_extension("jsonl.partial");
    std::fs::write(&tmp, kept).map_err(|e| io_error(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io_error(&path, e))?;
    OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(|e| io_error(&path, e))
}

fn validate(model: &Qwen, v: &Validation<'_>, pad_id: u32) -> Result<f64, Error> {
    let plain = model.valid().to_device(&v.device);
    let (report, _) = kd_infer::evaluate(
        &plain,
        v.prompts,
        v.labels,
        v.label_ids,
        pad_id,
        v.batch_size,
        &v.device,
        &mut |_| {},
    )?;
    Ok(report.accuracy)
}

/// The loss of one (micro-)batch, split into its parts (each a one-element tensor).
#[derive(Debug, Clone)]
pub struct LossParts {
    /// What is minimised.
    pub total: Tensor<1>,
    /// Cross-entropy on the supervised tokens.
    pub ce: Tensor<1>,
    /// The KD term, already including T² when that is on.
    pub kd: Option<Tensor<1>>,
}

/// Computes the training loss of `model` on `batch`: sums over the batch's supervised tokens
/// divided by `normalizer` (the supervised tokens of the whole optimizer step, so that the
/// micro-batch losses of one step add up to the step's token mean).
///
/// The student's LM head runs only at the supervised positions. When distilling, the teacher
/// runs on `teacher_device` (its own, without autodiff) over the same ids and positions, and
/// its logits join the student's graph as constants: `alpha * KD + (1 - alpha) * CE`.
pub fn step_loss(
    model: &Qwen,
    batch: &StepBatch,
    objective: &Objective<'_>,
    teacher_device: Option<&Device>,
    normalizer: f64,
) -> Result<LossParts, Error> {
    let options = ForwardOptions::default();
    let reduction = Reduction::Items(normalizer);
    let logits = model.forward_at(batch.input_ids.clone(), batch.positions.clone(), &options);
    let ce = cross_entropy(logits.clone(), batch.targets.clone(), &reduction);
    match objective {
        Objective::Labels => Ok(LossParts {
            total: ce.clone(),
            ce,
            kd: None,
        }),
        Objective::WeightedLabels { weights } => {
            // Rows follow `batch.examples`; positions row by row (`supervised_positions`).
            let mut per_position = Vec::with_capacity(batch.supervised);
            for (row, &count) in batch.examples.iter().zip(&batch.row_supervised) {
                let w = weights[*row] / count.max(1) as f64 / normalizer;
                per_position.extend(std::iter::repeat_n(w as f32, count));
            }
            let n = per_position.len();
            let weights = Tensor::<1>::from_data(
                burn::tensor::TensorData::new(per_position, [n]),
                &batch.targets.device(),
            );
            let ce = weighted_cross_entropy(logits, batch.targets.clone(), weights)?;
            Ok(LossParts {
                total: ce.clone(),
                ce,
                kd: None,
            })
        }
        Objective::Distill { teacher, kd, alpha } => {
            let student_device = logits.device();
            let teacher_batch = match teacher_device {
                Some(device) => batch.to_device(device),
                None => batch.clone(),
            };
            let teacher_logits = teacher
                .forward_at(teacher_batch.input_ids, teacher_batch.positions, &options)
                .to_device(&student_device)
                .autodiff();
            let kd = KdConfig {
                reduction,
                ..kd.clone()
            };
            let kd_term = kd_loss(logits, teacher_logits, None, &kd)?;
            let total = kd_term.clone().mul_scalar(*alpha) + ce.clone().mul_scalar(1.0 - alpha);
            Ok(LossParts {
                total,
                ce,
                kd: Some(kd_term),
            })
        }
        Objective::CachedTeacher { cache, kd, alpha } => {
            let teacher = cache.sparse_teacher(&batch.examples, &logits.device());
            let kd = KdConfig {
                reduction,
                ..kd.clone()
            };
            let kd_term = sparse_kd_loss(logits, teacher, None, &kd)?;
            let total = kd_term.clone().mul_scalar(*alpha) + ce.clone().mul_scalar(1.0 - alpha);
            Ok(LossParts {
                total,
                ce,
                kd: Some(kd_term),
            })
        }
    }
}

fn scalar(t: &Tensor<1>) -> f64 {
    f64::from(t.clone().into_scalar::<f32>())
}

/// The inference copy of a trained model (no autodiff graph).
pub fn inference_copy(model: &Qwen) -> Qwen {
    model.valid()
}

#[cfg(test)]
mod tests {
    use burn::tensor::Device;
    use kd_imdb::{Batch, IGNORE_INDEX, PadSide};
    use kd_loss::{Divergence, KdConfig, Reduction};
    use kd_qwen::{Qwen, QwenConfig};

    use super::*;

    fn tiny(vocab: usize, seed: u64, device: &Device) -> Qwen {
        let mut config = QwenConfig::qwen3_shaped(32, 64, 1, 4, 2, 8);
        config.vocab_size = vocab;
        // Large enough weights that the two models' distributions clearly differ.
        config.initializer_range = 0.5;
        device.seed(seed);
        Qwen::new(&config, device)
    }

    fn batch() -> Batch {
        // Two rows; row 1 is one token shorter and right-padded with 0.
        let ignore = IGNORE_INDEX;
        Batch {
            input_ids: vec![5, 6, 7, 8, 9, 11, 12, 13, 14, 0],
            labels: vec![ignore, ignore, ignore, 8, 9, ignore, ignore, 13, 14, ignore],
            batch: 2,
            seq_len: 5,
            lengths: vec![5, 4],
            answer_pos: vec![3, 2],
            pad_side: PadSide::Right,
        }
    }

    fn rkl() -> KdConfig {
        KdConfig {
            divergence: Divergence::ReverseKl,
            temperature: 2.0,
            t_squared: true,
            reduction: Reduction::TokenMean,
            chunk_positions: 1024,
        }
    }

    /// The KD term of `student` against `teacher` (on the plain device) for [`batch`].
    fn kd_term(teacher: &Qwen, student: &Qwen, plain: &Device, train: &Device) -> Tensor<1> {
        let step = StepBatch::new(&batch(), train);
        let objective = Objective::Distill {
            teacher,
            kd: rkl(),
            alpha: 0.5,
        };
        let normalizer = step.supervised as f64;
        let parts = step_loss(student, &step, &objective, Some(plain), normalizer).expect("loss");
        parts.kd.expect("distillation has a KD term")
    }

    fn devices() -> (Device, Device) {
        let plain = Device::flex();
        let train = plain.clone().autodiff();
        (plain, train)
    }

    #[test]
    fn kd_term_is_nonzero_with_a_gradient_for_equal_vocabularies() {
        // The Python original computed KL only when the vocabularies differed; here both are
        // 40 wide and the term must still be there.
        let (plain, train) = devices();
        let teacher = tiny(40, 1, &plain);
        let student = tiny(40, 2, &train);
        let kd = kd_term(&teacher, &student, &plain, &train);
        let kd_value = f64::from(kd.clone().into_scalar::<f32>());
        assert!(kd_value > 1e-3, "KD term is {kd_value}");

        // Its gradient reaches the student's weights.
        let grads = kd.backward();
        let grad = student
            .model
            .embed_tokens
            .weight
            .grad(&grads)
            .expect("embedding gradient");
        let norm = f64::from(grad.abs().sum().into_scalar::<f32>());
        assert!(norm > 1e-6, "gradient norm {norm}");
    }

    #[test]
    fn kd_term_is_zero_when_student_is_the_teacher() {
        let (plain, train) = devices();
        let teacher = tiny(40, 3, &plain);
        let student = teacher.clone().to_device(&train);
        let kd_value = f64::from(kd_term(&teacher, &student, &plain, &train).into_scalar::<f32>());
        // Same weights: the divergence is zero up to f32 rounding of two identical forward
        // passes (bitwise equal on one backend; the tolerance leaves room for a backend that
        // fuses differently with autodiff on).
        const ZERO_TOL: f64 = 1e-6;
        assert!(kd_value.abs() < ZERO_TOL, "KD term is {kd_value}");
    }

    #[test]
    fn wider_teacher_vocabulary_is_sliced_to_the_student() {
        // Qwen2.5-style padding rows: a teacher 8 rows wider than the student still gives a
        // finite, positive KD term.
        let (plain, train) = devices();
        let teacher = tiny(48, 1, &plain);
        let student = tiny(40, 2, &train);
        let kd_value = f64::from(kd_term(&teacher, &student, &plain, &train).into_scalar::<f32>());
        assert!(
            kd_value.is_finite() && kd_value > 0.0,
            "KD term is {kd_value}"
        );
    }
}
