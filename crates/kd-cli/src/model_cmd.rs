//! `kd inspect`, `kd logits`, `kd export`: looking at, running and re-writing Hugging Face
//! checkpoint folders.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use kd_qwen::{Checkpoint, ForwardOptions, Padding, StoreDtype, export_hf, pad_batch};

use crate::device::DeviceChoice;

/// `kd inspect DIR`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A Hugging Face checkpoint folder (config.json + safetensors).
    pub dir: PathBuf,
}

/// `kd logits`.
#[derive(Debug, Args)]
pub struct LogitsArgs {
    /// A Hugging Face checkpoint folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Token ids: `1,2,3` for one sequence, `1,2,3;4,5` for a padded batch.
    #[arg(long)]
    pub ids: String,
    /// Pad on the left (as for generation) instead of the right.
    #[arg(long)]
    pub left_pad: bool,
    /// Padding id (never attended to); defaults to the config's `pad_token_id`, else 0.
    #[arg(long)]
    pub pad_id: Option<u32>,
    /// Output file: `.json` writes JSON, anything else safetensors with `logits`
    /// [batch, seq, vocab] and `attention_mask` [batch, seq].
    #[arg(long)]
    pub out: PathBuf,
    /// Compute device.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceChoice,
}

/// Element type of an export.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ExportDtype {
    /// bfloat16 (what Qwen checkpoints ship in).
    Bf16,
    /// float32, lossless.
    F32,
}

/// `kd export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Checkpoint folder to read (e.g. a trained student written by `kd distill`).
    #[arg(long)]
    pub from: PathBuf,
    /// Folder to write (config.json, model.safetensors, generation_config.json, tokenizer).
    #[arg(long)]
    pub out: PathBuf,
    /// Stored element type.
    #[arg(long, value_enum, default_value = "bf16")]
    pub dtype: ExportDtype,
    /// tokenizer.json, or a folder holding it; tokenizer_config.json beside it is copied
    /// too. Defaults to the `--from` folder's tokenizer, when it has one.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

/// Prints architecture, parameter count and stored dtypes.
pub fn inspect(args: InspectArgs) -> Result<()> {
    let ckpt = Checkpoint::open(&args.dir)?;
    let c = &ckpt.config;
    let stored: usize = ckpt
        .tensors
        .values()
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    let mut report = format!(
        "{}\n  model_type {:?}, {} layers, hidden {}, intermediate {}, heads {} (kv {}), \
         head_dim {}\n  vocab {}, tied head {}, q/k/v bias {}, q/k norm {}, rope_theta {}, \
         rms_norm_eps {}, max positions {}\n  parameters {} ({} stored)\n  files {} ({:.1} MB)\n",
        args.dir.display(),
        c.model_type,
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim(),
        c.vocab_size,
        c.tie_word_embeddings,
        c.qkv_bias(),
        c.qk_norm(),
        c.rope_theta,
        c.rms_norm_eps,
        c.max_position_embeddings,
        c.num_params(),
        stored,
        ckpt.files.len(),
        ckpt.file_bytes() as f64 / 1e6,
    );
    for (dtype, (tensors, elements)) in ckpt.dtypes() {
        report += &format!("  dtype {dtype}: {tensors} tensors, {elements} elements\n");
    }
    if stored != c.num_params() {
        // A tied head stored twice also lands here; loading names the tensor either way.
        tracing::warn!(
            config = c.num_params(),
            stored,
            "config.json and the weight files disagree on the parameter count; loading the \
             checkpoint (e.g. `kd logits`) names the first tensor that does not fit"
        );
    }
    #[allow(clippy::print_stdout)] // the report is the command's output
    {
        print!("{report}");
    }
    Ok(())
}

/// `1,2,3;4,5` → two sequences. Errors name the sequence and the position (both from 1).
fn parse_ids(text: &str) -> Result<Vec<Vec<u32>>> {
    text.split(';')
        .enumerate()
        .map(|(r, row)| {
            if row.trim().is_empty() {
                bail!("--ids `{text}`: sequence {} is empty", r + 1);
            }
            row.split(',')
                .enumerate()
                .map(|(i, t)| {
                    t.trim().parse::<u32>().with_context(|| {
                        format!(
                            "--ids `{text}`: sequence {}, token {}: `{}` is not a token id",
                            r + 1,
                            i + 1,
                            t.trim()
                        )
                    })
                })
                .collect()
        })
        .collect()
}

