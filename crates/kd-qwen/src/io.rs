//! Reading and writing Hugging Face checkpoint folders: `config.json` plus `model.safetensors`
//! or shards listed in `model.safetensors.index.json`.
//!
//! Tensor names are Hugging Face's. PyTorch stores a linear weight as `[out, in]`, burn as
//! `[in, out]`; the transpose happens here, in both directions. A tied LM head is stored once,
//! as the embedding, the way `transformers` writes it.
//!
//! Headers are parsed by the `safetensors` crate; the tensors are read here rather than
//! through burn-store, for three reasons: burn-store has no sharded-index support; its errors
//! do not name the file and the expected shape; and it memory-maps each file and copies every
//! tensor out of the map, so the file's pages count in the resident set beside the f32 model
//! (file + f32 model: 3× a bf16 checkpoint instead of 2×). Here each tensor is one
//! positioned read of just its bytes, decoded to f32 on every core and handed to the device,
//! so the peak above the finished model is one tensor.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::{Embedding, Linear};
use burn::tensor::{Device, Tensor, TensorData};

use crate::model::{Attention, DecoderLayer, Mlp, QwenBody, RmsNorm, WeightLayout};
use crate::{Error, Qwen, QwenConfig};

/// Element type of the tensors an export writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreDtype {
    /// 32-bit floats: exact.
    F32,
    /// bfloat16, rounded to nearest even (what `model.to(torch.bfloat16)` does).
    Bf16,
}

impl StoreDtype {
    fn hf_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::Bf16 => "bfloat16",
        }
    }
}

/// Where one tensor of a checkpoint lives.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// safetensors dtype name (`F32`, `BF16`, ...).
    pub dtype: String,
    /// Shape as stored (PyTorch layout).
    pub shape: Vec<usize>,
    /// The file holding it.
    pub file: PathBuf,
    /// Absolute byte range in the file.
    begin: u64,
    end: u64,
}

/// An opened checkpoint folder: its configuration and the index of every tensor's location.
/// Opening reads only `config.json` and the safetensors headers.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The folder.
    pub dir: PathBuf,
    /// The parsed and validated `config.json`.
    pub config: QwenConfig,
    /// Every tensor, by Hugging Face name.
    pub tensors: BTreeMap<String, TensorEntry>,
    /// The safetensors files, with their sizes in bytes.
    pub files: Vec<(PathBuf, u64)>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
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

