//! Fine-tuning and distillation loops for kd.
//!
//! [`train`] runs AdamW with warmup + cosine over shuffled batches of tokenised examples,
//! computing the LM head only at the supervised positions ([`supervised_positions`]: the
//! position *before* each label token). The objective is plain cross-entropy (teacher
//! fine-tuning, baseline student) or `alpha * KD + (1 - alpha) * CE` against a frozen teacher
//! ([`Objective::Distill`]), with the KD term from `kd-loss` computed whatever the two
//! vocabulary sizes.

mod batch;
mod schedule;
mod trainer;

pub use batch::{StepBatch, supervised_positions};
pub use schedule::WarmupCosine;
pub use trainer::{
    LossParts, Objective, StepMetrics, TrainConfig, TrainSummary, inference_copy, step_loss, train,
};

/// What can stop a training run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// There was nothing to train on.
    #[error("no training examples")]
    NoData,
    /// The loss became NaN or infinite.
    #[error("loss is {loss} at step {step}; stopping")]
    NonFinite {
        /// The step at which it happened.
        step: usize,
        /// The value seen.
        loss: f64,
    },
    /// The distillation loss refused its inputs.
    #[error(transparent)]
    Loss(#[from] kd_loss::LossError),
}
