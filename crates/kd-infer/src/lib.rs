//! Inference for kd: label-token scoring of sentiment prompts.
//!
//! A prompt ends where the assistant's answer starts; the model's logits at that last
//! position, read at the first token of each label word, decide the class. No free-form
//! generation is involved, so the score is exactly "which label the model prefers".

mod score;

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
}
