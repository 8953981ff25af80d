//! `kd rationales`: have a model explain, inside `<think>…</think>`, why each review of a
//! labelled file has its label, streaming `id, sentiment, review, reasoning, new_tokens,
//! finish_reason, extraction` rows to a CSV that `--resume` continues.
//!
//! Prompts are bucketed by length over the whole input (the same buckets on every run), and
//! each bucket is one left-padded batch written with one flushed write, so a run killed at
//! any moment loses at most the batch in flight; on resume the rows already in the file are
//! skipped and a torn last row is cut off first.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use kd_imdb::assets::{Asset, AssetOptions, resolve};
use kd_imdb::{Review, clean_review, read_any};
use kd_infer::rationale::{
    DEFAULT_TEMPLATE, RationaleRow, RationaleWriter, Template, extract_reasoning,
};
use kd_infer::{
    GenerateConfig, Sampling, StopStrings, generate_with, length_buckets, load_model_with,
};
use kd_qwen::WeightLayout;
use tokenizers::Tokenizer;
use tracing::info;

use crate::device::DeviceChoice;

/// End-of-sequence markers of the Qwen2/Qwen3 and DeepSeek-R1-Distill tokenizers; those the
/// tokenizer knows end a row, with the config's `eos_token_id`.
const EOS_TOKENS: [&str; 3] = ["<|im_end|>", "<|endoftext|>", "<｜end▁of▁sentence｜>"];

/// Which reviews of the input file to explain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SplitChoice {
    /// The training split (the only one in the TSV and CSV layouts).
    Train,
    /// The test split.
    Test,
    /// Both, training first.
    All,
}

/// `kd rationales`.
#[derive(Debug, Args)]
pub struct RationalesArgs {
    /// Model folder: a Hugging Face Qwen2/Qwen3 checkpoint or a `kd quantize` output.
    #[arg(long)]
    pub model: PathBuf,
    /// tokenizer.json; defaults to the model folder's, else the Qwen3 tokenizer from the
    /// mirrors or cache (`KD_MIRROR`, `KD_CACHE`).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Labelled reviews: aclImdb folder or .tar.gz, Kaggle .tsv, or review,sentiment .csv.
    #[arg(long)]
    pub input: PathBuf,
    /// Output CSV.
    #[arg(long)]
    pub out: PathBuf,
    /// Prompt template with `{review}` once and `{label}` anywhere; special-token strings in
    /// it are parsed as special tokens. Default: data/templates/rationale.txt (Qwen3 chat).
    #[arg(long)]
    pub template: Option<PathBuf>,
    /// Which split of the input to use.
    #[arg(long, value_enum, default_value = "train")]
    pub split: SplitChoice,
    /// Prompts per batch. A larger batch multiplies each weight with more rows at once: on
    /// the CPU, the 1.5B R1 shape decodes about twice as many tokens per second at batch 32
    /// as at batch 8 (docs/bench-generate.md). The KV cache grows with it: about 57 KB per
    /// token for that model in f32.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Most tokens generated per review.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Longer reviews keep their first quarter and last three quarters of this many tokens.
    #[arg(long, default_value_t = 1024)]
    pub max_review_tokens: usize,
    /// Only the reviews whose ids are listed in this file (one per line; `#` comments and
    /// blank lines ignored), e.g. the `student_ids.txt` a `kd distill` run writes, so that
    /// exactly the student's training reviews are explained.
    #[arg(long, value_name = "FILE")]
    pub ids: Option<PathBuf>,
    /// Only the first N reviews of the split (in file order; after `--ids`).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Continue an existing output file, skipping the ids already in it. Refused when the
    /// model, tokenizer, template or generation settings differ from those the file was
    /// started with (recorded in `<out>.settings.json`).
    #[arg(long)]
    pub resume: bool,
    /// Stop strings, matched in the decoded text of each row (however the tokenizer split
    /// them); give the flag once per string.
    #[arg(long, default_value = "</think>")]
    pub stop: Vec<String>,
    /// Sample at this temperature instead of decoding greedily.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// With --temperature: keep only the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// With --temperature: nucleus threshold.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// With --temperature: seed (each review draws from its own stream).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Never download the tokenizer.
    #[arg(long)]
    pub offline: bool,
    /// Compute device.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Sleep this long after each written batch (for kill/resume tests).
    #[arg(long, default_value_t = 0, hide = true)]
    pub pause_after_batch_ms: u64,
}

