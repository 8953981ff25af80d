//! Properties every loss must have, on random inputs from a fixed-seed generator.

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use kd_loss::{
    Divergence, KdConfig, LossError, Reduction, kd_loss, shift_for_next_token, try_cross_entropy,
    weighted_cross_entropy,
};

/// Identical inputs: the divergence and its gradient are 0 up to f32 rounding.
const ZERO_TOL: f32 = 1e-6;
/// The bound on negative values from rounding.
const NEGATIVE_TOL: f32 = -1e-6;
/// Padding and micro-batching must not change values or gradients beyond this.
const EQUAL_TOL: f32 = 1e-6;

const DIVERGENCES: [Divergence; 6] = [
    Divergence::ForwardKl,
    Divergence::ReverseKl,
    Divergence::Jsd { beta: 0.0 },
    Divergence::Jsd { beta: 0.1 },
    Divergence::Jsd { beta: 0.5 },
    Divergence::Jsd { beta: 1.0 },
];

/// xorshift64*: a tiny deterministic generator, so no `rand` dependency.
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Roughly normal (sum of uniforms), times `scale`.
    fn normal(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| (0..4).map(|_| self.next_f32() - 0.5).sum::<f32>() * 1.7 * scale)
            .collect()
    }
}

/// Rounds to the nearest bfloat16 (ties to even), as a bf16 model's logits would be.
fn bf16_round(x: f32) -> f32 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) & 0xFFFF_0000;
    f32::from_bits(rounded)
}

fn cfg(divergence: Divergence, temperature: f64, reduction: Reduction) -> KdConfig {
    KdConfig {
        divergence,
        temperature,
        t_squared: false,
        reduction,
        chunk_positions: 3,
    }
}

