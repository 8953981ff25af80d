//! Weight-only int8 / int4 quantization of a checkpoint, in kd's own folder format.
//!
//! A quantized folder holds:
//! - `config.json`: the source checkpoint's, unchanged;
//! - `quant.json`: [`QuantInfo`] (format name, version, bits, block size, which tensors);
//! - `model.quant.safetensors`: for each quantized tensor `NAME` (PyTorch layout
//!   `[rows, cols]`), `NAME.codes` (I8 `[rows, cols]` for int8; U8 `[rows, ceil(cols / 2)]`
//!   for int4, two codes per byte, low nibble first, each stored as `code + 8`) and
//!   `NAME.scales` (F32 `[rows, ceil(cols / block)]`); every other tensor as F32 under its
//!   own name. The safetensors metadata repeats format, version, bits and block.
//!
//! Scaling is symmetric absmax per block of `block` consecutive input features of one output
//! row (`scale = max|w| / qmax`, `qmax` = 127 or 7), rounding to nearest, so every weight is
//! reproduced within `scale / 2`. The linear layers are always quantized; the embedding (and
//! with it a tied LM head) only when asked. Norm weights and biases stay f32.
//!
//! Loading is **dequantize-on-load**: [`load_quantized`] turns the codes back into f32 and
//! builds an ordinary [`Qwen`], so everything that runs a `Qwen` (scoring, generation) takes a
//! quantized model unchanged, and the answers are those of the rounded weights. The saving is
//! on disk only: at run time the model is f32 and runs at f32 speed.
//!
//! FIXME: a real quantized path would keep the codes on the device and multiply with a fused
//! dequantizing matmul (int8 dot products, scales applied per block). burn 0.22's
//! `quantize_weights` only has such kernels on the cubecl GPU backends; on Flex it stores the
//! codes and dequantizes in each matmul, ~20x slower for per-block schemes, so it is not used
//! here. On a cuda/wgpu build, `Module::quantize_weights` with a per-block `QuantScheme` on the
//! loaded model would be the next step.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};
use kd_qwen::{Checkpoint, Qwen, QwenConfig, WeightLayout};
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde::{Deserialize, Serialize};

/// The `format` field of `quant.json`.
pub const QUANT_FORMAT: &str = "kd-quant";
/// The format version this build writes and reads.
pub const QUANT_VERSION: u32 = 1;
/// The description file of a quantized folder; its presence marks the folder as quantized.
pub const QUANT_JSON: &str = "quant.json";
/// The tensor file of a quantized folder.
pub const QUANT_WEIGHTS: &str = "model.quant.safetensors";

/// What can go wrong quantizing, writing or reading a quantized model.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// The source checkpoint could not be read.
    #[error(transparent)]
    Model(#[from] kd_qwen::Error),
    /// A file could not be read or written.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A quantized file is not in the expected format.
    #[error("{}: {msg}", .path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// Unsupported settings.
    #[error("{0}")]
    Settings(String),
    /// Data could not be read back from the device.
    #[error("reading `{0}` back from the device")]
    Backend(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> QuantError + '_ {
    move |source| QuantError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn format_err(path: &Path, msg: impl Into<String>) -> QuantError {
    QuantError::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// How to quantize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantSpec {
    /// 8 or 4.
    pub bits: u8,
    /// Input features per scale.
    pub block: usize,
    /// Quantize the token embedding (and so a tied LM head) too.
    pub embeddings: bool,
}

impl QuantSpec {
    /// Checks `bits` and `block`.
    pub fn validate(&self) -> Result<(), QuantError> {
        if !matches!(self.bits, 4 | 8) {
            return Err(QuantError::Settings(format!(
                "--bits {} is not supported; use 8 or 4",
                self.bits
            )));
        }
        if self.block == 0 {
            return Err(QuantError::Settings("--block must be at least 1".into()));
        }
        Ok(())
    }

    fn qmax(&self) -> f32 {
        if self.bits == 8 { 127.0 } else { 7.0 }
    }
}

/// The contents of `quant.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantInfo {
    /// Always [`QUANT_FORMAT`].
    pub format: String,
    /// [`QUANT_VERSION`] when written by this build.
    pub version: u32,
    /// 8 or 4.
    pub bits: u8,
    /// Input features per scale.
    pub block: usize,
    /// Names of the quantized tensors (Hugging Face names).
    pub quantized: Vec<String>,
    /// The folder quantized from, for the record.
    pub source: String,
}

/// One tensor quantized: codes (one per weight, in `[-qmax, qmax]`) and one scale per block.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    /// `[rows, cols]`.
    pub shape: [usize; 2],
    /// Row-major codes.
    pub codes: Vec<i8>,
    /// `[rows, ceil(cols / block)]` scales.
    pub scales: Vec<f32>,
}