/// One review ready to generate.
struct Job {
    /// Index in the (limited) split: the sampling stream.
    index: usize,
    review: Review,
    /// The cleaned text, as the model saw it (before truncation).
    text: String,
    prompt: Vec<u32>,
}

/// Runs `kd rationales`.
pub fn run(args: RationalesArgs) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    // 1. Inputs: reviews, template, tokenizer, model.
    let corpus = read_any(&args.input)?;
    let mut reviews: Vec<Review> = match args.split {
        SplitChoice::Train => corpus.train,
        SplitChoice::Test => corpus.test,
        SplitChoice::All => corpus.train.into_iter().chain(corpus.test).collect(),
    };
    if let Some(path) = &args.ids {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --ids {}", path.display()))?;
        let wanted: std::collections::HashSet<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        reviews.retain(|r| wanted.contains(r.id.as_str()));
        if reviews.len() < wanted.len() {
            bail!(
                "{}: {} of its {} ids are not in the {:?} split of {}",
                path.display(),
                wanted.len() - reviews.len(),
                wanted.len(),
                args.split,
                args.input.display()
            );
        }
    }
    if let Some(limit) = args.limit {
        reviews.truncate(limit);
    }
    let template_text = match &args.template {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading template {}", path.display()))?,
        None => DEFAULT_TEMPLATE.to_string(),
    };
    let template = Template::new(template_text.clone()).context("prompt template")?;
    let tokenizer_path = match &args.tokenizer {
        Some(path) => path.clone(),
        None if args.model.join("tokenizer.json").is_file() => args.model.join("tokenizer.json"),
        None => {
            let mut options = AssetOptions::from_env();
            options.offline |= args.offline; // adds to `KD_OFFLINE`, never clears it
            resolve(Asset::QwenTokenizer, &options)?
        }
    };
    let tokens = Tokens::load(&tokenizer_path)?;
    let device = args.device.device()?;
    // Generation only: the layout whose decoding steps are fastest.
    let model = load_model_with(&args.model, &device, WeightLayout::Inference)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let config = model.config();
    let mut eos_ids: Vec<u32> = EOS_TOKENS.iter().filter_map(|t| tokens.id(t)).collect();
    eos_ids.extend(config.eos_token_id.iter().flat_map(|e| e.ids()));
    let pad_id = config
        .pad_token_id
        .or_else(|| tokens.id("<|endoftext|>"))
        .unwrap_or(0);
    // A decoding failure cannot stop a row; the row then runs to eos or max_new_tokens.
    let stops = StopStrings::new(args.stop.iter().cloned(), |ids: &[u32]| {
        tokens.decode(ids).unwrap_or_default()
    });

    // 2. Output: a fresh file, or the ids already done by a run with the same settings.
    let settings = settings_of(&args, &tokenizer_path, &template_text)?;
    let settings_path = settings_path(&args.out);
    let (mut writer, done) = if args.resume {
        check_settings(&settings_path, &settings)?;
        RationaleWriter::resume(&args.out)?
    } else {
        if args.out.exists() {
            bail!(
                "{} exists; pass --resume to continue it, or remove it",
                args.out.display()
            );
        }
        (RationaleWriter::create(&args.out)?, HashSet::new())
    };
    // Written whole, then renamed: a kill cannot leave it torn.
    let tmp = settings_path.with_extension("json.partial");
    std::fs::write(&tmp, serde_json::to_string_pretty(&settings)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &settings_path)
        .with_context(|| format!("writing {}", settings_path.display()))?;

    // 3. Prompts, bucketed by length over the whole split so every run batches alike.
    let mut jobs = Vec::with_capacity(reviews.len());
    for (index, review) in reviews.into_iter().enumerate() {
        let text = clean_review(&review.text);
        let (before, after) = template.split(review.label.word());
        let prompt = tokens.prompt(&before, &text, &after, args.max_review_tokens)?;
        jobs.push(Job {
            index,
            review,
            text,
            prompt,
        });
    }
    // A tokenizer that does not belong to the model would index past its embedding.
    let vocab = config.vocab_size;
    if let Some((job, &id)) = jobs.iter().find_map(|j| {
        j.prompt
            .iter()
            .find(|&&t| t as usize >= vocab)
            .map(|t| (j, t))
    }) {
        bail!(
            "{}: review {} tokenizes to id {id}, outside the vocabulary of {vocab} in {}; \
             pass the model's own tokenizer with --tokenizer",
            tokenizer_path.display(),
            job.review.id,
            args.model.join("config.json").display()
        );
    }
    let lengths: Vec<usize> = jobs.iter().map(|j| j.prompt.len()).collect();
    let buckets: Vec<Vec<usize>> = length_buckets(&lengths, args.batch_size)
        .into_iter()
        .map(|b| {
            b.into_iter()
                .filter(|&i| !done.contains(&jobs[i].review.id))
                .collect::<Vec<_>>()
        })
        .filter(|b| !b.is_empty())
        .collect();
    let todo: usize = buckets.iter().map(Vec::len).sum();
    info!(
        reviews = jobs.len(),
        done = done.len(),
        todo,
        batches = buckets.len(),
        "rationales"
    );

    // 4. Generate batch by batch, writing each as soon as it is done.
    let sampling = match args.temperature {
        None => Sampling::Greedy,
        Some(temperature) => Sampling::Sample {
            temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
    };
    let bar = ProgressBar::new(todo as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} rows  {per_sec}  {msg}  elapsed {elapsed}  ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let start = Instant::now();
    let mut generated = 0usize;
    for bucket in &buckets {
        let prompts: Vec<Vec<u32>> = bucket.iter().map(|&i| jobs[i].prompt.clone()).collect();
        let gen_config = GenerateConfig {
            max_new_tokens: args.max_new_tokens,
            eos_ids: eos_ids.clone(),
            stop_sequences: Vec::new(),
            sampling,
            pad_id,
            row_streams: bucket.iter().map(|&i| jobs[i].index as u64).collect(),
        };
        let outputs = generate_with(&model, &prompts, &gen_config, &stops)?;
        let mut rows = Vec::with_capacity(bucket.len());
        for (&i, output) in bucket.iter().zip(outputs) {
            let job = &jobs[i];
            generated += output.tokens.len();
            let mut ids = output.tokens.as_slice();
            while let Some((last, rest)) = ids.split_last()
                && eos_ids.contains(last)
            {
                ids = rest;
            }
            let (reasoning, extraction) = extract_reasoning(&tokens.decode(ids)?);
            rows.push(RationaleRow {
                id: job.review.id.clone(),
                sentiment: job.review.label.word().to_string(),
                review: job.text.clone(),
                reasoning,
                new_tokens: output.tokens.len(),
                finish_reason: output.finish.as_str().to_string(),
                extraction,
            });
        }
        writer.write_batch(&rows)?;
        bar.inc(rows.len() as u64);
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!("{:.1} tok/s", generated as f64 / secs));
        if args.pause_after_batch_ms > 0 {
            std::thread::sleep(Duration::from_millis(args.pause_after_batch_ms));
        }
    }
    bar.finish();
    info!(
        rows = todo,
        generated_tokens = generated,
        secs = start.elapsed().as_secs_f64(),
        out = %args.out.display(),
        "rationales written"
    );
    Ok(())
}

