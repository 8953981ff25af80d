//! Every malformed checkpoint is refused with a message naming the file, the tensor or field,
//! and what was expected and found.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use kd_qwen::load_checkpoint;
use safetensors::Dtype;

mod common;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A writable copy of a fixture folder.
fn copy(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    dir
}

/// Rewrites `file` in `dir`, letting `edit` change the list of (name, dtype, shape, bytes).
fn rewrite(dir: &Path, file: &str, edit: impl FnOnce(&mut Vec<common::Entry>)) {
    let path = dir.join(file);
    let mut tensors = common::read_tensors(&path);
    edit(&mut tensors);
    common::write_tensors(&path, &tensors);
}

fn load_err(dir: &Path) -> String {
    let err =
        load_checkpoint(dir, &Device::flex()).expect_err("a malformed checkpoint must be refused");
    err.to_string()
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for part in parts {
        assert!(msg.contains(part), "`{part}` not in: {msg}");
    }
}

#[test]
fn missing_tensor_is_named_with_its_shape() {
    let dir = copy("qwen3");
    rewrite(dir.path(), "model.safetensors", |t| {
        t.retain(|(n, ..)| n != "model.layers.1.mlp.up_proj.weight");
    });
    let msg = load_err(dir.path());
    assert_mentions(
        &msg,
        &[
            "model.layers.1.mlp.up_proj.weight",
            "missing",
            "[64, 32]",
            "model.safetensors",
        ],
    );
}

#[test]
fn wrong_shape_names_tensor_expected_found_and_file() {
    let dir = copy("qwen3");
    rewrite(dir.path(), "model.safetensors", |t| {
        let norm = t
            .iter_mut()
            .find(|(n, ..)| n == "model.norm.weight")
            .unwrap();
        norm.2 = vec![31];
        norm.3.truncate(31 * 4);
    });
    let msg = load_err(dir.path());
    assert_mentions(
        &msg,
        &[
            "model.norm.weight",
            "expected shape [32]",
            "found [31]",
            "model.safetensors",
        ],
    );
}

#[test]
fn unexpected_dtype_is_named() {
    let dir = copy("qwen3");
    rewrite(dir.path(), "model.safetensors", |t| {
        let norm = t
            .iter_mut()
            .find(|(n, ..)| n == "model.norm.weight")
            .unwrap();
        norm.1 = Dtype::I32;
    });
    let msg = load_err(dir.path());
    assert_mentions(
        &msg,
        &[
            "model.norm.weight",
            "unexpected dtype I32",
            "F32, BF16 or F16",
            "model.safetensors",
        ],
    );
}

#[test]
fn truncated_file_names_tensor_and_sizes() {
    let dir = copy("qwen3");
    let path = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(len - 100).unwrap();
    let msg = load_err(dir.path());
    assert_mentions(
        &msg,
        &[
            "model.safetensors",
            "truncated",
            &format!("the file has {}", len - 100),
        ],
    );
}

#[test]
fn file_cut_inside_its_header_is_refused() {
    let dir = copy("qwen3");
    let path = dir.path().join("model.safetensors");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(20)
        .unwrap();
    assert_mentions(
        &load_err(dir.path()),
        &["model.safetensors", "truncated: header of"],
    );
}

#[test]
fn shard_lacking_an_indexed_tensor_is_named() {
    let dir = copy("qwen2");
    let index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let shard = index["weight_map"]["lm_head.weight"]
        .as_str()
        .unwrap()
        .to_string();
    rewrite(dir.path(), &shard, |t| {
        t.retain(|(n, ..)| n != "lm_head.weight")
    });
    assert_mentions(
        &load_err(dir.path()),
        &["lm_head.weight", &shard, "absent", "index.json"],
    );
}

#[test]
fn missing_weights_file_is_reported() {
    let dir = copy("qwen3");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    assert_mentions(
        &load_err(dir.path()),
        &["model.safetensors.index.json", "found"],
    );
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut value: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(&path, value.to_string()).unwrap();
}

#[test]
fn config_that_is_not_json_names_the_file() {
    let dir = copy("qwen3");
    std::fs::write(
        dir.path().join("config.json"),
        "{\"model_type\": \"qwen3\",",
    )
    .unwrap();
    assert_mentions(&load_err(dir.path()), &["config.json", "EOF"]);
}

#[test]
fn config_missing_a_field_names_it() {
    let dir = copy("qwen3");
    edit_config(dir.path(), |c| {
        c.as_object_mut().unwrap().remove("hidden_size");
    });
    assert_mentions(&load_err(dir.path()), &["config.json", "hidden_size"]);
}

#[test]
fn unsupported_model_type_is_refused() {
    let dir = copy("qwen3");
    edit_config(dir.path(), |c| c["model_type"] = "llama".into());
    assert_mentions(
        &load_err(dir.path()),
        &["config.json", "model_type", "llama"],
    );
}

#[test]
fn rope_scaling_is_refused_in_either_spelling() {
    let dir = copy("qwen3");
    edit_config(dir.path(), |c| {
        c["rope_parameters"] =
            serde_json::json!({"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0});
    });
    assert_mentions(
        &load_err(dir.path()),
        &["config.json", "rope_parameters", "yarn"],
    );
    edit_config(dir.path(), |c| {
        c.as_object_mut().unwrap().remove("rope_parameters");
        c["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0});
    });
    assert_mentions(
        &load_err(dir.path()),
        &["config.json", "rope_scaling", "linear"],
    );
}

#[test]
fn sliding_window_is_refused() {
    let dir = copy("qwen2");
    edit_config(dir.path(), |c| c["use_sliding_window"] = true.into());
    assert_mentions(
        &load_err(dir.path()),
        &["config.json", "use_sliding_window"],
    );
    edit_config(dir.path(), |c| {
        c["use_sliding_window"] = false.into();
        c["layer_types"] = serde_json::json!(["full_attention", "sliding_attention"]);
    });
    assert_mentions(
        &load_err(dir.path()),
        &["config.json", "layer_types", "sliding_attention"],
    );
}

#[test]
fn shape_disagreeing_with_config_is_named() {
    // The config claims a wider MLP than the weights have.
    let dir = copy("qwen3");
    edit_config(dir.path(), |c| c["intermediate_size"] = 80.into());
    assert_mentions(
        &load_err(dir.path()),
        &[
            "model.layers.0.mlp.gate_proj.weight",
            "expected shape [80, 32]",
            "found [64, 32]",
        ],
    );
}
