//! An offline teacher-logit cache: the teacher runs once over the training set, and
//! distillation later reads its top-k log-probabilities instead of running it again.
//!
//! # What is stored
//!
//! For every supervised position of every example (the position *before* each label token,
//! exactly as [`supervised_positions`] picks them, in the same order), the teacher's `k` most
//! likely token ids and their log-probabilities **at the distillation temperature**:
//! `log_softmax(teacher_logits / T)`, then the top k. This is what
//! [`kd_loss::SparseTeacher`] expects, and it is why the temperature is part of the
//! [`Fingerprint`]: a cache built at T = 1 cannot serve a run at T = 2 (the top-k of a
//! tempered softmax cannot be re-tempered without the full log-sum-exp, which is not kept).
//!
//! # On disk
//!
//! A folder with two files, written under a temporary name and renamed into place:
//!
//! - `meta.json`: format name and version, the [`Fingerprint`], `k`, the teacher's vocabulary
//!   size, the number of rows, and the examples in build order as `{"id", "rows"}` (an
//!   example's rows follow those of the examples before it).
//! - `topk.safetensors`: `ids` U32 `[rows, k]` (Qwen vocabularies exceed `u16`) and
//!   `log_probs` F16 `[rows, k]`.
//!
//! So a supervised token costs `6 k` bytes of payload (384 B at k = 64), plus its share of
//! `meta.json` (one id string per example, spread over the example's few answer tokens).
//! F16 keeps a log-probability to a relative error of 2⁻¹¹ (≈ 0.05 %), i.e. each cached
//! probability to ≈ 0.05 % × |log q|, far below what distillation can resolve.
//!
//! # Alignment
//!
//! Examples are found by id ([`TeacherCache::aligned`]), never by position, so any data order,
//! subset or shuffle reads the right rows; an example whose number of supervised positions
//! differs from the cached one is refused, so a row can never slide onto a neighbour's.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use half::f16;
use kd_imdb::{Example, PadSide, PromptBuilder, Review, Sentiment, collate};
use kd_loss::SparseTeacher;
use kd_qwen::{ForwardOptions, Qwen};
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{StepBatch, supervised_positions};

/// Name written in `meta.json` and in the safetensors metadata.
pub const CACHE_FORMAT: &str = "kd-teacher-topk";
/// Bumped whenever the layout changes; older caches are refused.
pub const CACHE_VERSION: u32 = 1;
const META_FILE: &str = "meta.json";
const TOPK_FILE: &str = "topk.safetensors";
/// Bytes of one cached entry: a `u32` id and an `f16` log-probability.
const ENTRY_BYTES: usize = 4 + 2;
/// Length limit of the prompt builder used for [`template_sha256`]'s probes: fixed, so the
/// template hash does not change with the run's `max_len` (a field of its own).
const PROBE_MAX_LEN: usize = 96;

/// What the cached numbers depend on besides the examples themselves. Opening a cache whose
/// fingerprint differs from the run's is an error naming every field that differs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// sha256 of the `tokenizer.json` bytes.
    pub tokenizer_sha256: String,
    /// sha256 of what the prompt builder makes of fixed probe reviews ([`template_sha256`]):
    /// instruction, chat markup, answer words, cleaning and the truncation rule.
    pub template_sha256: String,
    /// The prompt length limit the examples were built with.
    pub max_len: usize,
    /// The distillation temperature the log-probabilities are at.
    pub temperature: f64,
    /// sha256 of the teacher checkpoint ([`checkpoint_sha256`]).
    pub teacher_sha256: String,
}

impl Fingerprint {
    /// The fingerprint of a run: hashes the tokenizer file, probes the prompt template and
    /// hashes the whole teacher checkpoint (see [`checkpoint_sha256`] for the cost).
    pub fn compute(
        tokenizer_json: &Path,
        max_len: usize,
        temperature: f64,
        teacher_dir: &Path,
    ) -> Result<Self, CacheError> {
        Ok(Self {
            tokenizer_sha256: sha256_file(tokenizer_json)?,
            template_sha256: template_sha256(tokenizer_json)?,
            max_len,
            temperature,
            teacher_sha256: checkpoint_sha256(teacher_dir)?,
        })
    }

