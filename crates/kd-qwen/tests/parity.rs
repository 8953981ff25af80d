//! Parity with Hugging Face transformers on tiny random checkpoints.
//!
//! The fixtures under `tests/fixtures/` and every expected number come from
//! `reference/generate.py` (seeded; transformers 5.25.0, torch 2.15.0, float32, eager
//! attention). Qwen3: tied head, `head_dim` 16 ≠ hidden / heads = 8, q/k norm. Qwen2: sharded
//! checkpoint, q/k/v bias, derived `head_dim`, untied head, θ = 10,000.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use kd_qwen::{
    ForwardOptions, KvCache, Padding, Qwen, StoreDtype, WeightLayout, export_hf, greedy,
    load_checkpoint, load_checkpoint_with, pad_batch,
};

mod common;

/// f32 against f32: both sides sum the same products in a different order; with |logits| ≲ 30
/// and ≤ 64-term dot products, accumulated rounding stays below 1e-5, so 1e-4 (the issue's
/// bound) leaves a 10× margin.
const F32_TOL: f32 = 1e-4;

/// A bf16 checkpoint against PyTorch running the *same* bf16 weights upcast to f32: widening
/// bf16 → f32 is exact, so only the f32 summation order differs, as for [`F32_TOL`]. (Against
/// the original f32 weights the bf16 rounding, 2⁻⁹ relative per weight, moves logits by up to
/// 0.30 (Qwen3, logit std 6.2) and 0.055 (Qwen2, std 1.4), printed by the generator.)
const BF16_TOL: f32 = F32_TOL;

const PAD_ID: u32 = 0;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    fn open(family: &str) -> Self {
        let bytes = std::fs::read(fixture(family).join("reference.safetensors")).unwrap();
        Self { bytes }
    }

    fn get(&self, name: &str) -> (Vec<usize>, Vec<u8>, safetensors::Dtype) {
        let st = safetensors::SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap();
        (t.shape().to_vec(), t.data().to_vec(), t.dtype())
    }

    fn f32(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let (shape, data, dtype) = self.get(name);
        assert_eq!(dtype, safetensors::Dtype::F32, "{name}");
        let v = data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        (shape, v.collect())
    }

    fn i64(&self, name: &str) -> (Vec<usize>, Vec<i64>) {
        let (shape, data, dtype) = self.get(name);
        assert_eq!(dtype, safetensors::Dtype::I64, "{name}");
        let v = data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()));
        (shape, v.collect())
    }

    fn prompts(&self) -> Vec<Vec<u32>> {
        (0..3)
            .map(|i| {
                self.i64(&format!("ids_{i}"))
                    .1
                    .iter()
                    .map(|&t| t as u32)
                    .collect()
            })
            .collect()
    }
}

fn values(t: Tensor<3>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec().unwrap()
}

/// Max |a - b| over positions where `mask` (one entry per `[batch, seq]` row of width `inner`)
/// is 1.
fn max_diff(a: &[f32], b: &[f32], mask: &[i64], inner: usize) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0f32;
    for (pos, &m) in mask.iter().enumerate() {
        if m == 1 {
            for k in pos * inner..(pos + 1) * inner {
                worst = worst.max((a[k] - b[k]).abs());
            }
        }
    }
    worst
}

fn padded_logits(
    model: &Qwen,
    prompts: &[Vec<u32>],
    padding: Padding,
    device: &Device,
) -> Vec<f32> {
    let (ids, mask) = pad_batch(prompts, PAD_ID, padding, device);
    let options = ForwardOptions {
        attention_mask: Some(mask),
    };
    values(model.forward(ids, &options))
}

fn check_alone(family: &str) {
    let device = Device::flex();
    let reference = Reference::open(family);
    let model = load_checkpoint(&fixture(family), &device).unwrap();
    for (i, prompt) in reference.prompts().iter().enumerate() {
        let ids: Vec<i64> = prompt.iter().map(|&t| i64::from(t)).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, prompt.len()]), &device);
        let hidden = model.forward_hidden(ids, &ForwardOptions::default(), None);
        let logits = values(model.lm_logits(hidden.clone()));
        let ones = vec![1i64; prompt.len()];
        let (_, want) = reference.f32(&format!("hidden_{i}"));
        let d_hidden = max_diff(&values(hidden), &want, &ones, model.config().hidden_size);
        let (_, want) = reference.f32(&format!("logits_{i}"));
        let d_logits = max_diff(&logits, &want, &ones, model.config().vocab_size);
        eprintln!("{family} prompt {i}: hidden max-abs {d_hidden:.3e}, logits {d_logits:.3e}");
        assert!(
            d_hidden <= F32_TOL && d_logits <= F32_TOL,
            "{family} {i}: {d_hidden} {d_logits}"
        );
    }
}