/// Writes the logits of every position of a (padded) batch.
pub fn logits(args: LogitsArgs) -> Result<()> {
    let device = args.device.device()?;
    let rows = parse_ids(&args.ids)?;
    let model = kd_qwen::load_checkpoint(&args.model, &device)?;
    let vocab = model.config().vocab_size;
    if let Some(bad) = rows.iter().flatten().find(|&&t| t as usize >= vocab) {
        bail!("--ids: token {bad} is outside the vocabulary of {vocab}");
    }
    model
        .check_positions(rows.iter().map(Vec::len).max().unwrap_or(0))
        .with_context(|| format!("--ids for {}", args.model.display()))?;
    let pad_id = args.pad_id.or(model.config().pad_token_id).unwrap_or(0);
    let padding = if args.left_pad {
        Padding::Left
    } else {
        Padding::Right
    };
    let (ids, mask) = pad_batch(&rows, pad_id, padding, &device);
    let [batch, seq] = ids.dims();
    let options = ForwardOptions {
        attention_mask: Some(mask.clone()),
    };
    let logits: Vec<f32> = model
        .forward(ids, &options)
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .map_err(|e| anyhow::anyhow!("reading logits back: {e:?}"))?;
    let mask: Vec<i64> = mask
        .into_data()
        .convert::<i64>()
        .try_into_vec()
        .map_err(|e| anyhow::anyhow!("reading the mask back: {e:?}"))?;

    if args.out.extension().is_some_and(|e| e == "json") {
        let nested: Vec<Vec<&[f32]>> = logits
            .chunks(seq * vocab)
            .map(|row| row.chunks(vocab).collect())
            .collect();
        let value = serde_json::json!({
            "shape": [batch, seq, vocab],
            "attention_mask": mask.chunks(seq).collect::<Vec<_>>(),
            "logits": nested,
        });
        std::fs::write(&args.out, serde_json::to_string(&value)?)
            .with_context(|| format!("writing {}", args.out.display()))?;
    } else {
        let logit_bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mask_bytes: Vec<u8> = mask.iter().flat_map(|v| v.to_le_bytes()).collect();
        use safetensors::{Dtype, tensor::TensorView};
        let views = vec![
            (
                "logits",
                TensorView::new(Dtype::F32, vec![batch, seq, vocab], &logit_bytes)?,
            ),
            (
                "attention_mask",
                TensorView::new(Dtype::I64, vec![batch, seq], &mask_bytes)?,
            ),
        ];
        safetensors::tensor::serialize_to_file(views, None, &args.out)
            .with_context(|| format!("writing {}", args.out.display()))?;
        kd_qwen::make_shareable(&args.out)
            .with_context(|| format!("writing {}", args.out.display()))?;
    }
    tracing::info!(batch, seq, vocab, out = %args.out.display(), "logits written");
    Ok(())
}

/// Files of a Hugging Face tokenizer that travel with an export, when present.
const TOKENIZER_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
];

/// Copies the tokenizer files at `source` (a `tokenizer.json`, with the
/// `tokenizer_config.json` beside it, or a folder holding the usual files) into `out`; returns
/// how many were copied. The copies are ordinary writable files, whatever the source's
/// permissions (a read-only mirror).
pub(crate) fn copy_tokenizer(source: &Path, out: &Path) -> Result<usize> {
    let (dir, names): (&Path, Vec<&str>) = if source.is_dir() {
        (source, TOKENIZER_FILES.to_vec())
    } else {
        let dir = source.parent().unwrap_or(Path::new("."));
        let name = source
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("tokenizer.json");
        (dir, vec![name, "tokenizer_config.json"])
    };
    let mut copied = 0;
    for name in names {
        let from = dir.join(name);
        if from.is_file() {
            let bytes =
                std::fs::read(&from).with_context(|| format!("reading {}", from.display()))?;
            let to = out.join(name);
            std::fs::write(&to, bytes).with_context(|| format!("writing {}", to.display()))?;
            copied += 1;
        }
    }
    Ok(copied)
}

/// Re-writes a checkpoint folder as one transformers loads.
pub fn export(args: ExportArgs) -> Result<()> {
    let device = burn::tensor::Device::flex();
    let model = kd_qwen::load_checkpoint(&args.from, &device)?;
    let dtype = match args.dtype {
        ExportDtype::Bf16 => StoreDtype::Bf16,
        ExportDtype::F32 => StoreDtype::F32,
    };
    export_hf(&model, &args.out, dtype)?;
    // A generation config that came with the source (sampling defaults, several eos ids)
    // says more than the one derived from config.json.
    let generation = args.from.join("generation_config.json");
    if generation.is_file() {
        std::fs::copy(&generation, args.out.join("generation_config.json"))
            .with_context(|| format!("copying {}", generation.display()))?;
    }
    let tokenizer = args.tokenizer.clone().or_else(|| {
        args.from
            .join("tokenizer.json")
            .is_file()
            .then(|| args.from.clone())
    });
    let copied = match &tokenizer {
        Some(path) if !path.exists() => bail!("--tokenizer {}: no such file", path.display()),
        Some(path) => copy_tokenizer(path, &args.out)?,
        None => {
            tracing::warn!("no tokenizer given or found beside --from; the folder has none");
            0
        }
    };
    tracing::info!(out = %args.out.display(), tokenizer_files = copied, "exported");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_and_errors_name_sequence_and_position() {
        assert_eq!(
            parse_ids("1, 2,3;4,5").ok(),
            Some(vec![vec![1, 2, 3], vec![4, 5]])
        );
        let msg = |text: &str| {
            format!(
                "{:#}",
                parse_ids(text)
                    .err()
                    .unwrap_or_else(|| anyhow::anyhow!("accepted"))
            )
        };
        assert!(
            msg("1,2;").contains("sequence 2 is empty"),
            "{}",
            msg("1,2;")
        );
        let bad = msg("1,2,;3");
        assert!(
            bad.contains("--ids") && bad.contains("sequence 1, token 3"),
            "{bad}"
        );
        assert!(
            msg("1;x").contains("sequence 2, token 1: `x`"),
            "{}",
            msg("1;x")
        );
    }
}
