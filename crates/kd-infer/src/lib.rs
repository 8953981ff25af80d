//! Inference for kd: label-token scoring of sentiment prompts.
//!
//! A prompt ends where the assistant's answer starts; the model's logits at that last
//! position, read at the first token of each label word, decide the class. No free-form
//! generation is involved, so the score is exactly "which label the model prefers".
//!
//! [`evaluate_full`] adds ROC AUC, a confusion matrix, accuracy by review length and
//! throughput (`kd eval`); [`quant`] writes and reads weight-only int8/int4 checkpoints,
//! dequantized on load, and [`load_model`] opens either kind of folder.

mod eval;
mod generate;
pub mod quant;
pub mod rationale;
mod score;

pub use eval::{
    Confusion, EvalSummary, LENGTH_BUCKETS, LengthBucket, agreement, evaluate_full,
    positive_probability, roc_auc, summarize,
};
pub use generate::{
    FinishReason, GenerateConfig, Generation, Sampling, StopCondition, StopStrings, generate,
    generate_with, length_buckets,
};
pub use quant::{QuantError, QuantSpec, load_model, load_model_with};
pub use score::{EvalReport, LabelScores, evaluate, score_labels};

/// What can go wrong while scoring.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A prompt was empty.
    #[error("example {index} has no tokens")]
    EmptyPrompt {
        /// Its index in the input.
        index: usize,
    },
    /// The backend returned data of an unexpected type.
    #[error("reading logits back from the device: {0}")]
    Backend(String),
    /// A setting out of its range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The model refused the input (e.g. more tokens than its positions allow).
    #[error(transparent)]
    Model(#[from] kd_qwen::Error),
}
