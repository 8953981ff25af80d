//! Presets: every setting of a distillation run, read from TOML files in `data/presets/`.

use std::path::Path;

use anyhow::{Context, Result, bail};
use kd_loss::{Divergence, KdConfig, Reduction};
use kd_qwen::{LoraConfig, QwenConfig};
use kd_train::TrainConfig;
use serde::{Deserialize, Serialize};

/// Presets compiled into the binary, so `kd distill` works from any folder.
const BUILTIN: &[(&str, &str)] = &[
    ("tiny", include_str!("../../../data/presets/tiny.toml")),
    ("smoke", include_str!("../../../data/presets/smoke.toml")),
];

/// A whole run's settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    /// Name used in the run folder.
    pub name: String,
    /// Which reviews, how many, how long.
    pub data: DataSection,
    /// The teacher's shape and training.
    pub teacher: ModelSection,
    /// The students' shape and training (KD and baseline share it).
    pub student: ModelSection,
    /// The distillation objective.
    pub distill: DistillSection,
    /// Evaluation settings.
    pub eval: EvalSection,
}

/// Data settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Training reviews drawn (balanced) from the aclImdb train split.
    pub train_size: usize,
    /// How many of the training reviews the students see (the first ones of the shuffled
    /// training set); the teacher sees all of them. `None`: the students see them all too.
    /// A student distilled on less data than its teacher is the usual case (a teacher
    /// fine-tuned on everything, a transfer set for the student), and where soft targets
    /// help most (Hinton et al., 2015, §3: 3% of the data with soft targets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub student_train_size: Option<usize>,
    /// Validation reviews held out of the same split (stratified).
    pub val_size: usize,
    /// Test reviews drawn (balanced) from the aclImdb test split only.
    pub test_size: usize,
    /// Longest prompt in tokens; longer reviews are truncated.
    pub max_len: usize,
    /// Seed for sampling, splitting, initialisation and data order.
    pub seed: u64,
}

/// A model's shape (Qwen3 fields) and its training settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Residual width.
    pub hidden_size: usize,
    /// SwiGLU width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Optimisation.
    pub train: TrainConfig,
    /// Train low-rank adapters instead of every weight (`[teacher.lora]`, `[student.lora]`:
    /// `rank`, `alpha`, `dropout`, `targets` as in PEFT). Mostly for a loaded teacher
    /// (`--teacher DIR --finetune-teacher`); the saved checkpoint has the adapters merged, and
    /// the adapters alone go to `checkpoints/<model>-lora` in PEFT's layout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraConfig>,
}

impl ModelSection {
    /// The Qwen3 configuration (real vocabulary, tied embeddings) of this shape.
    pub fn qwen_config(&self) -> QwenConfig {
        QwenConfig::qwen3_shaped(
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
        )
    }
}

/// The KD objective.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillSection {
    /// Weight of the KD term; `1 - alpha` goes to cross-entropy.
    pub alpha: f64,
    /// Softmax temperature of both distributions in the KD term.
    pub temperature: f64,
    /// `reverse_kl` (KL(student‖teacher), the original's choice), `forward_kl` or `jsd`.
    pub divergence: String,
    /// β of the generalised JSD (ignored otherwise).
    #[serde(default = "half")]
    pub beta: f64,
}

fn half() -> f64 {
    0.5
}

impl DistillSection {
    /// The loss configuration: T² on, token mean over supervised positions.
    pub fn kd_config(&self) -> Result<KdConfig> {
        let divergence = match self.divergence.as_str() {
            "reverse_kl" => Divergence::ReverseKl,
            "forward_kl" => Divergence::ForwardKl,
            "jsd" => Divergence::Jsd { beta: self.beta },
            other => bail!("distill.divergence: unknown `{other}` (reverse_kl, forward_kl, jsd)"),
        };
        Ok(KdConfig {
            divergence,
            temperature: self.temperature,
            t_squared: true,
            reduction: Reduction::TokenMean,
            chunk_positions: 1024,
        })
    }
}

/// Evaluation settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Prompts per forward pass.
    pub batch_size: usize,
}

impl Preset {
    /// A built-in preset by name, or a TOML file by path.
    pub fn load(name_or_path: &str) -> Result<Self> {
        if let Some((_, text)) = BUILTIN.iter().find(|(name, _)| *name == name_or_path) {
            return toml::from_str(text)
                .with_context(|| format!("built-in preset `{name_or_path}`"));
        }
        let path = Path::new(name_or_path);
        if !path.exists() {
            let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
            bail!(
                "no preset `{name_or_path}`: not a built-in ({}) nor a file",
                names.join(", ")
            );
        }
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing preset {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_presets_parse_and_validate() {
        for (name, _) in BUILTIN {
            let preset = Preset::load(name).expect("built-in preset parses");
            assert_eq!(&preset.name, name);
            preset
                .teacher
                .qwen_config()
                .validate(name)
                .expect("teacher config valid");
            preset
                .student
                .qwen_config()
                .validate(name)
                .expect("student config valid");
            preset.distill.kd_config().expect("divergence known");
        }
    }

    #[test]
    fn unknown_field_is_named() {
        let text = BUILTIN[0].1.replace("max_len", "max_length");
        let err = toml::from_str::<Preset>(&text).expect_err("unknown field refused");
        assert!(err.to_string().contains("max_length"), "{err}");
    }
}
