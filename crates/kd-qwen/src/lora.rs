//! LoRA adapters for the linear projections of a [`Qwen`] model (Hu et al. 2021, "LoRA:
//! Low-Rank Adaptation of Large Language Models").
//!
//! An adapted projection computes `y = x·W + b + (alpha / rank) · dropout(x)·A·B`, with the
//! base weight `W` (`[in, out]`, burn layout) frozen and only `A` (`[in, rank]`) and `B`
//! (`[rank, out]`) trained. This is the formula of Hugging Face PEFT's `lora.Linear`, dropout on
//! the adapter's input included, so adapters trained here and there mean the same thing.
//!
//! Why not burn's own `Module::apply_lora`: it reparameterises the weight itself
//! (`W → W + s·A·B`), so the input never reaches the adapter on its own and PEFT's dropout on
//! the adapter input cannot be expressed. Here the adapters run beside the frozen linear in the
//! forward pass, and live in one field, [`Qwen::lora`], which is `None` for a plain model: the
//! base modules, their loading and their export are untouched, and a model without adapters
//! runs exactly the forward it ran before.
//!
//! The life cycle:
//! - [`attach_lora`] freezes every base parameter and adds fresh adapters to the projections
//!   that [`LoraConfig::targets`] names;
//! - train as usual: only the adapters receive gradients (a frozen parameter has none, and
//!   burn's optimizers leave a parameter without a gradient untouched);
//! - [`save_adapters`] writes the adapters alone in PEFT's layout (`adapter_config.json` and
//!   `adapter_model.safetensors`), which `peft.PeftModel.from_pretrained` loads;
//!   [`load_adapters`] puts them back onto a base model;
//! - [`merge_lora`] folds them into the base weights (`W' = W + (alpha / rank)·A·B`) for an
//!   export with [`export_hf`](crate::export_hf), which refuses a model that still has
//!   adapters rather than silently writing the base weights alone.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::model::DecoderLayer;
use crate::{Error, Qwen};

/// File name of the adapter weights in a saved adapter folder (PEFT's name).
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// File name of the adapter configuration in a saved adapter folder (PEFT's name).
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// PEFT wraps the transformers model twice (`PeftModel.base_model` is a `LoraModel` whose
/// `.model` is the `Qwen3ForCausalLM`), so its saved names carry this prefix before the
/// transformers module path.
const PEFT_PREFIX: &str = "base_model.model.";

/// Origin named in errors about a [`LoraConfig`] given in code rather than read from a file.
const IN_MEMORY: &str = "LoRA configuration";

/// The projections of one decoder layer that can carry an adapter, as module paths below
/// `model.layers.{i}.` (Hugging Face's names). Every per-layer array in this file follows this
/// order.
const PROJECTIONS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// What to adapt and how: the knobs of PEFT's `LoraConfig` that this crate implements.
///
/// Missing fields take the [`Default`] values (PEFT's defaults for Qwen), so a preset can set
/// only what it changes; unknown fields are an error, to catch typos.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank `r` of the update `A·B`; at least 1.
    pub rank: usize,
    /// `lora_alpha`: the update is scaled by `alpha / rank`.
    pub alpha: f64,
    /// Probability of dropping an element of the adapter's input, in `[0, 1)`. Active only
    /// while training (an autodiff device and training flags on, see burn's `Dropout`); it
    /// draws from the device's RNG.
    pub dropout: f64,
    /// Modules to adapt, matched as PEFT matches `target_modules`: a name targets every module
    /// whose full path (`model.layers.3.self_attn.q_proj`) equals it or ends with `.` + it. So
    /// `q_proj` adapts the query projection of every layer and `layers.0.mlp.down_proj` one
    /// module. Candidates: `q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`,
    /// `down_proj`. A name that matches nothing is an error.
    pub targets: Vec<String>,
}

