//! LoRA adapters: a frozen base under training, merging, export, PEFT-format save and load,
//! and the errors for targets and files that do not fit the model.
//!
//! Every model is a tiny random Qwen3 (hidden 32, 2 layers, vocabulary 64) built from a seeded
//! device RNG; nothing is compared with outside numbers, only the paths against each other.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::collections::HashMap;
use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Distribution, Int, Tensor};
use kd_qwen::{
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, ForwardOptions, LoraAdapter, LoraConfig, Qwen, QwenConfig,
    attach_lora, has_lora, load_adapters, load_checkpoint, merge_lora, save_adapters,
    save_checkpoint,
};

/// Merged against adapted forward, both f32 on the same device. Per projection the adapted path
/// computes `x·W + s·(x·A)·B` and the merged one `x·(W + s·A·B)`: the same products summed in a
/// different order and rounded at different points. For a dot product of n ≤ 64 + 4 terms the
/// rounding error is at most about n·2⁻²⁴ ≈ 4e-6 of the sum of the terms' magnitudes, which
/// here (activations of order 1 after RMSNorm, weights of std 0.2) is itself of order 1; two
/// layers, the norms and the tied head compound a few such errors into logits of order 1. 1e-4
/// leaves more than a 10× margin over that, while a real merge bug (a missing `alpha / rank`, a
/// transposed `A·B`) moves logits by the adapters' whole effect, which the test checks is far
/// larger (`MIN_EFFECT`).
const MERGE_TOL: f32 = 1e-4;

/// The adapters' effect on the logits must dwarf [`MERGE_TOL`] for the merge check to mean
/// anything.
const MIN_EFFECT: f32 = 1e-2;

/// A save → load round trip stores f32 exactly, so the weights come back bit for bit; but a
/// reloaded weight is a transposed view of the stored `[out, in]` matrix rather than the
/// contiguous `[in, out]` one, and the matmul then sums in another order — the same bound as
/// [`MERGE_TOL`] applies. (Measured on Flex: 2–3e-6 for both round trips, 3e-6 for the merge,
/// against an adapter effect of about 3.)
const ROUND_TRIP_TOL: f32 = MERGE_TOL;

fn tiny_config() -> QwenConfig {
    let mut config = QwenConfig::qwen3_shaped(32, 64, 2, 4, 2, 8);
    config.vocab_size = 64;
    config.max_position_embeddings = 64;
    // Weights large enough that logits are of order 1 and the layers matter.
    config.initializer_range = 0.2;
    config
}

fn tiny_model(seed: u64, device: &Device) -> Qwen {
    device.seed(seed);
    Qwen::new(&tiny_config(), device)
}

fn lora_config(targets: &[&str]) -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.1,
        targets: targets.iter().map(|t| t.to_string()).collect(),
    }
}

const ALL: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Two rows of six token ids.
fn ids(device: &Device) -> Tensor<2, Int> {
    Tensor::from_data([[1, 5, 9, 13, 2, 7], [3, 4, 60, 61, 8, 0]], device)
}

fn logits(model: &Qwen, device: &Device) -> Vec<f32> {
    model
        .forward(ids(device), &ForwardOptions::default())
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Every float parameter's values, by parameter id.
#[derive(Default)]
struct Snapshot(HashMap<ParamId, Vec<f32>>);

impl ModuleVisitor for Snapshot {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let values = param
            .val()
            .into_data()
            .convert::<f32>()
            .try_into_vec()
            .unwrap();
        self.0.insert(param.id, values);
    }
}

fn snapshot<M: Module>(module: &M) -> HashMap<ParamId, Vec<f32>> {
    let mut s = Snapshot::default();
    module.visit(&mut s);
    s.0
}

/// Every adapter of `model`, mutably.
fn adapters_mut(model: &mut Qwen) -> Vec<&mut LoraAdapter> {
    let lora = model.lora.as_mut().unwrap();
    let mut out = Vec::new();
    for layer in &mut lora.layers {
        let (a, m) = (&mut layer.self_attn, &mut layer.mlp);
        for slot in [
            &mut a.q_proj,
            &mut a.k_proj,
            &mut a.v_proj,
            &mut a.o_proj,
            &mut m.gate_proj,
            &mut m.up_proj,
            &mut m.down_proj,
        ] {
            out.extend(slot.as_mut());
        }
    }
    out
}

/// Gives every `B` random values (std 0.2, like the base weights), as training would, so that
/// the adapters change the output (a fresh `B` is zero).
fn randomise_b(model: &mut Qwen, device: &Device) {
    for adapter in adapters_mut(model) {
        let dims = adapter.lora_b.dims();
        adapter.lora_b = adapter
            .lora_b
            .clone()
            .map(|_| Tensor::random(dims, Distribution::Normal(0.0, 0.2), device));
    }
}

