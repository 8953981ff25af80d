//! `kd distill --teacher DIR --finetune-teacher` with a `[teacher.lora]` preset table trains
//! adapters only: the saved teacher equals the loaded one except in the adapted projections,
//! and the adapters are saved on their own in PEFT's layout.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::path::Path;
use std::process::{Command, Output};

use burn::tensor::Device;
use kd_qwen::load_checkpoint;

fn distill(out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kd"))
        .args(["distill", "--steps", "2,2", "--test-size", "20"])
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

fn values(t: burn::tensor::Tensor<2>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

#[test]
fn lora_finetuned_teacher_changes_only_the_adapted_projections() {
    let tmp = tempfile::tempdir().unwrap();
    let first = tmp.path().join("first");
    let run = distill(&first, &["--preset", "smoke"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    // The smoke preset plus adapters on the teacher's query and value projections.
    let smoke = include_str!("../../../data/presets/smoke.toml");
    let preset = tmp.path().join("lora.toml");
    std::fs::write(
        &preset,
        format!(
            "{smoke}\n[teacher.lora]\nrank = 4\nalpha = 8.0\ntargets = [\"q_proj\", \"v_proj\"]\n"
        ),
    )
    .unwrap();
    let base_dir = first.join("checkpoints/teacher");
    let second = tmp.path().join("second");
    let run = distill(
        &second,
        &[
            "--preset",
            preset.to_str().unwrap(),
            "--teacher",
            base_dir.to_str().unwrap(),
            "--finetune-teacher",
        ],
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        second
            .join("checkpoints/teacher-lora/adapter_config.json")
            .exists()
    );

    let device = Device::flex();
    let base = load_checkpoint(&base_dir, &device).unwrap();
    let tuned = load_checkpoint(&second.join("checkpoints/teacher"), &device).unwrap();
    let (b, t) = (
        &base.model.layers[0].self_attn,
        &tuned.model.layers[0].self_attn,
    );
    // Frozen and not adapted: bit for bit the loaded teacher.
    assert_eq!(values(b.k_proj.weight.val()), values(t.k_proj.weight.val()));
    assert_eq!(
        values(base.model.embed_tokens.weight.val()),
        values(tuned.model.embed_tokens.weight.val())
    );
    // Adapted and merged: changed (LoRA's B starts at zero, so two steps of AdamW at the
    // smoke preset's learning rate move it well above f32 rounding).
    let moved = values(b.q_proj.weight.val())
        .iter()
        .zip(values(t.q_proj.weight.val()))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(moved > 1e-5, "q_proj moved by at most {moved}");
}
