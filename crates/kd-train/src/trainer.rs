//! The training loop shared by teacher fine-tuning and student distillation.

use std::time::Instant;

use burn::module::Module;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Tensor};
use kd_imdb::{Example, PadSide, collate};
use kd_loss::{KdConfig, Reduction, cross_entropy, kd_loss};
use kd_qwen::{ForwardOptions, Qwen};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use tracing::{debug, info};

use crate::Error;
use crate::batch::StepBatch;
use crate::schedule::WarmupCosine;

/// Optimisation settings of one training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Examples per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// Final learning rate as a fraction of the peak.
    pub min_lr_ratio: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Clip each parameter's gradient to this L2 norm (burn's per-parameter clipping).
    pub grad_clip: Option<f64>,
    /// Seed for initialisation and data order.
    pub seed: u64,
}

/// What the student is trained on.
pub enum Objective<'a> {
    /// Cross-entropy on the supervised tokens only.
    Labels,
    /// `alpha * KD + (1 - alpha) * CE`, the KD term from a frozen teacher.
    Distill {
        /// The teacher, on a device without autodiff: it builds no graph.
        teacher: &'a Qwen,
        /// Divergence, temperature and T² settings.
        kd: KdConfig,
        /// Weight of the KD term.
        alpha: f64,
    },
}

/// What one logged step reports.
#[derive(Debug, Clone, Serialize)]
pub struct StepMetrics {
    /// 1-based step number.
    pub step: usize,
    /// Total loss.
    pub loss: f64,
    /// Cross-entropy part.
    pub ce: f64,
    /// KD part (already multiplied by T² when that is on), when distilling.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kd: Option<f64>,
    /// Learning rate used for this step.
    pub lr: f64,
    /// Non-padding tokens per second over this step.
    pub tokens_per_s: f64,
    /// Seconds since training started.
    pub elapsed_s: f64,
}

/// Totals of a finished run.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    /// Steps run.
    pub steps: usize,
    /// Non-padding tokens processed.
    pub tokens: usize,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Mean tokens per second.
    pub tokens_per_s: f64,
    /// Mean loss over the last tenth of the steps.
    pub final_loss: f64,
}

/// Trains `model` (built on an autodiff device) on `examples` and returns it.
///
/// `on_step` is called after every step with that step's figures; reading them back from the
/// device costs a synchronisation, which on the CPU is negligible next to the step itself.
pub fn train(
    mut model: Qwen,
    examples: &[Example],
    pad_id: u32,
    config: &TrainConfig,
    objective: &Objective<'_>,
    on_step: &mut dyn FnMut(&StepMetrics),
) -> Result<(Qwen, TrainSummary), Error> {
    if examples.is_empty() {
        return Err(Error::NoData);
    }
    let device = model.devices().into_iter().next().unwrap_or_default();
    let teacher_device: Option<Device> = match objective {
        Objective::Distill { teacher, .. } => teacher.devices().into_iter().next(),
        Objective::Labels => None,
    };
    let mut optim = AdamWConfig::new()
        .with_weight_decay(config.weight_decay as f32)
        .with_grad_clipping(
            config
                .grad_clip
                .map(|c| GradientClippingConfig::Norm(c as f32)),
        )
        .init();
    let schedule = WarmupCosine {
        peak: config.lr,
        warmup: config.warmup_steps,
        total: config.steps,
        min_ratio: config.min_lr_ratio,
    };
    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.shuffle(&mut rng);
    let mut cursor = 0;

    let started = Instant::now();
    let mut tokens_total = 0;
    let mut recent = Vec::new();
    for step in 0..config.steps {
        let step_started = Instant::now();

        // 1. Next batch in a seeded, reshuffled-every-epoch order.
        let mut picked = Vec::with_capacity(config.batch_size);
        while picked.len() < config.batch_size {
            if cursor == order.len() {
                order.shuffle(&mut rng);
                cursor = 0;
            }
            picked.push(&examples[order[cursor]]);
            cursor += 1;
        }
        let batch = StepBatch::new(&collate(&picked, pad_id, PadSide::Right), &device);

        // 2. Loss on the supervised positions (teacher included when distilling).
        let parts = step_loss(&model, &batch, objective, teacher_device.as_ref())?;
        let LossParts {
            total: loss,
            ce,
            kd,
        } = parts;

        // 4. Backward and update.
        let lr = schedule.lr(step);
        let loss_value = scalar(&loss);
        if !loss_value.is_finite() {
            return Err(Error::NonFinite {
                step: step + 1,
                loss: loss_value,
            });
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(lr, model, grads);

        // 5. Report.
        tokens_total += batch.tokens;
        let metrics = StepMetrics {
            step: step + 1,
            loss: loss_value,
            ce: scalar(&ce),
            kd: kd.as_ref().map(scalar),
            lr,
            tokens_per_s: batch.tokens as f64 / step_started.elapsed().as_secs_f64(),
            elapsed_s: started.elapsed().as_secs_f64(),
        };
        debug!(
            step = metrics.step,
            loss = metrics.loss,
            ce = metrics.ce,
            lr,
            "step"
        );
        on_step(&metrics);
        recent.push(loss_value);
    }

    let seconds = started.elapsed().as_secs_f64();
    let tail = (recent.len() / 10).max(1);
    let final_loss = recent[recent.len() - tail..].iter().sum::<f64>() / tail as f64;
    let summary = TrainSummary {
        steps: config.steps,
        tokens: tokens_total,
        seconds,
        tokens_per_s: tokens_total as f64 / seconds,
        final_loss,
    };
    info!(
        steps = summary.steps,
        seconds, final_loss, "training finished"
    );
    Ok((model, summary))
}

/// The loss of one batch, split into its parts (each a one-element tensor).
#[derive(Debug, Clone)]
pub struct LossParts {
    /// What is minimised.
    pub total: Tensor<1>,
    /// Cross-entropy on the supervised tokens (token mean).
    pub ce: Tensor<1>,
    /// The KD term, already including T² when that is on.
    pub kd: Option<Tensor<1>>,
}

/// Computes the training loss of `model` on `batch`.
///
/// The student's LM head runs only at the supervised positions. When distilling, the teacher
/// runs on `teacher_device` (its own, without autodiff) over the same ids and positions, and
/// its logits join the student's graph as constants: `alpha * KD + (1 - alpha) * CE`.
pub fn step_loss(
    model: &Qwen,
    batch: &StepBatch,
    objective: &Objective<'_>,
    teacher_device: Option<&Device>,
) -> Result<LossParts, Error> {
    let options = ForwardOptions::default();
    let logits = model.forward_at(batch.input_ids.clone(), batch.positions.clone(), &options);
    let ce = cross_entropy(logits.clone(), batch.targets.clone(), &Reduction::TokenMean);
    match objective {
        Objective::Labels => Ok(LossParts {
            total: ce.clone(),
            ce,
            kd: None,
        }),
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
            let kd_term = kd_loss(logits, teacher_logits, None, kd)?;
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
        let parts = step_loss(student, &step, &objective, Some(plain)).expect("loss");
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
