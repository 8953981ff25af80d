//! Fine-tuning and distillation loops for kd.
//!
//! [`train`] runs AdamW (no decay on norms and biases, global-norm clipping) with warmup +
//! cosine over seeded batches of tokenised examples, accumulating gradients over
//! micro-batches, and computes the LM head only at the supervised positions
//! ([`supervised_positions`]: the position *before* each label token). The objective is plain
//! cross-entropy (teacher fine-tuning, baseline student) or `alpha * KD + (1 - alpha) * CE`
//! against a frozen teacher ([`Objective::Distill`]), with the KD term from `kd-loss` computed
//! whatever the two vocabulary sizes. Given a run folder it writes `metrics.jsonl` and
//! checkpoints that a killed run resumes from exactly ([`checkpoint`]).

mod batch;
pub mod cache;
pub mod checkpoint;
pub mod optim;
mod schedule;
mod trainer;

use std::path::PathBuf;

pub use batch::{StepBatch, supervised_positions};
pub use cache::{
    AlignedCache, BuildOptions, CacheError, Fingerprint, TeacherCache, checkpoint_sha256,
    sha256_bytes, sha256_file, template_sha256,
};
pub use optim::Optimizer;
pub use schedule::WarmupCosine;
pub use trainer::{
    LossParts, Objective, RunOptions, StepGradients, StepMetrics, TrainConfig, TrainSummary,
    Validation, inference_copy, step_gradients, step_loss, train,
};

/// What can stop a training run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// There was nothing to train on.
    #[error("no training examples")]
    NoData,
    /// The loss became NaN or infinite.
    #[error(
        "loss is {loss} at step {step} (ce {ce}{}); stopping without updating the weights. {}",
        kd.map(|k| format!(", kd {k}")).unwrap_or_default(),
        match last_checkpoint {
            Some(p) => format!("The last good checkpoint is {}", p.display()),
            None => "No checkpoint was written before it".to_string(),
        }
    )]
    NonFinite {
        /// The step at which it happened (1-based).
        step: usize,
        /// The total loss seen.
        loss: f64,
        /// Its cross-entropy part.
        ce: f64,
        /// Its KD part, when distilling.
        kd: Option<f64>,
        /// The newest checkpoint written before it, if any.
        last_checkpoint: Option<PathBuf>,
    },
    /// A checkpoint does not fit this run.
    #[error("cannot resume from {}: {message}", path.display())]
    Resume {
        /// The checkpoint folder.
        path: PathBuf,
        /// What differs.
        message: String,
    },
    /// A checkpoint file could not be written or read.
    #[error("{}: {message}", path.display())]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Loading or saving the model failed.
    #[error(transparent)]
    Model(#[from] kd_qwen::Error),
    /// Validation scoring failed.
    #[error(transparent)]
    Eval(#[from] kd_infer::Error),
    /// The distillation loss refused its inputs.
    #[error(transparent)]
    Loss(#[from] kd_loss::LossError),
}