/// Parses one safetensors header (with the `safetensors` crate, which also checks that the
/// tensors' byte ranges follow each other and fit their dtype and shape) and checks that every
/// tensor's bytes lie inside the file.
fn read_header(path: &Path) -> Result<(Vec<(String, TensorEntry)>, u64), Error> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let file_len = file.metadata().map_err(io_err(path))?.len();
    let mut len_bytes = [0u8; 8];
    if file_len < 8 {
        return Err(ckpt_err(
            path,
            format!("truncated: {file_len} bytes, shorter than the 8-byte header length"),
        ));
    }
    file.read_exact(&mut len_bytes).map_err(io_err(path))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if 8 + header_len > file_len {
        return Err(ckpt_err(
            path,
            format!("truncated: header of {header_len} bytes, file has {file_len} in all"),
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(io_err(path))?;
    let metadata: safetensors::tensor::Metadata = serde_json::from_slice(&header)
        .map_err(|e| ckpt_err(path, format!("unreadable safetensors header: {e}")))?;
    let data_start = 8 + header_len;
    let mut entries: Vec<(String, TensorEntry)> = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| {
            let (begin, end) = info.data_offsets;
            let entry = TensorEntry {
                dtype: format!("{:?}", info.dtype),
                shape: info.shape.clone(),
                file: path.to_path_buf(),
                begin: data_start + begin as u64,
                end: data_start + end as u64,
            };
            (name, entry)
        })
        .collect();
    entries.sort_by_key(|(_, e)| e.begin);
    if let Some((name, entry)) = entries.iter().find(|(_, e)| e.end > file_len) {
        return Err(tensor_err(
            path,
            name,
            format!(
                "file truncated: the tensor ends at byte {}, the file has {file_len}",
                entry.end
            ),
        ));
    }
    Ok((entries, file_len))
}

impl Checkpoint {
    /// Reads `config.json` and the safetensors headers of `dir` (single file or sharded).
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(io_err(&config_path))?;
        let config = QwenConfig::from_json(&text, &config_path.display().to_string())?;

        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let mut tensors = BTreeMap::new();
        let mut files = Vec::new();
        if index_path.exists() {
            // Sharded: the index maps each tensor to its shard; every shard must hold what
            // the index promises.
            let text = std::fs::read_to_string(&index_path).map_err(io_err(&index_path))?;
            let index: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ckpt_err(&index_path, format!("not JSON: {e}")))?;
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ckpt_err(&index_path, "no `weight_map` object"))?;
            let mut by_shard: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for (name, shard) in map {
                let shard = shard.as_str().ok_or_else(|| {
                    ckpt_err(
                        &index_path,
                        format!("weight_map[{name}] is not a file name"),
                    )
                })?;
                by_shard.entry(shard).or_default().push(name);
            }
            for (shard, names) in by_shard {
                let path = dir.join(shard);
                let (entries, len) = read_header(&path)?;
                let mut entries: HashMap<String, TensorEntry> = entries.into_iter().collect();
                for name in names {
                    let entry = entries.remove(name).ok_or_else(|| {
                        tensor_err(
                            &path,
                            name,
                            format!("listed in {} but absent", index_path.display()),
                        )
                    })?;
                    tensors.insert(name.to_string(), entry);
                }
                files.push((path, len));
            }
        } else if single.exists() {
            let (entries, len) = read_header(&single)?;
            tensors.extend(entries);
            files.push((single, len));
        } else {
            return Err(ckpt_err(
                dir,
                "neither model.safetensors nor model.safetensors.index.json found",
            ));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            tensors,
            files,
        })
    }

    /// Total size of the safetensors files in bytes.
    pub fn file_bytes(&self) -> u64 {
        self.files.iter().map(|(_, len)| len).sum()
    }

    /// How many tensors (and elements) each stored dtype accounts for.
    pub fn dtypes(&self) -> BTreeMap<String, (usize, usize)> {
        let mut out: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for entry in self.tensors.values() {
            let slot = out.entry(entry.dtype.clone()).or_default();
            slot.0 += 1;
            slot.1 += entry.shape.iter().product::<usize>();
        }
        out
    }

    /// Builds the model on `device`, converting every tensor to f32, in the training layout.
    pub fn load(&self, device: &Device) -> Result<Qwen, Error> {
        self.load_with(device, WeightLayout::Training)
    }

    /// Builds the model on `device`, converting every tensor to f32, with its linear weights
    /// in `layout` ([`WeightLayout::Inference`] keeps the file's `[out, in]` and skips the
    /// transpose).
    pub fn load_with(&self, device: &Device, layout: WeightLayout) -> Result<Qwen, Error> {
        let mut reader = Reader {
            ckpt: self,
            handles: HashMap::new(),
            device,
            layout,
            used: 0,
        };
        let model = reader.model()?;
        if reader.used < self.tensors.len() {
            // transformers ignores these too (a redundant `lm_head.weight` of a tied model,
            // an old `rotary_emb.inv_freq` buffer).
            tracing::warn!(
                unused = self.tensors.len() - reader.used,
                dir = %self.dir.display(),
                "checkpoint tensors not used by the model"
            );
        }
        Ok(model)
    }
}

fn f32_le(c: &[u8]) -> f32 {
    f32::from_le_bytes([c[0], c[1], c[2], c[3]])
}

fn bf16_le(c: &[u8]) -> f32 {
    f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)
}

fn f16_le(c: &[u8]) -> f32 {
    half::f16::from_le_bytes([c[0], c[1]]).to_f32()
}

/// Decodes little-endian elements of `width` bytes, on all cores for a large tensor.
fn decode_all(bytes: &[u8], width: usize, decode: impl Fn(&[u8]) -> f32 + Sync) -> Vec<f32> {
    let n = bytes.len() / width;
    let mut out = vec![0.0f32; n];
    let per = n.div_ceil(threads_for(n));
    std::thread::scope(|scope| {
        for (dst, src) in out.chunks_mut(per).zip(bytes.chunks(per * width)) {
            let decode = &decode;
            scope.spawn(move || {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(width)) {
                    *d = decode(s);
                }
            });
        }
    });
    out
}

