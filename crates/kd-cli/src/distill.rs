//! `kd distill`: data → teacher → KD student and baseline student → evaluation → report.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kd_imdb::assets::{Asset, AssetOptions, resolve};
use kd_imdb::prompt::PromptBuilder;
use kd_imdb::{Example, Review, ValSize, balanced_sample, read_aclimdb_archive, stratified_split};
use kd_infer::{EvalReport, LabelScores, evaluate};
use kd_qwen::{Qwen, load_checkpoint, save_checkpoint};
use kd_train::{Objective, StepMetrics, TrainSummary, inference_copy, train};
use serde::Serialize;
use tracing::info;

use crate::device::DeviceChoice;
use crate::preset::Preset;

/// Flags of `kd distill`.
#[derive(Debug, clap::Args)]
pub struct DistillArgs {
    /// A built-in preset (`tiny`, `smoke`) or a preset TOML file.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Override `data.train_size`.
    #[arg(long)]
    pub train_size: Option<usize>,
    /// Override `data.student_train_size`.
    #[arg(long)]
    pub student_train_size: Option<usize>,
    /// Override `data.test_size`.
    #[arg(long)]
    pub test_size: Option<usize>,
    /// Override the number of optimizer steps of the teacher and both students, as
    /// `TEACHER,STUDENT` or one number for both.
    #[arg(long, value_parser = parse_steps)]
    pub steps: Option<(usize, usize)>,
    /// Override every seed of the preset.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Run folder; default `runs/<preset>-<UTC timestamp>`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Compute device.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Never download: use only the local mirror (`KD_MIRROR`) and the cache.
    #[arg(long)]
    pub offline: bool,
    /// Use this checkpoint folder (Hugging Face layout, e.g. a fine-tuned Qwen3-4B or the
    /// `checkpoints/teacher` of an earlier run) as the teacher instead of training one. It
    /// must share the student's tokenizer.
    #[arg(long, value_name = "DIR")]
    pub teacher: Option<PathBuf>,
}

fn parse_steps(s: &str) -> Result<(usize, usize), String> {
    let parse = |x: &str| x.trim().parse::<usize>().map_err(|e| format!("`{x}`: {e}"));
    match s.split_once(',') {
        Some((t, st)) => Ok((parse(t)?, parse(st)?)),
        None => parse(s).map(|n| (n, n)),
    }
}

/// Everything `report.json` holds.
#[derive(Debug, Serialize)]
struct Report {
    preset: String,
    device: DeviceChoice,
    train_examples: usize,
    student_train_examples: usize,
    val_examples: usize,
    test_examples: usize,
    truncated_train_fraction: f64,
    teacher_params: usize,
    student_params: usize,
    teacher: ModelReport,
    kd_student: ModelReport,
    baseline_student: ModelReport,
    /// KD student's test accuracy minus the baseline's, in points.
    kd_gain_points: f64,
    /// Test reviews the KD student gets right and the baseline wrong, and the reverse.
    discordant: (usize, usize),
    /// Two-sided exact McNemar p-value of the KD/baseline difference on the same reviews.
    mcnemar_p: f64,
    phase_seconds: Vec<(String, f64)>,
    total_seconds: f64,
}

#[derive(Debug, Serialize)]
struct ModelReport {
    /// `None` for a teacher loaded with `--teacher`.
    train: Option<TrainSummary>,
    val: EvalReport,
    test: EvalReport,
}