#[test]
fn training_changes_only_the_adapters() {
    let device = Device::flex().autodiff();
    let base = tiny_model(1, &device);
    let base_before = snapshot(&base);
    let config = lora_config(&["q_proj", "v_proj", "gate_proj", "down_proj"]);
    let mut model = attach_lora(base, &config).unwrap();
    let adapters_before = snapshot(model.lora.as_ref().unwrap());
    // 2 layers × 4 targets × (A, B).
    assert_eq!(adapters_before.len(), 16);

    let q = &model.model.layers[0].self_attn.q_proj;
    assert!(!q.weight.is_require_grad(), "base weight still trainable");
    let adapter = model.lora.as_ref().unwrap().layers[0]
        .self_attn
        .q_proj
        .as_ref()
        .unwrap();
    assert!(adapter.lora_a.is_require_grad() && adapter.lora_b.is_require_grad());

    // Three AdamW steps on next-token-style cross-entropy (targets: the ids themselves), with
    // adapter dropout 0.1 active on this autodiff device. Weight decay is on, so a frozen
    // weight that the optimizer visited would move even without a gradient.
    let mut optim = AdamWConfig::new().with_weight_decay(0.1).init();
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    for _ in 0..3 {
        let out = model.forward(ids(&device), &ForwardOptions::default());
        let [batch, seq, vocab] = out.dims();
        let targets = ids(&device).reshape([batch * seq]);
        let loss = loss_fn.forward(out.reshape([batch * seq, vocab]), targets);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        assert_eq!(
            grads.len(),
            16,
            "gradients for exactly the adapter matrices"
        );
        model = optim.step(1e-2, model, grads);
    }

    let adapters_after = snapshot(model.lora.as_ref().unwrap());
    for (id, before) in &adapters_before {
        assert_ne!(&adapters_after[id], before, "adapter {id} did not change");
    }
    model.lora = None;
    let base_after = snapshot(&model);
    assert_eq!(base_after.len(), base_before.len());
    for (id, before) in &base_before {
        // Bit for bit: a frozen weight is not touched at all.
        assert_eq!(&base_after[id], before, "base parameter {id} changed");
    }
}

#[test]
fn freezing_survives_moving_to_the_training_device() {
    let plain = Device::flex();
    let train = plain.clone().autodiff();
    let model = attach_lora(tiny_model(2, &plain), &lora_config(&["q_proj"])).unwrap();
    // In burn 0.22 a move keeps the tensors' autodiff state; `train()` switches it on, with
    // each parameter's configured gradient setting.
    for moved in [
        model.clone().fork(&train).train(),
        model.to_device(&train).train(),
    ] {
        assert!(
            !moved.model.layers[1]
                .self_attn
                .q_proj
                .weight
                .is_require_grad()
        );
        assert!(!moved.model.embed_tokens.weight.is_require_grad());
        let adapter = moved.lora.as_ref().unwrap().layers[1]
            .self_attn
            .q_proj
            .as_ref()
            .unwrap();
        assert!(adapter.lora_a.is_require_grad() && adapter.lora_b.is_require_grad());
    }
}

#[test]
fn merged_model_computes_what_the_adapters_did_and_exports() {
    // A plain device: dropout is inactive there (burn's `Dropout` acts only under autodiff),
    // although the config asks for 0.1.
    let device = Device::flex();
    let base = tiny_model(3, &device);
    let base_logits = logits(&base, &device);

    let mut model = attach_lora(base, &lora_config(&ALL)).unwrap();
    // B = 0: the fresh adapters add exactly zero.
    assert_eq!(logits(&model, &device), base_logits);

    randomise_b(&mut model, &device);
    let adapted = logits(&model, &device);
    let effect = max_diff(&adapted, &base_logits);
    assert!(
        effect > MIN_EFFECT,
        "adapters change the logits by {effect} only"
    );

    // Exporting with the adapters still on would drop them: refused.
    let dir = tempfile::tempdir().unwrap();
    let err = save_checkpoint(&model, dir.path()).unwrap_err().to_string();
    assert!(err.contains("merge_lora"), "{err}");

    let merged = merge_lora(model);
    assert!(!has_lora(&merged));
    let merged_logits = logits(&merged, &device);
    let diff = max_diff(&merged_logits, &adapted);
    assert!(diff <= MERGE_TOL, "merged vs adapted: {diff} > {MERGE_TOL}");

    save_checkpoint(&merged, dir.path()).unwrap();
    let reloaded = load_checkpoint(dir.path(), &device).unwrap();
    let diff = max_diff(&logits(&reloaded, &device), &merged_logits);
    assert!(
        diff <= ROUND_TRIP_TOL,
        "reloaded vs merged: {diff} > {ROUND_TRIP_TOL}"
    );
}

fn read_safetensors_shapes(path: &Path) -> HashMap<String, Vec<usize>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| (name, view.shape().to_vec()))
        .collect()
}