/// Decodes a row-major `[rows, cols]` tensor of `width`-byte elements into its transpose,
/// `[cols, rows]`, on all cores for a large tensor. Each thread owns a range of output rows
/// (input columns) and walks the input in bands of `BAND` rows, so that a band stays in
/// cache while every one of its columns is written out as one contiguous run.
fn transpose_decode(
    bytes: &[u8],
    width: usize,
    rows: usize,
    cols: usize,
    decode: impl Fn(&[u8]) -> f32 + Sync,
) -> Vec<f32> {
    const BAND: usize = 32;
    let mut out = vec![0.0f32; rows * cols];
    if out.is_empty() {
        return out;
    }
    let per = cols.div_ceil(threads_for(rows * cols));
    std::thread::scope(|scope| {
        for (t, chunk) in out.chunks_mut(per * rows).enumerate() {
            let decode = &decode;
            scope.spawn(move || {
                let first = t * per;
                let count = chunk.len() / rows;
                for r0 in (0..rows).step_by(BAND) {
                    let r1 = (r0 + BAND).min(rows);
                    for c in 0..count {
                        let dst = &mut chunk[c * rows + r0..c * rows + r1];
                        for (d, r) in dst.iter_mut().zip(r0..r1) {
                            let at = (r * cols + first + c) * width;
                            *d = decode(&bytes[at..at + width]);
                        }
                    }
                }
            });
        }
    });
    out
}

/// Threads worth using for `n` elements: one below a million, else every core.
fn threads_for(n: usize) -> usize {
    if n < 1 << 20 {
        1
    } else {
        std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
    }
}

struct Reader<'a> {
    ckpt: &'a Checkpoint,
    handles: HashMap<PathBuf, File>,
    device: &'a Device,
    layout: WeightLayout,
    used: usize,
}