/// Runs the whole job.
pub fn run(args: DistillArgs) -> Result<()> {
    let started = Instant::now();
    let mut preset = Preset::load(&args.preset)?;
    apply_overrides(&mut preset, &args);
    let device = args.device.device()?;
    let out = args.out.clone().unwrap_or_else(|| {
        let stamp = chrono::Utc::now().format("%Y%m%d-%H%M%S");
        PathBuf::from("runs").join(format!("{}-{stamp}", preset.name))
    });
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join("config.toml"), toml::to_string_pretty(&preset)?)
        .with_context(|| format!("writing {}/config.toml", out.display()))?;
    info!(out = %out.display(), preset = preset.name, "run folder");
    let mut phases: Vec<(String, f64)> = Vec::new();
    let mut metrics =
        BufWriter::new(File::create(out.join("metrics.jsonl")).context("creating metrics.jsonl")?);

    // 1. Data: resolve the files, read the archive, sample and split.
    let t = Instant::now();
    let asset_options = AssetOptions {
        offline: args.offline,
        ..AssetOptions::from_env()
    };
    let archive = resolve(Asset::ImdbArchive, &asset_options)?;
    let tokenizer = resolve(Asset::QwenTokenizer, &asset_options)?;
    info!(archive = %archive.display(), tokenizer = %tokenizer.display(), "inputs");
    let corpus = spinner("reading aclImdb", || read_aclimdb_archive(&archive))?;
    let d = &preset.data;
    let pool = balanced_sample(&corpus.train, d.train_size + d.val_size, d.seed)?;
    let (train_reviews, val_reviews) = stratified_split(&pool, ValSize::Count(d.val_size), d.seed)?;
    // Test reviews come only from the aclImdb test split.
    let test_reviews = balanced_sample(&corpus.test, d.test_size, d.seed)?;
    drop(corpus);

    // 2. Tokenise: training examples carry the answer; evaluation prompts stop before it.
    let builder = PromptBuilder::new(&tokenizer, d.max_len)?;
    let train_examples = encode(&builder, &train_reviews, true, "tokenising train")?;
    let val_prompts = encode(&builder, &val_reviews, false, "tokenising val")?;
    let test_prompts = encode(&builder, &test_reviews, false, "tokenising test")?;
    let val_labels: Vec<usize> = val_reviews.iter().map(|r| r.label.index()).collect();
    let test_labels: Vec<usize> = test_reviews.iter().map(|r| r.label.index()).collect();
    let truncated = train_examples.iter().filter(|e| e.truncated).count();
    let (label_ids, pad_id) = (builder.label_token_ids(), builder.pad_id());
    phases.push(("data".into(), t.elapsed().as_secs_f64()));

    let train_device = device.clone().autodiff();
    // Validation and test reports, and the test scores for the review-by-review comparison.
    type Evaluated = (EvalReport, EvalReport, Vec<LabelScores>);
    let evaluate_both = |model: &Qwen, what: &str| -> Result<Evaluated> {
        let bs = preset.eval.batch_size;
        let (val, _) = with_bar(&format!("eval {what} (val)"), val_prompts.len(), |bar| {
            evaluate(
                model,
                &val_prompts,
                &val_labels,
                label_ids,
                pad_id,
                bs,
                &device,
                &mut |n| bar.set_position(n as u64),
            )
            .map_err(anyhow::Error::from)
        })?;
        let (test, test_scores) =
            with_bar(&format!("eval {what} (test)"), test_prompts.len(), |bar| {
                evaluate(
                    model,
                    &test_prompts,
                    &test_labels,
                    label_ids,
                    pad_id,
                    bs,
                    &device,
                    &mut |n| bar.set_position(n as u64),
                )
                .map_err(anyhow::Error::from)
            })?;
        info!(
            model = what,
            val = val.accuracy,
            test = test.accuracy,
            "accuracy"
        );
        Ok((val, test, test_scores))
    };

    // 3. Teacher: loaded, or trained from scratch with cross-entropy on the labels.
    let t = Instant::now();
    let (teacher, teacher_summary) = match &args.teacher {
        Some(dir) => {
            let teacher = load_checkpoint(dir, &device)?;
            info!(teacher = %dir.display(), params = teacher.config().num_params(), "teacher loaded");
            (teacher, None)
        }
        None => {
            train_device.seed(preset.teacher.train.seed);
            let teacher = Qwen::new(&preset.teacher.qwen_config(), &train_device);
            let (teacher, summary) = train_phase(
                "teacher",
                teacher,
                &train_examples,
                pad_id,
                &preset.teacher.train,
                &Objective::Labels,
                &mut metrics,
            )?;
            let teacher = inference_copy(&teacher);
            save_checkpoint(&teacher, &out.join("checkpoints/teacher"))?;
            (teacher, Some(summary))
        }
    };
    let teacher_cfg = teacher.config().clone();
    phases.push(("teacher".into(), t.elapsed().as_secs_f64()));
    let t = Instant::now();
    let (teacher_val, teacher_test, _) = evaluate_both(&teacher, "teacher")?;
    phases.push(("teacher_eval".into(), t.elapsed().as_secs_f64()));

    // 4. Students: same shape, seed, data and steps; one distilled, one on labels alone.
    let student_cfg = preset.student.qwen_config();
    let student_examples = &train_examples[..d
        .student_train_size
        .unwrap_or(train_examples.len())
        .min(train_examples.len())];
    let kd = preset.distill.kd_config()?;
    let mut students = Vec::new();
    for (name, objective) in [
        (
            "kd_student",
            Objective::Distill {
                teacher: &teacher,
                kd: kd.clone(),
                alpha: preset.distill.alpha,
            },
        ),
        ("baseline_student", Objective::Labels),
    ] {
        let t = Instant::now();
        train_device.seed(preset.student.train.seed);
        let student = Qwen::new(&student_cfg, &train_device);
        let (student, summary) = train_phase(
            name,
            student,
            student_examples,
            pad_id,
            &preset.student.train,
            &objective,
            &mut metrics,
        )?;
        let student = inference_copy(&student);
        save_checkpoint(&student, &out.join("checkpoints").join(name))?;
        phases.push((format!("{name}_train"), t.elapsed().as_secs_f64()));
        let t = Instant::now();
        let (val, test, scores) = evaluate_both(&student, name)?;
        phases.push((format!("{name}_eval"), t.elapsed().as_secs_f64()));
        students.push((
            ModelReport {
                train: Some(summary),
                val,
                test,
            },
            scores,
        ));
    }
    metrics.flush()?;
    let (baseline, baseline_scores) = students.pop().context("baseline student missing")?;
    let (kd_student, kd_scores) = students.pop().context("KD student missing")?;

    // 5. Paired comparison on the same test reviews.
    let right = |s: &[f32; 2], label: usize| usize::from(s[1] > s[0]) == label;
    let mut discordant = (0, 0);
    for ((k, b), &label) in kd_scores.iter().zip(&baseline_scores).zip(&test_labels) {
        match (right(k, label), right(b, label)) {
            (true, false) => discordant.0 += 1,
            (false, true) => discordant.1 += 1,
            _ => {}
        }
    }
    let report = Report {
        preset: preset.name.clone(),
        device: args.device,
        train_examples: train_examples.len(),
        student_train_examples: student_examples.len(),
        val_examples: val_prompts.len(),
        test_examples: test_prompts.len(),
        truncated_train_fraction: truncated as f64 / train_examples.len().max(1) as f64,
        teacher_params: teacher_cfg.num_params(),
        student_params: student_cfg.num_params(),
        kd_gain_points: 100.0 * (kd_student.test.accuracy - baseline.test.accuracy),
        discordant,
        mcnemar_p: mcnemar_exact(discordant.0, discordant.1),
        teacher: ModelReport {
            train: teacher_summary,
            val: teacher_val,
            test: teacher_test,
        },
        kd_student,
        baseline_student: baseline,
        phase_seconds: phases,
        total_seconds: started.elapsed().as_secs_f64(),
    };
    write_report(&out, &report)?;
    let line = format!(
        "teacher {:.1}% · KD student {:.1}% · baseline student {:.1}% on {} test reviews ({:.0} s) → {}",
        100.0 * report.teacher.test.accuracy,
        100.0 * report.kd_student.test.accuracy,
        100.0 * report.baseline_student.test.accuracy,
        report.test_examples,
        report.total_seconds,
        out.join("report.md").display()
    );
    info!("{line}");
    eprintln!("{line}");
    Ok(())
}