fn check_padded(family: &str, padding: Padding) {
    let device = Device::flex();
    let reference = Reference::open(family);
    let model = load_checkpoint(&fixture(family), &device).unwrap();
    let side = if padding == Padding::Left {
        "left"
    } else {
        "right"
    };
    let got = padded_logits(&model, &reference.prompts(), padding, &device);
    let (_, want) = reference.f32(&format!("logits_{side}"));
    let (_, mask) = reference.i64(&format!("mask_{side}"));
    let d = max_diff(&got, &want, &mask, model.config().vocab_size);
    eprintln!("{family} {side}-padded: logits max-abs {d:.3e}");
    assert!(d <= F32_TOL, "{family} {side}: {d}");
}

#[test]
fn qwen3_rows_alone_match_hidden_and_logits() {
    check_alone("qwen3");
}

#[test]
fn qwen2_rows_alone_match_hidden_and_logits() {
    check_alone("qwen2");
}

#[test]
fn qwen3_right_padded_batch_matches() {
    check_padded("qwen3", Padding::Right);
}

#[test]
fn qwen3_left_padded_batch_matches() {
    check_padded("qwen3", Padding::Left);
}

#[test]
fn qwen2_right_padded_batch_matches() {
    check_padded("qwen2", Padding::Right);
}

#[test]
fn qwen2_left_padded_batch_matches() {
    check_padded("qwen2", Padding::Left);
}

fn check_greedy(family: &str) {
    let device = Device::flex();
    let reference = Reference::open(family);
    let model = load_checkpoint(&fixture(family), &device).unwrap();
    let got = greedy(&model, &reference.prompts(), 8, None);
    let (shape, want) = reference.i64("greedy");
    let want: Vec<Vec<u32>> = want
        .chunks(shape[1])
        .map(|r| r.iter().map(|&t| t as u32).collect())
        .collect();
    assert_eq!(got, want, "{family}: greedy continuation with the KV cache");
}

#[test]
fn qwen3_greedy_with_cache_matches_token_for_token() {
    check_greedy("qwen3");
}

#[test]
fn qwen2_greedy_with_cache_matches_token_for_token() {
    check_greedy("qwen2");
}

fn check_bf16(family: &str) {
    let device = Device::flex();
    let reference = Reference::open(family);
    let model = load_checkpoint(&fixture(&format!("{family}-bf16")), &device).unwrap();
    let got = padded_logits(&model, &reference.prompts(), Padding::Left, &device);
    let (_, want) = reference.f32("logits_left_bf16w");
    let (_, mask) = reference.i64("mask_left");
    let d = max_diff(&got, &want, &mask, model.config().vocab_size);
    eprintln!("{family} bf16 copy, left-padded: logits max-abs {d:.3e}");
    assert!(d <= BF16_TOL, "{family} bf16: {d}");
}

#[test]
fn qwen3_bf16_copy_matches() {
    check_bf16("qwen3");
}

#[test]
fn qwen2_bf16_copy_matches() {
    check_bf16("qwen2");
}

