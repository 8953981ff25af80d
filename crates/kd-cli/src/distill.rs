//! `kd distill`: data → teacher → KD student and baseline student → evaluation → report.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use burn::module::Module;
use indicatif::{ProgressBar, ProgressStyle};
use kd_imdb::assets::{Asset, AssetOptions, resolve};
use kd_imdb::prompt::PromptBuilder;
use kd_imdb::{Example, Review, ValSize, balanced_sample, read_aclimdb_archive, stratified_split};
use kd_infer::{EvalReport, LabelScores, evaluate};
use kd_qwen::{
    Qwen, attach_lora, has_lora, load_checkpoint, merge_lora, save_adapters, save_checkpoint,
};
use kd_train::{
    Fingerprint, Objective, RunOptions, StepMetrics, TeacherCache, TrainSummary, Validation,
    checkpoint_sha256, inference_copy, sha256_file, template_sha256, train,
};
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
    /// Continue the run in `--out DIR`: finished models are loaded, an interrupted one
    /// resumes from its newest checkpoint.
    #[arg(long, requires = "out")]
    pub resume: bool,
    /// Use this checkpoint folder (Hugging Face layout, e.g. a fine-tuned Qwen3-4B or the
    /// `checkpoints/teacher` of an earlier run) as the teacher instead of training one. It
    /// must share the student's tokenizer.
    #[arg(long, value_name = "DIR")]
    pub teacher: Option<PathBuf>,
    /// Fine-tune the `--teacher` checkpoint on the training labels before distilling (all
    /// weights, or LoRA adapters when the preset has a `[teacher.lora]` table), with the
    /// preset's teacher optimisation settings.
    #[arg(long, requires = "teacher", conflicts_with = "teacher_cache")]
    pub finetune_teacher: bool,
    /// Distil the KD student from a teacher cache written by `kd cache-teacher` (top-k
    /// log-probabilities) instead of running a teacher. The cache must have been built with
    /// this run's tokenizer, prompt template, `max_len` and temperature. With `--teacher`
    /// too, that checkpoint must be the cache's teacher, and it is evaluated for the report
    /// (never run during training); without, no teacher is trained or evaluated.
    #[arg(long, value_name = "DIR")]
    pub teacher_cache: Option<PathBuf>,
    /// Also train a "step-by-step" student on a rationale CSV written by `kd rationales`:
    /// every student review keeps its label-only example, and a review with a rationale adds
    /// a second one that answers with the reasoning in the think block, then the label.
    /// It is evaluated on labels only and reported beside the KD student.
    #[arg(long, value_name = "CSV")]
    pub rationales: Option<PathBuf>,
    /// Weight of a rationale example relative to a label-only one (each example's tokens
    /// share its weight, so a long rationale does not count more than a short one).
    #[arg(long, default_value_t = 1.0, requires = "rationales")]
    pub rationale_weight: f64,
    /// Reasoning tokens kept per rationale example (the rest is cut).
    #[arg(long, default_value_t = 128, requires = "rationales")]
    pub rationale_tokens: usize,
}

