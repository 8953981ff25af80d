//! Distillation against a cached, sparse teacher: its top-k token ids and log-probabilities.
//!
//! # The rule for the missing mass (tail bucket)
//!
//! Only `k` teacher probabilities are known; the rest, `1 − Σ_k q`, is spread over unknown
//! tokens. Both distributions are therefore *coarsened* to `k + 1` outcomes: the `k` cached ids,
//! and one bucket holding everything else (for the student: `Σ_{j ∉ top-k} p_j`, computed
//! exactly by a log-sum-exp over the other ids). The chosen divergence is taken between the two
//! coarsened distributions. This is a proper divergence (0 when the student matches the
//! teacher on the cached ids and the tail mass, never negative) and, by the data-processing
//! inequality, a lower bound of the full divergence; it equals it when `k = vocab`.
//!
//! The cached log-probabilities are used as given: they must already be at the distillation
//! temperature (`log_softmax(teacher_logits / T)` before taking the top k). The student's
//! logits are divided by `T` as in the dense loss.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Bool, IndexingUpdateOp, Int, Tensor};

use crate::config::{KdConfig, LossError};
use crate::core::{ChunkOut, position_weights, run_chunked, upcast};
use crate::dense::{check_len, divergence_chunk, keep_mask};

/// A cached teacher: at every position its `k` most likely token ids and their
/// log-probabilities at the distillation temperature. Ids within a row must be distinct.
///
/// # Shapes
///
/// - ids: `[positions, k]`, each in `0..vocab`
/// - log_probs: `[positions, k]`, with `Σ exp(log_probs) ≤ 1` per row
#[derive(Clone, Debug)]
pub struct SparseTeacher {
    /// Token ids of the teacher's top-k, `[positions, k]`.
    pub ids: Tensor<2, Int>,
    /// Teacher log-probabilities of those ids, `[positions, k]`.
    pub log_probs: Tensor<2>,
}

/// [`kd_loss`](crate::kd_loss) with a [`SparseTeacher`] under the tail-bucket rule (see the
/// module docs). Masked rows may hold anything, out-of-range ids included.
///
/// # Shapes
///
/// - student: `[positions, vocab]`; teacher: `[positions, k]` with `k ≤ vocab`
/// - mask: `[positions]`, `true` = keep
/// - output: `[1]`
pub fn sparse_kd_loss(
    student: Tensor<2>,
    teacher: SparseTeacher,
    mask: Option<Tensor<1, Bool>>,
    cfg: &KdConfig,
) -> Result<Tensor<1>, LossError> {
    cfg.validate()?;
    let [positions, vocab] = student.dims();
    let [id_positions, k] = teacher.ids.dims();
    if teacher.log_probs.dims() != [id_positions, k] {
        return Err(LossError::Sparse(format!(
            "ids are {:?} but log_probs are {:?}",
            teacher.ids.dims(),
            teacher.log_probs.dims()
        )));
    }
    check_len("sparse teacher", id_positions, positions)?;
    if k == 0 || k > vocab {
        return Err(LossError::Sparse(format!(
            "k = {k} must lie in 1..={vocab}"
        )));
    }
    let keep = keep_mask(mask, positions, &student)?;
    let weights = position_weights(keep.clone(), &cfg.reduction, None)?;

    // Masked rows may hold anything: give them k distinct ids and a valid distribution.
    let device = keep.device();
    let drop = keep.bool_not().unsqueeze_dim::<2>(1).expand([positions, k]);
    let filler_ids = Tensor::<1, Int>::arange(0..k as i64, &device)
        .unsqueeze_dim::<2>(0)
        .expand([positions, k]);
    let ids = teacher.ids.inner().mask_where(drop.clone(), filler_ids);
    let log_probs = upcast(teacher.log_probs.inner()).mask_fill(drop, -((k + 1) as f64).ln());

    let t = cfg.temperature;
    let factor = if cfg.t_squared { t * t } else { 1.0 };
    let divergence = cfg.divergence;
    Ok(run_chunked(
        student,
        weights,
        None,
        cfg.chunk_positions,
        factor,
        factor / t,
        |chunk| {
            let (start, len) = (chunk.start, chunk.len);
            let ids = ids.clone().narrow(0, start, len);
            let lt_top = log_probs.clone().narrow(0, start, len);
            let ls = log_softmax(chunk.student.div_scalar(t), 1);

            // 1. Which vocabulary entries are cached ([len, vocab]).
            let device = ls.device();
            let is_top = Tensor::<2>::zeros([len, vocab], &device)
                .scatter(
                    1,
                    ids.clone(),
                    Tensor::ones([len, k], &device),
                    IndexingUpdateOp::Assign,
                )
                .greater_elem(0.5);

            // 2. Coarsened log-probabilities [len, k + 1]: the cached ids, then the tail bucket.
            let ls_top = ls.clone().gather(1, ids.clone());
            let ls_tail = log_sum_exp_rows(ls.clone().mask_fill(is_top.clone(), f64::NEG_INFINITY));
            let lt_tail = lt_top.clone().exp().sum_dim(1).clamp_max(1.0).neg().log1p();
            let coarse_s = Tensor::cat(vec![ls_top, ls_tail.clone()], 1);
            let coarse_t = Tensor::cat(vec![lt_top, lt_tail], 1);
            let out = divergence_chunk(coarse_s, coarse_t, divergence);

            // 3. Back to the full vocabulary: a cached id gets its coarse gradient, a tail id its
            //    share p_j / P_tail of the tail bucket's gradient.
            let gamma_top = out.grad.clone().narrow(1, 0, k);
            let gamma_tail = out.grad.narrow(1, k, 1);
            let share = (ls.clone() - ls_tail).exp();
            let dead = is_top.bool_or(ls.equal_elem(f64::NEG_INFINITY));
            let grad = (share * gamma_tail).mask_fill(dead, 0.0).scatter(
                1,
                ids,
                gamma_top,
                IndexingUpdateOp::Assign,
            );
            ChunkOut {
                value: out.value,
                grad,
            }
        },
    ))
}

/// `log Σ_j exp(x_ij)` per row, `[rows, 1]`; a row of `-inf` gives `-inf` (not NaN).
fn log_sum_exp_rows(x: Tensor<2>) -> Tensor<2> {
    let top = x.clone().max_dim(1);
    let top = top
        .clone()
        .mask_fill(top.equal_elem(f64::NEG_INFINITY), 0.0);
    top.clone() + (x - top).exp().sum_dim(1).log()
}