fn check_export_roundtrip(family: &str) {
    let device = Device::flex();
    let reference = Reference::open(family);
    let prompts = reference.prompts();
    let model = load_checkpoint(&fixture(family), &device).unwrap();
    let before = padded_logits(&model, &prompts, Padding::Right, &device);
    let dir = tempfile::tempdir().unwrap();
    export_hf(&model, dir.path(), StoreDtype::F32).unwrap();
    let after = padded_logits(
        &load_checkpoint(dir.path(), &device).unwrap(),
        &prompts,
        Padding::Right,
        &device,
    );
    assert!(
        before == after,
        "{family}: f32 export → reload must reproduce logits exactly"
    );

    // bf16 export of the bf16 fixture's weights is lossless too.
    let bf = load_checkpoint(&fixture(&format!("{family}-bf16")), &device).unwrap();
    let before = padded_logits(&bf, &prompts, Padding::Right, &device);
    export_hf(&bf, dir.path(), StoreDtype::Bf16).unwrap();
    let after = padded_logits(
        &load_checkpoint(dir.path(), &device).unwrap(),
        &prompts,
        Padding::Right,
        &device,
    );
    assert!(
        before == after,
        "{family}: bf16 export → reload must reproduce logits exactly"
    );
    let tied = model.config().tie_word_embeddings;
    let text = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let names = safetensors::SafeTensors::deserialize(&text)
        .unwrap()
        .names()
        .len();
    let has_head = safetensors::SafeTensors::deserialize(&text)
        .unwrap()
        .tensor("lm_head.weight")
        .is_ok();
    assert_eq!(
        has_head, !tied,
        "{family}: a tied head is stored once ({names} tensors)"
    );
}

#[test]
fn qwen3_export_reload_is_exact() {
    check_export_roundtrip("qwen3");
}

#[test]
fn qwen2_export_reload_is_exact() {
    check_export_roundtrip("qwen2");
}

/// The feature-major forward that generation uses, on the inference layout (weights kept as
/// the checkpoint stores them): every non-padded position of the left-padded batch, against
/// the same reference and tolerance as the ordinary forward.
fn check_feature_major_padded(family: &str) {
    let device = Device::flex();
    let reference = Reference::open(family);
    let model = load_checkpoint_with(&fixture(family), &device, WeightLayout::Inference).unwrap();
    let (ids, mask) = pad_batch(&reference.prompts(), PAD_ID, Padding::Left, &device);
    let [batch, seq] = ids.dims();
    let options = ForwardOptions {
        attention_mask: Some(mask),
    };
    let hidden = model.forward_hidden_t(ids, &options, None); // [hidden, batch * seq]
    let vocab = model.config().vocab_size;
    let logits = model
        .lm_logits(hidden.transpose())
        .reshape([batch, seq, vocab]);
    let (_, want) = reference.f32("logits_left");
    let (_, mask) = reference.i64("mask_left");
    let d = max_diff(&values(logits), &want, &mask, vocab);
    eprintln!("{family} feature-major, inference layout, left-padded: logits max-abs {d:.3e}");
    assert!(d <= F32_TOL, "{family}: {d}");
}

#[test]
fn qwen3_feature_major_forward_matches() {
    check_feature_major_padded("qwen3");
}

#[test]
fn qwen2_feature_major_forward_matches() {
    check_feature_major_padded("qwen2");
}

/// Greedy decoding through `next_token_logits` (prefill, then one token per row with the KV
/// cache, feature-major, inference layout) gives the reference continuation.
fn check_next_token_greedy(family: &str) {
    let device = Device::flex();
    let reference = Reference::open(family);
    let model = load_checkpoint_with(&fixture(family), &device, WeightLayout::Inference).unwrap();
    let prompts = reference.prompts();
    let (mut input, mut mask) = pad_batch(&prompts, PAD_ID, Padding::Left, &device);
    let mut cache = KvCache::new(model.config().num_hidden_layers);
    let mut got = vec![Vec::new(); prompts.len()];
    for _ in 0..8 {
        let options = ForwardOptions {
            attention_mask: Some(mask.clone()),
        };
        let next = model
            .next_token_logits(input, &options, &mut cache)
            .argmax(0);
        let next: Vec<i64> = next.into_data().convert::<i64>().try_into_vec().unwrap();
        for (row, &t) in got.iter_mut().zip(&next) {
            row.push(t as u32);
        }
        input = Tensor::from_data(TensorData::new(next, [prompts.len(), 1]), &device);
        mask = Tensor::cat(vec![mask, Tensor::ones([prompts.len(), 1], &device)], 1);
    }
    let (shape, want) = reference.i64("greedy");
    let want: Vec<Vec<u32>> = want
        .chunks(shape[1])
        .map(|r| r.iter().map(|&t| t as u32).collect())
        .collect();
    assert_eq!(got, want, "{family}: next_token_logits greedy continuation");
}

#[test]
fn qwen3_next_token_greedy_matches_token_for_token() {
    check_next_token_greedy("qwen3");
}

#[test]
fn qwen2_next_token_greedy_matches_token_for_token() {
    check_next_token_greedy("qwen2");
}

