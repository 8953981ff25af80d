//! Masked token cross-entropy, chunked like the distillation losses.

use burn::tensor::activation::log_softmax;
use burn::tensor::{IndexingUpdateOp, Int, Tensor};

use crate::config::{DEFAULT_CHUNK_POSITIONS, LossError, Reduction, validate_reduction};
use crate::core::{ChunkOut, position_weights, run_chunked, upcast};
use crate::dense::check_len;

/// Target id that marks a position as ignored (PyTorch's and Hugging Face's convention).
pub const IGNORE_INDEX: i64 = -100;

/// Token cross-entropy `−log softmax(logits)[target]` over positions whose target is not
/// [`IGNORE_INDEX`], computed in f32 in chunks of [`DEFAULT_CHUNK_POSITIONS`].
///
/// # Shapes
///
/// - logits: `[positions, vocab]`
/// - targets: `[positions]`, ids in `0..vocab` or `-100`
/// - output: `[1]`
///
/// # Panics
///
/// If [`try_cross_entropy`] would return an error: [`Reduction::PerSequenceMean`] (use
/// [`cross_entropy_3d`](crate::cross_entropy_3d)), `Items(n)` with `n <= 0`, or a target
/// length that differs from the number of positions.
pub fn cross_entropy(
    logits: Tensor<2>,
    targets: Tensor<1, Int>,
    reduction: &Reduction,
) -> Tensor<1> {
    match try_cross_entropy(logits, targets, reduction, DEFAULT_CHUNK_POSITIONS) {
        Ok(loss) => loss,
        Err(err) => panic!("cross_entropy: {err}"),
    }
}

/// [`cross_entropy`] that reports bad input as an error and takes the chunk size.
pub fn try_cross_entropy(
    logits: Tensor<2>,
    targets: Tensor<1, Int>,
    reduction: &Reduction,
    chunk_positions: usize,
) -> Result<Tensor<1>, LossError> {
    validate_reduction(reduction)?;
    let weights = ce_weights(&logits, &targets, reduction, None)?;
    cross_entropy_weighted(logits, targets, weights, chunk_positions)
}

/// Cross-entropy with explicit per-position weights instead of a reduction:
/// `Σ_i weights[i] · (−log softmax(logits_i)[targets_i])`. A weight of 0, or a target of
/// [`IGNORE_INDEX`], masks the position. This is how a multi-task run gives every example the
/// same total weight whatever its number of supervised tokens.
///
/// # Shapes
///
/// - logits: `[positions, vocab]`, targets and weights: `[positions]`
/// - output: `[1]`
pub fn weighted_cross_entropy(
    logits: Tensor<2>,
    targets: Tensor<1, Int>,
    weights: Tensor<1>,
) -> Result<Tensor<1>, LossError> {
    let [positions, _] = logits.dims();
    check_len("targets", targets.dims()[0], positions)?;
    check_len("weights", weights.dims()[0], positions)?;
    let keep = targets.clone().inner().not_equal_elem(IGNORE_INDEX);
    let weights = upcast(weights.inner()).mask_fill(keep.bool_not(), 0.0);
    cross_entropy_weighted(logits, targets, weights, DEFAULT_CHUNK_POSITIONS)
}

pub(crate) fn ce_weights(
    logits: &Tensor<2>,
    targets: &Tensor<1, Int>,
    reduction: &Reduction,
    seq_len: Option<usize>,
) -> Result<Tensor<1>, LossError> {
    let [positions, _] = logits.dims();
    check_len("targets", targets.dims()[0], positions)?;
    let keep = targets.clone().inner().not_equal_elem(IGNORE_INDEX);
    position_weights(keep, reduction, seq_len)
}

/// Cross-entropy `Σ_i weights[i] · (−log p_i[target_i])`; weight 0 masks a position.
pub(crate) fn cross_entropy_weighted(
    logits: Tensor<2>,
    targets: Tensor<1, Int>,
    weights: Tensor<1>,
    chunk_positions: usize,
) -> Result<Tensor<1>, LossError> {
    if chunk_positions == 0 {
        return Err(LossError::ChunkPositions);
    }
    let targets = targets.inner();
    let ignored = targets.clone().equal_elem(IGNORE_INDEX);
    let targets = targets.mask_fill(ignored, 0);
    Ok(run_chunked(
        logits,
        weights,
        None,
        chunk_positions,
        1.0,
        1.0,
        |chunk| {
            let (start, len) = (chunk.start, chunk.len);
            let ls = log_softmax(chunk.student, 1);
            // [len, 1]
            let target = targets.clone().narrow(0, start, len).unsqueeze_dim::<2>(1);
            let value = ls.clone().gather(1, target.clone()).neg().squeeze_dim(1);
            // softmax − one_hot(target), the −1 scattered in place rather than built as a
            // [len, vocab] one-hot (one full pass instead of three).
            let minus_one = Tensor::<2>::full([len, 1], -1.0, &target.device());
            let grad = ls
                .exp()
                .scatter(1, target, minus_one, IndexingUpdateOp::Add);
            ChunkOut { value, grad }
        },
    ))
}
