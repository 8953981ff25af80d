//! Benchmark of weight-only quantization: on-disk size, eval throughput, accuracy and label
//! agreement with the f32 model, for the teacher and the KD student of a distill run.
//!
//! ```text
//! cargo run -p kd-infer --example bench_quant -- [RUN_DIR] [--reviews N] [--block N] [--out FILE]
//! ```
//!
//! RUN_DIR defaults to the newest `runs/tiny-*` with a `report.json`, else the newest run of
//! any preset. Reviews: a label-balanced sample of the aclImdb test split, seed 17 (the same
//! sample `kd distill` draws for its test set when the sizes agree). Quantized copies are
//! written under `target/bench-quant/<run name>/`. The table goes to `docs/bench-quant.md`.

#![allow(clippy::print_stdout)] // a benchmark's report is its output

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use burn::tensor::Device;
use kd_imdb::assets::{Asset, AssetOptions, resolve};
use kd_imdb::{PromptBuilder, balanced_sample, clean_review, read_aclimdb_archive};
use kd_infer::quant::{QuantSpec, quantize_checkpoint, weight_bytes};
use kd_infer::{EvalSummary, LabelScores, agreement, evaluate_full, load_model};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Prompt length of the presets (`max_len = 192` in `tiny`).
const MAX_LEN: usize = 192;
/// The presets' eval batch size.
const BATCH: usize = 64;
/// Input features per scale (`kd quantize`'s default); `--block N` overrides it.
const BLOCK: usize = 32;
/// Seed of the test sample (the presets' data seed).
const SEED: u64 = 17;

fn newest_run() -> Res<PathBuf> {
    let mut runs: Vec<(bool, SystemTime, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir("runs")? {
        let dir = entry?.path();
        let report = dir.join("report.json");
        if let Ok(meta) = std::fs::metadata(&report) {
            let tiny = dir
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("tiny"));
            runs.push((tiny, meta.modified()?, dir));
        }
    }
    runs.sort();
    Ok(runs.pop().ok_or("no run with a report.json under runs/")?.2)
}

struct Row {
    model: String,
    variant: String,
    bytes: u64,
    summary: EvalSummary,
    agreement: f64,
    acc_delta: f64,
}

fn eval(model_dir: &Path, data: &Data, device: &Device) -> Res<(EvalSummary, Vec<LabelScores>)> {
    let model = load_model(model_dir, device)?;
    Ok(evaluate_full(
        &model,
        &data.prompts,
        &data.labels,
        &data.words,
        data.label_ids,
        data.pad_id,
        BATCH,
        device,
        &mut |_| {},
    )?)
}

struct Data {
    prompts: Vec<kd_imdb::Example>,
    labels: Vec<usize>,
    words: Vec<usize>,
    label_ids: [u32; 2],
    pad_id: u32,
}

fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let (mut run, mut reviews, mut out) = (None, 2000usize, PathBuf::from("docs/bench-quant.md"));
    let mut block = BLOCK;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--reviews" => reviews = args.next().ok_or("--reviews N")?.parse()?,
            "--out" => out = args.next().ok_or("--out FILE")?.into(),
            "--block" => block = args.next().ok_or("--block N")?.parse()?,
            _ => run = Some(PathBuf::from(a)),
        }
    }
    let run = match run {
        Some(r) => r,
        None => newest_run()?,
    };
    let device = Device::flex();
    // Quantized copies go to the build folder, not into the run (which may not be ours).
    let run_name = run
        .file_name()
        .map_or("run".into(), |n| n.to_string_lossy().to_string());
    let scratch = PathBuf::from("target/bench-quant").join(run_name);

    // 1. Data: the test sample, tokenised as in training.
    let options = AssetOptions::from_env();
    let corpus = read_aclimdb_archive(resolve(Asset::ImdbArchive, &options)?)?;
    let test = balanced_sample(&corpus.test, reviews, SEED)?;
    drop(corpus);
    let builder = PromptBuilder::new(resolve(Asset::QwenTokenizer, &options)?, MAX_LEN)?;
    let data = Data {
        prompts: builder.encode_batch(&test, false)?,
        labels: test.iter().map(|r| r.label.index()).collect(),
        words: test
            .iter()
            .map(|r| clean_review(&r.text).split_whitespace().count())
            .collect(),
        label_ids: builder.label_token_ids(),
        pad_id: builder.pad_id(),
    };

    // 2. Each model in f32, then each quantized variant against it.
    let variants = [(8, false), (4, false), (8, true), (4, true)];
    let mut rows = Vec::new();
    let mut checks = Vec::new();
    for name in ["teacher", "kd_student"] {
        let src = run.join("checkpoints").join(name);
        // Warm-up: the first batches pay for allocation and thread start-up.
        let warm = load_model(&src, &device)?;
        kd_infer::score_labels(
            &warm,
            &data.prompts[..BATCH.min(data.prompts.len())],
            data.label_ids,
            data.pad_id,
            BATCH,
            &device,
            &mut |_| {},
        )?;
        drop(warm);
        let (base, base_scores) = eval(&src, &data, &device)?;
        println!("{name} f32: accuracy {:.4}", base.accuracy);
        rows.push(Row {
            model: name.into(),
            variant: "f32".into(),
            bytes: weight_bytes(&src)?,
            acc_delta: 0.0,
            agreement: 1.0,
            summary: base.clone(),
        });
        for (bits, embeddings) in variants {
            let variant = format!("int{bits}{}", if embeddings { " + emb" } else { "" });
            let dir = scratch.join(format!(
                "{name}-int{bits}{}",
                if embeddings { "-emb" } else { "" }
            ));
            let spec = QuantSpec {
                bits,
                block,
                embeddings,
            };
            let started = Instant::now();
            quantize_checkpoint(&src, &dir, &spec, &device)?;
            let quantize_s = started.elapsed().as_secs_f64();
            let (s, scores) = eval(&dir, &data, &device)?;
            let agree = agreement(&base_scores, &scores);
            let delta = 100.0 * (s.accuracy - base.accuracy);
            println!(
                "{name} {variant}: accuracy {:.4}, agreement {agree:.4} \
                 (quantized in {quantize_s:.1} s)",
                s.accuracy
            );
            let (min_agree, max_delta) = if bits == 8 { (0.99, 0.5) } else { (0.97, 1.5) };
            checks.push(format!(
                "- {name} {variant}: agreement {:.2}% (≥ {:.0}%: {}), \
                 accuracy Δ {delta:+.2} pts \
                 (within ±{max_delta}: {})",
                100.0 * agree,
                100.0 * min_agree,
                if agree >= min_agree { "pass" } else { "FAIL" },
                if delta.abs() <= max_delta {
                    "pass"
                } else {
                    "FAIL"
                },
            ));
            rows.push(Row {
                model: name.into(),
                variant,
                bytes: weight_bytes(&dir)?,
                summary: s,
                agreement: agree,
                acc_delta: delta,
            });
        }
    }

    // 3. The report.
    let mut md = String::new();
    writeln!(
        md,
        "# Weight-only quantization: size, throughput, answers\n"
    )?;
    writeln!(
        md,
        "Generated by `cargo run -p kd-infer --example bench_quant -- {} --reviews {} \
         --block {block}` \
         (checkpoints of run `{}`; {} test reviews, a label-balanced sample of the aclImdb \
         test split with seed {SEED}; prompts cut to {MAX_LEN} tokens; batch {BATCH}; \
         block {block}; CPU, burn Flex, f32).\n",
        run.display(),
        data.prompts.len(),
        run.display(),
        data.prompts.len()
    )?;
    writeln!(
        md,
        "| model | weights | on disk (MB) | vs f32 | accuracy | Δ acc (pts) | agreement | \
         ROC AUC | reviews/s | tokens/s |"
    )?;
    writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    let f32_bytes = |model: &str| {
        rows.iter()
            .find(|r| r.model == model && r.variant == "f32")
            .map_or(1, |r| r.bytes)
    };
    for r in &rows {
        writeln!(
            md,
            "| {} | {} | {:.1} | {:.2}× | {:.2}% | {:+.2} | {:.2}% | {} | {:.1} | {:.0} |",
            r.model,
            r.variant,
            r.bytes as f64 / 1e6,
            r.bytes as f64 / f32_bytes(&r.model) as f64,
            100.0 * r.summary.accuracy,
            r.acc_delta,
            100.0 * r.agreement,
            r.summary
                .roc_auc
                .map_or("n/a".into(), |a| format!("{a:.4}")),
            r.summary.reviews_per_s,
            r.summary.tokens_per_s,
        )?;
    }
    writeln!(
        md,
        "\nAcceptance (int8: agreement ≥ 99%, |Δ acc| ≤ 0.5; int4: ≥ 97%, ≤ 1.5):\n"
    )?;
    for c in &checks {
        writeln!(md, "{c}")?;
    }
    writeln!(
        md,
        "\nHow to read it:\n\n\
         - `intN` quantizes every linear layer (q/k/v/o, gate/up/down, an untied LM head) with \
         symmetric absmax scales per block of {block} input features; `+ emb` also quantizes \
         the token embedding, which the tied LM head shares. Norms and biases stay f32.\n\
         - Loading is **dequantize-on-load**: the codes are turned back into f32 weights and \
         the ordinary model runs, so throughput is the f32 throughput (differences are \
         machine noise; the machine is shared) and memory at run time is f32. The saving is \
         on disk. A fused int8/int4 matmul would be needed for a speed or memory win (see the \
         FIXME in `crates/kd-infer/src/quant.rs`).\n\
         - These models are small and their vocabulary is Qwen's 151,936 tokens, so the \
         embedding holds most of the weights: quantizing only the linear layers barely changes \
         the file; `+ emb` is where the size goes down.\n\
         - Agreement: the fraction of reviews on which the quantized model prefers the same \
         label word as the f32 model."
    )?;
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&out, &md)?;
    print!("{md}");
    Ok(())
}