#[test]
fn saved_adapters_load_onto_a_fresh_base() {
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    let (base_dir, adapter_dir) = (dir.path().join("base"), dir.path().join("adapters"));

    let base = tiny_model(4, &device);
    save_checkpoint(&base, &base_dir).unwrap();
    let config = lora_config(&["q_proj", "k_proj", "layers.1.mlp.down_proj"]);
    let mut model = attach_lora(base, &config).unwrap();
    randomise_b(&mut model, &device);
    save_adapters(&model, &adapter_dir).unwrap();

    // PEFT's names and PyTorch layout: A [rank, in], B [out, rank]. k_proj: 32 → 2 × 8;
    // down_proj: 64 → 32, in layer 1 only.
    let shapes = read_safetensors_shapes(&adapter_dir.join(ADAPTER_WEIGHTS));
    let p = "base_model.model.model.layers";
    assert_eq!(shapes.len(), 2 * 2 * 2 + 2);
    assert_eq!(
        shapes[&format!("{p}.0.self_attn.q_proj.lora_A.weight")],
        [4, 32]
    );
    assert_eq!(
        shapes[&format!("{p}.1.self_attn.k_proj.lora_B.weight")],
        [16, 4]
    );
    assert_eq!(
        shapes[&format!("{p}.1.mlp.down_proj.lora_A.weight")],
        [4, 64]
    );
    assert_eq!(
        shapes[&format!("{p}.1.mlp.down_proj.lora_B.weight")],
        [32, 4]
    );
    assert!(!shapes.contains_key(&format!("{p}.0.mlp.down_proj.lora_A.weight")));
    let text = std::fs::read_to_string(adapter_dir.join(ADAPTER_CONFIG)).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["r"], 4);
    assert_eq!(json["lora_alpha"], 8);
    assert_eq!(json["lora_dropout"], 0.1);
    assert_eq!(
        json["target_modules"],
        serde_json::json!(["q_proj", "k_proj", "layers.1.mlp.down_proj"])
    );

    let fresh = load_checkpoint(&base_dir, &device).unwrap();
    let loaded = load_adapters(fresh, &adapter_dir).unwrap();
    assert_eq!(loaded.lora.as_ref().unwrap().config, config);
    assert!(
        !loaded.model.layers[0]
            .mlp
            .down_proj
            .weight
            .is_require_grad()
    );
    let diff = max_diff(&logits(&loaded, &device), &logits(&model, &device));
    assert!(
        diff <= ROUND_TRIP_TOL,
        "loaded vs saved: {diff} > {ROUND_TRIP_TOL}"
    );
}

#[test]
fn a_target_that_matches_nothing_is_named() {
    let device = Device::flex();
    let base = tiny_model(5, &device);
    let err = attach_lora(base.clone(), &lora_config(&["q_proj", "qkv_proj"]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`qkv_proj`") && err.contains("targets"),
        "{err}"
    );

    // A layer the model does not have matches nothing either.
    let err = attach_lora(base.clone(), &lora_config(&["layers.2.self_attn.q_proj"]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("layers.2.self_attn.q_proj"), "{err}");

    let err = attach_lora(
        base,
        &LoraConfig {
            rank: 0,
            ..lora_config(&["q_proj"])
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("`rank`"), "{err}");
}

#[test]
fn adapters_that_do_not_fit_are_refused() {
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    let model = attach_lora(tiny_model(6, &device), &lora_config(&["up_proj"])).unwrap();
    save_adapters(&model, dir.path()).unwrap();

    // A base with another intermediate size: the first mismatching matrix is named.
    let mut other = tiny_config();
    other.intermediate_size = 48;
    let err = load_adapters(Qwen::new(&other, &device), dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.0.mlp.up_proj.lora_B.weight") && err.contains("[48, 4]"),
        "{err}"
    );

    // A configuration naming a module this model lacks: the file and the target are named.
    let config_path = dir.path().join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(&config_path, text.replace("\"up_proj\"", "\"w1\"")).unwrap();
    let err = load_adapters(tiny_model(6, &device), dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(ADAPTER_CONFIG) && err.contains("target_modules") && err.contains("`w1`"),
        "{err}"
    );

    // Nothing to save on a plain model.
    let err = save_adapters(&tiny_model(6, &device), dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no LoRA adapters"), "{err}");
}

#[test]
fn config_fills_defaults_and_rejects_unknown_fields() {
    // A preset names only what it changes; the rest are PEFT's defaults.
    let config: LoraConfig =
        serde_json::from_str(r#"{ "rank": 16, "targets": ["q_proj", "down_proj"] }"#).unwrap();
    assert_eq!(
        config,
        LoraConfig {
            rank: 16,
            targets: vec!["q_proj".into(), "down_proj".into()],
            ..LoraConfig::default()
        }
    );
    assert_eq!(config.scale(), 0.5);
    let err = serde_json::from_str::<LoraConfig>(r#"{ "rnak": 16 }"#).unwrap_err();
    assert!(err.to_string().contains("rnak"), "{err}");
}
