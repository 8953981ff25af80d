//! The offline teacher cache: order independence, fingerprint checks, round trip, agreement
//! with the live teacher, and id lookup. Tiny random Qwen3-shaped models (vocabulary 40) and
//! hand-built examples; no files outside a temporary folder.

use std::collections::HashMap;

use burn::tensor::activation::log_softmax;
use burn::tensor::{Bool, Device, Tensor, TensorData};
use kd_imdb::{Example, IGNORE_INDEX, PadSide, collate};
use kd_loss::{Divergence, KdConfig, Reduction, sparse_kd_loss};
use kd_qwen::{ForwardOptions, Qwen, QwenConfig, save_checkpoint};
use kd_train::{
    BuildOptions, CacheError, Fingerprint, StepBatch, TeacherCache, checkpoint_sha256,
    supervised_positions,
};

const VOCAB: usize = 40;
const TEMPERATURE: f64 = 2.0;

fn tiny(seed: u64, device: &Device) -> Qwen {
    let mut config = QwenConfig::qwen3_shaped(32, 64, 1, 4, 2, 8);
    config.vocab_size = VOCAB;
    // Large weights, so teacher and student distributions are far from uniform and apart.
    config.initializer_range = 0.5;
    device.seed(seed);
    Qwen::new(&config, device)
}

/// Six examples of lengths 5..=12 with 1 to 3 supervised answer tokens at the end.
fn examples() -> (Vec<String>, Vec<Example>) {
    let mut state = 12_345_u64;
    let mut next = move || {
        // SplitMix-style LCG step; only needs to scatter ids over 1..VOCAB.
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        1 + (state >> 33) as u32 % (VOCAB as u32 - 1)
    };
    let shapes = [(9, 2), (5, 1), (12, 3), (7, 2), (10, 2), (6, 3)];
    let mut ids = Vec::new();
    let mut out = Vec::new();
    for (i, (len, answer)) in shapes.into_iter().enumerate() {
        let input_ids: Vec<u32> = (0..len).map(|_| next()).collect();
        let answer_pos = len - answer;
        let labels = input_ids
            .iter()
            .enumerate()
            .map(|(t, &id)| {
                if t < answer_pos {
                    IGNORE_INDEX
                } else {
                    i64::from(id)
                }
            })
            .collect();
        ids.push(format!("{i}_{}", 1 + i % 10));
        out.push(Example {
            input_ids,
            labels,
            answer_pos,
            truncated: false,
            label: None,
        });
    }
    (ids, out)
}

fn fingerprint(max_len: usize) -> Fingerprint {
    Fingerprint {
        tokenizer_sha256: "ab".repeat(32),
        template_sha256: "cd".repeat(32),
        max_len,
        temperature: TEMPERATURE,
        teacher_sha256: "ef".repeat(32),
    }
}

fn build(teacher: &Qwen, k: usize, batch_size: usize, max_len: usize) -> TeacherCache {
    let (ids, examples) = examples();
    let mut seen = Vec::new();
    let cache = TeacherCache::build(
        teacher,
        &ids,
        &examples,
        BuildOptions { k, batch_size },
        fingerprint(max_len),
        &mut |n| seen.push(n),
    )
    .expect("build");
    assert_eq!(
        seen.last(),
        Some(&examples.len()),
        "progress reaches the end"
    );
    cache
}

fn kd_config() -> KdConfig {
    KdConfig {
        divergence: Divergence::ReverseKl,
        temperature: TEMPERATURE,
        t_squared: true,
        reduction: Reduction::TokenMean,
        chunk_positions: 1024,
    }
}

fn to_f32(t: Tensor<2>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 data")
}

/// The KD loss of every example of one batch, computed from the whole batch's student logits
/// and sparse teacher with a mask keeping that example's rows only.
fn per_example_losses(
    student: &Qwen,
    cache: &TeacherCache,
    batch: &[usize],
    teacher_rows: &[usize],
    device: &Device,
) -> HashMap<String, f64> {
    let (ids, examples) = examples();
    let aligned = cache.aligned(&ids, &examples).expect("aligned");
    let picked: Vec<&Example> = batch.iter().map(|&i| &examples[i]).collect();
    let step = StepBatch::new(&collate(&picked, 0, PadSide::Right), device);
    let logits = student.forward_at(step.input_ids, step.positions, &ForwardOptions::default());
    let teacher = aligned.sparse_teacher(teacher_rows, device);
    let mut out = HashMap::new();
    let mut row = 0;
    for &i in batch {
        let e = &examples[i];
        let n = supervised_positions(&e.labels, 1, e.len()).0.len();
        let keep: Vec<bool> = (0..step.supervised)
            .map(|r| (row..row + n).contains(&r))
            .collect();
        let mask = Tensor::<1, Bool>::from_data(TensorData::new(keep, [step.supervised]), device);
        let loss = sparse_kd_loss(logits.clone(), teacher.clone(), Some(mask), &kd_config())
            .expect("loss")
            .into_scalar::<f32>();
        out.insert(ids[i].clone(), f64::from(loss));
        row += n;
    }
    out
}

