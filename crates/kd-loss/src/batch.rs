//! `[batch, seq, vocab]` conveniences: next-token shifting and flattening wrappers.

use burn::tensor::{Bool, Int, Tensor};

use crate::ce::{IGNORE_INDEX, ce_weights, cross_entropy_weighted};
use crate::config::{KdConfig, LossError, Reduction, validate_reduction};
use crate::core::position_weights;
use crate::dense::kd_loss_weighted;

/// Aligns causal-LM logits with their targets: the logits at position `t` predict the token at
/// `t + 1`, so the last position's logits and the first label are dropped.
///
/// # Shapes
///
/// - logits: `[batch, seq, vocab]` → `[batch, seq − 1, vocab]`
/// - labels: `[batch, seq]` → `[batch, seq − 1]`
///
/// # Panics
///
/// If `seq < 1` or the batch/sequence dims disagree.
pub fn shift_for_next_token(
    logits: Tensor<3>,
    labels: Tensor<2, Int>,
) -> (Tensor<3>, Tensor<2, Int>) {
    let [batch, seq, _] = logits.dims();
    assert_eq!(
        labels.dims(),
        [batch, seq],
        "labels must be [batch, seq] like the logits"
    );
    assert!(seq >= 1, "cannot shift an empty sequence");
    (shift_logits(logits), labels.narrow(1, 1, seq - 1))
}

/// The logits half of [`shift_for_next_token`], for the teacher: `[b, s, v]` → `[b, s − 1, v]`.
pub fn shift_logits(logits: Tensor<3>) -> Tensor<3> {
    let [_, seq, _] = logits.dims();
    logits.narrow(1, 0, seq.saturating_sub(1))
}

/// [`kd_loss`](crate::kd_loss) over `[batch, seq, vocab]`: positions whose label is `-100` are
/// masked (pass labels already shifted, see [`shift_for_next_token`]); `None` keeps all.
/// Supports every [`Reduction`], `PerSequenceMean` included.
pub fn kd_loss_3d(
    student: Tensor<3>,
    teacher: Tensor<3>,
    labels: Option<Tensor<2, Int>>,
    cfg: &KdConfig,
) -> Result<Tensor<1>, LossError> {
    let mask = labels.map(|l| l.inner().not_equal_elem(IGNORE_INDEX));
    kd_loss_3d_masked(student, teacher, mask, cfg)
}

/// [`kd_loss_3d`] with a boolean keep mask `[batch, seq]` instead of labels.
pub fn kd_loss_3d_masked(
    student: Tensor<3>,
    teacher: Tensor<3>,
    mask: Option<Tensor<2, Bool>>,
    cfg: &KdConfig,
) -> Result<Tensor<1>, LossError> {
    cfg.validate()?;
    let [batch, seq, vocab] = student.dims();
    let [teacher_batch, teacher_seq, teacher_vocab] = teacher.dims();
    if [teacher_batch, teacher_seq] != [batch, seq] {
        return Err(LossError::ShapeMismatch {
            student: student.dims().to_vec(),
            teacher: teacher.dims().to_vec(),
        });
    }
    let positions = batch * seq;
    let keep = match mask {
        Some(mask) => {
            if mask.dims() != [batch, seq] {
                return Err(LossError::MaskLength {
                    what: "mask",
                    got: mask.dims().iter().product(),
                    expected: positions,
                });
            }
            mask.inner().reshape([positions])
        }
        None => Tensor::<1, Bool>::ones([positions], &student.clone().inner().device()),
    };
    let weights = position_weights(keep, &cfg.reduction, Some(seq))?;
    // [batch * seq, vocab]
    let student = student.reshape([positions, vocab]);
    let teacher = teacher.reshape([positions, teacher_vocab]);
    kd_loss_weighted(student, teacher, weights, cfg)
}

/// [`cross_entropy`](crate::cross_entropy) over `[batch, seq, vocab]` with `[batch, seq]`
/// labels (`-100` = ignored; pass them shifted). Supports every [`Reduction`].
pub fn cross_entropy_3d(
    logits: Tensor<3>,
    labels: Tensor<2, Int>,
    reduction: &Reduction,
    chunk_positions: usize,
) -> Result<Tensor<1>, LossError> {
    validate_reduction(reduction)?;
    let [batch, seq, vocab] = logits.dims();
    if labels.dims() != [batch, seq] {
        return Err(LossError::MaskLength {
            what: "labels",
            got: labels.dims().iter().product(),
            expected: batch * seq,
        });
    }
    // [batch * seq, vocab]
    let logits = logits.reshape([batch * seq, vocab]);
    let labels = labels.reshape([batch * seq]);
    let weights = ce_weights(&logits, &labels, reduction, Some(seq))?;
    cross_entropy_weighted(logits, labels, weights, chunk_positions)
}