    /// One sentence per field where the cache (`self`) and the run (`run`) differ, e.g.
    /// `"cache was built with max_len 128, this run uses 192"`; empty when they agree.
    pub fn diff(&self, run: &Self) -> Vec<String> {
        let short = |hash: &str| hash.chars().take(12).collect::<String>();
        // The temperature is compared exactly: a cache at T = 1.0000001 is not one at T = 1.
        let fields = [
            (
                "tokenizer sha256",
                self.tokenizer_sha256 != run.tokenizer_sha256,
                short(&self.tokenizer_sha256),
                short(&run.tokenizer_sha256),
            ),
            (
                "prompt template sha256",
                self.template_sha256 != run.template_sha256,
                short(&self.template_sha256),
                short(&run.template_sha256),
            ),
            (
                "max_len",
                self.max_len != run.max_len,
                self.max_len.to_string(),
                run.max_len.to_string(),
            ),
            (
                "temperature",
                self.temperature != run.temperature,
                self.temperature.to_string(),
                run.temperature.to_string(),
            ),
            (
                "teacher checkpoint sha256",
                self.teacher_sha256 != run.teacher_sha256,
                short(&self.teacher_sha256),
                short(&run.teacher_sha256),
            ),
        ];
        fields
            .into_iter()
            .filter(|(_, differs, _, _)| *differs)
            .map(|(name, _, cache, run)| {
                format!("cache was built with {name} {cache}, this run uses {run}")
            })
            .collect()
    }
}

