//! The knobs of a distillation loss and the one error type of this crate.

use thiserror::Error;

/// Which divergence between the teacher distribution `q` and the student distribution `p`.
///
/// All are computed on `log_softmax(logits / T)` of both models, in f32.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Divergence {
    /// `KL(q ‖ p) = Σ q (log q − log p)`: mean-seeking, the classic Hinton distillation loss.
    ForwardKl,
    /// `KL(p ‖ q) = Σ p (log p − log q)`: mode-seeking; the original project's default.
    ReverseKl,
    /// TRL's generalized Jensen–Shannon divergence with mixture `m = β q + (1 − β) p`:
    /// `β KL(q ‖ m) + (1 − β) KL(p ‖ m)`, for `β` in `[0, 1]`.
    ///
    /// Following TRL (`GKDTrainer.generalized_jsd_loss`), the endpoints are special-cased:
    /// `β = 0` is [`ForwardKl`](Divergence::ForwardKl) and `β = 1` is
    /// [`ReverseKl`](Divergence::ReverseKl). The formula itself tends to 0 at both endpoints, so
    /// the loss is discontinuous there; `β = 0.5` is the symmetric JSD (bounded by `ln 2`).
    Jsd {
        /// Weight of the teacher in the mixture, in `[0, 1]`.
        beta: f64,
    },
}

/// How per-position losses are combined into one number.
///
/// Our own enum: `burn::nn::loss::Reduction` means something else (its `Mean` averages over
/// vocabulary entries too).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Reduction {
    /// Sum over kept positions.
    Sum,
    /// Sum over kept positions divided by their number (at least 1, so an all-masked batch is 0).
    TokenMean,
    /// Mean over kept positions within each sequence, then mean over sequences that have at
    /// least one kept position. Needs sequences: a `[batch, seq, vocab]` input.
    PerSequenceMean,
    /// Sum over kept positions divided by the given number of items, e.g. the number of
    /// supervised tokens in the whole optimizer step, so that summing the losses of the
    /// micro-batches of a gradient-accumulation step equals the loss of one big batch.
    Items(f64),
}

/// Configuration of [`kd_loss`](crate::kd_loss).
#[derive(Clone, Debug)]
pub struct KdConfig {
    /// The divergence between teacher and student distributions.
    pub divergence: Divergence,
    /// Softmax temperature `T > 0` applied to both models' logits.
    pub temperature: f64,
    /// Multiply the loss by `T²` (Hinton et al. 2015) so that gradient magnitudes stay
    /// comparable across temperatures.
    pub t_squared: bool,
    /// How per-position values are combined.
    pub reduction: Reduction,
    /// Positions per chunk: the loss holds a few `[chunk_positions, vocab]` f32 buffers at a
    /// time plus one `[positions, vocab]` gradient buffer.
    pub chunk_positions: usize,
}

impl Default for KdConfig {
    /// Reverse KL at `T = 1` with token mean, in chunks of 256 positions.
    fn default() -> Self {
        Self {
            divergence: Divergence::ReverseKl,
            temperature: 1.0,
            t_squared: false,
            reduction: Reduction::TokenMean,
            chunk_positions: DEFAULT_CHUNK_POSITIONS,
        }
    }
}

/// Default of [`KdConfig::chunk_positions`]: 256 × 151,936 f32 is 156 MB per buffer.
pub const DEFAULT_CHUNK_POSITIONS: usize = 256;

/// Everything that can be wrong with the inputs of a loss.
#[derive(Debug, Error, PartialEq)]
pub enum LossError {
    /// Student and teacher disagree on the number of positions (or batch/sequence shape).
    #[error("student has shape {student:?} but teacher has {teacher:?}: positions must agree")]
    ShapeMismatch {
        /// Student dims.
        student: Vec<usize>,
        /// Teacher dims.
        teacher: Vec<usize>,
    },
    /// A mask, labels or weights tensor does not have one entry per position.
    #[error("{what} has {got} entries, expected one per position ({expected})")]
    MaskLength {
        /// Which input.
        what: &'static str,
        /// Its length.
        got: usize,
        /// The number of positions.
        expected: usize,
    },
    /// The teacher vocabulary is narrower than the student's: no rule makes that meaningful.
    #[error("teacher vocabulary ({teacher}) is narrower than the student's ({student})")]
    TeacherNarrower {
        /// Teacher vocabulary width.
        teacher: usize,
        /// Student vocabulary width.
        student: usize,
    },
    /// Temperature is not a finite number above 0.
    #[error("temperature must be finite and > 0, got {0}")]
    Temperature(f64),
    /// JSD β outside `[0, 1]`.
    #[error("JSD beta must lie in [0, 1], got {0}")]
    Beta(f64),
    /// `Reduction::Items` with a count that is not finite and > 0.
    #[error("Reduction::Items needs a finite count > 0, got {0}")]
    Items(f64),
    /// `chunk_positions` is 0.
    #[error("chunk_positions must be at least 1")]
    ChunkPositions,
    /// `Reduction::PerSequenceMean` on a flat `[positions, vocab]` input.
    #[error("Reduction::PerSequenceMean needs [batch, seq, vocab] input (use kd_loss_3d)")]
    PerSequenceNeedsSequences,
    /// A sparse teacher with inconsistent ids/log-probabilities.
    #[error("sparse teacher: {0}")]
    Sparse(String),
}

impl KdConfig {
    /// Checks the numeric fields; called by every loss entry point.
    pub fn validate(&self) -> Result<(), LossError> {
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(LossError::Temperature(self.temperature));
        }
        if let Divergence::Jsd { beta } = self.divergence
            && !(0.0..=1.0).contains(&beta)
        {
            return Err(LossError::Beta(beta));
        }
        if self.chunk_positions == 0 {
            return Err(LossError::ChunkPositions);
        }
        validate_reduction(&self.reduction)
    }
}

pub(crate) fn validate_reduction(reduction: &Reduction) -> Result<(), LossError> {
    match *reduction {
        Reduction::Items(n) if !(n.is_finite() && n > 0.0) => Err(LossError::Items(n)),
        _ => Ok(()),
    }
}