impl Default for LoraConfig {
    /// PEFT's defaults: `r = 8`, `lora_alpha = 8`, `lora_dropout = 0`, and for Qwen models the
    /// query and value projections.
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 8.0,
            dropout: 0.0,
            targets: vec!["q_proj".into(), "v_proj".into()],
        }
    }
}

/// Field names used in error messages: ours for a config given in code, PEFT's for a config
/// read from `adapter_config.json`.
struct FieldNames {
    rank: &'static str,
    alpha: &'static str,
    dropout: &'static str,
    targets: &'static str,
}

const OUR_FIELDS: FieldNames = FieldNames {
    rank: "rank",
    alpha: "alpha",
    dropout: "dropout",
    targets: "targets",
};

const PEFT_FIELDS: FieldNames = FieldNames {
    rank: "r",
    alpha: "lora_alpha",
    dropout: "lora_dropout",
    targets: "target_modules",
};

impl LoraConfig {
    /// The factor `alpha / rank` applied to every adapter's output.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Checks the ranges of the numbers and that there is at least one target (whether the
    /// targets match a model is checked by [`attach_lora`]).
    pub fn validate(&self) -> Result<(), Error> {
        self.check(IN_MEMORY, &OUR_FIELDS)
    }

    fn check(&self, file: &str, names: &FieldNames) -> Result<(), Error> {
        if self.rank == 0 {
            return Err(config_err(file, names.rank, "must be at least 1"));
        }
        if !self.alpha.is_finite() {
            return Err(config_err(
                file,
                names.alpha,
                format!("must be finite, got {}", self.alpha),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(config_err(
                file,
                names.dropout,
                format!("must lie in [0, 1), got {}", self.dropout),
            ));
        }
        if self.targets.is_empty() {
            return Err(config_err(
                file,
                names.targets,
                "is empty: name at least one module to adapt",
            ));
        }
        Ok(())
    }
}

/// One low-rank adapter beside a frozen linear layer: adds `(alpha / rank)·dropout(x)·A·B` to
/// the layer's output.
#[derive(Module, Debug)]
pub struct LoraAdapter {
    /// `A`, `[in, rank]` (burn layout; PEFT stores `lora_A.weight` as `[rank, in]`).
    pub lora_a: Param<Tensor<2>>,
    /// `B`, `[rank, out]` (burn layout; PEFT stores `lora_B.weight` as `[out, rank]`).
    pub lora_b: Param<Tensor<2>>,
    /// Dropout on the adapter's input (not on the base layer's).
    pub dropout: Dropout,
    /// `alpha / rank`.
    #[module(skip)]
    pub scale: f64,
}

impl LoraAdapter {
    /// A fresh adapter for `base`, on the base weight's device.
    ///
    /// `A` is drawn as PEFT draws it by default (PyTorch's Kaiming-uniform with `a = √5` on the
    /// `[rank, in]` weight, i.e. uniform in `±1/√in`) and `B` starts at zero, so the adapted
    /// model computes exactly the base model's function until the first update.
    fn new(base: &Linear, config: &LoraConfig) -> Self {
        let [d_in, d_out] = base.weight.lazy_shape().dims();
        let device = base.weight.lazy_device();
        let bound = 1.0 / (d_in as f64).sqrt();
        let a = Tensor::<2>::random(
            [d_in, config.rank],
            Distribution::Uniform(-bound, bound),
            &device,
        );
        let b = Tensor::<2>::zeros([config.rank, d_out], &device);
        Self::from_tensors(a, b, config)
    }

    fn from_tensors(a: Tensor<2>, b: Tensor<2>, config: &LoraConfig) -> Self {
        Self {
            lora_a: Param::from_tensor(a),
            lora_b: Param::from_tensor(b),
            dropout: DropoutConfig::new(config.dropout).init(),
            scale: config.scale(),
        }
    }

    /// The adapter's contribution to the layer output.
    ///
    /// # Shapes
    /// - x: `[batch, seq, in]` → `[batch, seq, out]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [batch, seq, d_in] = x.dims();
        let [_, d_out] = self.lora_b.dims();
        let x = self.dropout.forward(x).reshape([batch * seq, d_in]);
        // The scale is applied to the rank-wide intermediate: `rank` columns, not `out`.
        x.matmul(self.lora_a.val()) // [batch * seq, rank]
            .mul_scalar(self.scale)
            .matmul(self.lora_b.val()) // [batch * seq, out]
            .reshape([batch, seq, d_out])
    }

    /// The dense update `(alpha / rank)·A·B` it makes to the base weight, `[in, out]`.
    pub fn delta(&self) -> Tensor<2> {
        self.lora_a
            .val()
            .matmul(self.lora_b.val())
            .mul_scalar(self.scale)
    }
}

/// Adapters of one attention block; `None` where the projection is not adapted.
#[derive(Module, Debug)]
pub struct AttentionLora {
    /// Beside `self_attn.q_proj`.
    pub q_proj: Option<LoraAdapter>,
    /// Beside `self_attn.k_proj`.
    pub k_proj: Option<LoraAdapter>,
    /// Beside `self_attn.v_proj`.
    pub v_proj: Option<LoraAdapter>,
    /// Beside `self_attn.o_proj`.
    pub o_proj: Option<LoraAdapter>,
}

/// Adapters of one MLP block; `None` where the projection is not adapted.
#[derive(Module, Debug)]
pub struct MlpLora {
    /// Beside `mlp.gate_proj`.
    pub gate_proj: Option<LoraAdapter>,
    /// Beside `mlp.up_proj`.
    pub up_proj: Option<LoraAdapter>,
    /// Beside `mlp.down_proj`.
    pub down_proj: Option<LoraAdapter>,
}

/// Adapters of one decoder layer, mirroring [`DecoderLayer`]'s field names.
#[derive(Module, Debug)]
pub struct LayerLora {
    /// Attention projections.
    pub self_attn: AttentionLora,
    /// MLP projections.
    pub mlp: MlpLora,
}

impl LayerLora {
    fn from_slots(slots: [Option<LoraAdapter>; 7]) -> Self {
        let [q, k, v, o, gate, up, down] = slots;
        Self {
            self_attn: AttentionLora {
                q_proj: q,
                k_proj: k,
                v_proj: v,
                o_proj: o,
            },
            mlp: MlpLora {
                gate_proj: gate,
                up_proj: up,
                down_proj: down,
            },
        }
    }