/// What can go wrong building, reading or using a cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A cache file is not what this version writes.
    #[error("{path}: {msg}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The cache was built for another tokenizer, template, length, temperature or teacher.
    #[error("teacher cache {path} does not match this run: {}", .diffs.join("; "))]
    Mismatch {
        /// The cache folder.
        path: PathBuf,
        /// One sentence per differing field ([`Fingerprint::diff`]).
        diffs: Vec<String>,
    },
    /// A training example has no cached rows.
    #[error("example `{id}` is not in the teacher cache")]
    MissingExample {
        /// Its id.
        id: String,
    },
    /// A training example has another number of supervised positions than its cached rows.
    #[error("example `{id}` has {run} supervised positions in this run but {cached} in the cache")]
    RowCount {
        /// Its id.
        id: String,
        /// Rows in the cache.
        cached: usize,
        /// Supervised positions now.
        run: usize,
    },
    /// A caller passed something unusable (duplicate ids, k = 0, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// The teacher checkpoint could not be opened.
    #[error(transparent)]
    Checkpoint(#[from] kd_qwen::Error),
    /// The tokenizer or prompt builder failed.
    #[error(transparent)]
    Prompt(#[from] kd_imdb::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn format_err(path: &Path, msg: impl Into<String>) -> CacheError {
    CacheError::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Settings of [`TeacherCache::build`] that do not change the cached values' meaning.
#[derive(Debug, Clone, Copy)]
pub struct BuildOptions {
    /// Token ids kept per position.
    pub k: usize,
    /// Examples per teacher forward pass.
    pub batch_size: usize,
}

/// The teacher's top-k at every supervised position of a set of examples, keyed by id.
#[derive(Debug, Clone, PartialEq)]
pub struct TeacherCache {
    fingerprint: Fingerprint,
    k: usize,
    teacher_vocab: usize,
    ids: Vec<String>,
    index: HashMap<String, usize>,
    /// Row range of example `i`: `offsets[i]..offsets[i + 1]`.
    offsets: Vec<usize>,
    /// `[rows, k]` row-major.
    topk_ids: Vec<u32>,
    /// `[rows, k]` row-major, at the fingerprint's temperature.
    log_probs: Vec<f16>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    format: String,
    version: u32,
    fingerprint: Fingerprint,
    k: usize,
    teacher_vocab: usize,
    rows: usize,
    examples: Vec<MetaExample>,
}

#[derive(Debug, Serialize, Deserialize)]
struct MetaExample {
    id: String,
    rows: usize,
}

/// Number of supervised positions of one example, counted as [`supervised_positions`] does.
fn supervised_count(example: &Example) -> usize {
    supervised_positions(&example.labels, 1, example.labels.len())
        .0
        .len()
}

impl TeacherCache {
    /// Runs `teacher` (on a device without autodiff) over `examples`, `batch_size` at a time
    /// in order of length (less padding), and keeps the top `k` of
    /// `log_softmax(logits / fingerprint.temperature)` at each supervised position.
    /// `progress` receives the number of examples done so far.
    ///
    /// `ids[i]` names `examples[i]`; ids must be distinct. Fails when an example is longer
    /// than `fingerprint.max_len` (the fingerprint would then not describe the cache).
    pub fn build(
        teacher: &Qwen,
        ids: &[String],
        examples: &[Example],
        options: BuildOptions,
        fingerprint: Fingerprint,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Self, CacheError> {
        let bad = |msg: String| Err(CacheError::InvalidArgument(msg));
        let vocab = teacher.config().vocab_size;
        let (k, temperature) = (options.k, fingerprint.temperature);
        if ids.len() != examples.len() {
            return bad(format!("{} ids for {} examples", ids.len(), examples.len()));
        }
        if k == 0 || k > vocab {
            return bad(format!("k = {k} must lie in 1..={vocab}"));
        }
        if options.batch_size == 0 {
            return bad("batch size must be at least 1".into());
        }
        if !(temperature.is_finite() && temperature > 0.0) {
            return bad(format!("temperature {temperature} must be positive"));
        }
        let index = index_ids(ids)?;
        teacher.check_positions(examples.iter().map(Example::len).max().unwrap_or(0))?;
        if let Some((id, e)) = ids
            .iter()
            .zip(examples)
            .find(|(_, e)| e.len() > fingerprint.max_len)
        {
            return bad(format!(
                "example `{id}` has {} tokens, more than the fingerprint's max_len {}",
                e.len(),
                fingerprint.max_len
            ));
        }
        let device = teacher
            .devices()
            .into_iter()
            .next()
            .ok_or_else(|| CacheError::InvalidArgument("the teacher has no device".into()))?;

        // 1. Batches of similar length; right padding needs no attention mask (causal
        //    attention never looks right), so the pad id is irrelevant: 0.
        let mut order: Vec<usize> = (0..examples.len()).collect();
        order.sort_by_key(|&i| examples[i].len());
        let mut per_example: Vec<(Vec<u32>, Vec<f16>)> = vec![Default::default(); examples.len()];
        let options_fwd = ForwardOptions::default();
        let mut done = 0;
        for chunk in order.chunks(options.batch_size) {
            let picked: Vec<&Example> = chunk.iter().map(|&i| &examples[i]).collect();
            let step = StepBatch::new(&collate(&picked, 0, PadSide::Right), &device);

            // 2. Teacher log-probabilities at the supervised positions, top k of each row.
            if step.supervised > 0 {
                let logits = teacher.forward_at(step.input_ids, step.positions, &options_fwd);
                let log_probs = log_softmax(logits.div_scalar(temperature), 1); // [n, vocab]
                let (values, top_ids) = log_probs.topk_with_indices(k, 1); // [n, k]
                let values: Vec<f32> = values
                    .into_data()
                    .convert::<f32>()
                    .try_to_vec()
                    .map_err(|e| CacheError::InvalidArgument(format!("{e:?}")))?;
                let top_ids: Vec<i64> = top_ids
                    .into_data()
                    .convert::<i64>()
                    .try_to_vec()
                    .map_err(|e| CacheError::InvalidArgument(format!("{e:?}")))?;

                // 3. Rows are row-major over the batch: hand each example its own.
                let mut row = 0;
                for &i in chunk {
                    let n = supervised_count(&examples[i]);
                    let span = row * k..(row + n) * k;
                    per_example[i] = (
                        top_ids[span.clone()].iter().map(|&t| t as u32).collect(),
                        values[span].iter().map(|&v| f16::from_f32(v)).collect(),
                    );
                    row += n;
                }
                debug_assert_eq!(row, step.supervised);
            }
            done += chunk.len();
            progress(done);
        }

        // 4. Concatenate in the callers' order.
        let mut offsets = vec![0];
        let mut topk_ids = Vec::new();
        let mut log_probs = Vec::new();
        for (example, (t, v)) in examples.iter().zip(per_example) {
            let rows = supervised_count(example);
            debug_assert_eq!(t.len(), rows * k);
            offsets.push(offsets[offsets.len() - 1] + rows);
            topk_ids.extend(t);
            log_probs.extend(v);
        }
        Ok(Self {
            fingerprint,
            k,
            teacher_vocab: vocab,
            ids: ids.to_vec(),
            index,
            offsets,
            topk_ids,
            log_probs,
        })
    }

    /// Writes the cache to `dir` (see the module docs for the layout), first under a
    /// temporary name beside it, then renamed into place. An existing cache folder at `dir`
    /// is replaced; any other existing, non-empty folder is refused. Returns the bytes
    /// written.
    pub fn save(&self, dir: &Path) -> Result<u64, CacheError> {
        if dir.exists() && !dir.join(META_FILE).exists() && dir_non_empty(dir)? {
            return Err(CacheError::InvalidArgument(format!(
                "{} exists and is not a teacher cache; choose another folder",
                dir.display()
            )));
        }
        let name = dir
            .file_name()
            .ok_or_else(|| CacheError::InvalidArgument(format!("bad folder {}", dir.display())))?
            .to_string_lossy();
        let parent = dir.parent().unwrap_or(Path::new("."));
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;

        // 1. The two files.
        let topk = tmp.join(TOPK_FILE);
        let rows = self.rows();
        let id_bytes: Vec<u8> = self.topk_ids.iter().flat_map(|t| t.to_le_bytes()).collect();
        let lp_bytes: Vec<u8> = self
            .log_probs
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let views = [
            ("ids", Dtype::U32, &id_bytes),
            ("log_probs", Dtype::F16, &lp_bytes),
        ]
        .into_iter()
        .map(|(n, dtype, bytes)| {
            TensorView::new(dtype, vec![rows, self.k], bytes)
                .map(|v| (n, v))
                .map_err(|e| format_err(&topk, format!("tensor `{n}`: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
        let metadata = HashMap::from([
            ("format".to_string(), CACHE_FORMAT.to_string()),
            ("version".to_string(), CACHE_VERSION.to_string()),
        ]);
        safetensors::tensor::serialize_to_file(views, Some(metadata), &topk)
            .map_err(|e| format_err(&topk, e.to_string()))?;
        kd_qwen::make_shareable(&topk).map_err(io_err(&topk))?;
        let meta = Meta {
            format: CACHE_FORMAT.into(),
            version: CACHE_VERSION,
            fingerprint: self.fingerprint.clone(),
            k: self.k,
            teacher_vocab: self.teacher_vocab,
            rows,
            examples: self
                .ids
                .iter()
                .enumerate()
                .map(|(i, id)| MetaExample {
                    id: id.clone(),
                    rows: self.offsets[i + 1] - self.offsets[i],
                })
                .collect(),
        };
        let meta_path = tmp.join(META_FILE);
        let json = serde_json::to_vec(&meta).map_err(|e| format_err(&meta_path, e.to_string()))?;
        std::fs::write(&meta_path, &json).map_err(io_err(&meta_path))?;
        let bytes = file_len(&topk)? + json.len() as u64;

        // 2. Into place: an old cache is moved aside first, then removed.
        if dir.exists() {
            let old = parent.join(format!(".{name}.old-{}", std::process::id()));
            std::fs::rename(dir, &old).map_err(io_err(dir))?;
            std::fs::rename(&tmp, dir).map_err(io_err(dir))?;
            std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
        } else {
            std::fs::rename(&tmp, dir).map_err(io_err(dir))?;
        }
        Ok(bytes)
    }

    /// The fingerprint recorded in the cache at `dir`, without checking it or reading the
    /// top-k file (for a run that has no teacher checkpoint to hash: it takes the cache's
    /// teacher hash as its own).
    pub fn read_fingerprint(dir: &Path) -> Result<Fingerprint, CacheError> {
        Ok(read_meta(dir)?.fingerprint)
    }

    /// Reads the cache at `dir`, refusing it when its fingerprint differs from `expected`
    /// (the error names every differing field).
    pub fn open(dir: &Path, expected: &Fingerprint) -> Result<Self, CacheError> {
        let meta = read_meta(dir)?;
        let diffs = meta.fingerprint.diff(expected);
        if !diffs.is_empty() {
            return Err(CacheError::Mismatch {
                path: dir.to_path_buf(),
                diffs,
            });
        }
        let meta_path = dir.join(META_FILE);
        let total: usize = meta.examples.iter().map(|e| e.rows).sum();
        if total != meta.rows || meta.k == 0 {
            return Err(format_err(
                &meta_path,
                format!(
                    "examples hold {total} rows, `rows` says {}; k = {}",
                    meta.rows, meta.k
                ),
            ));
        }
        let ids: Vec<String> = meta.examples.iter().map(|e| e.id.clone()).collect();
        let index = index_ids(&ids).map_err(|e| format_err(&meta_path, e.to_string()))?;
        let mut offsets = vec![0];
        for e in &meta.examples {
            offsets.push(offsets[offsets.len() - 1] + e.rows);
        }

        let topk = dir.join(TOPK_FILE);
        let bytes = std::fs::read(&topk).map_err(io_err(&topk))?;
        let file = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| format_err(&topk, format!("not a readable safetensors file: {e}")))?;
        let shape = [meta.rows, meta.k];
        let read = |name: &str, dtype: Dtype| -> Result<&[u8], CacheError> {
            let view = file
                .tensor(name)
                .map_err(|_| format_err(&topk, format!("tensor `{name}` missing")))?;
            if view.dtype() != dtype || view.shape() != shape {
                return Err(format_err(
                    &topk,
                    format!(
                        "`{name}`: expected {dtype:?} {shape:?}, found {:?} {:?}",
                        view.dtype(),
                        view.shape()
                    ),
                ));
            }
            Ok(view.data())
        };
        let topk_ids: Vec<u32> = read("ids", Dtype::U32)?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if let Some(bad) = topk_ids.iter().find(|&&t| t as usize >= meta.teacher_vocab) {
            return Err(format_err(
                &topk,
                format!(
                    "id {bad} outside the teacher vocabulary {}",
                    meta.teacher_vocab
                ),
            ));
        }
        let log_probs: Vec<f16> = read("log_probs", Dtype::F16)?
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]))
            .collect();
        Ok(Self {
            fingerprint: meta.fingerprint,
            k: meta.k,
            teacher_vocab: meta.teacher_vocab,
            ids,
            index,
            offsets,
            topk_ids,
            log_probs,
        })
    }

    /// The rows of `examples` (named by `ids`, in that order), checked: every id must be
    /// cached, with as many rows as the example has supervised positions now.
    pub fn aligned(
        &self,
        ids: &[String],
        examples: &[Example],
    ) -> Result<AlignedCache<'_>, CacheError> {
        if ids.len() != examples.len() {
            return Err(CacheError::InvalidArgument(format!(
                "{} ids for {} examples",
                ids.len(),
                examples.len()
            )));
        }
        let mut slots = Vec::with_capacity(ids.len());
        for (id, example) in ids.iter().zip(examples) {
            let slot = *self
                .index
                .get(id)
                .ok_or_else(|| CacheError::MissingExample { id: id.clone() })?;
            let cached = self.offsets[slot + 1] - self.offsets[slot];
            let run = supervised_count(example);
            if cached != run {
                return Err(CacheError::RowCount {
                    id: id.clone(),
                    cached,
                    run,
                });
            }
            slots.push(slot);
        }
        Ok(AlignedCache { cache: self, slots })
    }

    /// What the cached values depend on.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }

    /// Token ids kept per position.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The teacher's vocabulary size (every cached id is below it).
    pub fn teacher_vocab(&self) -> usize {
        self.teacher_vocab
    }

    /// Cached examples, in build order.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// Cached supervised positions, all examples together.
    pub fn rows(&self) -> usize {
        self.offsets[self.offsets.len() - 1]
    }

    /// The cached top-k of one example: `(ids, log_probs)`, each `[rows, k]` row-major.
    pub fn example(&self, id: &str) -> Option<(&[u32], &[f16])> {
        let slot = *self.index.get(id)?;
        let span = self.offsets[slot] * self.k..self.offsets[slot + 1] * self.k;
        Some((&self.topk_ids[span.clone()], &self.log_probs[span]))
    }

    /// Payload bytes per supervised token: `k` ids (u32) and `k` log-probabilities (f16).
    /// `meta.json` adds a few bytes per *example* on top; [`TeacherCache::save`] returns the
    /// exact total.
    pub fn bytes_per_supervised_token(&self) -> usize {
        self.k * ENTRY_BYTES
    }
}

/// A cache checked against one run's examples; indices are positions in that run's list.
#[derive(Debug, Clone)]
pub struct AlignedCache<'a> {
    cache: &'a TeacherCache,
    /// Per run example, its slot in the cache.
    slots: Vec<usize>,
}

impl AlignedCache<'_> {
    /// Number of run examples.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The sparse teacher of a batch made of the run's examples `example_indices`, in that
    /// order: its rows follow the order of [`StepBatch`]'s positions for
    /// `collate(&[examples[i] for i in example_indices], _, PadSide::Right)`.
    ///
    /// # Panics
    ///
    /// When an index is out of range (a programmer error: indices come from the same list
    /// the cache was aligned with).
    ///
    /// # Shapes
    ///
    /// - output ids and log_probs: `[Σ supervised positions, k]`
    pub fn sparse_teacher(&self, example_indices: &[usize], device: &Device) -> SparseTeacher {
        let cache = self.cache;
        let k = cache.k;
        let mut ids = Vec::new();
        let mut log_probs = Vec::new();
        for &i in example_indices {
            let slot = self.slots[i];
            let span = cache.offsets[slot] * k..cache.offsets[slot + 1] * k;
            ids.extend(cache.topk_ids[span.clone()].iter().map(|&t| i64::from(t)));
            log_probs.extend(cache.log_probs[span].iter().map(|v| v.to_f32()));
        }
        let rows = ids.len() / k;
        SparseTeacher {
            ids: Tensor::<2, Int>::from_data(TensorData::new(ids, [rows, k]), device),
            log_probs: Tensor::<2>::from_data(TensorData::new(log_probs, [rows, k]), device),
        }
    }
}

fn index_ids(ids: &[String]) -> Result<HashMap<String, usize>, CacheError> {
    let mut index = HashMap::with_capacity(ids.len());
    for (i, id) in ids.iter().enumerate() {
        if index.insert(id.clone(), i).is_some() {
            return Err(CacheError::InvalidArgument(format!(
                "example id `{id}` appears twice"
            )));
        }
    }
    Ok(index)
}

fn read_meta(dir: &Path) -> Result<Meta, CacheError> {
    let path = dir.join(META_FILE);
    let text = std::fs::read(&path).map_err(io_err(&path))?;
    let meta: Meta =
        serde_json::from_slice(&text).map_err(|e| format_err(&path, format!("bad JSON: {e}")))?;
    if meta.format != CACHE_FORMAT || meta.version != CACHE_VERSION {
        return Err(format_err(
            &path,
            format!(
                "format {} v{}, this build reads {CACHE_FORMAT} v{CACHE_VERSION}; rebuild the \
                 cache with `kd cache-teacher`",
                meta.format, meta.version
            ),
        ));
    }
    Ok(meta)
}

fn dir_non_empty(dir: &Path) -> Result<bool, CacheError> {
    Ok(std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .next()
        .is_some())
}

fn file_len(path: &Path) -> Result<u64, CacheError> {
    Ok(std::fs::metadata(path).map_err(io_err(path))?.len())
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Feeds a whole file to `hasher` in 1 MiB reads.
fn hash_into(hasher: &mut Sha256, path: &Path) -> Result<(), CacheError> {
    let mut file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            return Ok(());
        }
        hasher.update(&buf[..n]);
    }
}