impl Reader<'_> {
    /// Reads one tensor in its stored (PyTorch) layout, checking name, shape and dtype.
    fn tensor<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
    ) -> Result<Tensor<D>, Error> {
        let values = self.values(name, &shape, false)?;
        Ok(Tensor::from_data(
            TensorData::new(values, shape),
            self.device,
        ))
    }

    /// Reads a 2-D `[rows, cols]` tensor and returns it transposed, `[cols, rows]`, stored
    /// contiguously: the layout a freshly initialised burn `Linear` has, so a loaded model runs
    /// the same kernels (and rounds the same way) as a freshly built one.
    fn tensor_transposed(&mut self, name: &str, shape: [usize; 2]) -> Result<Tensor<2>, Error> {
        let values = self.values(name, &shape, true)?;
        Ok(Tensor::from_data(
            TensorData::new(values, [shape[1], shape[0]]),
            self.device,
        ))
    }

    /// The f32 values of one tensor, checked against `shape`; transposed when `transpose`
    /// (2-D only).
    fn values(&mut self, name: &str, shape: &[usize], transpose: bool) -> Result<Vec<f32>, Error> {
        let entry = self.ckpt.tensors.get(name).ok_or_else(|| {
            let files: Vec<String> = self
                .ckpt
                .files
                .iter()
                .map(|(p, _)| p.display().to_string())
                .collect();
            Error::Tensor {
                path: files.join(", "),
                tensor: name.to_string(),
                msg: format!("missing (expected shape {shape:?} from config.json)"),
            }
        })?;
        if entry.shape != shape {
            return Err(tensor_err(
                &entry.file,
                name,
                format!(
                    "expected shape {shape:?} (from config.json), found {:?}",
                    entry.shape
                ),
            ));
        }
        if !matches!(entry.dtype.as_str(), "F32" | "BF16" | "F16") {
            return Err(tensor_err(
                &entry.file,
                name,
                format!(
                    "unexpected dtype {} (expected F32, BF16 or F16)",
                    entry.dtype
                ),
            ));
        }
        let file = match self.handles.entry(entry.file.clone()) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(File::open(&entry.file).map_err(io_err(&entry.file))?)
            }
        };
        let mut bytes = vec![0u8; (entry.end - entry.begin) as usize];
        file.seek(SeekFrom::Start(entry.begin))
            .and_then(|_| file.read_exact(&mut bytes))
            .map_err(|e| tensor_err(&entry.file, name, format!("cannot read its bytes: {e}")))?;
        // bf16 is the top half of an f32: the widening is exact.
        let values = match (entry.dtype.as_str(), transpose) {
            ("F32", false) => decode_all(&bytes, 4, f32_le),
            ("F32", true) => transpose_decode(&bytes, 4, shape[0], shape[1], f32_le),
            ("BF16", false) => decode_all(&bytes, 2, bf16_le),
            ("BF16", true) => transpose_decode(&bytes, 2, shape[0], shape[1], bf16_le),
            (_, false) => decode_all(&bytes, 2, f16_le),
            (_, true) => transpose_decode(&bytes, 2, shape[0], shape[1], f16_le),
        };
        drop(bytes);
        self.used += 1;
        Ok(values)
    }

    fn linear(
        &mut self,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
    ) -> Result<Linear, Error> {
        // PyTorch [out, in] -> burn [in, out]: transposed while decoding (training layout),
        // or a transposed view of the tensor as stored (inference layout).
        let name = format!("{prefix}.weight");
        let weight = match self.layout {
            WeightLayout::Training => self.tensor_transposed(&name, [d_out, d_in])?,
            WeightLayout::Inference => self.tensor(&name, [d_out, d_in])?.transpose(),
        };
        let bias = if bias {
            Some(Param::from_tensor(
                self.tensor(&format!("{prefix}.bias"), [d_out])?,
            ))
        } else {
            None
        };
        Ok(Linear {
            weight: Param::from_tensor(weight),
            bias,
        })
    }

    fn norm(&mut self, name: &str, width: usize) -> Result<RmsNorm, Error> {
        Ok(RmsNorm {
            weight: Param::from_tensor(self.tensor(&format!("{name}.weight"), [width])?),
            eps: self.ckpt.config.rms_norm_eps,
        })
    }

    fn model(&mut self) -> Result<Qwen, Error> {
        let c = self.ckpt.config.clone();
        let (d, hd, f) = (c.hidden_size, c.head_dim(), c.intermediate_size);
        let (heads, kv_heads) = (c.num_attention_heads, c.num_key_value_heads);
        let embed = self.tensor("model.embed_tokens.weight", [c.vocab_size, d])?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let bias = c.qkv_bias();
            let (q_norm, k_norm) = if c.qk_norm() {
                (
                    Some(self.norm(&format!("{p}.self_attn.q_norm"), hd)?),
                    Some(self.norm(&format!("{p}.self_attn.k_norm"), hd)?),
                )
            } else {
                (None, None)
            };
            let self_attn = Attention {
                q_proj: self.linear(&format!("{p}.self_attn.q_proj"), d, heads * hd, bias)?,
                k_proj: self.linear(&format!("{p}.self_attn.k_proj"), d, kv_heads * hd, bias)?,
                v_proj: self.linear(&format!("{p}.self_attn.v_proj"), d, kv_heads * hd, bias)?,
                o_proj: self.linear(&format!("{p}.self_attn.o_proj"), heads * hd, d, false)?,
                q_norm,
                k_norm,
                heads,
                kv_heads,
                head_dim: hd,
            };
            let mlp = Mlp {
                gate_proj: self.linear(&format!("{p}.mlp.gate_proj"), d, f, false)?,
                up_proj: self.linear(&format!("{p}.mlp.up_proj"), d, f, false)?,
                down_proj: self.linear(&format!("{p}.mlp.down_proj"), f, d, false)?,
            };
            layers.push(DecoderLayer {
                self_attn,
                mlp,
                input_layernorm: self.norm(&format!("{p}.input_layernorm"), d)?,
                post_attention_layernorm: self.norm(&format!("{p}.post_attention_layernorm"), d)?,
            });
        }
        let norm = self.norm("model.norm", d)?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(self.linear("lm_head", d, c.vocab_size, false)?)
        };
        Ok(Qwen {
            model: QwenBody {
                embed_tokens: Embedding {
                    weight: Param::from_tensor(embed),
                },
                layers,
                norm,
            },
            lm_head,
            lora: None,
            config: c,
        })
    }
}

