//! `kd eval`, `kd predict`, `kd quantize`: scoring a checkpoint (full precision or quantized)
//! on labelled reviews or free text, and writing a weight-only int8/int4 copy of one.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kd_imdb::assets::{Asset, AssetOptions, resolve};
use kd_imdb::{PromptBuilder, Review, balanced_sample, clean_review, read_any};
use kd_infer::quant::{QuantSpec, quantize_checkpoint};
use kd_infer::{EvalSummary, evaluate_full, load_model, positive_probability, score_labels};

use crate::device::DeviceChoice;

/// Seed of the balanced sample `--limit` draws (the presets' data seed).
const LIMIT_SEED: u64 = 17;

/// `kd eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Model folder: a Hugging Face checkpoint or a `kd quantize` output.
    #[arg(long)]
    pub model: PathBuf,
    /// Labelled reviews (aclImdb folder or .tar.gz, Kaggle .tsv, review,sentiment .csv); the
    /// test split when the file has one. Default: the aclImdb test split from the mirror.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Evaluate a label-balanced sample of this many reviews (seed 17) instead of all.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Prompt length limit in tokens (reviews are cut head + tail to fit). Default: the
    /// length the model was trained at, from the `kd.json` a `kd distill` checkpoint holds,
    /// else 192.
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Prompts per forward pass (batches are formed from length-sorted prompts).
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Compute device.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceChoice,
}

/// `kd predict`.
#[derive(Debug, Args)]
pub struct PredictArgs {
    /// Model folder: a Hugging Face checkpoint or a `kd quantize` output.
    #[arg(long)]
    pub model: PathBuf,
    /// Reviews to classify; without any, one review per line is read from stdin.
    pub text: Vec<String>,
    /// Prompt length limit in tokens. Default: as for `kd eval`.
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Compute device.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceChoice,
}

/// `kd quantize`.
#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// Full-precision checkpoint folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Bits per weight: 8 or 4.
    #[arg(long)]
    pub bits: u8,
    /// Input features sharing one scale.
    #[arg(long, default_value_t = 32)]
    pub block: usize,
    /// Quantize the token embedding (and a tied LM head) too; by default it stays f32. With
    /// `--bits 4` on a narrow model, `--block 16` keeps more answers (docs/bench-quant.md).
    #[arg(long)]
    pub embeddings: bool,
    /// Output folder (config.json, quant.json, model.quant.safetensors).
    #[arg(long)]
    pub out: PathBuf,
}

/// The prompt length a model folder was trained at, recorded by `kd distill` (`kd.json`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct TrainedWith {
    /// `data.max_len` of the run.
    pub max_len: usize,
}

/// The file in a checkpoint folder that holds [`TrainedWith`].
pub(crate) const TRAINED_WITH_FILE: &str = "kd.json";

/// Prompt length when none is given and the folder records none (the `tiny` preset's).
const DEFAULT_MAX_LEN: usize = 192;

/// `--max-len` if given, else the folder's `kd.json`, else [`DEFAULT_MAX_LEN`].
fn prompt_len(model: &Path, given: Option<usize>) -> Result<usize> {
    if let Some(n) = given {
        return Ok(n);
    }
    let path = model.join(TRAINED_WITH_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(DEFAULT_MAX_LEN);
    };
    let trained: TrainedWith =
        serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
    tracing::info!(max_len = trained.max_len, from = %path.display(), "prompt length");
    Ok(trained.max_len)
}

fn tokenizer(max_len: usize) -> Result<PromptBuilder> {
    let path = resolve(Asset::QwenTokenizer, &AssetOptions::from_env())?;
    Ok(PromptBuilder::new(&path, max_len)?)
}

/// The labelled reviews to evaluate: the test split of `data` when it has one, else all of
/// its reviews; an error naming the file when there are none.
pub fn load_reviews(data: Option<&Path>) -> Result<(PathBuf, Vec<Review>)> {
    let path = match data {
        Some(p) => p.to_path_buf(),
        None => resolve(Asset::ImdbArchive, &AssetOptions::from_env())?,
    };
    // kd_imdb's errors already name the file (and line).
    let corpus = read_any(&path)?;
    let reviews = if corpus.test.is_empty() {
        corpus.train
    } else {
        corpus.test
    };
    if reviews.is_empty() {
        bail!("{}: no reviews in the file", path.display());
    }
    Ok((path, reviews))
}