fn tensor(values: Vec<f32>, shape: [usize; 2], device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn mask(keep: &[bool], device: &Device) -> Tensor<1, Bool> {
    Tensor::from_data(TensorData::new(keep.to_vec(), [keep.len()]), device)
}

/// Value and student gradient of one loss evaluation.
fn eval(
    student: Vec<f32>,
    teacher: Vec<f32>,
    shape: [usize; 2],
    keep: Option<&[bool]>,
    cfg: &KdConfig,
) -> (f32, Vec<f32>) {
    let device = Device::flex().autodiff();
    let student = tensor(student, shape, &device).require_grad();
    let teacher = tensor(teacher, shape, &device.clone().inner()).autodiff();
    let keep = keep.map(|k| mask(k, &device));
    let loss = kd_loss(student.clone(), teacher, keep, cfg).expect("valid inputs");
    let grads = loss.backward();
    let grad = student
        .grad(&grads)
        .expect("gradient")
        .into_data()
        .try_to_vec::<f32>();
    (loss.into_scalar(), grad.expect("f32"))
}

#[test]
fn identical_inputs_give_zero() {
    let mut rng = Rng(1);
    let shape = [6, 17];
    let logits = rng.normal(6 * 17, 3.0);
    for divergence in DIVERGENCES {
        for temperature in [0.5, 1.0, 2.0] {
            let cfg = cfg(divergence, temperature, Reduction::Sum);
            let (value, grad) = eval(logits.clone(), logits.clone(), shape, None, &cfg);
            assert!(
                value.abs() <= ZERO_TOL,
                "{divergence:?} T={temperature}: {value}"
            );
            let worst = grad.iter().fold(0f32, |m, g| m.max(g.abs()));
            assert!(
                worst <= ZERO_TOL,
                "{divergence:?} T={temperature}: grad {worst}"
            );
        }
    }
}

#[test]
fn bf16_rounded_inputs_are_never_negative() {
    let mut rng = Rng(2);
    let shape = [5, 29];
    for trial in 0..40 {
        let scale = [0.1, 1.0, 4.0, 12.0][trial % 4];
        let student: Vec<f32> = rng
            .normal(5 * 29, scale)
            .into_iter()
            .map(bf16_round)
            .collect();
        // Nearly identical teachers are where cancellation could push a value below 0.
        let teacher: Vec<f32> = student
            .iter()
            .map(|&s| bf16_round(s + 1e-3 * (rng.next_f32() - 0.5)))
            .collect();
        for divergence in DIVERGENCES {
            for temperature in [0.7, 1.0, 3.0] {
                let cfg = cfg(divergence, temperature, Reduction::Sum);
                for t in [&teacher, &student] {
                    let (value, _) = eval(student.clone(), t.clone(), shape, None, &cfg);
                    assert!(
                        value >= NEGATIVE_TOL,
                        "{divergence:?} T={temperature}: {value}"
                    );
                }
            }
        }
    }
}

#[test]
fn fully_masked_input_gives_zero_and_a_zero_gradient() {
    let shape = [3, 7];
    let garbage: Vec<f32> = (0..21)
        .map(|i| [f32::NEG_INFINITY, f32::NAN, 1e30, f32::INFINITY][i % 4])
        .collect();
    for divergence in DIVERGENCES {
        for reduction in [Reduction::Sum, Reduction::TokenMean, Reduction::Items(4.0)] {
            let cfg = cfg(divergence, 1.0, reduction);
            let keep = [false; 3];
            let (value, grad) = eval(garbage.clone(), garbage.clone(), shape, Some(&keep), &cfg);
            assert_eq!(value, 0.0, "{divergence:?} {reduction:?}");
            assert!(
                grad.iter().all(|&g| g == 0.0),
                "{divergence:?} {reduction:?}: {grad:?}"
            );
        }
    }
}

#[test]
fn vocabulary_padding_with_neg_inf_changes_nothing() {
    let mut rng = Rng(3);
    let [positions, vocab, pad] = [4, 11, 5];
    let student = rng.normal(positions * vocab, 2.0);
    let teacher = rng.normal(positions * vocab, 2.0);
    let padded = |x: &[f32]| -> Vec<f32> {
        x.chunks(vocab)
            .flat_map(|row| {
                row.iter()
                    .copied()
                    .chain(std::iter::repeat_n(f32::NEG_INFINITY, pad))
            })
            .collect()
    };
    for divergence in DIVERGENCES {
        let cfg = cfg(divergence, 1.5, Reduction::TokenMean);
        let (value, grad) = eval(
            student.clone(),
            teacher.clone(),
            [positions, vocab],
            None,
            &cfg,
        );
        let (value_p, grad_p) = eval(
            padded(&student),
            padded(&teacher),
            [positions, vocab + pad],
            None,
            &cfg,
        );
        assert!(
            (value - value_p).abs() <= EQUAL_TOL,
            "{divergence:?}: {value} vs {value_p}"
        );
        for (row, row_p) in grad.chunks(vocab).zip(grad_p.chunks(vocab + pad)) {
            for (g, gp) in row.iter().zip(row_p) {
                assert!((g - gp).abs() <= EQUAL_TOL, "{divergence:?}: {g} vs {gp}");
            }
            assert!(
                row_p[vocab..].iter().all(|&g| g == 0.0),
                "{divergence:?}: padding grad"
            );
        }
    }
}

/// The engine writes the gradient over the teacher's rows once they are used; a teacher the
/// caller still holds (here: a clone, equal or wider, with masked rows) must come back
/// untouched, and the loss must not depend on whether the teacher was shared.
#[test]
fn a_teacher_the_caller_keeps_is_left_untouched() {
    let mut rng = Rng(7);
    let [positions, vocab] = [7, 13];
    let keep = [true, false, true, true, false, true, true];
    for teacher_vocab in [vocab, vocab + 3] {
        let student = rng.normal(positions * vocab, 2.0);
        let teacher = rng.normal(positions * teacher_vocab, 2.0);
        for divergence in DIVERGENCES {
            let cfg = cfg(divergence, 1.0, Reduction::TokenMean);
            let device = Device::flex().autodiff();
            let run = |shared: bool| {
                let s = tensor(student.clone(), [positions, vocab], &device).require_grad();
                let t = tensor(
                    teacher.clone(),
                    [positions, teacher_vocab],
                    &device.clone().inner(),
                )
                .autodiff();
                let kept = shared.then(|| t.clone());
                let loss =
                    kd_loss(s.clone(), t, Some(mask(&keep, &device)), &cfg).expect("valid inputs");
                let grads = loss.backward();
                let grad = s.grad(&grads).expect("gradient").into_data();
                let after = kept.map(|k| k.into_data().try_to_vec::<f32>().expect("f32"));
                (
                    loss.into_scalar::<f32>(),
                    grad.try_to_vec::<f32>().expect("f32"),
                    after,
                )
            };
            let (value, grad, after) = run(true);
            assert_eq!(
                after,
                Some(teacher.clone()),
                "{divergence:?}: the caller's teacher changed"
            );
            let (value_owned, grad_owned, _) = run(false);
            assert_eq!(value, value_owned, "{divergence:?}");
            assert_eq!(grad, grad_owned, "{divergence:?}");
        }
    }
}

#[test]
fn micro_batches_with_items_equal_one_batch() {
    let mut rng = Rng(4);
    let [positions, vocab] = [23, 13];
    let student = rng.normal(positions * vocab, 2.0);
    let teacher = rng.normal(positions * vocab, 2.0);
    let keep: Vec<bool> = (0..positions).map(|i| i % 5 != 2).collect();
    let items = keep.iter().filter(|&&k| k).count() as f64;
    for divergence in DIVERGENCES {
        // The whole batch with token mean …
        let whole = cfg(divergence, 2.0, Reduction::TokenMean);
        let (value, grad) = eval(
            student.clone(),
            teacher.clone(),
            [positions, vocab],
            Some(&keep),
            &whole,
        );
        // … against four uneven micro-batches, each normalised by the global item count.
        let part = cfg(divergence, 2.0, Reduction::Items(items));
        let (mut value_sum, mut grad_cat) = (0f32, Vec::new());
        let mut start = 0;
        for len in [2, 9, 5, 7] {
            let rows = start * vocab..(start + len) * vocab;
            let (v, g) = eval(
                student[rows.clone()].to_vec(),
                teacher[rows].to_vec(),
                [len, vocab],
                Some(&keep[start..start + len]),
                &part,
            );
            value_sum += v;
            grad_cat.extend(g);
            start += len;
        }
        assert_eq!(start, positions);
        assert!(
            (value - value_sum).abs() <= EQUAL_TOL,
            "{divergence:?}: {value} vs {value_sum}"
        );
        for (g, gm) in grad.iter().zip(&grad_cat) {
            assert!((g - gm).abs() <= EQUAL_TOL, "{divergence:?}: {g} vs {gm}");
        }
    }
}

#[test]
fn equal_vocabularies_never_skip_the_kd_term() {
    // The original only ran the KL term when vocabularies differed.
    let device = Device::flex();
    let student = Tensor::<2>::from_data([[0.0f32, 0.0, 0.0]], &device);
    let teacher = Tensor::<2>::from_data([[2.0f32, 0.0, 0.0]], &device);
    let value: f32 = kd_loss(student, teacher, None, &KdConfig::default())
        .expect("valid")
        .into_scalar();
    assert!(value > 0.4, "{value}");
}

#[test]
fn t_squared_scales_value() {
    let device = Device::flex();
    let student = Tensor::<2>::from_data([[0.0f32, 0.0, 0.0]], &device);
    let teacher = Tensor::<2>::from_data([[2.0f32, 0.0, 0.0]], &device);
    let mut c = cfg(Divergence::ReverseKl, 2.0, Reduction::Sum);
    let plain: f32 = kd_loss(student.clone(), teacher.clone(), None, &c)
        .expect("ok")
        .into_scalar();
    c.t_squared = true;
    let scaled: f32 = kd_loss(student, teacher, None, &c)
        .expect("ok")
        .into_scalar();
    assert!(
        (scaled - 4.0 * plain).abs() <= ZERO_TOL,
        "{scaled} vs 4 × {plain}"
    );
}

#[test]
fn bad_inputs_are_errors() {
    let device = Device::flex();
    let s = Tensor::<2>::zeros([2, 5], &device);
    let narrow = Tensor::<2>::zeros([2, 4], &device);
    let ok = cfg(Divergence::ReverseKl, 1.0, Reduction::Sum);
    let err = kd_loss(s.clone(), narrow, None, &ok).err();
    assert_eq!(
        err,
        Some(LossError::TeacherNarrower {
            teacher: 4,
            student: 5
        })
    );
    let rows = Tensor::<2>::zeros([3, 5], &device);
    assert!(matches!(
        kd_loss(s.clone(), rows, None, &ok),
        Err(LossError::ShapeMismatch { .. })
    ));
    let cases = [
        (
            cfg(Divergence::Jsd { beta: 1.5 }, 1.0, Reduction::Sum),
            LossError::Beta(1.5),
        ),
        (
            cfg(Divergence::ForwardKl, 0.0, Reduction::Sum),
            LossError::Temperature(0.0),
        ),
        (
            cfg(Divergence::ForwardKl, 1.0, Reduction::Items(0.0)),
            LossError::Items(0.0),
        ),
        (
            cfg(Divergence::ForwardKl, 1.0, Reduction::PerSequenceMean),
            LossError::PerSequenceNeedsSequences,
        ),
        (
            KdConfig {
                chunk_positions: 0,
                ..ok.clone()
            },
            LossError::ChunkPositions,
        ),
    ];
    for (c, want) in cases {
        assert_eq!(kd_loss(s.clone(), s.clone(), None, &c).err(), Some(want));
    }
    let targets = Tensor::<1, Int>::zeros([2], &device);
    let err = try_cross_entropy(s, targets, &Reduction::PerSequenceMean, 4).err();
    assert_eq!(err, Some(LossError::PerSequenceNeedsSequences));
}

#[test]
fn shift_drops_last_logits_and_first_label() {
    let device = Device::flex();
    // logits[b, t, 0] = t, labels[b, t] = 10 t.
    let logits = Tensor::<1, Int>::arange(0..4, &device)
        .float()
        .reshape([1, 4, 1])
        .repeat_dim(2, 3);
    let labels = Tensor::<1, Int>::arange(0..4, &device)
        .mul_scalar(10)
        .reshape([1, 4]);
    let (logits, labels) = shift_for_next_token(logits, labels);
    assert_eq!(logits.dims(), [1, 3, 3]);
    let first: Vec<f32> = logits
        .narrow(2, 0, 1)
        .into_data()
        .try_to_vec()
        .expect("f32");
    let labels: Vec<f32> = labels.float().into_data().try_to_vec().expect("f32");
    assert_eq!(first, [0.0, 1.0, 2.0]);
    assert_eq!(labels, [10.0, 20.0, 30.0]);
}

#[test]
fn weighted_cross_entropy_is_the_weighted_sum_of_per_position_values() {
    // 5 positions, targets with one ignored. Per-position CE values come from `Sum` over a
    // one-position slice; the weighted loss must be Σ w_i · CE_i over the kept ones.
    let device = Device::flex();
    let mut rng = Rng(7);
    let (positions, vocab) = (5, 11);
    let logits = rng.normal(positions * vocab, 2.0);
    let targets: Vec<i64> = vec![3, -100, 0, 10, 7];
    let weights: Vec<f32> = vec![0.5, 9.0, 0.25, 2.0, 0.0];
    let logits_t = tensor(logits.clone(), [positions, vocab], &device);
    let targets_t =
        Tensor::<1, Int>::from_data(TensorData::new(targets.clone(), [positions]), &device);
    let weights_t = Tensor::<1>::from_data(TensorData::new(weights.clone(), [positions]), &device);
    let got: f32 = weighted_cross_entropy(logits_t, targets_t, weights_t)
        .expect("valid")
        .into_scalar();
    let mut expected = 0.0f32;
    for i in 0..positions {
        if targets[i] < 0 {
            continue; // ignored whatever its weight
        }
        let row = tensor(
            logits[i * vocab..(i + 1) * vocab].to_vec(),
            [1, vocab],
            &device,
        );
        let target = Tensor::<1, Int>::from_data(TensorData::new(vec![targets[i]], [1]), &device);
        let ce: f32 = try_cross_entropy(row, target, &Reduction::Sum, 1024)
            .expect("valid")
            .into_scalar();
        expected += weights[i] * ce;
    }
    assert!(
        (got - expected).abs() <= EQUAL_TOL * expected.abs().max(1.0),
        "{got} vs {expected}"
    );
}