    /// The adapters in [`PROJECTIONS`] order.
    fn slots(&self) -> [Option<&LoraAdapter>; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            a.q_proj.as_ref(),
            a.k_proj.as_ref(),
            a.v_proj.as_ref(),
            a.o_proj.as_ref(),
            m.gate_proj.as_ref(),
            m.up_proj.as_ref(),
            m.down_proj.as_ref(),
        ]
    }

    fn into_slots(self) -> [Option<LoraAdapter>; 7] {
        let (a, m) = (self.self_attn, self.mlp);
        [
            a.q_proj,
            a.k_proj,
            a.v_proj,
            a.o_proj,
            m.gate_proj,
            m.up_proj,
            m.down_proj,
        ]
    }
}

/// All adapters of a model, one [`LayerLora`] per decoder layer, and the configuration they
/// were made with (saved as `adapter_config.json`).
#[derive(Module, Debug)]
pub struct QwenLora {
    /// Per decoder layer, in order.
    pub layers: Vec<LayerLora>,
    /// Rank, alpha, dropout and targets.
    #[module(skip)]
    pub config: LoraConfig,
}

/// The base linear layers of one decoder layer in [`PROJECTIONS`] order.
fn projections(layer: &DecoderLayer) -> [&Linear; 7] {
    let (a, m) = (&layer.self_attn, &layer.mlp);
    [
        &a.q_proj,
        &a.k_proj,
        &a.v_proj,
        &a.o_proj,
        &m.gate_proj,
        &m.up_proj,
        &m.down_proj,
    ]
}