#[test]
fn layouts_convert_both_ways_without_changing_a_weight() {
    let device = Device::flex();
    for family in ["qwen3", "qwen2"] {
        let training = load_checkpoint(&fixture(family), &device).unwrap();
        let loaded =
            load_checkpoint_with(&fixture(family), &device, WeightLayout::Inference).unwrap();
        let converted = training.clone().into_layout(WeightLayout::Inference);
        let back = converted.clone().into_layout(WeightLayout::Training);
        let weights = |m: &Qwen| -> Vec<f32> {
            let l = &m.model.layers[0];
            [&l.self_attn.q_proj, &l.self_attn.o_proj, &l.mlp.down_proj]
                .iter()
                .flat_map(|p| {
                    p.weight
                        .val()
                        .into_data()
                        .convert::<f32>()
                        .try_into_vec::<f32>()
                        .unwrap()
                })
                .collect()
        };
        let want = weights(&training);
        assert_eq!(
            weights(&loaded),
            want,
            "{family}: loaded in the inference layout"
        );
        assert_eq!(weights(&converted), want, "{family}: converted to it");
        assert_eq!(weights(&back), want, "{family}: and back");
    }
}

/// A copy of `family`'s fixture whose weights are rounded to f16 (round to nearest even, by
/// `half`) and stored either as f16 or as those same values widened back to f32 (widening is
/// exact). Every `model*.safetensors` file is rewritten, so the sharded Qwen2 fixture stays
/// sharded and its index stays valid.
fn f16_rounded_copy(family: &str, store_f16: bool) -> tempfile::TempDir {
    use safetensors::Dtype;
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(family)).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        let target = dir.path().join(&name);
        if !(name.starts_with("model") && name.ends_with(".safetensors")) {
            std::fs::copy(&path, &target).unwrap();
            continue;
        }
        let tensors: Vec<common::Entry> = common::read_tensors(&path)
            .into_iter()
            .map(|(n, dtype, shape, data)| {
                assert_eq!(dtype, Dtype::F32, "{family} fixture {n}");
                let rounded = data
                    .chunks_exact(4)
                    .map(|c| half::f16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
                let (dtype, data) = if store_f16 {
                    (Dtype::F16, rounded.flat_map(|h| h.to_le_bytes()).collect())
                } else {
                    (
                        Dtype::F32,
                        rounded.flat_map(|h| h.to_f32().to_le_bytes()).collect(),
                    )
                };
                (n, dtype, shape, data)
            })
            .collect();
        common::write_tensors(&target, &tensors);
    }
    dir
}

/// An f16 checkpoint loads exactly the values it stores: its logits equal, bit for bit, those
/// of an f32 checkpoint holding the same f16-rounded weights; and they differ from the
/// unrounded fixture's, so the rounding did happen.
fn check_f16(family: &str) {
    let device = Device::flex();
    let prompts = Reference::open(family).prompts();
    let logits = |dir: &Path| {
        padded_logits(
            &load_checkpoint(dir, &device).unwrap(),
            &prompts,
            Padding::Left,
            &device,
        )
    };
    let as_f16 = f16_rounded_copy(family, true);
    let as_f32 = f16_rounded_copy(family, false);
    let got = logits(as_f16.path());
    assert!(
        got == logits(as_f32.path()),
        "{family}: the f16 copy must load the values it stores"
    );
    assert!(
        got != logits(&fixture(family)),
        "{family}: f16 rounding changed nothing"
    );
}

#[test]
fn qwen3_f16_copy_loads_exactly() {
    check_f16("qwen3");
}

#[test]
fn qwen2_sharded_f16_copy_loads_exactly() {
    check_f16("qwen2");
}

/// safetensors writes through a private (0600) temporary file; exported weights must be as
/// readable as the config beside them.
#[cfg(unix)]
#[test]
fn exported_weights_are_readable_by_others() {
    use std::os::unix::fs::PermissionsExt;
    let device = Device::flex();
    let model = load_checkpoint(&fixture("qwen3"), &device).unwrap();
    let dir = tempfile::tempdir().unwrap();
    export_hf(&model, dir.path(), StoreDtype::Bf16).unwrap();
    let mode = |name: &str| {
        std::fs::metadata(dir.path().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("model.safetensors"), 0o644);
}