/// The tokenizer twice: one parsing special-token strings (template, stop strings), one
/// treating them as text (reviews, so a review cannot inject `<|im_end|>`).
struct Tokens {
    path: PathBuf,
    special: Tokenizer,
    text: Tokenizer,
}

impl Tokens {
    fn load(path: &Path) -> Result<Self> {
        let special = Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("loading tokenizer {}: {e}", path.display()))?;
        let mut text = special.clone();
        text.set_encode_special_tokens(true);
        Ok(Self {
            path: path.to_path_buf(),
            special,
            text,
        })
    }

    fn id(&self, token: &str) -> Option<u32> {
        self.special.token_to_id(token)
    }

    fn encode(tokenizer: &Tokenizer, path: &Path, s: &str) -> Result<Vec<u32>> {
        let encoding = tokenizer
            .encode_fast(s, false)
            .map_err(|e| anyhow::anyhow!("tokenizing with {}: {e}", path.display()))?;
        Ok(encoding.get_ids().to_vec())
    }

    fn encode_special(&self, s: &str) -> Result<Vec<u32>> {
        Self::encode(&self.special, &self.path, s)
    }

    /// `before` + review + `after`. Whitespace that ends `before` moves onto the review, so
    /// the review's first word carries its leading space as it would in one string.
    fn prompt(&self, before: &str, review: &str, after: &str, budget: usize) -> Result<Vec<u32>> {
        let trimmed = before.trim_end_matches([' ', '\t']);
        let review = format!("{}{review}", &before[trimmed.len()..]);
        let mut ids = self.encode_special(trimmed)?;
        let body = Self::encode(&self.text, &self.path, &review)?;
        if body.len() > budget {
            let head = budget / 4;
            ids.extend_from_slice(&body[..head]);
            ids.extend_from_slice(&body[body.len() - (budget - head)..]);
        } else {
            ids.extend_from_slice(&body);
        }
        ids.extend(self.encode_special(after)?);
        Ok(ids)
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.special
            .decode(ids, false)
            .map_err(|e| anyhow::anyhow!("decoding with {}: {e}", self.path.display()))
    }
}