/// Symmetric absmax quantization of a row-major `[rows, cols]` matrix per block of `block`
/// columns, rounding to nearest.
pub fn quantize_blocks(values: &[f32], shape: [usize; 2], spec: &QuantSpec) -> Quantized {
    let [rows, cols] = shape;
    let qmax = spec.qmax();
    let blocks = cols.div_ceil(spec.block);
    let mut codes = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(rows * blocks);
    for row in values.chunks(cols) {
        for chunk in row.chunks(spec.block) {
            let absmax = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let scale = absmax / qmax;
            scales.push(scale);
            for &v in chunk {
                // An all-zero block keeps scale 0 and codes 0.
                let q = if scale > 0.0 {
                    (v / scale).round().clamp(-qmax, qmax)
                } else {
                    0.0
                };
                codes.push(q as i8);
            }
        }
    }
    Quantized {
        shape,
        codes,
        scales,
    }
}

/// The f32 values the codes stand for.
pub fn dequantize_blocks(q: &Quantized, block: usize) -> Vec<f32> {
    let [_, cols] = q.shape;
    let blocks = cols.div_ceil(block);
    let mut out = Vec::with_capacity(q.codes.len());
    for (r, row) in q.codes.chunks(cols).enumerate() {
        for (b, chunk) in row.chunks(block).enumerate() {
            let scale = q.scales[r * blocks + b];
            out.extend(chunk.iter().map(|&c| f32::from(c) * scale));
        }
    }
    out
}

/// Packs int4 codes (`-8..=7`) of a `[rows, cols]` matrix two per byte, each row padded to a
/// whole byte: low nibble = even column, high nibble = odd column, stored as `code + 8`.
pub fn pack_int4(codes: &[i8], cols: usize) -> Vec<u8> {
    let nibble = |c: i8| (c + 8) as u8 & 0x0f;
    let mut out = Vec::with_capacity(codes.len() / 2 + 1);
    for row in codes.chunks(cols) {
        for pair in row.chunks(2) {
            let lo = nibble(pair[0]);
            let hi = pair.get(1).map_or(nibble(0), |&c| nibble(c));
            out.push(lo | (hi << 4));
        }
    }
    out
}

/// Inverse of [`pack_int4`].
pub fn unpack_int4(bytes: &[u8], rows: usize, cols: usize) -> Vec<i8> {
    let per_row = cols.div_ceil(2);
    let mut out = Vec::with_capacity(rows * cols);
    for row in bytes.chunks(per_row).take(rows) {
        for (i, &byte) in row.iter().enumerate() {
            out.push((byte & 0x0f) as i8 - 8);
            if 2 * i + 1 < cols {
                out.push((byte >> 4) as i8 - 8);
            }
        }
    }
    out
}

