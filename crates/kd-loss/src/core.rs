//! The chunked engine shared by every loss: per-position weights, a loop over position chunks
//! that computes each chunk's value and analytic gradient without an autodiff graph, and the
//! step that attaches that gradient to the student's graph.
//!
//! Why analytic gradients: with autodiff, every chunk's intermediates (log-softmaxes,
//! probabilities, products) are kept alive until `backward`, so chunking the forward pass would
//! not bound memory at all. Computing `∂loss/∂student` chunk by chunk and attaching it through
//! the surrogate `Σ student ⊙ G − stop_grad(Σ student ⊙ G) + value` keeps exactly one
//! `[positions, vocab]` buffer (`G`) in the graph, and the surrogate's value is exactly `value`.
//! See [`run_chunked`] for where the memory goes.

use burn::tensor::{Bool, FloatDType, Tensor};

use crate::config::{LossError, Reduction};

/// One chunk of positions as a kernel sees it (all on the inner device, f32).
pub(crate) struct Chunk {
    /// Rows `start..start + len` of the student, masked rows zero-filled.
    pub student: Tensor<2>,
    /// The same rows of the caller's scratch tensor (see [`run_chunked`]), masked rows
    /// zero-filled; `None` when the caller passed none.
    pub scratch: Option<Tensor<2>>,
    pub start: usize,
    pub len: usize,
}

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
/// `student` is the caller's tensor (maybe tracked by autodiff). `scratch`, if given, is a
/// `[positions, vocab]` f32 tensor on the inner device that the kernel reads one chunk of rows
/// at a time (the dense teacher): once a chunk is done its rows are dead, so the gradient `G`
/// is written over them instead of into a buffer of its own. `grad_scale` multiplies the
/// gradient (e.g. `T²/T`), `value_scale` the value.
///
/// Memory, counted in `[positions, vocab]` f32 buffers on top of the inputs: the chunk loop
/// holds `G` (inside `scratch` when there is one) plus a few `[chunk, vocab]` temporaries; the
/// surrogate's product is one buffer, freed as soon as it is summed; `backward` then allocates
/// just the student's gradient. Reusing `scratch` is safe even when the caller still holds that
/// tensor: Flex writes in place only into uniquely owned storage and copies shared storage
/// first (the reuse then merely stops being free).
pub(crate) fn run_chunked(
    student: Tensor<2>,
    weights: Tensor<1>,
    scratch: Option<Tensor<2>>,
    chunk_positions: usize,
    value_scale: f64,
    grad_scale: f64,
    mut kernel: impl FnMut(Chunk) -> ChunkOut,
) -> Tensor<1> {
    let [positions, vocab] = student.dims();
    let tracked = student.is_tracked();
    let autodiff = student.is_autodiff();
    let drop = weights.clone().equal_elem(0.0);
    // One sync on a [positions] tensor; without masked rows the per-chunk zero-fill is skipped.
    let any_dropped = drop.clone().any().into_scalar::<bool>();
    let student_in = upcast(student.clone().inner());
    let inner_device = student_in.device();

    let mut value = Tensor::<1>::zeros([1], &inner_device);
    // Becomes G row by row (only written when the student is tracked).
    let mut buffer = scratch;
    let mut grad = None;
    // Whether the student holds a non-finite entry anywhere (masked rows included): only then
    // can the surrogate's product hit `0 · ±inf` and need cleaning.
    let mut non_finite: Option<Tensor<1, Bool>> = None;
    let mut start = 0;
    while start < positions {
        let len = chunk_positions.min(positions - start);
        let mut rows = student_in.clone().narrow(0, start, len);
        let mut scratch_rows = buffer.as_ref().map(|b| b.clone().narrow(0, start, len));
        if tracked {
            let bad = rows.clone().is_finite().bool_not().any();
            non_finite = Some(match non_finite {
                Some(seen) => seen.bool_or(bad),
                None => bad,
            });
        }
        // Masked rows may hold -inf or garbage: zeros before any arithmetic, one chunk at a
        // time so the caller's tensors are never copied whole.
        if any_dropped {
            let drop_rows = drop
                .clone()
                .narrow(0, start, len)
                .unsqueeze_dim::<2>(1)
                .expand([len, vocab]);
            rows = rows.mask_fill(drop_rows.clone(), 0.0);
            scratch_rows = scratch_rows.map(|r| r.mask_fill(drop_rows, 0.0));
        }
        let w = weights.clone().narrow(0, start, len);
        let out = kernel(Chunk {
            student: rows,
            scratch: scratch_rows,
            start,
            len,
        });
        value = value + (out.value * w.clone()).sum();
        if tracked {
            let gw = out.grad * w.unsqueeze_dim::<2>(1).mul_scalar(grad_scale);
            if len == positions {
                // One chunk covering everything needs no assembly buffer.
                buffer = None;
                grad = Some(gw);
            } else {
                // The kernel has dropped its view of these rows, so a handed-over buffer is
                // uniquely owned here and this writes in place.
                let target = buffer
                    .take()
                    .unwrap_or_else(|| Tensor::<2>::zeros([positions, vocab], &inner_device));
                buffer = Some(target.slice_assign([start..start + len, 0..vocab], gw));
            }
        }
        start += len;
    }
    let value = value.mul_scalar(value_scale);
    let grad = tracked.then(|| {
        grad.or(buffer)
            .unwrap_or_else(|| Tensor::<2>::zeros([positions, vocab], &inner_device))
    });

    // Attach the gradient to the student's graph, or return the plain value.
    match grad {
        Some(grad) => {
            // The surrogate Σ z ⊙ G: autodiff keeps only G for the backward pass, and the
            // product is freed as soon as it is summed.
            let product = upcast(student) * grad.autodiff();
            let any_non_finite = non_finite.is_some_and(|t| t.into_scalar::<bool>());
            // At -inf entries (vocabulary padding) and in masked rows (any garbage) G is exactly
            // 0, and 0 · ±inf or 0 · NaN = NaN would poison the surrogate's value (NaN − NaN is
            // NaN, not 0). Zero those products; the gradient there is G = 0 either way. Only
            // the rare input with a non-finite entry pays for this extra pass.
            let product = if any_non_finite {
                let nan = product.clone().is_nan();
                product.mask_fill(nan, 0.0)
            } else {
                product
            };
            let surrogate = product.sum();
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