fn projections_mut(layer: &mut DecoderLayer) -> [&mut Linear; 7] {
    let (a, m) = (&mut layer.self_attn, &mut layer.mlp);
    [
        &mut a.q_proj,
        &mut a.k_proj,
        &mut a.v_proj,
        &mut a.o_proj,
        &mut m.gate_proj,
        &mut m.up_proj,
        &mut m.down_proj,
    ]
}

fn config_err(file: &str, field: &str, msg: impl Into<String>) -> Error {
    Error::Config {
        file: file.to_string(),
        field: Some(field.to_string()),
        msg: msg.into(),
    }
}

fn ckpt_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

fn tensor_err(path: &Path, tensor: &str, msg: impl Into<String>) -> Error {
    Error::Tensor {
        path: path.display().to_string(),
        tensor: tensor.to_string(),
        msg: msg.into(),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Which projections of which layers the targets select (`[layer][PROJECTIONS index]`), with
/// PEFT's rule: a target selects a module whose path equals it or ends with `.` + target.
fn resolve(
    targets: &[String],
    layers: usize,
    file: &str,
    field: &str,
) -> Result<Vec<[bool; 7]>, Error> {
    let mut chosen = vec![[false; 7]; layers];
    for target in targets {
        let suffix = format!(".{target}");
        let mut matched = false;
        for (i, row) in chosen.iter_mut().enumerate() {
            for (slot, projection) in row.iter_mut().zip(PROJECTIONS) {
                let path = format!("model.layers.{i}.{projection}");
                if path == *target || path.ends_with(&suffix) {
                    *slot = true;
                    matched = true;
                }
            }
        }
        if !matched {
            return Err(config_err(
                file,
                field,
                format!(
                    "`{target}` matches no module of this {layers}-layer model; LoRA can \
                     target q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj and down_proj, \
                     or a longer path suffix such as `layers.0.self_attn.q_proj`"
                ),
            ));
        }
    }
    Ok(chosen)
}

/// Whether `model` carries LoRA adapters (that [`merge_lora`] would fold in).
pub fn has_lora(model: &Qwen) -> bool {
    model.lora.is_some()
}

/// Freezes every parameter of `model` and adds fresh, trainable adapters to the projections
/// that `config.targets` selects.
///
/// The returned model computes the same function as `model` (every `B` starts at zero) and,
/// trained, changes only its adapters. Works on a plain or an autodiff device. A model
/// prepared on a plain device trains after `model.fork(&autodiff_device).train()` (burn 0.22
/// moves keep a tensor's autodiff state; `train()` turns it on), and `train()` keeps the base
/// frozen and the adapters trainable.
///
/// # Errors
/// [`Error::Config`] naming the field when `config` is out of range, when a target matches no
/// module (the message names the target), or when the model already has adapters.
pub fn attach_lora(model: Qwen, config: &LoraConfig) -> Result<Qwen, Error> {
    config.check(IN_MEMORY, &OUR_FIELDS)?;
    if has_lora(&model) {
        return Err(Error::Config {
            file: IN_MEMORY.into(),
            field: None,
            msg: "the model already has LoRA adapters; merge them (merge_lora) before \
                  attaching new ones"
                .into(),
        });
    }
    let chosen = resolve(
        &config.targets,
        model.model.layers.len(),
        IN_MEMORY,
        OUR_FIELDS.targets,
    )?;

    // Freeze before the adapters exist, so that `no_grad` reaches the base parameters only.
    let mut model = model.no_grad();
    let layers = model
        .model
        .layers
        .iter()
        .zip(&chosen)
        .map(|(layer, row)| {
            let bases = projections(layer);
            LayerLora::from_slots(std::array::from_fn(|j| {
                row[j].then(|| LoraAdapter::new(bases[j], config))
            }))
        })
        .collect();
    model.lora = Some(QwenLora {
        layers,
        config: config.clone(),
    });
    Ok(model)
}

/// Folds every adapter into its base weight, `W' = W + (alpha / rank)·A·B`, and removes the
/// adapters; a model without adapters comes back unchanged.
///
/// The result is a plain model for [`export_hf`](crate::export_hf) or inference. Its weights
/// keep the base's gradient setting, which [`attach_lora`] turned off: call
/// `set_require_grad(true)` on it to fine-tune every weight.
pub fn merge_lora(mut model: Qwen) -> Qwen {
    let Some(lora) = model.lora.take() else {
        return model;
    };
    for (layer, adapters) in model.model.layers.iter_mut().zip(lora.layers) {
        for (base, adapter) in projections_mut(layer)
            .into_iter()
            .zip(adapters.into_slots())
        {
            if let Some(adapter) = adapter {
                // Detached: the merged weight is a new leaf, not a node of the adapters' graph.
                let delta = adapter.delta().detach();
                base.weight = base.weight.clone().map(|w| w + delta);
            }
        }
    }
    model
}

/// The `adapter_config.json` PEFT writes for a causal-LM LoRA, with the options this crate
/// does not implement set to their neutral values.
fn peft_config(config: &LoraConfig) -> serde_json::Value {
    // PEFT annotates `lora_alpha` as an int; write one when the value is integral.
    let alpha = if config.alpha.fract() == 0.0 && config.alpha.abs() < 1e15 {
        serde_json::Value::from(config.alpha as i64)
    } else {
        serde_json::Value::from(config.alpha)
    };
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config.rank,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "target_modules": config.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "base_model_name_or_path": null
    })
}