#[test]
fn shuffling_the_data_changes_no_per_example_loss() {
    let device = Device::flex();
    let teacher = tiny(1, &device);
    let student = tiny(2, &device);
    // k = 8 of 40 and batches of 4: two teacher batches, in length order, not input order.
    let cache = build(&teacher, 8, 4, 128);

    let in_order = [0, 1, 2, 3, 4, 5];
    let reference = per_example_losses(&student, &cache, &in_order, &in_order, &device);
    assert!(
        reference.values().all(|l| l.is_finite() && *l > 0.0),
        "{reference:?}"
    );

    // A shuffled order as one batch, and the same order split into two batches of other
    // padded lengths.
    let shuffled = [4, 1, 5, 0, 3, 2];
    let mut others = vec![per_example_losses(
        &student, &cache, &shuffled, &shuffled, &device,
    )];
    for half in shuffled.chunks(3) {
        others.push(per_example_losses(&student, &cache, half, half, &device));
    }
    let mut split = HashMap::new();
    for m in others.drain(1..) {
        split.extend(m);
    }
    others.push(split);

    // The student's logits of one example are the same f32 computation in every batch, up to
    // the order of accumulation a gemm picks for another row count or padded length: a few
    // ulps of the logits, ~1e-6 relative in the loss. 1e-5 relative leaves a margin of 10.
    const ORDER_TOL: f64 = 1e-5;
    for other in &others {
        for (id, &want) in &reference {
            let got = other[id];
            assert!(
                (got - want).abs() <= ORDER_TOL * want.abs().max(1.0),
                "example {id}: {got} in shuffled order, {want} in order"
            );
        }
    }

    // The check has teeth: reading the teacher rows in the unshuffled order against the
    // shuffled batch (a misaligned cache) changes the losses far beyond the tolerance.
    let misaligned = per_example_losses(&student, &cache, &shuffled, &in_order, &device);
    let worst = reference
        .iter()
        .map(|(id, want)| (misaligned[id] - want).abs())
        .fold(0.0, f64::max);
    assert!(
        worst > 100.0 * ORDER_TOL,
        "misalignment went unnoticed: {worst}"
    );
}