fn parse_steps(s: &str) -> Result<(usize, usize), String> {
    let parse = |x: &str| {
        x.trim()
            .parse::<usize>()
            .map_err(|e| format!("`{x}`: {e} (expected TEACHER,STUDENT or one number)"))
    };
    match s.split_once(',') {
        Some((_, st)) if st.contains(',') => {
            Err(format!("`{s}`: expected TEACHER,STUDENT or one number"))
        }
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
    /// `None` when the KD student learned from a cache and no teacher was given.
    teacher_params: Option<usize>,
    student_params: usize,
    /// Where the KD targets came from: `trained`, `loaded <dir>` or `cache <dir>`.
    teacher_source: String,
    /// The teacher cache, when the KD student learned from one.
    #[serde(skip_serializing_if = "Option::is_none")]
    teacher_cache: Option<CacheReport>,
    /// `None` when the KD student learned from a cache and no teacher was given.
    teacher: Option<ModelReport>,
    kd_student: ModelReport,
    baseline_student: ModelReport,
    /// The step-by-step student, with `--rationales`.
    #[serde(skip_serializing_if = "Option::is_none")]
    rationale_student: Option<RationaleReport>,
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
struct RationaleReport {
    csv: PathBuf,
    /// Rationale examples trained on (one per student review with a usable rationale).
    examples: usize,
    /// CSV rows skipped: flagged extractions (unclosed or no tags) and empty reasoning.
    skipped_flagged: usize,
    /// Mean supervised tokens per rationale example (reasoning after the cut, the closing
    /// `</think>`, the label word and `<|im_end|>`).
    mean_supervised_tokens: f64,
    weight: f64,
    /// Test accuracy minus the KD student's, in points.
    minus_kd_points: f64,
    #[serde(flatten)]
    model: ModelReport,
}

#[derive(Debug, Serialize)]
struct CacheReport {
    path: PathBuf,
    k: usize,
    /// Supervised positions cached (over the whole training set).
    rows: usize,
    /// Payload bytes per supervised token (`6 k`: a u32 id and an f16 log-probability each).
    payload_bytes_per_supervised_token: usize,
    /// Size of the cache folder divided by the cached supervised tokens.
    file_bytes_per_supervised_token: f64,
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
    let config = toml::to_string_pretty(&preset)?;
    check_run_folder(&out, &config, args.resume)?;
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join("config.toml"), config)
        .with_context(|| format!("writing {}/config.toml", out.display()))?;
    info!(out = %out.display(), preset = preset.name, "run folder");
    let mut phases: Vec<(String, f64)> = Vec::new();

    // 1. Data: resolve the files, read the archive, sample and split.
    let t = Instant::now();
    let Reviews {
        tokenizer,
        train: train_reviews,
        val: val_reviews,
        test: test_reviews,
    } = Reviews::draw(&preset, args.offline)?;
    let d = &preset.data;

    // 2. Tokenise: training examples carry the answer; evaluation prompts stop before it.
    let builder = PromptBuilder::new(&tokenizer, d.max_len)?;
    let train_examples = encode(&builder, &train_reviews, true, "tokenising train")?;
    let val_prompts = encode(&builder, &val_reviews, false, "tokenising val")?;
    let test_prompts = encode(&builder, &test_reviews, false, "tokenising test")?;
    let val_labels: Vec<usize> = val_reviews.iter().map(|r| r.label.index()).collect();
    let test_labels: Vec<usize> = test_reviews.iter().map(|r| r.label.index()).collect();
    let train_ids: Vec<String> = train_reviews.iter().map(|r| r.id.clone()).collect();
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
    let validation = || Validation {
        prompts: &val_prompts,
        labels: &val_labels,
        label_ids,
        batch_size: preset.eval.batch_size,
        device: device.clone(),
    };
    let cached = match &args.teacher_cache {
        Some(dir) => Some(open_cache(
            dir,
            &tokenizer,
            d.max_len,
            preset.distill.temperature,
            args.teacher.as_deref(),
        )?),
        None => None,
    };
    let (teacher, teacher_summary) = match (&args.teacher, &cached) {
        (Some(dir), _) if args.finetune_teacher => {
            match finished_phase(&out, "teacher", &device)? {
                Some((teacher, summary)) if args.resume => (Some(teacher), Some(summary)),
                _ => {
                    let base = load_checkpoint(dir, &train_device)?;
                    info!(teacher = %dir.display(), "fine-tuning the loaded teacher");
                    let teacher = with_lora(base, preset.teacher.lora.as_ref())?;
                    let (teacher, summary) = train_phase(
                        "teacher",
                        teacher,
                        &train_examples,
                        pad_id,
                        &preset.teacher.train,
                        &Objective::Labels,
                        &out.join("train/teacher"),
                        args.resume,
                        Some(validation()),
                    )?;
                    let teacher = inference_copy(&teacher);
                    let teacher =
                        finish_phase(&out, "teacher", teacher, &summary, &tokenizer, d.max_len)?;
                    (Some(teacher), Some(summary))
                }
            }
        }
        (Some(dir), _) => {
            let teacher = load_checkpoint(dir, &device)?;
            info!(teacher = %dir.display(), params = teacher.config().num_params(), "teacher loaded");
            (Some(teacher), None)
        }
        (None, Some(_)) => (None, None),
        (None, None) => match finished_phase(&out, "teacher", &device)? {
            Some((teacher, summary)) if args.resume => (Some(teacher), Some(summary)),
            _ => {
                train_device.seed(preset.teacher.train.seed);
                let teacher = Qwen::new(&preset.teacher.qwen_config(), &train_device);
                let teacher = with_lora(teacher, preset.teacher.lora.as_ref())?;
                let (teacher, summary) = train_phase(
                    "teacher",
                    teacher,
                    &train_examples,
                    pad_id,
                    &preset.teacher.train,
                    &Objective::Labels,
                    &out.join("train/teacher"),
                    args.resume,
                    Some(validation()),
                )?;
                let teacher = inference_copy(&teacher);
                let teacher =
                    finish_phase(&out, "teacher", teacher, &summary, &tokenizer, d.max_len)?;
                (Some(teacher), Some(summary))
            }
        },
    };
    let teacher_params = teacher.as_ref().map(|t| t.config().num_params());
    phases.push(("teacher".into(), t.elapsed().as_secs_f64()));
    let t = Instant::now();
    let teacher_report = match &teacher {
        Some(teacher) => {
            let (val, test, _) = evaluate_both(teacher, "teacher")?;
            Some(ModelReport {
                train: teacher_summary,
                val,
                test,
            })
        }
        None => None,
    };
    phases.push(("teacher_eval".into(), t.elapsed().as_secs_f64()));
    // With a cache the teacher only served the report: free it before the students train.
    let teacher = if cached.is_some() { None } else { teacher };

    // 4. Students: same shape, seed, data and steps; one distilled, one on labels alone.
    let student_cfg = preset.student.qwen_config();
    let student_examples = &train_examples[..d
        .student_train_size
        .unwrap_or(train_examples.len())
        .min(train_examples.len())];
    let kd = preset.distill.kd_config()?;
    let aligned = match &cached {
        Some((cache, _)) => Some(
            cache
                .aligned(&train_ids[..student_examples.len()], student_examples)
                .with_context(|| {
                    format!(
                        "teacher cache {}",
                        args.teacher_cache
                            .as_deref()
                            .unwrap_or(Path::new(""))
                            .display()
                    )
                })?,
        ),
        None => None,
    };
    let kd_objective = match (&aligned, &teacher) {
        (Some(cache), _) => Objective::CachedTeacher {
            cache,
            kd: kd.clone(),
            alpha: preset.distill.alpha,
        },
        (None, Some(teacher)) => Objective::Distill {
            teacher,
            kd: kd.clone(),
            alpha: preset.distill.alpha,
        },
        (None, None) => anyhow::bail!("no teacher and no teacher cache"),
    };
    // The student's reviews by id, for `kd rationales --ids`.
    let ids_path = out.join("student_ids.txt");
    let mut ids_text =
        String::from("# ids of the reviews the students train on (kd rationales --ids)\n");
    for review in &train_reviews[..student_examples.len()] {
        ids_text.push_str(&review.id);
        ids_text.push('\n');
    }
    std::fs::write(&ids_path, ids_text)
        .with_context(|| format!("writing {}", ids_path.display()))?;

    // The step-by-step student's data: label-only examples, then rationale examples.
    let rationale_data = match &args.rationales {
        Some(csv) => Some(rationale_examples(
            csv,
            &builder,
            &train_reviews[..student_examples.len()],
            student_examples,
            args.rationale_weight,
            args.rationale_tokens,
        )?),
        None => None,
    };
    let mut plan: Vec<(&str, Objective<'_>, &[Example])> = vec![
        ("kd_student", kd_objective, student_examples),
        ("baseline_student", Objective::Labels, student_examples),
    ];
    if let Some(r) = &rationale_data {
        plan.push((
            "rationale_student",
            Objective::WeightedLabels {
                weights: &r.weights,
            },
            &r.examples,
        ));
    }
    let mut students = Vec::new();
    for (name, objective, examples) in plan {
        let t = Instant::now();
        let (student, summary) = match finished_phase(&out, name, &device)? {
            Some(done) if args.resume => done,
            _ => {
                train_device.seed(preset.student.train.seed);
                let student = Qwen::new(&student_cfg, &train_device);
                let student = with_lora(student, preset.student.lora.as_ref())?;
                let (student, summary) = train_phase(
                    name,
                    student,
                    examples,
                    pad_id,
                    &preset.student.train,
                    &objective,
                    &out.join("train").join(name),
                    args.resume,
                    Some(validation()),
                )?;
                let student = inference_copy(&student);
                let student = finish_phase(&out, name, student, &summary, &tokenizer, d.max_len)?;
                (student, summary)
            }
        };
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
    combine_metrics(
        &out,
        &[
            "teacher",
            "kd_student",
            "baseline_student",
            "rationale_student",
        ],
    )?;
    let rationale_student = match rationale_data {
        Some(r) => Some((r, students.pop().context("rationale student missing")?.0)),
        None => None,
    };
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
        teacher_params,
        student_params: student_cfg.num_params(),
        teacher_source: match (&args.teacher_cache, &args.teacher) {
            (Some(dir), _) => format!("cache {}", dir.display()),
            (None, Some(dir)) => format!("loaded {}", dir.display()),
            (None, None) => "trained".into(),
        },
        teacher_cache: cached.as_ref().map(|(_, r)| CacheReport {
            path: r.path.clone(),
            k: r.k,
            rows: r.rows,
            payload_bytes_per_supervised_token: r.payload_bytes_per_supervised_token,
            file_bytes_per_supervised_token: r.file_bytes_per_supervised_token,
        }),
        kd_gain_points: 100.0 * (kd_student.test.accuracy - baseline.test.accuracy),
        discordant,
        mcnemar_p: mcnemar_exact(discordant.0, discordant.1),
        teacher: teacher_report,
        rationale_student: rationale_student.map(|(r, model)| RationaleReport {
            csv: r.csv,
            examples: r.rationale_examples,
            skipped_flagged: r.skipped_flagged,
            mean_supervised_tokens: r.mean_supervised_tokens,
            weight: args.rationale_weight,
            minus_kd_points: 100.0 * (model.test.accuracy - kd_student.test.accuracy),
            model,
        }),
        kd_student,
        baseline_student: baseline,
        phase_seconds: phases,
        total_seconds: started.elapsed().as_secs_f64(),
    };
    write_report(&out, &report)?;
    let teacher_acc = report.teacher.as_ref().map_or("not evaluated".into(), |t| {
        format!("{:.1}%", 100.0 * t.test.accuracy)
    });
    let line = format!(
        "teacher {teacher_acc} · KD student {:.1}% · baseline student {:.1}% on {} test reviews ({:.0} s) → {}",
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

/// The reviews of a run, drawn from the IMDB archive as the preset says, and the tokenizer.
/// `kd cache-teacher` draws through here too, so its cache holds exactly the training
/// examples `kd distill` trains on.
pub(crate) struct Reviews {
    pub tokenizer: PathBuf,
    pub train: Vec<Review>,
    pub val: Vec<Review>,
    pub test: Vec<Review>,
}

impl Reviews {
    pub(crate) fn draw(preset: &Preset, offline: bool) -> Result<Self> {
        let mut asset_options = AssetOptions::from_env();
        asset_options.offline |= offline; // `--offline` adds to `KD_OFFLINE`, never clears it
        let archive = resolve(Asset::ImdbArchive, &asset_options)?;
        let tokenizer = resolve(Asset::QwenTokenizer, &asset_options)?;
        info!(archive = %archive.display(), tokenizer = %tokenizer.display(), "inputs");
        let corpus = spinner("reading aclImdb", || read_aclimdb_archive(&archive))?;
        let d = &preset.data;
        let pool = balanced_sample(&corpus.train, d.train_size + d.val_size, d.seed)?;
        let (train, val) = stratified_split(&pool, ValSize::Count(d.val_size), d.seed)?;
        // Test reviews come only from the aclImdb test split.
        let test = balanced_sample(&corpus.test, d.test_size, d.seed)?;
        Ok(Self {
            tokenizer,
            train,
            val,
            test,
        })
    }
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

#[allow(clippy::too_many_arguments)] // one phase's settings, each passed straight to `train`
fn train_phase(
    name: &str,
    model: Qwen,
    examples: &[Example],
    pad_id: u32,
    config: &kd_train::TrainConfig,
    objective: &Objective<'_>,
    dir: &Path,
    resume: bool,
    validation: Option<Validation<'_>>,
) -> Result<(Qwen, TrainSummary)> {
    with_bar(&format!("train {name}"), config.steps, |bar| {
        let mut on_step = |m: &StepMetrics| {
            bar.set_position(m.step as u64);
            let kd = m.kd.map(|k| format!(" (kd {k:.4})")).unwrap_or_default();
            let val = m
                .val_accuracy
                .map(|a| format!(" · val {:.1}%", 100.0 * a))
                .unwrap_or_default();
            bar.set_message(format!(
                "loss {:.4}{kd} · {:.0} tok/s{val}",
                m.loss, m.tokens_per_s
            ));
        };
        let run = RunOptions {
            dir: Some(dir.to_path_buf()),
            resume,
            validation,
            on_step: &mut on_step,
        };
        Ok(train(model, examples, pad_id, config, objective, run)?)
    })
}

/// The step-by-step student's training set.
struct RationaleData {
    csv: PathBuf,
    /// The label-only examples, then one rationale example per usable CSV row.
    examples: Vec<Example>,
    /// 1 for a label-only example, the rationale weight for a rationale example.
    weights: Vec<f64>,
    rationale_examples: usize,
    skipped_flagged: usize,
    mean_supervised_tokens: f64,
}

/// Builds the step-by-step training set from a `kd rationales` CSV: `label_examples` (of
/// `reviews`, in order) plus a rationale example for every review the CSV explains. A row
/// whose sentiment disagrees with the review's label is an error; rows for reviews outside
/// the student's set are ignored.
fn rationale_examples(
    csv: &Path,
    builder: &PromptBuilder,
    reviews: &[Review],
    label_examples: &[Example],
    weight: f64,
    max_tokens: usize,
) -> Result<RationaleData> {
    let rows = kd_infer::rationale::read_rationales(csv)?;
    let by_id: std::collections::HashMap<&str, (usize, &kd_infer::rationale::RationaleRow)> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.as_str(), (i, r)))
        .collect();
    let mut examples = label_examples.to_vec();
    let mut weights = vec![1.0; examples.len()];
    let (mut skipped, mut supervised_tokens) = (0, 0);
    for review in reviews {
        let Some(&(i, row)) = by_id.get(review.id.as_str()) else {
            continue;
        };
        if row.sentiment != review.label.word() {
            anyhow::bail!(
                "{}: row {} (id {}): sentiment `{}`, but the review's label is `{}`",
                csv.display(),
                i + 2, // 1-based, after the header line
                row.id,
                row.sentiment,
                review.label.word()
            );
        }
        if row.extraction.flagged() || row.reasoning.trim().is_empty() {
            skipped += 1;
            continue;
        }
        let example = builder.encode_with_rationale(review, &row.reasoning, max_tokens)?;
        supervised_tokens += example
            .labels
            .iter()
            .filter(|&&l| l != kd_imdb::IGNORE_INDEX)
            .count();
        examples.push(example);
        weights.push(weight);
    }
    let rationale_examples = examples.len() - label_examples.len();
    if rationale_examples == 0 {
        anyhow::bail!(
            "{}: no usable rationale for any of the {} student reviews ({skipped} flagged or \
             empty); was it written for this preset's training set?",
            csv.display(),
            reviews.len()
        );
    }
    info!(
        csv = %csv.display(),
        rationale_examples,
        skipped,
        "step-by-step training set"
    );
    Ok(RationaleData {
        csv: csv.to_path_buf(),
        examples,
        weights,
        rationale_examples,
        skipped_flagged: skipped,
        mean_supervised_tokens: supervised_tokens as f64 / rationale_examples as f64,
    })
}

/// Opens the teacher cache at `dir` for this run: tokenizer, template, `max_len` and
/// temperature must be this run's; the teacher must be `teacher` when given (hashing it),
/// else whatever teacher the cache names.
fn open_cache(
    dir: &Path,
    tokenizer: &Path,
    max_len: usize,
    temperature: f64,
    teacher: Option<&Path>,
) -> Result<(TeacherCache, CacheReport)> {
    let cached = TeacherCache::read_fingerprint(dir)?;
    let teacher_sha256 = match teacher {
        Some(dir) => spinner("hashing the teacher checkpoint", || checkpoint_sha256(dir))?,
        None => cached.teacher_sha256.clone(),
    };
    let expected = Fingerprint {
        tokenizer_sha256: sha256_file(tokenizer)?,
        template_sha256: template_sha256(tokenizer)?,
        max_len,
        temperature,
        teacher_sha256,
    };
    let cache = spinner("reading the teacher cache", || {
        TeacherCache::open(dir, &expected)
    })?;
    let mut file_bytes = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        file_bytes += entry?.metadata()?.len();
    }
    let report = CacheReport {
        path: dir.to_path_buf(),
        k: cache.k(),
        rows: cache.rows(),
        payload_bytes_per_supervised_token: cache.bytes_per_supervised_token(),
        file_bytes_per_supervised_token: file_bytes as f64 / cache.rows().max(1) as f64,
    };
    info!(
        cache = %dir.display(),
        k = report.k,
        rows = report.rows,
        bytes_per_token = report.file_bytes_per_supervised_token,
        "teacher cache"
    );
    Ok((cache, report))
}

/// Writes `metrics.jsonl` at the top of the run folder: every phase's step lines (kept live
/// under `train/<phase>/metrics.jsonl` while it trains), each wrapped as
/// `{"phase": …, "metrics": {…}}`. A phase given by `--teacher` has no lines.
fn combine_metrics(out: &Path, phases: &[&str]) -> Result<()> {
    let mut combined = String::new();
    for phase in phases {
        let path = out.join("train").join(phase).join("metrics.jsonl");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        for (i, line) in text.lines().enumerate() {
            let metrics: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not a JSON line", path.display(), i + 1))?;
            combined
                .push_str(&serde_json::json!({ "phase": phase, "metrics": metrics }).to_string());
            combined.push('\n');
        }
    }
    let path = out.join("metrics.jsonl");
    let tmp = path.with_extension("jsonl.partial");
    std::fs::write(&tmp, combined).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Saves a trained model to `checkpoints/<name>` and its summary beside its training records,
/// which marks the phase as done for `--resume`. The run's tokenizer files go beside the
/// weights, so that the folder is complete for `kd export`, `kd eval` and `transformers`.
///
/// A LoRA model's adapters are saved on their own (`checkpoints/<name>-lora`, PEFT layout) and
/// merged into the weights of the checkpoint; the merged model is returned.
fn finish_phase(
    out: &Path,
    name: &str,
    model: Qwen,
    summary: &TrainSummary,
    tokenizer: &Path,
    max_len: usize,
) -> Result<Qwen> {
    let model = if has_lora(&model) {
        save_adapters(
            &model,
            &out.join("checkpoints").join(format!("{name}-lora")),
        )?;
        merge_lora(model)
    } else {
        model
    };
    let dir = out.join("checkpoints").join(name);
    save_checkpoint(&model, &dir)?;
    crate::model_cmd::copy_tokenizer(tokenizer, &dir)?;
    let trained = crate::eval_cmd::TrainedWith { max_len };
    let path = dir.join(crate::eval_cmd::TRAINED_WITH_FILE);
    std::fs::write(&path, serde_json::to_string_pretty(&trained)?)
        .with_context(|| format!("writing {}", path.display()))?;
    let path = out.join("train").join(name).join("summary.json");
    let tmp = path.with_extension("json.partial");
    std::fs::write(&tmp, serde_json::to_string_pretty(summary)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(model)
}

/// `model` with fresh LoRA adapters when `lora` is set (its base frozen), else unchanged.
fn with_lora(model: Qwen, lora: Option<&kd_qwen::LoraConfig>) -> Result<Qwen> {
    let Some(config) = lora else {
        return Ok(model);
    };
    // burn draws parameters lazily, on first use: draw the base's now, so that a seeded base
    // is the same with and without adapters (the adapters draw after it).
    let model = model.map(&mut Materialise);
    info!(rank = config.rank, targets = ?config.targets, "LoRA adapters");
    Ok(attach_lora(model, config)?)
}

/// Touches every parameter so that burn initialises it now.
struct Materialise;

impl burn::module::ModuleMapper for Materialise {
    fn map_float<const D: usize>(
        &mut self,
        param: burn::module::Param<burn::tensor::Tensor<D>>,
    ) -> burn::module::Param<burn::tensor::Tensor<D>> {
        let _ = param.val();
        param
    }
}

/// A folder that already holds a run (its `config.toml`) is continued only with `--resume`,
/// and only with the settings it was started with: otherwise its finished phases would be
/// reported under settings they were not trained with.
fn check_run_folder(out: &Path, config: &str, resume: bool) -> Result<()> {
    let path = out.join("config.toml");
    let Ok(before) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    if !resume {
        anyhow::bail!(
            "{} already holds a run ({} exists): pass --resume to continue it, or give another --out",
            out.display(),
            path.display()
        );
    }
    let differences = settings_differences(&before, config)
        .with_context(|| format!("reading {}", path.display()))?;
    if !differences.is_empty() {
        anyhow::bail!(
            "--resume: {} was started with other settings ({}): {}. A run continues only with \
             the settings it started with; give another --out for a new one",
            out.display(),
            path.display(),
            differences.join("; ")
        );
    }
    Ok(())
}

/// [`crate::settings::differences`] between two preset TOML texts.
fn settings_differences(before: &str, now: &str) -> Result<Vec<String>> {
    let json = |text: &str| -> Result<serde_json::Value> {
        Ok(serde_json::to_value(toml::from_str::<toml::Value>(text)?)?)
    };
    Ok(crate::settings::differences(
        &json(before)?,
        &json(now)?,
        "folder",
    ))
}

/// The model and summary of a phase an earlier run of this folder finished.
fn finished_phase(
    out: &Path,
    name: &str,
    device: &burn::tensor::Device,
) -> Result<Option<(Qwen, TrainSummary)>> {
    let path = out.join("train").join(name).join("summary.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    let summary: TrainSummary =
        serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
    let model = load_checkpoint(&out.join("checkpoints").join(name), device)?;
    info!(phase = name, "already trained; loaded");
    Ok(Some((model, summary)))
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
         Teacher {} parameters ({}), students {} parameters each.{}\n\n\
         | model | test acc | val acc | final train loss | train tok/s | eval tok/s | train s |\n\
         |---|---|---|---|---|---|---|\n",
        report.preset,
        report.train_examples,
        report.student_train_examples,
        report.val_examples,
        report.test_examples,
        report
            .teacher_params
            .map_or("unknown".into(), |n| n.to_string()),
        report.teacher_source,
        report.student_params,
        report.teacher_cache.as_ref().map_or(String::new(), |c| format!(
            " The KD student learned from the cache's top-{} log-probabilities: {} payload bytes \
             ({:.1} bytes on disk) per supervised token.",
            c.k, c.payload_bytes_per_supervised_token, c.file_bytes_per_supervised_token
        )),
    );
    if let Some(teacher) = &report.teacher {
        md += &row("teacher", teacher);
    }
    md += &row("KD student", &report.kd_student);
    md += &row("baseline student (CE only)", &report.baseline_student);
    if let Some(r) = &report.rationale_student {
        md += &row("step-by-step student (rationales)", &r.model);
    }
    if let Some(r) = &report.rationale_student {
        md += &format!(
            "\nStep-by-step student: {} rationale examples from {} (weight {}, {:.0} supervised \
             tokens each on average; {} flagged or empty rows skipped) beside the {} label-only \
             ones; its test accuracy minus the KD student's: {:+.2} points.\n",
            r.examples,
            r.csv.display(),
            r.weight,
            r.mean_supervised_tokens,
            r.skipped_flagged,
            report.student_train_examples,
            r.minus_kd_points
        );
    }
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
    fn steps_are_one_number_or_a_pair() {
        assert_eq!(parse_steps("40"), Ok((40, 40)));
        assert_eq!(parse_steps("40, 20"), Ok((40, 20)));
        for bad in ["1,2,3", "x", "1,"] {
            let err = parse_steps(bad).expect_err(bad);
            assert!(err.contains("expected TEACHER,STUDENT"), "{bad}: {err}");
        }
    }

    #[test]
    #[allow(clippy::unwrap_used)] // a panic is the failure report
    fn a_run_folder_is_continued_only_with_resume_and_its_own_settings() {
        let dir = tempfile::tempdir().unwrap();
        let smoke = Preset::load("smoke").unwrap();
        let config = toml::to_string_pretty(&smoke).unwrap();
        // A fresh folder needs nothing.
        check_run_folder(dir.path(), &config, false).unwrap();
        std::fs::write(dir.path().join("config.toml"), &config).unwrap();

        let err = check_run_folder(dir.path(), &config, false).unwrap_err();
        assert!(err.to_string().contains("pass --resume"), "{err}");
        check_run_folder(dir.path(), &config, true).unwrap();

        let mut other = smoke.clone();
        other.data.test_size += 1;
        let other = toml::to_string_pretty(&other).unwrap();
        let err = check_run_folder(dir.path(), &other, true)
            .unwrap_err()
            .to_string();
        let want = format!(
            "data.test_size: {} in the folder, {} now",
            smoke.data.test_size,
            smoke.data.test_size + 1
        );
        assert!(err.contains(&want), "{err}");
        assert_eq!(
            err.matches(" now").count(),
            1,
            "only the changed key: {err}"
        );
    }

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