/// What a parameter is, for deciding whether to quantize it.
enum Slot<'a> {
    /// A linear weight, burn layout `[in, out]`.
    Linear(&'a mut Param<Tensor<2>>),
    /// The token embedding `[vocab, hidden]`.
    Embedding(&'a mut Param<Tensor<2>>),
    /// A norm weight or a bias.
    Vector(&'a mut Param<Tensor<1>>),
}

/// Every parameter of `model` under its Hugging Face name.
fn slots(model: &mut Qwen) -> Vec<(String, Slot<'_>)> {
    fn linear<'a>(out: &mut Vec<(String, Slot<'a>)>, prefix: &str, l: &'a mut burn::nn::Linear) {
        out.push((format!("{prefix}.weight"), Slot::Linear(&mut l.weight)));
        if let Some(b) = l.bias.as_mut() {
            out.push((format!("{prefix}.bias"), Slot::Vector(b)));
        }
    }
    let mut out = Vec::new();
    let body = &mut model.model;
    out.push((
        "model.embed_tokens.weight".into(),
        Slot::Embedding(&mut body.embed_tokens.weight),
    ));
    for (i, layer) in body.layers.iter_mut().enumerate() {
        let p = format!("model.layers.{i}");
        let a = &mut layer.self_attn;
        linear(&mut out, &format!("{p}.self_attn.q_proj"), &mut a.q_proj);
        linear(&mut out, &format!("{p}.self_attn.k_proj"), &mut a.k_proj);
        linear(&mut out, &format!("{p}.self_attn.v_proj"), &mut a.v_proj);
        linear(&mut out, &format!("{p}.self_attn.o_proj"), &mut a.o_proj);
        if let Some(n) = a.q_norm.as_mut() {
            out.push((
                format!("{p}.self_attn.q_norm.weight"),
                Slot::Vector(&mut n.weight),
            ));
        }
        if let Some(n) = a.k_norm.as_mut() {
            out.push((
                format!("{p}.self_attn.k_norm.weight"),
                Slot::Vector(&mut n.weight),
            ));
        }
        let m = &mut layer.mlp;
        linear(&mut out, &format!("{p}.mlp.gate_proj"), &mut m.gate_proj);
        linear(&mut out, &format!("{p}.mlp.up_proj"), &mut m.up_proj);
        linear(&mut out, &format!("{p}.mlp.down_proj"), &mut m.down_proj);
        out.push((
            format!("{p}.input_layernorm.weight"),
            Slot::Vector(&mut layer.input_layernorm.weight),
        ));
        out.push((
            format!("{p}.post_attention_layernorm.weight"),
            Slot::Vector(&mut layer.post_attention_layernorm.weight),
        ));
    }
    out.push((
        "model.norm.weight".into(),
        Slot::Vector(&mut body.norm.weight),
    ));
    if let Some(head) = model.lm_head.as_mut() {
        linear(&mut out, "lm_head", head);
    }
    out
}

fn to_vec<const D: usize>(t: Tensor<D>, name: &str) -> Result<Vec<f32>, QuantError> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|_| QuantError::Backend(name.to_string()))
}