/// sha256 of `bytes`, as lowercase hex.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// sha256 of a file, as lowercase hex.
///
/// # Errors
///
/// The file could not be read.
pub fn sha256_file(path: &Path) -> Result<String, CacheError> {
    let mut hasher = Sha256::new();
    hash_into(&mut hasher, path)?;
    Ok(hex(&hasher.finalize()))
}

/// sha256 of a checkpoint folder: `config.json`, then every safetensors file (one, or each
/// shard of the index, in name order) with its name and length, **all bytes included**.
///
/// Why the full hash: a teacher fine-tuned again (another seed, more steps) has the same
/// config, the same safetensors header and the same file sizes; only the weight bytes tell
/// it apart, and a cache from the wrong teacher silently distils the wrong model. sha256
/// streams at roughly 0.5–1.5 GB/s on one core, so an 8 GB Qwen3-4B costs 5–15 s, small next
/// to running that teacher over the training set.
pub fn checkpoint_sha256(dir: &Path) -> Result<String, CacheError> {
    let checkpoint = kd_qwen::Checkpoint::open(dir)?;
    let mut hasher = Sha256::new();
    let config = dir.join("config.json");
    hasher.update(b"config.json\0");
    hasher.update(file_len(&config)?.to_le_bytes());
    hash_into(&mut hasher, &config)?;
    let files: BTreeMap<String, &PathBuf> = checkpoint
        .files
        .iter()
        .map(|(p, _)| {
            let name = p
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into());
            (name, p)
        })
        .collect();
    for (name, path) in files {
        hasher.update(name.as_bytes());
        hasher.update(b"\0");
        hasher.update(file_len(path)?.to_le_bytes());
        hash_into(&mut hasher, path)?;
    }
    Ok(hex(&hasher.finalize()))
}