fn apply_overrides(preset: &mut Preset, args: &DistillArgs) {
    if let Some(n) = args.train_size {
        preset.data.train_size = n;
    }
    if let Some(n) = args.student_train_size {
        preset.data.student_train_size = Some(n);
    }
    if let Some(n) = args.test_size {
        preset.data.test_size = n;
    }
    if let Some((teacher, student)) = args.steps {
        preset.teacher.train.steps = teacher;
        preset.student.train.steps = student;
        for section in [&mut preset.teacher, &mut preset.student] {
            section.train.warmup_steps = section.train.warmup_steps.min(section.train.steps / 2);
        }
    }
    if let Some(seed) = args.seed {
        preset.data.seed = seed;
        preset.teacher.train.seed = seed;
        preset.student.train.seed = seed;
    }
}

fn encode(
    builder: &PromptBuilder,
    reviews: &[Review],
    with_label: bool,
    what: &str,
) -> Result<Vec<Example>> {
    with_bar(what, reviews.len(), |bar| {
        reviews
            .iter()
            .map(|r| {
                bar.inc(1);
                Ok(builder.encode_review(r, with_label)?)
            })
            .collect()
    })
}

fn train_phase(
    name: &str,
    model: Qwen,
    examples: &[Example],
    pad_id: u32,
    config: &kd_train::TrainConfig,
    objective: &Objective<'_>,
    metrics: &mut impl Write,
) -> Result<(Qwen, TrainSummary)> {
    with_bar(&format!("train {name}"), config.steps, |bar| {
        let mut write_err = None;
        let out = train(
            model,
            examples,
            pad_id,
            config,
            objective,
            &mut |m: &StepMetrics| {
                bar.set_position(m.step as u64);
                bar.set_message(format!("loss {:.4} · {:.0} tok/s", m.loss, m.tokens_per_s));
                let line = serde_json::json!({ "phase": name, "metrics": m });
                // One flushed line per step: a crash loses nothing already reported.
                if let Err(e) = writeln!(metrics, "{line}").and_then(|()| metrics.flush()) {
                    write_err.get_or_insert(e);
                }
            },
        )?;
        if let Some(e) = write_err {
            return Err(e).context("writing metrics.jsonl");
        }
        Ok(out)
    })
}

