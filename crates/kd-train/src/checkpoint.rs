//! Training checkpoints that survive a kill at any moment.
//!
//! A checkpoint is a folder `step-NNNNNN/` holding the model in Hugging Face layout
//! (`config.json`, `model.safetensors`, `generation_config.json`), the optimizer state
//! (`optimizer.bpk`, burn's burnpack format) and `state.json` ([`TrainState`]: step, data
//! position, seed, loss history, validation results). It is written under
//! `step-NNNNNN.partial/`, every file is synced, and only then is the folder renamed: a rename
//! within one directory is atomic, so a reader sees either the whole checkpoint or none of it.
//! Leftover `.partial` folders from a killed writer are ignored and removed on resume.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::trainer::TrainConfig;

/// Name of the state file inside a checkpoint folder.
pub const STATE_FILE: &str = "state.json";
/// Name of the optimizer state file inside a checkpoint folder.
pub const OPTIMIZER_FILE: &str = "optimizer.bpk";

/// Everything besides weights and optimizer moments that a resumed run needs to continue
/// exactly where the saved one stood.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: usize,
    /// Data order: epochs started so far minus one, and the next index within the epoch's
    /// permutation. The permutation of epoch `e` is a pure function of `(seed, e)`, so these
    /// two numbers are the whole data-order RNG state.
    pub epoch: usize,
    /// Position within the current epoch's permutation.
    pub cursor: usize,
    /// The settings the run was started with; a resume with other settings is refused.
    pub config: TrainConfig,
    /// Loss of every completed step, in order.
    pub losses: Vec<f64>,
    /// Non-padding tokens processed so far.
    pub tokens: usize,
    /// Training seconds so far (excluding time spent dead between a crash and the resume).
    pub seconds: f64,
    /// Validation accuracy at this step, when validation ran here.
    pub val_accuracy: Option<f64>,
    /// Best validation accuracy so far and the step it was measured at.
    pub best: Option<(usize, f64)>,
}

/// Folder name of the checkpoint after `step` steps.
pub fn step_dir(root: &Path, step: usize) -> PathBuf {
    root.join(format!("step-{step:06}"))
}

/// Complete checkpoints under `root`, oldest first, as `(step, folder)`.
pub fn list(root: &Path) -> Result<Vec<(usize, PathBuf)>, Error> {
    let mut found = Vec::new();
    let entries = match fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(io_error(root, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| io_error(root, e))?;
        let name = entry.file_name();
        let Some(step) = name
            .to_str()
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue; // `.partial` folders and anything else
        };
        found.push((step, entry.path()));
    }
    found.sort();
    Ok(found)
}

/// Reads the state of the checkpoint in `dir`.
pub fn read_state(dir: &Path) -> Result<TrainState, Error> {
    let path = dir.join(STATE_FILE);
    let text = fs::read_to_string(&path).map_err(|e| io_error(&path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
        path,
        message: e.to_string(),
    })
}

/// Writes a checkpoint for `state.step` under `root`: `write_files` fills the temporary
/// folder with the model and optimizer files, then the state is added, everything synced and
/// the folder renamed into place. Returns the final folder.
pub fn write(
    root: &Path,
    state: &TrainState,
    write_files: impl FnOnce(&Path) -> Result<(), Error>,
) -> Result<PathBuf, Error> {
    let target = step_dir(root, state.step);
    let tmp = target.with_extension("partial");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| io_error(&tmp, e))?;
    }
    fs::create_dir_all(&tmp).map_err(|e| io_error(&tmp, e))?;
    write_files(&tmp)?;
    let state_path = tmp.join(STATE_FILE);
    let json = serde_json::to_string_pretty(state).map_err(|e| Error::Checkpoint {
        path: state_path.clone(),
        message: e.to_string(),
    })?;
    fs::write(&state_path, json).map_err(|e| io_error(&state_path, e))?;
    for entry in fs::read_dir(&tmp).map_err(|e| io_error(&tmp, e))? {
        let path = entry.map_err(|e| io_error(&tmp, e))?.path();
        File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_error(&path, e))?;
    }
    if target.exists() {
        // A checkpoint of the same step from an earlier attempt: the new one replaces it.
        fs::remove_dir_all(&target).map_err(|e| io_error(&target, e))?;
    }
    fs::rename(&tmp, &target).map_err(|e| io_error(&target, e))?;
    sync_dir(root)?;
    Ok(target)
}

/// Deletes all but the newest `keep_last` checkpoints under `root`, never the one of step
/// `keep_step` (the best by validation).
pub fn prune(root: &Path, keep_last: usize, keep_step: Option<usize>) -> Result<(), Error> {
    let all = list(root)?;
    let cut = all.len().saturating_sub(keep_last.max(1));
    for (step, dir) in &all[..cut] {
        if Some(*step) != keep_step {
            fs::remove_dir_all(dir).map_err(|e| io_error(dir, e))?;
        }
    }
    Ok(())
}

/// Removes `.partial` folders a killed writer left behind.
pub fn remove_partials(root: &Path) -> Result<(), Error> {
    let Ok(entries) = fs::read_dir(root) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "partial") && path.is_dir() {
            fs::remove_dir_all(&path).map_err(|e| io_error(&path, e))?;
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    // Makes the rename itself durable; directories can be opened read-only and synced on
    // Unix. Elsewhere this is best effort.
    match File::open(dir).and_then(|f| f.sync_all()) {
        Ok(()) => Ok(()),
        Err(e) if cfg!(unix) => Err(io_error(dir, e)),
        Err(_) => Ok(()),
    }
}

pub(crate) fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}