/// sha256 of what [`PromptBuilder`] (built from `tokenizer_json` at a fixed length) makes of
/// fixed probe reviews: a short one with a `<br />` tag under both labels, and one long
/// enough to be truncated. It changes when the instruction, the chat markup, the answer
/// words, the cleaning or the truncation rule change — whatever the source of the change —
/// and not with the run's `max_len`, which is a field of its own.
pub fn template_sha256(tokenizer_json: &Path) -> Result<String, CacheError> {
    let builder = PromptBuilder::new(tokenizer_json, PROBE_MAX_LEN)?;
    let long: Vec<String> = (0..PROBE_MAX_LEN).map(|i| format!("w{i}")).collect();
    let long = long.join(" ");
    let short = "Loved it.<br /><br />A \"fine\" film!";
    let probes = [
        (short, Sentiment::Positive),
        (short, Sentiment::Negative),
        (long.as_str(), Sentiment::Positive),
    ];
    let mut hasher = Sha256::new();
    for (text, label) in probes {
        let review = Review {
            id: "probe".into(),
            text: text.into(),
            label,
            rating: None,
        };
        let example = builder.encode_review(&review, true)?;
        hasher.update((example.input_ids.len() as u64).to_le_bytes());
        for id in &example.input_ids {
            hasher.update(id.to_le_bytes());
        }
        for label in &example.labels {
            hasher.update(label.to_le_bytes());
        }
    }
    Ok(hex(&hasher.finalize()))
}