/// A tensor stored as it is, in f32: name, dtype, shape and bytes.
fn full_precision<const D: usize>(
    name: &str,
    t: Tensor<D>,
) -> Result<(String, Dtype, Vec<usize>, Vec<u8>), QuantError> {
    let shape = t.dims().to_vec();
    Ok((
        name.to_string(),
        Dtype::F32,
        shape,
        f32_bytes(&to_vec(t, name)?),
    ))
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Summary of one quantization.
#[derive(Debug, Clone, Serialize)]
pub struct QuantReport {
    /// Tensors quantized.
    pub quantized_tensors: usize,
    /// Elements in them.
    pub quantized_elements: usize,
    /// Largest `|w - ŵ|` over all quantized weights.
    pub max_abs_error: f32,
    /// Bytes of the source safetensors file(s).
    pub source_bytes: u64,
    /// Bytes of the written `model.quant.safetensors`.
    pub quantized_bytes: u64,
}

/// Quantizes the checkpoint in `src` (a Hugging Face folder) into a quantized folder `out`.
pub fn quantize_checkpoint(
    src: &Path,
    out: &Path,
    spec: &QuantSpec,
    device: &Device,
) -> Result<QuantReport, QuantError> {
    spec.validate()?;
    if src.join(QUANT_JSON).exists() {
        return Err(format_err(
            &src.join(QUANT_JSON),
            "already quantized; quantize the full-precision checkpoint instead",
        ));
    }
    let ckpt = Checkpoint::open(src)?;
    let mut model = ckpt.load(device)?;

    // 1. Quantize or copy every parameter, in PyTorch layout.
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut quantized = Vec::new();
    let (mut elements, mut max_err) = (0usize, 0.0f32);
    for (name, slot) in slots(&mut model) {
        let matrix = match slot {
            // burn [in, out] -> PyTorch [out, in]: blocks then run along input features.
            Slot::Linear(p) => Some(p.val().transpose()),
            Slot::Embedding(p) if spec.embeddings => Some(p.val()),
            // Kept in full precision: an embedding not asked for, norms and biases.
            Slot::Embedding(p) => {
                tensors.push(full_precision(&name, p.val())?);
                None
            }
            Slot::Vector(p) => {
                tensors.push(full_precision(&name, p.val())?);
                None
            }
        };
        let Some(matrix) = matrix else { continue };
        let shape = matrix.dims();
        let values = to_vec(matrix, &name)?;
        let q = quantize_blocks(&values, shape, spec);
        let restored = dequantize_blocks(&q, spec.block);
        for (a, b) in values.iter().zip(&restored) {
            max_err = max_err.max((a - b).abs());
        }
        elements += values.len();
        let (code_dtype, code_shape, code_bytes) = if spec.bits == 8 {
            let bytes = q.codes.iter().map(|&c| c as u8).collect();
            (Dtype::I8, vec![shape[0], shape[1]], bytes)
        } else {
            let bytes = pack_int4(&q.codes, shape[1]);
            (Dtype::U8, vec![shape[0], shape[1].div_ceil(2)], bytes)
        };
        tensors.push((format!("{name}.codes"), code_dtype, code_shape, code_bytes));
        let scale_shape = vec![shape[0], shape[1].div_ceil(spec.block)];
        tensors.push((
            format!("{name}.scales"),
            Dtype::F32,
            scale_shape,
            f32_bytes(&q.scales),
        ));
        quantized.push(name);
    }
    drop(model);

    // 2. Write the tensors, then config.json and quant.json.
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let weights = out.join(QUANT_WEIGHTS);
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| format_err(&weights, format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = HashMap::from([
        ("format".to_string(), QUANT_FORMAT.to_string()),
        ("version".to_string(), QUANT_VERSION.to_string()),
        ("bits".to_string(), spec.bits.to_string()),
        ("block".to_string(), spec.block.to_string()),
    ]);
    safetensors::tensor::serialize_to_file(views, Some(metadata), &weights)
        .map_err(|e| format_err(&weights, e.to_string()))?;
    kd_qwen::make_shareable(&weights).map_err(io_err(&weights))?;
    let config_src = src.join("config.json");
    let config_dst = out.join("config.json");
    std::fs::copy(&config_src, &config_dst).map_err(io_err(&config_dst))?;
    let info = QuantInfo {
        format: QUANT_FORMAT.into(),
        version: QUANT_VERSION,
        bits: spec.bits,
        block: spec.block,
        quantized: quantized.clone(),
        source: src.display().to_string(),
    };
    let info_path = out.join(QUANT_JSON);
    let text =
        serde_json::to_string_pretty(&info).map_err(|e| format_err(&info_path, e.to_string()))?;
    std::fs::write(&info_path, text).map_err(io_err(&info_path))?;
    let quantized_bytes = std::fs::metadata(&weights).map_err(io_err(&weights))?.len();
    tracing::info!(
        tensors = quantized.len(),
        elements,
        max_abs_error = max_err,
        bytes = quantized_bytes,
        "quantized"
    );
    Ok(QuantReport {
        quantized_tensors: quantized.len(),
        quantized_elements: elements,
        max_abs_error: max_err,
        source_bytes: ckpt.file_bytes(),
        quantized_bytes,
    })
}

/// Whether `dir` holds a quantized model (it has a `quant.json`).
pub fn is_quantized(dir: &Path) -> bool {
    dir.join(QUANT_JSON).is_file()
}

/// Reads and checks `quant.json`.
pub fn read_quant_info(dir: &Path) -> Result<QuantInfo, QuantError> {
    let path = dir.join(QUANT_JSON);
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        format_err(
            &path,
            format!("not a kd quantization header (not JSON: {e})"),
        )
    })?;
    match value.get("format").and_then(|f| f.as_str()) {
        Some(QUANT_FORMAT) => {}
        other => {
            return Err(format_err(
                &path,
                format!(
                    "not a kd quantization header: format is {other:?}, expected \"{QUANT_FORMAT}\""
                ),
            ));
        }
    }
    let info: QuantInfo = serde_json::from_value(value)
        .map_err(|e| format_err(&path, format!("malformed quantization header: {e}")))?;
    if info.version != QUANT_VERSION {
        return Err(format_err(
            &path,
            format!(
                "quantization format version {} is not supported \
                 (this build reads {QUANT_VERSION})",
                info.version
            ),
        ));
    }
    QuantSpec {
        bits: info.bits,
        block: info.block,
        embeddings: false,
    }
    .validate()
    .map_err(|e| format_err(&path, e.to_string()))?;
    Ok(info)
}

