//! Reading and writing Hugging Face style checkpoint folders (`config.json` +
//! `model.safetensors`).
//!
//! Tensor names are Hugging Face's; burn's `[in, out]` linear weights are transposed to and
//! from PyTorch's `[out, in]` by burn-store's adapters. A tied LM head is stored once, as the
//! embedding, the way `transformers` writes it.

use std::path::Path;

use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore};
use burn::tensor::Device;

use crate::{Error, Qwen, QwenConfig};

/// Writes `config.json` and `model.safetensors` (f32) into `dir`, creating it.
///
/// Both files are written under temporary names and renamed, so an interrupted save leaves
/// any previous checkpoint in `dir` whole.
pub fn save_checkpoint(model: &Qwen, dir: &Path) -> Result<(), Error> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| Error::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;

    let weights = dir.join("model.safetensors");
    let tmp = dir.join("model.safetensors.partial");
    let mut store = SafetensorsStore::from_file(&tmp)
        .with_to_adapter(BurnToPyTorchAdapter)
        .overwrite(true);
    model.save_into(&mut store).map_err(|e| Error::Checkpoint {
        path: tmp.display().to_string(),
        msg: e.to_string(),
    })?;
    std::fs::rename(&tmp, &weights).map_err(io(&weights))?;

    let config = dir.join("config.json");
    let tmp = dir.join("config.json.partial");
    let text = serde_json::to_string_pretty(model.config()).map_err(|e| Error::Checkpoint {
        path: config.display().to_string(),
        msg: e.to_string(),
    })?;
    std::fs::write(&tmp, text).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &config).map_err(io(&config))?;
    Ok(())
}

/// Reads a checkpoint folder written by [`save_checkpoint`] (or by `transformers`, for a
/// single-file `model.safetensors`).
pub fn load_checkpoint(dir: &Path, device: &Device) -> Result<Qwen, Error> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|source| Error::Io {
        path: config_path.display().to_string(),
        source,
    })?;
    let config = QwenConfig::from_json(&text, &config_path.display().to_string())?;
    let mut model = Qwen::new(&config, device);
    let weights = dir.join("model.safetensors");
    let mut store = SafetensorsStore::from_file(&weights).with_from_adapter(PyTorchToBurnAdapter);
    let result = model.load_from(&mut store).map_err(|e| Error::Checkpoint {
        path: weights.display().to_string(),
        msg: e.to_string(),
    })?;
    if !result.missing.is_empty() {
        return Err(Error::Checkpoint {
            path: weights.display().to_string(),
            msg: format!("missing tensors: {:?}", result.missing),
        });
    }
    Ok(model)
}
