//! Knowledge-distillation losses for Qwen decoder LMs on burn: forward KL, reverse KL, TRL's
//! generalized Jensen–Shannon divergence, and masked token cross-entropy, with a sparse
//! (cached top-k teacher) variant. The trainer (`kd-train`) calls these on the supervised
//! positions of each micro-batch.
//!
//! # Formulas
//!
//! With student logits `z_s`, teacher logits `z_t` (cut to the student's vocabulary when the
//! teacher's is wider) and temperature `T`, always in f32:
//!
//! - `log p = log_softmax(z_s / T)`, `log q = log_softmax(z_t / T)`
//! - forward KL: `D = KL(q ‖ p) = Σ_v q (log q − log p)`
//! - reverse KL: `D = KL(p ‖ q) = Σ_v p (log p − log q)`
//! - generalized JSD (TRL, GKD paper eq. 1): `m = β q + (1 − β) p` computed as
//!   `log m = logsumexp(log q + ln β, log p + ln(1 − β))`, then
//!   `D = β KL(q ‖ m) + (1 − β) KL(p ‖ m)`; like TRL, `β = 0` *is* forward KL and `β = 1`
//!   *is* reverse KL (the formula alone would give 0 there)
//! - cross-entropy: `D = −log softmax(z)[y]`, positions with `y = -100` ignored
//! - with `t_squared`, the loss is multiplied by `T²`; `0 · log 0 = 0` throughout
//!
//! Reductions over kept positions `i`: `Sum` = `Σ D_i`; `TokenMean` = `Σ D_i / max(n_kept, 1)`;
//! `Items(N)` = `Σ D_i / N` (micro-batches of one accumulation step share `N`, so their losses
//! add up to the big batch's); `PerSequenceMean` = mean over non-empty sequences of each
//! sequence's token mean.
//!
//! # Masking and memory
//!
//! Masked positions are replaced by zeros *before* any arithmetic, so `-inf` or NaN there
//! affects neither value nor gradient. Positions are processed in chunks of
//! [`KdConfig::chunk_positions`]; each chunk's gradient `∂loss/∂z_s` is computed in closed form
//! (no autodiff graph per chunk) and attached to the student through a surrogate whose value
//! is exactly the loss. Peak memory is a few `[chunk, vocab]` buffers plus about one
//! `[positions, vocab]` f32 buffer beyond the inputs, the student's gradient: the dense teacher,
//! when handed over by value, is overwritten by `G` as its rows are used (a teacher the caller
//! still holds is copied first, one more buffer; cross-entropy and the sparse loss have no such
//! buffer and allocate `G`, about two in all). Measured 1.0 buffer vs 3.9 for plain
//! autodiff, see `docs/bench-kd-loss.md`. Gradients are first-order only (no double backward).
//!
//! # Example
//!
//! ```
//! # use burn::tensor::{Device, Tensor};
//! # let device = Device::flex().autodiff();
//! # let student = Tensor::<2>::zeros([4, 10], &device).require_grad();
//! # let teacher = Tensor::<2>::ones([4, 10], &device);
//! use kd_loss::{Divergence, KdConfig, kd_loss};
//! let cfg = KdConfig { divergence: Divergence::Jsd { beta: 0.5 }, ..KdConfig::default() };
//! let loss = kd_loss(student, teacher, None, &cfg)?;
//! # let _ = loss.backward();
//! # Ok::<(), kd_loss::LossError>(())
//! ```

mod batch;
mod ce;
mod config;
mod core;
mod dense;
mod sparse;

pub use batch::{
    cross_entropy_3d, kd_loss_3d, kd_loss_3d_masked, shift_for_next_token, shift_logits,
};
pub use ce::{IGNORE_INDEX, cross_entropy, try_cross_entropy, weighted_cross_entropy};
pub use config::{DEFAULT_CHUNK_POSITIONS, Divergence, KdConfig, LossError, Reduction};
pub use dense::{kd_loss, kd_loss_weighted};
pub use sparse::{SparseTeacher, sparse_kd_loss};