#[test]
fn another_max_len_is_refused_by_name() {
    let device = Device::flex();
    let teacher = tiny(1, &device);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cache");
    build(&teacher, 4, 4, 128).save(&path).expect("save");

    let err = TeacherCache::open(&path, &fingerprint(192)).expect_err("max_len differs");
    assert!(matches!(err, CacheError::Mismatch { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("cache was built with max_len 128, this run uses 192"),
        "{message}"
    );
    // Only the differing field is named.
    assert!(!message.contains("temperature"), "{message}");

    // Every field is checked: the temperature and the teacher too.
    let mut other = fingerprint(128);
    other.temperature = 1.0;
    other.teacher_sha256 = "00".repeat(32);
    let message = TeacherCache::open(&path, &other)
        .expect_err("temperature and teacher differ")
        .to_string();
    assert!(
        message.contains("temperature 2, this run uses 1")
            && message
                .contains("teacher checkpoint sha256 efefefefefef, this run uses 000000000000"),
        "{message}"
    );
    assert_eq!(
        TeacherCache::read_fingerprint(&path).expect("fingerprint"),
        fingerprint(128)
    );
}

#[test]
fn save_then_open_returns_identical_values() {
    let device = Device::flex();
    let teacher = tiny(1, &device);
    let cache = build(&teacher, 6, 2, 128);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cache");
    let bytes = cache.save(&path).expect("save");
    let opened = TeacherCache::open(&path, &fingerprint(128)).expect("open");
    // Exact: the values are f16 in memory and on disk, written and read bit for bit.
    assert_eq!(opened, cache);
    assert_eq!(
        opened.rows(),
        13,
        "2 + 1 + 3 + 2 + 2 + 3 supervised positions"
    );
    for id in cache.ids() {
        assert_eq!(opened.example(id), cache.example(id));
    }
    // 6 bytes per entry, plus the safetensors header and meta.json.
    assert_eq!(cache.bytes_per_supervised_token(), 6 * 6);
    assert!(bytes > (13 * 6 * 6) as u64, "{bytes} bytes");

    // Saving again replaces the cache; a folder that is not a cache is never overwritten.
    build(&teacher, 3, 2, 128).save(&path).expect("replace");
    let reopened = TeacherCache::open(&path, &fingerprint(128)).expect("open");
    assert_eq!(reopened.k(), 3);
    let other = dir.path().join("other");
    std::fs::create_dir(&other).expect("mkdir");
    std::fs::write(other.join("notes.txt"), "keep me").expect("write");
    let err = cache.save(&other).expect_err("not a cache");
    assert!(err.to_string().contains("not a teacher cache"), "{err}");
    assert!(other.join("notes.txt").exists());
}

#[test]
fn cached_top_k_is_the_live_teachers_top_k() {
    let device = Device::flex();
    let teacher = tiny(1, &device);
    let k = 5;
    // Batches of 4: the cached rows come from padded batches, the live ones from each
    // example alone, so the check also covers batching.
    let cache = build(&teacher, k, 4, 128);
    let (ids, examples) = examples();
    for (id, example) in ids.iter().zip(&examples) {
        let step = StepBatch::new(&collate(&[example], 0, PadSide::Right), &device);
        let logits = teacher.forward_at(step.input_ids, step.positions, &ForwardOptions::default());
        let live = to_f32(log_softmax(logits.div_scalar(TEMPERATURE), 1)); // [n, vocab]
        let (top_ids, top_lp) = cache.example(id).expect("cached");
        assert_eq!(top_ids.len(), step.supervised * k);
        for row in 0..step.supervised {
            let live_row = &live[row * VOCAB..(row + 1) * VOCAB];
            let cached_ids = &top_ids[row * k..(row + 1) * k];
            let cached_lp = &top_lp[row * k..(row + 1) * k];
            for (j, (&t, lp)) in cached_ids.iter().zip(cached_lp).enumerate() {
                let want = f64::from(live_row[t as usize]);
                let got = f64::from(lp.to_f32());
                // f16 keeps 11 significant bits: rounding moves a value by at most
                // |x| * 2^-11; 1e-5 more covers f32 differences between the padded batch and
                // the lone example.
                let tol = want.abs() * 2f64.powi(-11) + 1e-5;
                assert!(
                    (got - want).abs() <= tol,
                    "{id} row {row} id {t}: {got} vs {want}"
                );
                assert!(
                    !cached_ids[..j].contains(&t),
                    "{id} row {row}: id {t} twice"
                );
            }
            // Top-k: no id left out is more likely than the least likely one kept (1e-5:
            // the same batch-versus-alone f32 margin, so a near-tie may go either way).
            let kept_min = cached_ids
                .iter()
                .map(|&t| live_row[t as usize])
                .fold(f32::INFINITY, f32::min);
            for (t, &v) in live_row.iter().enumerate() {
                if !cached_ids.contains(&(t as u32)) {
                    assert!(
                        v <= kept_min + 1e-5,
                        "{id} row {row}: id {t} ({v}) left out"
                    );
                }
            }
        }
    }
}

#[test]
fn a_missing_example_is_named() {
    let device = Device::flex();
    let teacher = tiny(1, &device);
    let cache = build(&teacher, 4, 8, 128);
    let (mut ids, data) = examples();
    ids[3] = "9999_7".into();
    let err = cache.aligned(&ids, &data).expect_err("unknown id");
    assert!(matches!(err, CacheError::MissingExample { .. }), "{err:?}");
    assert!(err.to_string().contains("`9999_7`"), "{err}");

    // An example whose supervised positions changed since the cache was built is refused
    // too: its rows would otherwise slide onto its neighbour's.
    let (ids, mut examples) = examples();
    examples[2].labels[5] = i64::from(examples[2].input_ids[5]);
    let err = cache
        .aligned(&ids, &examples)
        .expect_err("row count differs");
    assert!(
        err.to_string()
            .contains("example `2_3` has 4 supervised positions in this run but 3"),
        "{err}"
    );
}

#[test]
fn checkpoint_hash_sees_the_weights() {
    // Two teachers of the same shape differ only in their weight bytes: a header-and-sizes
    // fingerprint could not tell them apart, the full hash must.
    let device = Device::flex();
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, a2) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("a2"),
    );
    // The same model saved twice (not re-initialised: tests run in parallel and share the
    // device's seeded generator, so a second `tiny(1)` need not repeat the first).
    let model = tiny(1, &device);
    save_checkpoint(&model, &a).expect("save a");
    save_checkpoint(&tiny(2, &device), &b).expect("save b");
    save_checkpoint(&model, &a2).expect("save a again");
    let hash = |p: &std::path::Path| checkpoint_sha256(p).expect("hash");
    assert_eq!(hash(&a), hash(&a2));
    assert_ne!(hash(&a), hash(&b));
}

#[test]
fn fingerprint_of_a_real_run_names_only_what_changed() {
    // The shared Qwen3 tokenizer, as the kd-imdb tests use it.
    let tokenizer = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/models/qwen3-tokenizer/tokenizer.json"
    ));
    let device = Device::flex();
    let dir = tempfile::tempdir().expect("tempdir");
    let teacher = dir.path().join("teacher");
    save_checkpoint(&tiny(1, &device), &teacher).expect("save teacher");
    let built = Fingerprint::compute(tokenizer, 128, TEMPERATURE, &teacher).expect("fingerprint");
    let again = Fingerprint::compute(tokenizer, 128, TEMPERATURE, &teacher).expect("fingerprint");
    assert_eq!(built, again, "hashing is deterministic");
    assert!(built.diff(&again).is_empty());
    // The template hash is taken at a fixed probe length: another max_len is one difference,
    // not two.
    let longer = Fingerprint::compute(tokenizer, 192, TEMPERATURE, &teacher).expect("fingerprint");
    assert_eq!(
        built.diff(&longer),
        vec!["cache was built with max_len 128, this run uses 192".to_string()]
    );
}