/// Every parameter of `model` under its Hugging Face name, in PyTorch layout.
fn hf_tensors(model: &Qwen) -> Vec<(String, Tensor<1>, Vec<usize>)> {
    fn push<const D: usize>(
        out: &mut Vec<(String, Tensor<1>, Vec<usize>)>,
        name: String,
        t: Tensor<D>,
    ) {
        let shape = t.dims().to_vec();
        let n: usize = shape.iter().product();
        out.push((name, t.reshape([n]), shape));
    }
    fn linear(out: &mut Vec<(String, Tensor<1>, Vec<usize>)>, prefix: &str, l: &Linear) {
        // burn [in, out] -> PyTorch [out, in].
        push(out, format!("{prefix}.weight"), l.weight.val().transpose());
        if let Some(b) = &l.bias {
            push(out, format!("{prefix}.bias"), b.val());
        }
    }
    let mut out = Vec::new();
    push(
        &mut out,
        "model.embed_tokens.weight".into(),
        model.model.embed_tokens.weight.val(),
    );
    for (i, layer) in model.model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        let a = &layer.self_attn;
        linear(&mut out, &format!("{p}.self_attn.q_proj"), &a.q_proj);
        linear(&mut out, &format!("{p}.self_attn.k_proj"), &a.k_proj);
        linear(&mut out, &format!("{p}.self_attn.v_proj"), &a.v_proj);
        linear(&mut out, &format!("{p}.self_attn.o_proj"), &a.o_proj);
        if let Some(n) = &a.q_norm {
            push(
                &mut out,
                format!("{p}.self_attn.q_norm.weight"),
                n.weight.val(),
            );
        }
        if let Some(n) = &a.k_norm {
            push(
                &mut out,
                format!("{p}.self_attn.k_norm.weight"),
                n.weight.val(),
            );
        }
        linear(
            &mut out,
            &format!("{p}.mlp.gate_proj"),
            &layer.mlp.gate_proj,
        );
        linear(&mut out, &format!("{p}.mlp.up_proj"), &layer.mlp.up_proj);
        linear(
            &mut out,
            &format!("{p}.mlp.down_proj"),
            &layer.mlp.down_proj,
        );
        push(
            &mut out,
            format!("{p}.input_layernorm.weight"),
            layer.input_layernorm.weight.val(),
        );
        push(
            &mut out,
            format!("{p}.post_attention_layernorm.weight"),
            layer.post_attention_layernorm.weight.val(),
        );
    }
    push(
        &mut out,
        "model.norm.weight".into(),
        model.model.norm.weight.val(),
    );
    if let Some(head) = &model.lm_head {
        linear(&mut out, "lm_head", head);
    }
    out
}

/// The bytes of a tensor in the stored dtype, little-endian.
fn encode(t: Tensor<1>, dtype: StoreDtype, file: &Path, name: &str) -> Result<Vec<u8>, Error> {
    let values = t
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| {
            tensor_err(
                file,
                name,
                format!("cannot read back from the device: {e:?}"),
            )
        })?;
    Ok(match dtype {
        StoreDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        StoreDtype::Bf16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
    })
}