/// Where the settings of the run that writes `out` are kept: `<out>.settings.json`.
fn settings_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".settings.json");
    out.with_file_name(name)
}

/// Everything that decides what a row of the CSV holds, so that `--resume` can refuse to
/// append rows made another way. The model is identified by its folder, its `config.json`
/// and the names and sizes of its weight files (a full hash of a 3.5 GB model would cost
/// seconds on every resume); the tokenizer and template by their sha256. Left out: which
/// reviews are explained (`--input`, `--split`, `--ids`, `--limit`: a resumed run may cover
/// more of them) and the batch size (batched output equals one-row-at-a-time output).
fn settings_of(
    args: &RationalesArgs,
    tokenizer: &Path,
    template: &str,
) -> Result<serde_json::Value> {
    let config = args.model.join("config.json");
    let mut weights = Vec::new();
    for entry in std::fs::read_dir(&args.model)
        .with_context(|| format!("reading {}", args.model.display()))?
    {
        let entry = entry.with_context(|| format!("reading {}", args.model.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") {
            weights.push(format!("{name} {} bytes", entry.metadata()?.len()));
        }
    }
    weights.sort();
    Ok(serde_json::json!({
        "model": args.model.display().to_string(),
        "model_config_sha256": kd_train::cache::sha256_file(&config)?,
        "model_weights": weights.join(", "),
        "tokenizer_sha256": kd_train::cache::sha256_file(tokenizer)?,
        "template_sha256": kd_train::cache::sha256_bytes(template.as_bytes()),
        "max_new_tokens": args.max_new_tokens,
        "max_review_tokens": args.max_review_tokens,
        "stop": args.stop,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
    }))
}

/// Refuses to continue a CSV whose recorded settings differ from this run's, naming each
/// difference. A CSV without a settings file (written before they existed) is continued
/// with a warning.
fn check_settings(path: &Path, now: &serde_json::Value) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        tracing::warn!(
            settings = %path.display(),
            "no settings recorded beside the CSV; resuming without checking them"
        );
        return Ok(());
    };
    let before: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
    let differences = crate::settings::differences(&before, now, "file");
    if !differences.is_empty() {
        bail!(
            "--resume: the rows in the CSV were made with other settings ({}): {}. Resume with \
             the same ones, or write to another --out",
            path.display(),
            differences.join("; ")
        );
    }
    Ok(())
}
