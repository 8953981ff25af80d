//! The chunked engine shared by every loss: per-position weights, a loop over position chunks
//! that computes each chunk's value and analytic gradient without an autodiff graph, and the
//! step that attaches that gradient to the student's graph.
//!
//! Why analytic gradients: with autodiff, every chunk's intermediates (log-softmaxes,
//! probabilities, products) are kept alive until `backward`, so chunking the forward pass would
//! not bound memory at all. Computing `∂loss/∂student` chunk by chunk and attaching it through
//! the surrogate `Σ student ⊙ G − stop_grad(Σ student ⊙ G) + value` keeps exactly one
//! `[positions, vocab]` buffer (`G`) in the graph, and the surrogate's value is exactly `value`.

use burn::tensor::{Bool, FloatDType, Tensor};

use crate::config::{LossError, Reduction};

/// Per-chunk output of a loss kernel: unweighted per-position values `[chunk]` and their
/// gradients with respect to the (unscaled) student logits `[chunk, vocab]`.
pub(crate) struct ChunkOut {
    pub value: Tensor<1>,
    pub grad: Tensor<2>,
}

/// Per-position weights `[positions]` (f32, on the inner device) for a reduction.
///
/// `seq_len` groups consecutive positions into sequences for `PerSequenceMean`.
pub(crate) fn position_weights(
    keep: Tensor<1, Bool>,
    reduction: &Reduction,
    seq_len: Option<usize>,
) -> Result<Tensor<1>, LossError> {
    let keep = keep.float();
    match *reduction {
        Reduction::Sum => Ok(keep),
        Reduction::TokenMean => {
            let count = keep.clone().sum().clamp_min(1.0);
            Ok(keep / count)
        }
        Reduction::Items(n) => Ok(keep.div_scalar(n)),
        Reduction::PerSequenceMean => {
            let seq_len = seq_len.ok_or(LossError::PerSequenceNeedsSequences)?;
            let [positions] = keep.dims();
            let batch = positions / seq_len.max(1);
            // [batch, seq]
            let keep = keep.reshape([batch, seq_len]);
            // [batch, 1]
            let counts = keep.clone().sum_dim(1);
            let sequences = counts
                .clone()
                .greater_elem(0.0)
                .float()
                .sum()
                .clamp_min(1.0);
            let per_seq = keep / counts.clamp_min(1.0);
            Ok(per_seq.reshape([positions]) / sequences)
        }
    }
}

/// Runs `kernel` over chunks of positions and combines the chunks with `weights`.
///
/// `student` is the caller's tensor (maybe tracked by autodiff); the kernel gets the rows
/// `start..start + len` of `student_f32` (inner device, f32, masked rows zero-filled) and of
/// whatever else it captured. `grad_scale` multiplies the gradient (e.g. `T²/T`),
/// `value_scale` the value.
pub(crate) fn run_chunked(
    student: Tensor<2>,
    weights: Tensor<1>,
    chunk_positions: usize,
    value_scale: f64,
    grad_scale: f64,
    mut kernel: impl FnMut(Tensor<2>, usize, usize) -> ChunkOut,
) -> Tensor<1> {
    let [positions, vocab] = student.dims();
    let tracked = student.is_tracked();
    let autodiff = student.is_autodiff();
    let keep = weights.clone().not_equal_elem(0.0);

    // 1. Masked rows may hold -inf or garbage: replace them by zeros before any arithmetic.
    //    (Asking whether any row is masked costs a sync on a [positions] tensor; skipping the
    //    fill saves a full [positions, vocab] pass in the common all-kept case.)
    let student_in = upcast(student.clone().inner());
    let any_dropped = keep.clone().bool_not().any().into_scalar::<bool>();
    let drop_rows = any_dropped.then(|| {
        keep.clone()
            .bool_not()
            .unsqueeze_dim::<2>(1)
            .expand([positions, vocab])
    });
    let student_in = match &drop_rows {
        Some(drop) => student_in.mask_fill(drop.clone(), 0.0),
        None => student_in,
    };

    // 2. One chunk of positions at a time.
    let inner_device = student_in.device();
    let mut value = Tensor::<1>::zeros([1], &inner_device);
    let single = chunk_positions >= positions;
    let mut grad = tracked.then(|| {
        if single {
            // Placeholder, replaced by the only chunk's gradient.
            Tensor::<2>::zeros([1, 1], &inner_device)
        } else {
            Tensor::<2>::zeros([positions, vocab], &inner_device)
        }
    });
    let mut start = 0;
    while start < positions {
        let len = chunk_positions.min(positions - start);
        let rows = student_in.clone().narrow(0, start, len);
        let w = weights.clone().narrow(0, start, len);
        let out = kernel(rows, start, len);
        value = value + (out.value * w.clone()).sum();
        if let Some(g) = grad.take() {
            let gw = out.grad * w.unsqueeze_dim::<2>(1).mul_scalar(grad_scale);
            // One chunk covering everything needs no assembly buffer.
            grad = Some(if len == positions {
                gw
            } else {
                g.slice_assign([start..start + len, 0..vocab], gw)
            });
        }
        start += len;
    }
    let value = value.mul_scalar(value_scale);

    // 3. Attach the gradient to the student's graph, or return the plain value.
    match grad {
        Some(grad) => {
            let student = upcast(student);
            // FIXME: this sanitised copy and the product cost two [positions, vocab] buffers; a
            // custom autodiff op returning G directly would save both (docs/bench-kd-loss.md).
            // Entries where G is 0 may be ±inf (vocabulary padding, masked rows): zero them so
            // the surrogate product stays finite.
            let mut bad = student.clone().is_finite().bool_not();
            if let Some(drop) = drop_rows {
                bad = bad.bool_or(drop);
            }
            let student = if bad.clone().any().into_scalar::<bool>() {
                student.mask_fill(bad, 0.0)
            } else {
                student
            };
            let surrogate = (student * grad.autodiff()).sum();
            surrogate.clone() - surrogate.detach() + value.autodiff()
        }
        None if autodiff => value.autodiff(),
        None => value,
    }
}

/// f32 view of a float tensor (a no-op when it already is f32).
pub(crate) fn upcast<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    if t.dtype() == FloatDType::F32.into() {
        t
    } else {
        t.cast(FloatDType::F32)
    }
}

/// `x · y` with `0 · anything = 0` wherever `x == 0` (the `0 log 0 = 0` convention).
pub(crate) fn xmul(x: Tensor<2>, y: Tensor<2>) -> Tensor<2> {
    let zero = x.clone().equal_elem(0.0);
    (x * y).mask_fill(zero, 0.0)
}
