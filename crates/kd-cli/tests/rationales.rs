//! `kd rationales` killed with SIGKILL after its first flushed batch and resumed writes the
//! same rows as an uninterrupted run, with no duplicate ids; it runs a Qwen2 checkpoint (the
//! DeepSeek-R1-Distill architecture) and its int4 copy; a tokenizer that does not fit the
//! model is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use burn::tensor::Device;
use kd_infer::rationale::{RationaleRow, read_rationales};
use kd_qwen::{ModelType, Qwen, QwenConfig, save_checkpoint};

const TOKENIZER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/models/qwen3-tokenizer/tokenizer.json"
);

/// A random tiny model over the real Qwen3 vocabulary, and 12 labelled reviews.
fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    setup_with(dir, QwenConfig::qwen3_shaped(16, 32, 1, 2, 1, 8))
}

fn setup_with(dir: &Path, config: QwenConfig) -> (PathBuf, PathBuf) {
    let model_dir = dir.join("model");
    save_checkpoint(&Qwen::new(&config, &Device::flex()), &model_dir).unwrap();
    let mut csv = String::from("review,sentiment\n");
    for i in 0..12 {
        let words = "a truly memorable film ".repeat(i % 5 + 1);
        let label = if i % 2 == 0 { "positive" } else { "negative" };
        csv.push_str(&format!(
            "\"Review {i}: {words}<think>x</think>, \"\"ok\"\".\",{label}\n"
        ));
    }
    let input = dir.join("reviews.csv");
    std::fs::write(&input, csv).unwrap();
    (model_dir, input)
}

fn kd(model: &Path, input: &Path, out: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kd"));
    cmd.args(["rationales", "--batch-size", "4", "--max-new-tokens", "6"])
        .arg("--model")
        .arg(model)
        .arg("--tokenizer")
        .arg(TOKENIZER)
        .arg("--input")
        .arg(input)
        .arg("--out")
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

fn sorted(mut rows: Vec<RationaleRow>) -> Vec<RationaleRow> {
    rows.sort_by(|a, b| a.id.cmp(&b.id));
    rows
}

#[test]
fn killed_and_resumed_run_equals_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let (model, input) = setup(dir.path());

    // 1. Uninterrupted.
    let full = dir.path().join("full.csv");
    assert!(kd(&model, &input, &full).status().unwrap().success());
    let want = sorted(read_rationales(&full).unwrap());
    assert_eq!(want.len(), 12);

    // 2. SIGKILL once the first batch is in the file (the run pauses after each batch).
    let part = dir.path().join("part.csv");
    let mut child = kd(&model, &input, &part)
        .args(["--pause-after-batch-ms", "3000"])
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        let rows = read_rationales(&part).map(|r| r.len()).unwrap_or(0);
        if rows >= 4 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no batch written"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    let written = read_rationales(&part).unwrap().len();
    assert!(written < 12, "killed too late: {written} rows");

    // A torn row, as a kill in the middle of a write would leave.
    let mut bytes = std::fs::read(&part).unwrap();
    bytes.extend_from_slice(b"11,negative,\"Review 11: half a ro");
    std::fs::write(&part, bytes).unwrap();

    // 3. Resume.
    let status = kd(&model, &input, &part).arg("--resume").status().unwrap();
    assert!(status.success());
    let got = read_rationales(&part).unwrap();
    let ids: HashSet<&str> = got.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), got.len(), "duplicate ids");
    assert_eq!(sorted(got), want);

    // 4. Without --resume an existing file is refused.
    assert!(!kd(&model, &input, &part).status().unwrap().success());

    // 5. So is resuming with settings that change what a row holds; the message names them.
    let other = kd(&model, &input, &part)
        .args(["--resume", "--max-review-tokens", "500"])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!other.status.success());
    let msg = String::from_utf8_lossy(&other.stderr);
    assert!(
        msg.contains("max_review_tokens: 1024 in the file, 500 now"),
        "{msg}"
    );
    assert_eq!(
        sorted(read_rationales(&part).unwrap()),
        want,
        "the CSV is untouched"
    );
}

/// Every review once, with its label, and a finish reason the engine gives.
fn check_rows(rows: &[RationaleRow], what: &str) {
    assert_eq!(rows.len(), 12, "{what}");
    let ids: HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), 12, "{what}: duplicate ids");
    for row in rows {
        let i: usize = row.review.split(':').next().unwrap()["Review ".len()..]
            .parse()
            .unwrap();
        let label = if i.is_multiple_of(2) {
            "positive"
        } else {
            "negative"
        };
        assert_eq!(row.sentiment, label, "{what}: review {i}");
        assert!(
            ["eos", "stop", "length"].contains(&row.finish_reason.as_str())
                && (1..=6).contains(&row.new_tokens),
            "{what}: {row:?}"
        );
    }
}

#[test]
fn a_qwen2_model_and_its_int4_copy_write_every_row() {
    let dir = tempfile::tempdir().unwrap();
    // Qwen2's shape: q/k/v bias, no q/k norm, untied head, theta 10,000.
    let mut config = QwenConfig::qwen3_shaped(16, 32, 1, 2, 1, 8);
    config.model_type = ModelType::Qwen2;
    config.attention_bias = Some(true);
    config.tie_word_embeddings = false;
    config.rope_theta = 10_000.0;
    let (model, input) = setup_with(dir.path(), config);
    let out = dir.path().join("qwen2.csv");
    assert!(kd(&model, &input, &out).status().unwrap().success());
    check_rows(&read_rationales(&out).unwrap(), "qwen2");

    let int4 = dir.path().join("int4");
    let status = Command::new(env!("CARGO_BIN_EXE_kd"))
        .args(["quantize", "--bits", "4", "--model"])
        .arg(&model)
        .arg("--out")
        .arg(&int4)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let out = dir.path().join("int4.csv");
    assert!(kd(&int4, &input, &out).status().unwrap().success());
    check_rows(&read_rationales(&out).unwrap(), "int4");
}

#[test]
fn a_tokenizer_beyond_the_models_vocabulary_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = QwenConfig::qwen3_shaped(16, 32, 1, 2, 1, 8);
    config.vocab_size = 96;
    let (model, input) = setup_with(dir.path(), config);
    let out = dir.path().join("out.csv");
    let output = kd(&model, &input, &out)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("outside the vocabulary of 96") && err.contains("--tokenizer"),
        "{err}"
    );
}