/// Reads a quantized folder into an ordinary f32 [`Qwen`] (dequantize-on-load; see the module
/// documentation).
pub fn load_quantized(dir: &Path, device: &Device) -> Result<Qwen, QuantError> {
    let info = read_quant_info(dir)?;
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(io_err(&config_path))?;
    let config = QwenConfig::from_json(&text, &config_path.display().to_string())?;
    let weights = dir.join(QUANT_WEIGHTS);
    let bytes = std::fs::read(&weights).map_err(io_err(&weights))?;
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| format_err(&weights, format!("not a readable safetensors file: {e}")))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| format_err(&weights, format!("not a readable safetensors file: {e}")))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let expect = [
        ("format", QUANT_FORMAT.to_string()),
        ("version", QUANT_VERSION.to_string()),
        ("bits", info.bits.to_string()),
        ("block", info.block.to_string()),
    ];
    for (key, want) in expect {
        if meta.get(key) != Some(&want) {
            return Err(format_err(
                &weights,
                format!(
                    "header field `{key}` is {:?}, expected {want:?} (from {QUANT_JSON})",
                    meta.get(key)
                ),
            ));
        }
    }
    let quantized: BTreeSet<&str> = info.quantized.iter().map(String::as_str).collect();
    let spec = QuantSpec {
        bits: info.bits,
        block: info.block,
        embeddings: false,
    };

    // Fresh weights of the right shapes, each replaced below.
    let mut model = Qwen::new(&config, device);
    let mut seen = BTreeSet::new();
    for (name, slot) in slots(&mut model) {
        let bad = |msg: String| format_err(&weights, format!("tensor `{name}`: {msg}"));
        let values_2d = |shape: [usize; 2]| -> Result<Vec<f32>, QuantError> {
            if quantized.contains(name.as_str()) {
                read_quantized(&file, &name, shape, &spec).map_err(&bad)
            } else {
                read_f32(&file, &name, &shape).map_err(&bad)
            }
        };
        match slot {
            Slot::Linear(p) => {
                let [d_in, d_out] = p.val().dims();
                let values = values_2d([d_out, d_in])?;
                let t = Tensor::<2>::from_data(TensorData::new(values, [d_out, d_in]), device);
                *p = Param::from_tensor(t.transpose());
            }
            Slot::Embedding(p) => {
                let shape = p.val().dims();
                let values = values_2d(shape)?;
                *p = Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device));
            }
            Slot::Vector(p) => {
                let shape = p.val().dims();
                let values = read_f32(&file, &name, &shape).map_err(&bad)?;
                *p = Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device));
            }
        }
        seen.insert(name);
    }
    if let Some(extra) = info.quantized.iter().find(|n| !seen.contains(*n)) {
        return Err(format_err(
            &dir.join(QUANT_JSON),
            format!("lists `{extra}`, which this model does not have"),
        ));
    }
    Ok(model)
}