/// PEFT's name of an adapter matrix: `base_model.model.model.layers.{i}.{projection}.lora_A.weight`.
fn peft_name(layer: usize, projection: &str, matrix: &str) -> String {
    format!("{PEFT_PREFIX}model.layers.{layer}.{projection}.{matrix}.weight")
}

fn f32_values(t: Tensor<2>, file: &Path, name: &str) -> Result<Vec<f32>, Error> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| {
            tensor_err(
                file,
                name,
                format!("cannot read back from the device: {e:?}"),
            )
        })
}

/// Writes the adapters of `model` on their own into `dir` in PEFT's format:
/// `adapter_config.json` and `adapter_model.safetensors` (f32, PyTorch layout: `lora_A.weight`
/// `[rank, in]`, `lora_B.weight` `[out, rank]`). Each file is written under a temporary name
/// and renamed, so an interrupted save leaves any previous file whole.
///
/// # Errors
/// [`Error::Checkpoint`] when `model` has no adapters or a file cannot be written.
pub fn save_adapters(model: &Qwen, dir: &Path) -> Result<(), Error> {
    let lora = model
        .lora
        .as_ref()
        .ok_or_else(|| ckpt_err(dir, "the model has no LoRA adapters to save"))?;
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let weights = dir.join(ADAPTER_WEIGHTS);

    // 1. Every matrix in PyTorch layout, as little-endian f32 bytes.
    let mut encoded = Vec::new();
    for (i, layer) in lora.layers.iter().enumerate() {
        for (projection, adapter) in PROJECTIONS.iter().zip(layer.slots()) {
            let Some(adapter) = adapter else { continue };
            // burn [in, rank] -> PyTorch [rank, in]; burn [rank, out] -> PyTorch [out, rank].
            for (matrix, t) in [
                ("lora_A", adapter.lora_a.val().transpose()),
                ("lora_B", adapter.lora_b.val().transpose()),
            ] {
                let name = peft_name(i, projection, matrix);
                let shape = t.dims().to_vec();
                let bytes: Vec<u8> = f32_values(t, &weights, &name)?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect();
                encoded.push((name, shape, bytes));
            }
        }
    }

    // 2. The safetensors file.
    let views = encoded
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| tensor_err(&weights, name, e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let tmp = weights.with_extension("partial");
    safetensors::tensor::serialize_to_file(views, Some(metadata), &tmp)
        .map_err(|e| ckpt_err(&tmp, e.to_string()))?;
    crate::io::make_shareable(&tmp).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &weights).map_err(io_err(&weights))?;

    // 3. The configuration.
    let config_path = dir.join(ADAPTER_CONFIG);
    let text = serde_json::to_string_pretty(&peft_config(&lora.config))
        .map_err(|e| ckpt_err(&config_path, e.to_string()))?;
    let tmp = config_path.with_extension("partial");
    std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &config_path).map_err(io_err(&config_path))
}