fn with_bar<T>(what: &str, len: usize, f: impl FnOnce(&ProgressBar) -> Result<T>) -> Result<T> {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>24} [{bar:30}] {pos}/{len} ({eta} left) {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    let out = f(&bar);
    bar.finish();
    out
}

fn spinner<T, E: Into<anyhow::Error>>(what: &str, f: impl FnOnce() -> Result<T, E>) -> Result<T> {
    let bar = ProgressBar::new_spinner();
    bar.set_message(what.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let out = f().map_err(Into::into);
    bar.finish_and_clear();
    out
}

/// Two-sided exact McNemar test: under "no difference" each of the `b + c` discordant
/// reviews is a fair coin, so p = min(1, 2 * P[Binomial(b + c, 1/2) <= min(b, c)]).
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    // Sum C(n, i) / 2^n in log space to stay finite for n in the thousands.
    let ln_choose = |n: usize, i: usize| -> f64 {
        (1..=i)
            .map(|j| ((n - i + j) as f64).ln() - (j as f64).ln())
            .sum()
    };
    let tail: f64 = (0..=k)
        .map(|i| (ln_choose(n, i) - n as f64 * std::f64::consts::LN_2).exp())
        .sum();
    (2.0 * tail).min(1.0)
}

fn write_report(out: &Path, report: &Report) -> Result<()> {
    let json = serde_json::to_string_pretty(report)?;
    std::fs::write(out.join("report.json"), json).context("writing report.json")?;
    let row = |name: &str, m: &ModelReport| {
        let train = |f: fn(&TrainSummary) -> String| m.train.as_ref().map_or("loaded".into(), f);
        format!(
            "| {name} | {:.2}% | {:.2}% | {} | {} | {:.0} | {} |\n",
            100.0 * m.test.accuracy,
            100.0 * m.val.accuracy,
            train(|t| format!("{:.4}", t.final_loss)),
            train(|t| format!("{:.0}", t.tokens_per_s)),
            m.test.tokens_per_s,
            train(|t| format!("{:.1}", t.seconds)),
        )
    };
    let mut md = format!(
        "# kd distill — preset `{}`\n\n{} training reviews ({} seen by the students), {} validation, {} test (aclImdb test split, balanced).\n\
         Teacher {} parameters, students {} parameters each.\n\n\
         | model | test acc | val acc | final train loss | train tok/s | eval tok/s | train s |\n\
         |---|---|---|---|---|---|---|\n",
        report.preset,
        report.train_examples,
        report.student_train_examples,
        report.val_examples,
        report.test_examples,
        report.teacher_params,
        report.student_params,
    );
    md += &row("teacher", &report.teacher);
    md += &row("KD student", &report.kd_student);
    md += &row("baseline student (CE only)", &report.baseline_student);
    md += &format!(
        "\nKD − baseline: {:+.2} points; discordant reviews {} (KD right) / {} (baseline right); \
         exact McNemar p = {:.3}.\n\n| phase | seconds |\n|---|---|\n",
        report.kd_gain_points, report.discordant.0, report.discordant.1, report.mcnemar_p
    );
    for (phase, s) in &report.phase_seconds {
        md += &format!("| {phase} | {s:.1} |\n");
    }
    md += &format!("| total | {:.1} |\n", report.total_seconds);
    std::fs::write(out.join("report.md"), md).context("writing report.md")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOL: f64 = 1e-12;

    #[test]
    fn mcnemar_matches_hand_values() {
        // b = 0, c = 3: 2 * (1/8) = 0.25.
        assert!((mcnemar_exact(0, 3) - 0.25).abs() < TOL);
        // b = 1, c = 4: 2 * (1 + 5) / 32 = 0.375.
        assert!((mcnemar_exact(1, 4) - 0.375).abs() < TOL);
        // Symmetric and capped at 1.
        assert!((mcnemar_exact(4, 1) - 0.375).abs() < TOL);
        assert!((mcnemar_exact(5, 5) - 1.0).abs() < TOL);
    }

    #[test]
    fn steps_flag_takes_one_or_two_numbers() {
        assert_eq!(parse_steps("10"), Ok((10, 10)));
        assert_eq!(parse_steps("30,12"), Ok((30, 12)));
        assert!(parse_steps("a").is_err());
    }
}
