//! Dense distillation losses: both models' full logits at every position.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Bool, Tensor};

use crate::config::{Divergence, KdConfig, LossError, Reduction};
use crate::core::{ChunkOut, position_weights, run_chunked, upcast, xmul};

/// Distillation loss between student and teacher logits at the same positions.
///
/// Masked positions (mask `false`) contribute nothing and may hold any value, `-inf` and NaN
/// included. A teacher wider than the student (vocabulary padding rows) is cut to the student's
/// width. Only the student receives a gradient; the teacher is treated as a constant.
///
/// # Shapes
///
/// - student: `[positions, vocab]`, teacher: `[positions, vocab_teacher >= vocab]`
/// - mask: `[positions]`, `true` = keep; `None` keeps every position
/// - output: `[1]`
///
/// # Errors
///
/// Bad configuration (see [`KdConfig::validate`]), mismatched shapes, a narrower teacher, or
/// [`Reduction::PerSequenceMean`] (which needs [`kd_loss_3d`](crate::kd_loss_3d)).
pub fn kd_loss(
    student: Tensor<2>,
    teacher: Tensor<2>,
    mask: Option<Tensor<1, Bool>>,
    cfg: &KdConfig,
) -> Result<Tensor<1>, LossError> {
    cfg.validate()?;
    let [positions, _] = student.dims();
    let keep = keep_mask(mask, positions, &student)?;
    let weights = position_weights(keep, &cfg.reduction, None)?;
    kd_loss_weighted(student, teacher, weights, cfg)
}

/// Like [`kd_loss`], with explicit per-position weights instead of mask and reduction:
/// the loss is `Σ_i weights[i] · D_i` (times `T²` if asked). A weight of 0 masks the position
/// (it may then hold garbage). `cfg.reduction` is ignored.
///
/// # Shapes
///
/// - student: `[positions, vocab]`, teacher: `[positions, vocab_teacher >= vocab]`
/// - weights: `[positions]`
/// - output: `[1]`
pub fn kd_loss_weighted(
    student: Tensor<2>,
    teacher: Tensor<2>,
    weights: Tensor<1>,
    cfg: &KdConfig,
) -> Result<Tensor<1>, LossError> {
    let mut cfg = cfg.clone();
    cfg.reduction = Reduction::Sum;
    cfg.validate()?;
    let [positions, vocab] = student.dims();
    let [teacher_positions, teacher_vocab] = teacher.dims();
    if teacher_positions != positions {
        return Err(LossError::ShapeMismatch {
            student: student.dims().to_vec(),
            teacher: teacher.dims().to_vec(),
        });
    }
    if teacher_vocab < vocab {
        return Err(LossError::TeacherNarrower {
            teacher: teacher_vocab,
            student: vocab,
        });
    }
    check_len("weights", weights.dims()[0], positions)?;
    let weights = upcast(weights.inner());

    // The teacher is a constant: off the graph, f32, cut to the student's vocabulary. It is
    // handed to the engine as scratch: the engine zero-fills its masked rows chunk by chunk and
    // writes the gradient over the rows already used (see `run_chunked`).
    let mut teacher = upcast(teacher.inner());
    if teacher_vocab > vocab {
        teacher = teacher.narrow(1, 0, vocab);
    }

    let t = cfg.temperature;
    let factor = if cfg.t_squared { t * t } else { 1.0 };
    let divergence = cfg.divergence;
    Ok(run_chunked(
        student,
        weights,
        Some(teacher),
        cfg.chunk_positions,
        factor,
        factor / t,
        |chunk| {
            let ls = log_softmax(chunk.student.div_scalar(t), 1);
            let teacher = chunk.scratch.expect("the teacher is the scratch tensor");
            let lt = log_softmax(teacher.div_scalar(t), 1);
            divergence_chunk(ls, lt, divergence)
        },
    ))
}

/// One chunk of a divergence from student and teacher log-probabilities `[chunk, vocab]`.
///
/// Returns `D_i` and `∂D_i/∂s` for the tempered student logits `s`. Every divergence is
/// written as `D(p)`, with `h = p ⊙ ∂D/∂p`; the softmax Jacobian then gives
/// `∂D/∂s = h − p Σ h`.
pub(crate) fn divergence_chunk(ls: Tensor<2>, lt: Tensor<2>, divergence: Divergence) -> ChunkOut {
    let p = ls.clone().exp();
    let (value, h) = match divergence {
        Divergence::ForwardKl | Divergence::Jsd { beta: 0.0 } => {
            // D = Σ q (log q − log p), h = −q.
            let q = lt.clone().exp();
            let value = xmul(q.clone(), lt - ls).sum_dim(1);
            (value, q.neg())
        }
        Divergence::ReverseKl | Divergence::Jsd { beta: 1.0 } => {
            // D = Σ p (log p − log q), h = p (log p − log q + 1).
            let term = xmul(p.clone(), ls - lt);
            (term.clone().sum_dim(1), term + p.clone())
        }
        Divergence::Jsd { beta } => {
            // log m = logsumexp(log p + ln(1 − β), log q + ln β), stable in log space.
            let q = lt.clone().exp();
            let a = ls.clone().add_scalar((1.0 - beta).ln());
            let b = lt.clone().add_scalar(beta.ln());
            let top = a.clone().max_pair(b.clone());
            let lm = top.clone() + ((a - top.clone()).exp() + (b - top).exp()).log();
            // D = β Σ q (log q − log m) + (1 − β) Σ p (log p − log m),
            // h = (1 − β) p (log p − log m).
            let student_term = xmul(p.clone(), ls - lm.clone());
            let teacher_term = xmul(q, lt - lm);
            let value = teacher_term.sum_dim(1).mul_scalar(beta)
                + student_term.clone().sum_dim(1).mul_scalar(1.0 - beta);
            (value, student_term.mul_scalar(1.0 - beta))
        }
    };
    let h_sum = h.clone().sum_dim(1);
    let grad = h - p * h_sum;
    ChunkOut {
        value: value.squeeze_dim(1),
        grad,
    }
}

/// The keep mask on the inner device: the given one, or all `true`.
pub(crate) fn keep_mask(
    mask: Option<Tensor<1, Bool>>,
    positions: usize,
    like: &Tensor<2>,
) -> Result<Tensor<1, Bool>, LossError> {
    match mask {
        Some(mask) => {
            check_len("mask", mask.dims()[0], positions)?;
            Ok(mask.inner())
        }
        None => Ok(Tensor::<1, Bool>::ones(
            [positions],
            &like.clone().inner().device(),
        )),
    }
}

pub(crate) fn check_len(what: &'static str, got: usize, expected: usize) -> Result<(), LossError> {
    if got == expected {
        Ok(())
    } else {
        Err(LossError::MaskLength {
            what,
            got,
            expected,
        })
    }
}
