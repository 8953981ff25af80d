//! `kd distill --rationales`: a run writes the ids of its student reviews, a rationale CSV for
//! them trains a third ("step-by-step") student that is reported beside the KD student, and a
//! CSV whose sentiment contradicts a review's label is refused with the row named.
//!
//! The rationales here are written by the test (no model that can reason is available
//! offline); what is checked is the plumbing: ids, alignment, skipping of flagged rows,
//! training, evaluation and the report.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::path::Path;
use std::process::{Command, Output};

use kd_infer::rationale::{Extraction, RationaleRow, RationaleWriter};

/// A fast smoke-preset `kd distill` with `extra` flags; the IMDB archive and tokenizer come
/// from the mirror (`KD_MIRROR`, set by `.cargo/config.toml`).
fn distill(out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kd"))
        .args([
            "distill",
            "--preset",
            "smoke",
            "--steps",
            "2,2",
            "--test-size",
            "20",
        ])
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

/// aclImdb ids are `<n>_<rating>`: ratings 7-10 are positive reviews, 1-4 negative.
fn sentiment_of(id: &str) -> &'static str {
    let rating: u32 = id.rsplit('_').next().unwrap().parse().unwrap();
    if rating >= 7 { "positive" } else { "negative" }
}

fn write_csv(path: &Path, ids: &[&str], flagged: usize, contradict: Option<usize>) {
    let rows: Vec<RationaleRow> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let mut sentiment = sentiment_of(id);
            if contradict == Some(i) {
                sentiment = if sentiment == "positive" {
                    "negative"
                } else {
                    "positive"
                };
            }
            RationaleRow {
                id: id.to_string(),
                sentiment: sentiment.to_string(),
                review: String::new(),
                reasoning: format!("The reviewer's verdict is {sentiment}, so the label holds."),
                new_tokens: 12,
                finish_reason: "stop".into(),
                extraction: if i < flagged {
                    Extraction::NoTags
                } else {
                    Extraction::CloseOnly
                },
            }
        })
        .collect();
    let mut writer = RationaleWriter::create(path).unwrap();
    writer.write_batch(&rows).unwrap();
}

#[test]
fn rationales_train_a_third_student_and_contradictions_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let first = tmp.path().join("first");
    let run = distill(&first, &[]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    // Every checkpoint carries the run's tokenizer, so the folder exports complete.
    for phase in ["teacher", "kd_student", "baseline_student"] {
        let dir = first.join("checkpoints").join(phase);
        for file in ["tokenizer.json", "tokenizer_config.json"] {
            assert!(dir.join(file).is_file(), "{phase}: no {file}");
        }
        // ... and the prompt length it was trained at, for `kd eval` (smoke: max_len = 96).
        let kd_json = std::fs::read_to_string(dir.join("kd.json")).unwrap();
        let kd_json: serde_json::Value = serde_json::from_str(&kd_json).unwrap();
        assert_eq!(kd_json["max_len"], 96, "{phase}");
    }

    // The run lists its 200 student reviews (smoke: data.student_train_size = 200).
    let ids_text = std::fs::read_to_string(first.join("student_ids.txt")).unwrap();
    let ids: Vec<&str> = ids_text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    assert_eq!(ids.len(), 200);

    // Rationales for the first 30 of them, 3 flagged.
    let csv = tmp.path().join("rationales.csv");
    write_csv(&csv, &ids[..30], 3, None);
    let teacher = first.join("checkpoints/teacher");
    let second = tmp.path().join("second");
    let run = distill(
        &second,
        &[
            "--teacher",
            teacher.to_str().unwrap(),
            "--rationales",
            csv.to_str().unwrap(),
        ],
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(second.join("report.json")).unwrap())
            .unwrap();
    let r = &report["rationale_student"];
    assert_eq!(r["examples"], 27);
    assert_eq!(r["skipped_flagged"], 3);
    let acc = r["test"]["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    let kd = report["kd_student"]["test"]["accuracy"].as_f64().unwrap();
    let minus_kd = r["minus_kd_points"].as_f64().unwrap();
    // Both accuracies are over the same 20 reviews: the difference is a multiple of 5 points.
    const TOL: f64 = 1e-9;
    assert!((minus_kd - 100.0 * (acc - kd)).abs() < TOL);
    let metrics = std::fs::read_to_string(second.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"phase\":\"rationale_student\""));
    let md = std::fs::read_to_string(second.join("report.md")).unwrap();
    assert!(md.contains("step-by-step student"));

    // A row whose sentiment contradicts the review's label: refused, naming file, row, id.
    let bad = tmp.path().join("bad.csv");
    write_csv(&bad, &ids[..5], 0, Some(2));
    let run = distill(
        &tmp.path().join("third"),
        &[
            "--teacher",
            teacher.to_str().unwrap(),
            "--rationales",
            bad.to_str().unwrap(),
        ],
    );
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    // Row 4 of the file: the header is line 1, the contradicting row is the third data row.
    assert!(
        stderr.contains("bad.csv: row 4") && stderr.contains(ids[2]),
        "{stderr}"
    );
}
