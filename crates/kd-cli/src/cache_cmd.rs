//! `kd cache-teacher`: run a teacher checkpoint once over a preset's training set and store
//! its top-k log-probabilities at every supervised position (`kd_train::TeacherCache`), so
//! that distillation can read them instead of running the teacher again.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use kd_imdb::prompt::PromptBuilder;
use kd_qwen::load_checkpoint;
use kd_train::{BuildOptions, Fingerprint, TeacherCache};
use tracing::info;

use crate::device::DeviceChoice;
use crate::distill::Reviews;
use crate::preset::Preset;

/// Flags of `kd cache-teacher`.
#[derive(Debug, clap::Args)]
pub struct CacheTeacherArgs {
    /// The teacher checkpoint folder (Hugging Face layout).
    #[arg(long, value_name = "DIR")]
    pub teacher: PathBuf,
    /// Where to write the cache (a folder; an earlier cache there is replaced).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// The preset whose training set (and `distill.temperature`) the cache is for: `tiny`,
    /// `smoke` or a preset TOML file. Use the same preset and overrides as `kd distill`.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Override `data.train_size` (as `kd distill --train-size`).
    #[arg(long)]
    pub train_size: Option<usize>,
    /// Override the data seed (as `kd distill --seed`).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Token ids kept per supervised position (6·k bytes each). On the tiny preset k = 256
    /// put the cached-teacher student within 0.25 points of the live-teacher one and k = 64
    /// 1.05 points below it (docs/teacher-cache.md).
    #[arg(long, default_value_t = 256)]
    pub k: usize,
    /// Distillation temperature of the cached log-probabilities; default: the preset's.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Examples per teacher forward pass; default: the preset's `eval.batch_size`.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Compute device.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Never download: use only the local mirror (`KD_MIRROR`) and the cache.
    #[arg(long)]
    pub offline: bool,
}

/// Builds and writes the cache.
pub fn run(args: CacheTeacherArgs) -> Result<()> {
    let started = Instant::now();
    let mut preset = Preset::load(&args.preset)?;
    if let Some(n) = args.train_size {
        preset.data.train_size = n;
    }
    if let Some(seed) = args.seed {
        preset.data.seed = seed;
    }
    let temperature = args.temperature.unwrap_or(preset.distill.temperature);
    let batch_size = args.batch_size.unwrap_or(preset.eval.batch_size);
    let device = args.device.device()?;

    // 1. The training set exactly as `kd distill` draws it.
    let Reviews {
        tokenizer,
        train: train_reviews,
        ..
    } = Reviews::draw(&preset, args.offline)?;
    let d = &preset.data;
    let builder = PromptBuilder::new(&tokenizer, d.max_len)?;
    let examples = builder.encode_batch(&train_reviews, true)?;
    let ids: Vec<String> = train_reviews.iter().map(|r| r.id.clone()).collect();
    info!(examples = examples.len(), tokenizer = %tokenizer.display(), "training set");

    // 2. Fingerprint (hashes the whole teacher checkpoint) and the teacher itself.
    let t = Instant::now();
    let fingerprint = Fingerprint::compute(&tokenizer, d.max_len, temperature, &args.teacher)?;
    info!(
        seconds = t.elapsed().as_secs_f64(),
        teacher_sha256 = fingerprint.teacher_sha256,
        "fingerprint"
    );
    let teacher = load_checkpoint(&args.teacher, &device)
        .with_context(|| format!("loading teacher {}", args.teacher.display()))?;
    if args.k > teacher.config().vocab_size {
        bail!(
            "--k {} exceeds the teacher's vocabulary of {}",
            args.k,
            teacher.config().vocab_size
        );
    }

    // 3. One pass of the teacher.
    let bar = ProgressBar::new(examples.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>24} [{bar:30}] {pos}/{len} ({eta} left)")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix("teacher top-k");
    let options = BuildOptions {
        k: args.k,
        batch_size,
    };
    let cache = TeacherCache::build(&teacher, &ids, &examples, options, fingerprint, &mut |n| {
        bar.set_position(n as u64)
    });
    bar.finish();
    let cache = cache?;

    // 4. Write it and say what it costs.
    let bytes = cache.save(&args.out)?;
    let rows = cache.rows().max(1);
    let line = format!(
        "cached {} examples, {} supervised tokens, k = {}, T = {temperature}: {bytes} bytes, \
         {:.1} bytes per supervised token ({} of them top-k payload) → {} ({:.0} s)",
        cache.ids().len(),
        cache.rows(),
        cache.k(),
        bytes as f64 / rows as f64,
        cache.bytes_per_supervised_token(),
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    info!("{line}");
    eprintln!("{line}");
    Ok(())
}