/// Gives a file written by `safetensors::tensor::serialize_to_file` the permissions of the
/// other files kd writes. That function writes through a private temporary file, mode 0600 on
/// Unix, which leaves a checkpoint unreadable by other users and by containers running under
/// another uid; this sets `rw-r--r--` (a no-op off Unix).
///
/// # Errors
///
/// The file's permissions could not be changed.
pub fn make_shareable(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// The `config.json` text transformers expects for this model.
fn hf_config(config: &QwenConfig, dtype: StoreDtype, origin: &Path) -> Result<String, Error> {
    let mut value = serde_json::to_value(config).map_err(|e| ckpt_err(origin, e.to_string()))?;
    if let Some(obj) = value.as_object_mut() {
        let arch = match config.model_type {
            crate::ModelType::Qwen2 => "Qwen2ForCausalLM",
            crate::ModelType::Qwen3 => "Qwen3ForCausalLM",
        };
        obj.insert("architectures".into(), serde_json::json!([arch]));
        obj.insert("torch_dtype".into(), dtype.hf_name().into());
    }
    serde_json::to_string_pretty(&value).map_err(|e| ckpt_err(origin, e.to_string()))
}

/// Writes `model` as a Hugging Face folder transformers can load: `config.json`,
/// `model.safetensors` (in `dtype`, HF names, a tied head stored once as the embedding) and
/// `generation_config.json`. Each file is written under a temporary name and renamed, so an
/// interrupted export leaves any previous file whole.
///
/// A model with LoRA adapters is refused: the base weights alone are not what was trained.
/// Merge them first ([`merge_lora`](crate::merge_lora)) or save them on their own
/// ([`save_adapters`](crate::save_adapters)).
pub fn export_hf(model: &Qwen, dir: &Path, dtype: StoreDtype) -> Result<(), Error> {
    if model.lora.is_some() {
        return Err(ckpt_err(
            dir,
            "the model has LoRA adapters: merge them into the weights first \
             (kd_qwen::merge_lora) or save them on their own (kd_qwen::save_adapters)",
        ));
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let weights = dir.join("model.safetensors");
    let mut encoded = Vec::new();
    for (name, t, shape) in hf_tensors(model) {
        let bytes = encode(t, dtype, &weights, &name)?;
        encoded.push((name, shape, bytes));
    }
    let st_dtype = match dtype {
        StoreDtype::F32 => safetensors::Dtype::F32,
        StoreDtype::Bf16 => safetensors::Dtype::BF16,
    };
    let views = encoded
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(st_dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| tensor_err(&weights, name, e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let tmp = dir.join("model.safetensors.partial");
    safetensors::tensor::serialize_to_file(views, Some(metadata), &tmp)
        .map_err(|e| ckpt_err(&tmp, e.to_string()))?;
    make_shareable(&tmp).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &weights).map_err(io_err(&weights))?;

    let config = model.config();
    let config_path = dir.join("config.json");
    write_atomic(
        &config_path,
        hf_config(config, dtype, &config_path)?.as_bytes(),
    )?;
    let mut generation = serde_json::json!({ "_from_model_config": true });
    for (key, id) in [
        ("bos_token_id", config.bos_token_id),
        ("pad_token_id", config.pad_token_id),
    ] {
        if let Some(id) = id {
            generation[key] = id.into();
        }
    }
    if let Some(eos) = &config.eos_token_id {
        generation["eos_token_id"] = serde_json::to_value(eos)
            .map_err(|e| ckpt_err(&dir.join("generation_config.json"), e.to_string()))?;
    }
    let gen_path = dir.join("generation_config.json");
    let text = serde_json::to_string_pretty(&generation)
        .map_err(|e| ckpt_err(&gen_path, e.to_string()))?;
    write_atomic(&gen_path, text.as_bytes())
}

/// Writes `config.json`, `model.safetensors` (f32) and `generation_config.json` into `dir` in
/// Hugging Face's format; see [`export_hf`].
pub fn save_checkpoint(model: &Qwen, dir: &Path) -> Result<(), Error> {
    export_hf(model, dir, StoreDtype::F32)
}

/// Reads a Hugging Face checkpoint folder (single-file or sharded; f32, bf16 or f16 tensors)
/// into an f32 model on `device`, in the training layout.
pub fn load_checkpoint(dir: &Path, device: &Device) -> Result<Qwen, Error> {
    Checkpoint::open(dir)?.load(device)
}

/// [`load_checkpoint`] with the linear weights in `layout`.
pub fn load_checkpoint_with(
    dir: &Path,
    device: &Device,
    layout: WeightLayout,
) -> Result<Qwen, Error> {
    Checkpoint::open(dir)?.load_with(device, layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_decoders_agree_with_the_definition() {
        // 1031 x 1033 > 2^20 elements: the multi-threaded path, with a ragged last chunk.
        let (rows, cols) = (1031, 1033);
        let values: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.5 - 7.0).collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(decode_all(&bytes, 4, f32_le), values);
        let t = transpose_decode(&bytes, 4, rows, cols, f32_le);
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(t[c * rows + r], values[r * cols + c], "({r}, {c})");
            }
        }
    }
}