fn bar(len: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} ({eta} left)")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// `kd eval`.
pub fn eval(args: EvalArgs) -> Result<()> {
    let device = args.device.device()?;
    // The model first: a wrong folder fails before minutes of reading and tokenising.
    let model = load_model(&args.model, &device)
        .with_context(|| format!("loading the model from {}", args.model.display()))?;
    let (path, mut reviews) = load_reviews(args.data.as_deref())?;
    if let Some(n) = args.limit.filter(|&n| n < reviews.len()) {
        reviews = balanced_sample(&reviews, n, LIMIT_SEED)?;
    }
    let max_len = prompt_len(&args.model, args.max_len)?;
    let builder = tokenizer(max_len)?;
    let prompts = reviews
        .iter()
        .map(|r| builder.encode_review(r, false))
        .collect::<Result<Vec<_>, _>>()?;
    let labels: Vec<usize> = reviews.iter().map(|r| r.label.index()).collect();
    let words: Vec<usize> = reviews
        .iter()
        .map(|r| clean_review(&r.text).split_whitespace().count())
        .collect();
    let progress = bar(prompts.len(), "eval");
    let (summary, _) = evaluate_full(
        &model,
        &prompts,
        &labels,
        &words,
        builder.label_token_ids(),
        builder.pad_id(),
        args.batch_size,
        &device,
        &mut |n| progress.set_position(n as u64),
    )?;
    progress.finish_and_clear();
    let mut out = std::io::stdout().lock();
    if args.json {
        let value = serde_json::json!({
            "model": args.model.display().to_string(),
            "data": path.display().to_string(),
            "max_len": max_len,
            "summary": summary,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
    } else {
        write!(out, "{}", table(&summary, &args.model, &path))?;
    }
    Ok(())
}

/// The human-readable report of `kd eval`.
fn table(s: &EvalSummary, model: &Path, data: &Path) -> String {
    let c = &s.confusion;
    let auc = s
        .roc_auc
        .map_or("n/a (one class)".into(), |a| format!("{a:.4}"));
    let mut t = format!(
        "model     {}\ndata      {}\nreviews   {}\naccuracy  {:.2}%\nROC AUC   {auc}\n\n\
         confusion        predicted neg  predicted pos\n\
         actual neg       {:>13}  {:>13}\n\
         actual pos       {:>13}  {:>13}\n\n\
         review length (words)  reviews  accuracy\n",
        model.display(),
        data.display(),
        s.examples,
        100.0 * s.accuracy,
        c.true_negative,
        c.false_positive,
        c.false_negative,
        c.true_positive,
    );
    for b in &s.by_length {
        let range = match b.max_words {
            Some(max) => format!("{}–{}", b.min_words, max - 1),
            None => format!("{}+", b.min_words),
        };
        t += &format!(
            "{range:<22} {:>8}  {:>7.2}%\n",
            b.examples,
            100.0 * b.accuracy
        );
    }
    t += &format!(
        "\nthroughput  {:.1} reviews/s, {:.0} tokens/s ({:.1} s)\n",
        s.reviews_per_s, s.tokens_per_s, s.seconds
    );
    t
}

/// `kd predict`.
pub fn predict(args: PredictArgs) -> Result<()> {
    let texts: Vec<String> = if args.text.is_empty() {
        std::io::stdin()
            .lock()
            .lines()
            .collect::<Result<Vec<_>, _>>()
            .context("reading stdin")?
            .into_iter()
            .filter(|l| !l.trim().is_empty())
            .collect()
    } else {
        args.text
    };
    if texts.is_empty() {
        bail!("no input: give reviews as arguments or one per line on stdin");
    }
    let device = args.device.device()?;
    let model = load_model(&args.model, &device)
        .with_context(|| format!("loading the model from {}", args.model.display()))?;
    let max_len = prompt_len(&args.model, args.max_len)?;
    let builder = tokenizer(max_len)?;
    let prompts = texts
        .iter()
        .map(|t| builder.encode(&clean_review(t), None))
        .collect::<Result<Vec<_>, _>>()?;
    let scores = score_labels(
        &model,
        &prompts,
        builder.label_token_ids(),
        builder.pad_id(),
        32,
        &device,
        &mut |_| {},
    )?;
    let mut out = std::io::stdout().lock();
    for (text, s) in texts.iter().zip(scores) {
        let p = positive_probability(s);
        let label = if s[1] > s[0] { "positive" } else { "negative" };
        let preview: String = text.chars().take(60).collect();
        let more = if text.chars().count() > 60 { "…" } else { "" };
        writeln!(out, "{label}\t{p:.4}\t{preview}{more}")?;
    }
    Ok(())
}

/// `kd quantize`.
pub fn quantize(args: QuantizeArgs) -> Result<()> {
    let device = DeviceChoice::Cpu.device()?;
    let spec = QuantSpec {
        bits: args.bits,
        block: args.block,
        embeddings: args.embeddings,
    };
    let report = quantize_checkpoint(&args.model, &args.out, &spec, &device)?;
    // The quantized copy is evaluated at the length the original was trained at.
    let trained = args.model.join(TRAINED_WITH_FILE);
    if trained.is_file() {
        let to = args.out.join(TRAINED_WITH_FILE);
        std::fs::copy(&trained, &to).with_context(|| format!("writing {}", to.display()))?;
    }
    tracing::info!(
        out = %args.out.display(),
        tensors = report.quantized_tensors,
        max_abs_error = report.max_abs_error,
        from_bytes = report.source_bytes,
        to_bytes = report.quantized_bytes,
        "wrote int{} model",
        args.bits
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_length_comes_from_the_flag_then_the_checkpoint_then_the_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(prompt_len(dir.path(), None).ok(), Some(DEFAULT_MAX_LEN));
        std::fs::write(dir.path().join(TRAINED_WITH_FILE), r#"{"max_len": 96}"#).expect("write");
        assert_eq!(prompt_len(dir.path(), None).ok(), Some(96));
        assert_eq!(prompt_len(dir.path(), Some(300)).ok(), Some(300));
        std::fs::write(dir.path().join(TRAINED_WITH_FILE), "{").expect("write");
        let err = prompt_len(dir.path(), None).expect_err("torn kd.json");
        assert!(format!("{err:#}").contains("kd.json"), "{err:#}");
    }

    #[test]
    fn an_empty_review_file_is_an_error_naming_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("empty.csv");
        std::fs::write(&path, "").expect("write");
        let msg = format!("{:#}", load_reviews(Some(&path)).expect_err("empty"));
        assert!(msg.contains("empty.csv"), "{msg}");
        // A header and nothing else.
        std::fs::write(&path, "review,sentiment\n").expect("write");
        let msg = format!("{:#}", load_reviews(Some(&path)).expect_err("no rows"));
        assert!(
            msg.contains("empty.csv") && msg.contains("no reviews"),
            "{msg}"
        );
    }
}