/// Parses a PEFT `adapter_config.json`, refusing options that would change what the adapters
/// compute but that this crate does not implement.
fn read_peft_config(path: &Path) -> Result<LoraConfig, Error> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ckpt_err(path, format!("not JSON: {e}")))?;
    let obj = value
        .as_object()
        .ok_or_else(|| ckpt_err(path, "not a JSON object"))?;
    let field = |name: &str| obj.get(name).filter(|v| !v.is_null());

    match field("peft_type").and_then(|v| v.as_str()) {
        Some("LORA") => {}
        other => {
            return Err(config_err(
                &file,
                "peft_type",
                format!("expected \"LORA\", found {other:?}"),
            ));
        }
    }
    // Options that change the math: each must be absent or at its neutral value.
    for (name, neutral) in [
        ("use_rslora", serde_json::json!(false)),
        ("use_dora", serde_json::json!(false)),
        ("fan_in_fan_out", serde_json::json!(false)),
        ("bias", serde_json::json!("none")),
        ("rank_pattern", serde_json::json!({})),
        ("alpha_pattern", serde_json::json!({})),
        ("modules_to_save", serde_json::json!([])),
        ("layers_to_transform", serde_json::json!([])),
    ] {
        if let Some(v) = field(name)
            && *v != neutral
        {
            return Err(config_err(
                &file,
                name,
                format!("{v} is not supported (only {neutral} or absent)"),
            ));
        }
    }

    let rank = field("r")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| config_err(&file, "r", "missing or not a whole number"))?;
    let alpha = field("lora_alpha")
        .and_then(|v| v.as_f64())
        .ok_or_else(|| config_err(&file, "lora_alpha", "missing or not a number"))?;
    let dropout = match field("lora_dropout") {
        None => 0.0,
        Some(v) => v
            .as_f64()
            .ok_or_else(|| config_err(&file, "lora_dropout", "not a number"))?,
    };
    let targets = match field("target_modules") {
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .map(|t| t.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| config_err(&file, "target_modules", "not a list of module names"))?,
        Some(serde_json::Value::String(s)) => {
            // PEFT reads a single string as a regular expression over module paths.
            return Err(config_err(
                &file,
                "target_modules",
                format!("the regular expression {s:?} is not supported; list module names"),
            ));
        }
        _ => {
            return Err(config_err(
                &file,
                "target_modules",
                "missing or not a list of module names",
            ));
        }
    };
    let config = LoraConfig {
        rank: rank as usize,
        alpha,
        dropout,
        targets,
    };
    config.check(&file, &PEFT_FIELDS)?;
    Ok(config)
}

/// Decodes a stored adapter matrix (f32, bf16 or f16) to f32.
fn decode(
    view: &safetensors::tensor::TensorView<'_>,
    path: &Path,
    name: &str,
) -> Result<Vec<f32>, Error> {
    let bytes = view.data();
    Ok(match view.dtype() {
        safetensors::Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        safetensors::Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        safetensors::Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(tensor_err(
                path,
                name,
                format!("unexpected dtype {other:?} (expected F32, BF16 or F16)"),
            ));
        }
    })
}