fn read_f32(
    file: &safetensors::SafeTensors<'_>,
    name: &str,
    shape: &[usize],
) -> Result<Vec<f32>, String> {
    let view = file.tensor(name).map_err(|_| "missing".to_string())?;
    if view.dtype() != Dtype::F32 || view.shape() != shape {
        return Err(format!(
            "expected F32 {shape:?}, found {:?} {:?}",
            view.dtype(),
            view.shape()
        ));
    }
    Ok(view
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn read_quantized(
    file: &safetensors::SafeTensors<'_>,
    name: &str,
    shape: [usize; 2],
    spec: &QuantSpec,
) -> Result<Vec<f32>, String> {
    let [rows, cols] = shape;
    let scales = read_f32(
        file,
        &format!("{name}.scales"),
        &[rows, cols.div_ceil(spec.block)],
    )?;
    let codes_name = format!("{name}.codes");
    let view = file
        .tensor(&codes_name)
        .map_err(|_| format!("`{codes_name}` missing"))?;
    let (dtype, packed_cols) = if spec.bits == 8 {
        (Dtype::I8, cols)
    } else {
        (Dtype::U8, cols.div_ceil(2))
    };
    if view.dtype() != dtype || view.shape() != [rows, packed_cols] {
        return Err(format!(
            "`{codes_name}`: expected {dtype:?} {:?}, found {:?} {:?}",
            [rows, packed_cols],
            view.dtype(),
            view.shape()
        ));
    }
    let codes = if spec.bits == 8 {
        view.data().iter().map(|&b| b as i8).collect()
    } else {
        unpack_int4(view.data(), rows, cols)
    };
    Ok(dequantize_blocks(
        &Quantized {
            shape,
            codes,
            scales,
        },
        spec.block,
    ))
}

/// Loads either kind of model folder: a quantized one (with `quant.json`) through
/// [`load_quantized`], a Hugging Face checkpoint through [`kd_qwen::load_checkpoint`].
pub fn load_model(dir: &Path, device: &Device) -> Result<Qwen, QuantError> {
    load_model_with(dir, device, WeightLayout::Training)
}

/// [`load_model`] with a Hugging Face checkpoint's linear weights in `layout` (generation
/// wants [`WeightLayout::Inference`]). A quantized folder always loads in the inference
/// layout: its codes are dequantized as stored, `[out, in]`.
pub fn load_model_with(
    dir: &Path,
    device: &Device,
    layout: WeightLayout,
) -> Result<Qwen, QuantError> {
    if is_quantized(dir) {
        load_quantized(dir, device)
    } else {
        Ok(kd_qwen::load_checkpoint_with(dir, device, layout)?)
    }
}

/// Bytes of a model folder's weight files (`*.safetensors`).
pub fn weight_bytes(dir: &Path) -> Result<u64, QuantError> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        if entry.path().extension().is_some_and(|e| e == "safetensors") {
            total += entry.metadata().map_err(io_err(&entry.path()))?.len();
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic spread of values, some blocks all-zero, in `[-1.5, 1.5]`.
    fn sample(rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| {
                if (i / 8) % 5 == 3 {
                    0.0
                } else {
                    ((i as f32 * 0.618_034).fract() - 0.5) * 3.0
                }
            })
            .collect()
    }

    #[test]
    fn round_trip_error_within_half_a_scale_per_block() {
        // cols = 20 with block 8: two whole blocks and a partial one per row.
        let (rows, cols) = (6, 20);
        let values = sample(rows, cols);
        for bits in [8, 4] {
            let spec = QuantSpec {
                bits,
                block: 8,
                embeddings: false,
            };
            let q = quantize_blocks(&values, [rows, cols], &spec);
            assert_eq!(q.scales.len(), rows * 3);
            let back = dequantize_blocks(&q, spec.block);
            for (i, (w, w_hat)) in values.iter().zip(&back).enumerate() {
                let scale = q.scales[(i / cols) * 3 + (i % cols) / 8];
                // Rounding to nearest errs by at most half a step; 1e-6 relative for f32.
                assert!(
                    (w - w_hat).abs() <= scale / 2.0 * (1.0 + 1e-6),
                    "bits {bits}, index {i}: {w} vs {w_hat}, scale {scale}"
                );
                assert!(q.codes[i].unsigned_abs() as f32 <= spec.qmax());
            }
        }
    }

    #[test]
    fn int4_packing_round_trips_with_odd_width() {
        let (rows, cols) = (3, 7);
        let codes: Vec<i8> = (0..rows * cols).map(|i| (i % 15) as i8 - 7).collect();
        let packed = pack_int4(&codes, cols);
        assert_eq!(packed.len(), rows * 4);
        assert_eq!(unpack_int4(&packed, rows, cols), codes);
    }

    fn tiny_checkpoint(dir: &Path, device: &Device) -> Qwen {
        let mut config = QwenConfig::qwen3_shaped(16, 32, 1, 2, 1, 8);
        config.vocab_size = 64;
        let model = Qwen::new(&config, device);
        kd_qwen::save_checkpoint(&model, dir).expect("save");
        model
    }

    #[test]
    fn quantized_folder_loads_and_rejects_a_wrong_header() {
        let device = Device::flex();
        let tmp = tempfile::tempdir().expect("tempdir");
        let (src, out) = (tmp.path().join("f32"), tmp.path().join("q8"));
        let model = tiny_checkpoint(&src, &device);
        let spec = QuantSpec {
            bits: 8,
            block: 8,
            embeddings: true,
        };
        let report = quantize_checkpoint(&src, &out, &spec, &device).expect("quantize");
        assert!(report.quantized_tensors > 7);
        assert!(is_quantized(&out));
        let loaded = load_model(&out, &device).expect("load");
        let a = to_vec(model.model.embed_tokens.weight.val(), "a").expect("a");
        let b = to_vec(loaded.model.embed_tokens.weight.val(), "b").expect("b");
        let err = a
            .iter()
            .zip(&b)
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(err <= report.max_abs_error + 1e-7, "{err}");

        // A header of another format.
        let info_path = out.join(QUANT_JSON);
        let text = std::fs::read_to_string(&info_path).expect("read");
        std::fs::write(&info_path, text.replace(QUANT_FORMAT, "gguf")).expect("write");
        let msg = load_model(&out, &device)
            .expect_err("wrong format")
            .to_string();
        assert!(
            msg.contains("quant.json") && msg.contains("not a kd quantization header"),
            "{msg}"
        );
        // A future version.
        std::fs::write(&info_path, text.replace("\"version\": 1", "\"version\": 9"))
            .expect("write");
        let msg = load_model(&out, &device)
            .expect_err("wrong version")
            .to_string();
        assert!(msg.contains("version 9"), "{msg}");
        // A garbled tensor file.
        std::fs::write(&info_path, &text).expect("write");
        std::fs::write(
            out.join(QUANT_WEIGHTS),
            b"\xff\xff\xff\xff\xff\xff\xff\x7fjunk",
        )
        .expect("w");
        let msg = load_model(&out, &device).expect_err("garbled").to_string();
        assert!(
            msg.contains(QUANT_WEIGHTS) && msg.contains("safetensors"),
            "{msg}"
        );
    }

    #[test]
    fn another_model_family_is_refused_by_name() {
        let device = Device::flex();
        let tmp = tempfile::tempdir().expect("tempdir");
        tiny_checkpoint(tmp.path(), &device);
        let config = tmp.path().join("config.json");
        let text = std::fs::read_to_string(&config).expect("read");
        let text = text.replace("\"qwen3\"", "\"llama\"");
        assert!(text.contains("llama"));
        std::fs::write(&config, text).expect("write");
        let msg = load_model(tmp.path(), &device)
            .expect_err("llama")
            .to_string();
        assert!(
            msg.contains("config.json") && msg.contains("llama"),
            "{msg}"
        );
        let out = tmp.path().join("q");
        let spec = QuantSpec {
            bits: 4,
            block: 8,
            embeddings: false,
        };
        let msg = quantize_checkpoint(tmp.path(), &out, &spec, &device)
            .expect_err("llama")
            .to_string();
        assert!(msg.contains("llama"), "{msg}");
    }
}