/// Reads adapters saved by [`save_adapters`] (or by PEFT's `save_pretrained`) from `dir` and
/// puts them onto `model`, whose parameters are frozen as by [`attach_lora`]. The adapters are
/// trainable, so training can continue.
///
/// # Errors
/// - [`Error::Io`] / [`Error::Checkpoint`] for a missing or unreadable file;
/// - [`Error::Config`] for an `adapter_config.json` this crate cannot honour (named field), or
///   a target that matches no module of `model`, or a model that already has adapters;
/// - [`Error::Tensor`] for a matrix that is missing, of the wrong shape (adapters made for
///   another base) or dtype, or a stored matrix the configuration does not account for.
pub fn load_adapters(model: Qwen, dir: &Path) -> Result<Qwen, Error> {
    let config_path = dir.join(ADAPTER_CONFIG);
    let config = read_peft_config(&config_path)?;
    let file = config_path.display().to_string();
    if has_lora(&model) {
        return Err(Error::Config {
            file,
            field: None,
            msg: "the model already has LoRA adapters; merge them (merge_lora) before loading \
                  others"
                .into(),
        });
    }
    let chosen = resolve(
        &config.targets,
        model.model.layers.len(),
        &file,
        PEFT_FIELDS.targets,
    )?;

    // The adapters are small (rank × (in + out) per module): read the whole file.
    let weights = dir.join(ADAPTER_WEIGHTS);
    let bytes = std::fs::read(&weights).map_err(io_err(&weights))?;
    let stored = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| ckpt_err(&weights, format!("unreadable safetensors file: {e}")))?;
    let mut unused: BTreeSet<String> = stored.names().into_iter().map(String::from).collect();
    let rank = config.rank;
    let mut matrix =
        |name: String, shape: [usize; 2], device: &Device| -> Result<Tensor<2>, Error> {
            let view = stored.tensor(&name).map_err(|_| {
                tensor_err(
                    &weights,
                    &name,
                    format!("missing (expected shape {shape:?} from {ADAPTER_CONFIG})"),
                )
            })?;
            if view.shape() != shape {
                return Err(tensor_err(
                    &weights,
                    &name,
                    format!(
                        "expected shape {shape:?} (rank {rank} and the base model's sizes), \
                     found {:?}",
                        view.shape()
                    ),
                ));
            }
            let values = decode(&view, &weights, &name)?;
            unused.remove(&name);
            // PyTorch layout -> burn layout, materialised: a fresh adapter is a contiguous
            // `[in, r]` / `[r, out]` tensor, and a transposed view can take another matmul path
            // with another summation order, which would make a resumed run drift from an
            // uninterrupted one in the last bits.
            let [rows, cols] = shape;
            let mut transposed = vec![0.0f32; values.len()];
            for r in 0..rows {
                for c in 0..cols {
                    transposed[c * rows + r] = values[r * cols + c];
                }
            }
            Ok(Tensor::<2>::from_data(
                TensorData::new(transposed, [cols, rows]),
                device,
            ))
        };

    let mut layers = Vec::with_capacity(chosen.len());
    for (i, (layer, row)) in model.model.layers.iter().zip(&chosen).enumerate() {
        let mut slots: [Option<LoraAdapter>; 7] = Default::default();
        for (j, base) in projections(layer).into_iter().enumerate() {
            if !row[j] {
                continue;
            }
            let [d_in, d_out] = base.weight.lazy_shape().dims();
            let device = base.weight.lazy_device();
            let a = matrix(
                peft_name(i, PROJECTIONS[j], "lora_A"),
                [rank, d_in],
                &device,
            )?;
            let b = matrix(
                peft_name(i, PROJECTIONS[j], "lora_B"),
                [d_out, rank],
                &device,
            )?;
            slots[j] = Some(LoraAdapter::from_tensors(a, b, &config));
        }
        layers.push(LayerLora::from_slots(slots));
    }
    if let Some(name) = unused.into_iter().next() {
        return Err(tensor_err(
            &weights,
            &name,
            format!(
                "not a LoRA matrix of a module selected by {ADAPTER_CONFIG}'s target_modules \
                 {:?}",
                config.targets
            ),
        ));
    }

    let mut model = model.no_grad();
    model.lora = Some(QwenLora { layers, config });
    Ok(model)
}
