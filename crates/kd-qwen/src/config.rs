//! The model configuration, field for field as in a Hugging Face `config.json`.

use serde::{Deserialize, Serialize};

use crate::Error;

/// The two model families one [`crate::Qwen`] serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelType {
    /// Qwen2 / Qwen2.5 (and DeepSeek-R1-Distill-Qwen): q/k/v projections with bias, no q/k norm.
    Qwen2,
    /// Qwen3: no attention bias, per-head RMSNorm on q and k before RoPE, explicit `head_dim`.
    Qwen3,
}

/// One token id or several, as `config.json` may give `eos_token_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// Several ids, any of which counts.
    Many(Vec<u32>),
}

impl TokenIds {
    /// Every id, in the file's order.
    pub fn ids(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

/// A Qwen2/Qwen3 configuration. Field names are exactly those of Hugging Face's `config.json`,
/// so a checkpoint's file deserialises into it unchanged; unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QwenConfig {
    /// `qwen2` or `qwen3`; anything else is refused by [`QwenConfig::from_json`].
    pub model_type: ModelType,
    /// Rows of the token embedding (151,936 for Qwen3, padded past the tokenizer's 151,669).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU hidden layer.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention when fewer than the query heads).
    pub num_key_value_heads: usize,
    /// Per-head width. Qwen3 states it (128 even where `hidden_size / heads` is 64 or 80);
    /// Qwen2 leaves it out and derives it as `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Epsilon of every RMSNorm.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Longest position the model was trained for; longer inputs are refused.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Whether `lm_head` shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections. Qwen2's `config.json` has no such field: its projections
    /// always carry a bias, so an absent field means "the family's default".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// Activation of the MLP; only `silu` is implemented.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Sliding-window attention; not implemented, so it must be off.
    #[serde(default)]
    pub use_sliding_window: bool,
    /// RoPE scaling (YaRN, linear, ...); not implemented, so it must be absent, null or of
    /// type `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers ≥ 5 writes `{"rope_type": "default", "rope_theta": ..}` here instead of
    /// `rope_theta` / `rope_scaling`; [`QwenConfig::from_json`] folds it into `rope_theta`.
    /// Never written back: exported configs use the older top-level fields, which every
    /// transformers version reads.
    #[serde(default, skip_serializing)]
    pub rope_parameters: Option<serde_json::Value>,
    /// Per-layer attention kind (transformers ≥ 4.53); only `full_attention` is implemented.
    #[serde(default, skip_serializing)]
    pub layer_types: Option<Vec<String>>,
    /// Padding id, kept for export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<u32>,
    /// Beginning-of-sequence id, kept for export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence id(s), kept for export and generation. Hugging Face writes one id or a
    /// list (chat models often end on several tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    /// Initialiser standard deviation for training from scratch (Hugging Face's name).
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
}

/// Accepts a RoPE description only when it is plain RoPE (`rope_type` or legacy `type` equal
/// to `default`); every scaled variant (YaRN, linear, dynamic, llama3) is refused.
fn check_rope_type(value: &serde_json::Value, field: &str, origin: &str) -> Result<(), Error> {
    let kind = value
        .get("rope_type")
        .or_else(|| value.get("type"))
        .and_then(|v| v.as_str());
    if kind == Some("default") {
        return Ok(());
    }
    Err(Error::Config {
        file: origin.to_string(),
        field: Some(field.to_string()),
        msg: format!("RoPE scaling {value} is not supported (only rope_type `default`)"),
    })
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    1_000_000.0
}
fn default_max_pos() -> usize {
    40_960
}
fn default_act() -> String {
    "silu".to_string()
}
fn default_init_range() -> f64 {
    0.02
}

impl QwenConfig {
    /// Parses a `config.json` text and checks it with [`QwenConfig::validate`].
    ///
    /// `origin` names the file in error messages.
    pub fn from_json(text: &str, origin: &str) -> Result<Self, Error> {
        // Look at `model_type` first so that an unsupported family gets its own message
        // rather than a serde enum error.
        let raw: serde_json::Value = serde_json::from_str(text).map_err(|e| Error::Config {
            file: origin.to_string(),
            field: None,
            msg: e.to_string(),
        })?;
        match raw.get("model_type").and_then(|v| v.as_str()) {
            Some("qwen2" | "qwen3") => {}
            Some(other) => {
                return Err(Error::Config {
                    file: origin.to_string(),
                    field: Some("model_type".into()),
                    msg: format!("unsupported model_type `{other}` (kd supports qwen2 and qwen3)"),
                });
            }
            None => {
                return Err(Error::Config {
                    file: origin.to_string(),
                    field: Some("model_type".into()),
                    msg: "missing".into(),
                });
            }
        }
        let mut config: Self = serde_json::from_value(raw).map_err(|e| Error::Config {
            file: origin.to_string(),
            field: None,
            msg: e.to_string(),
        })?;
        if let Some(params) = config.rope_parameters.clone()
            && !params.is_null()
        {
            check_rope_type(&params, "rope_parameters", origin)?;
            config.rope_theta = params
                .get("rope_theta")
                .and_then(|v| v.as_f64())
                .ok_or_else(|| Error::Config {
                    file: origin.to_string(),
                    field: Some("rope_parameters.rope_theta".into()),
                    msg: format!("missing or not a number in {params}"),
                })?;
        }
        config.validate(origin)?;
        Ok(config)
    }

    /// Refuses configurations this implementation would compute wrongly.
    pub fn validate(&self, origin: &str) -> Result<(), Error> {
        let bad = |field: &str, msg: String| Error::Config {
            file: origin.to_string(),
            field: Some(field.to_string()),
            msg,
        };
        if self.use_sliding_window {
            return Err(bad(
                "use_sliding_window",
                "sliding-window attention is not supported".into(),
            ));
        }
        if let Some(scaling) = &self.rope_scaling
            && !scaling.is_null()
        {
            check_rope_type(scaling, "rope_scaling", origin)?;
        }
        if let Some(kinds) = &self.layer_types
            && let Some(other) = kinds.iter().find(|k| *k != "full_attention")
        {
            return Err(bad(
                "layer_types",
                format!("`{other}` layers are not supported (only full_attention)"),
            ));
        }
        if self.hidden_act != "silu" {
            return Err(bad(
                "hidden_act",
                format!("`{}` is not supported (only silu)", self.hidden_act),
            ));
        }
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
        ] {
            if value == 0 {
                return Err(bad(field, "must be positive".into()));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(bad(
                "num_key_value_heads",
                format!(
                    "{} query heads are not a multiple of {} key/value heads",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(bad(
                "head_dim",
                "absent, and hidden_size is not a multiple of heads".into(),
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(bad(
                "head_dim",
                format!("{} is odd; RoPE needs pairs", self.head_dim()),
            ));
        }
        Ok(())
    }

    /// The per-head width, stated or derived.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Whether q/k/v projections carry a bias.
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias
            .unwrap_or(self.model_type == ModelType::Qwen2)
    }

    /// Whether q and k are RMS-normalised per head before RoPE (Qwen3 only).
    pub fn qk_norm(&self) -> bool {
        self.model_type == ModelType::Qwen3
    }

    /// Number of parameters, counting a tied embedding once.
    pub fn num_params(&self) -> usize {
        let (d, hd) = (self.hidden_size, self.head_dim());
        let (q, kv) = (self.num_attention_heads * hd, self.num_key_value_heads * hd);
        let bias = if self.qkv_bias() { q + 2 * kv } else { 0 };
        let norms = if self.qk_norm() { 2 * hd } else { 0 };
        let attn = d * q + 2 * d * kv + q * d + bias + norms;
        let mlp = 3 * d * self.intermediate_size;
        let layer = attn + mlp + 2 * d;
        let embed = self.vocab_size * d;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + self.num_hidden_layers * layer + d
    }

    /// A Qwen3 configuration with the real Qwen3 vocabulary and the given shape; the
    /// remaining fields take Qwen3-0.6B's values.
    pub fn qwen3_shaped(
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
        head_dim: usize,
    ) -> Self {
        Self {
            model_type: ModelType::Qwen3,
            vocab_size: 151_936,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim: Some(head_dim),
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            max_position_embeddings: 40_960,
            tie_word_embeddings: true,
            attention_bias: Some(false),
            hidden_act: "silu".into(),
            use_sliding_window: false,
            rope_scaling: None,
            rope_parameters: None,
            layer_types: None,
            pad_token_id: None,
            bos_token_id: Some(151_643),
            eos_token_id: Some(TokenIds::One(151_645)),
            initializer_range: 0.02,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen3_0_6b_param_count() {
        // Qwen3-0.6B: 28 layers, d 1024, ffn 3072, 16 q heads, 8 kv heads, head_dim 128, tied.
        // Its model card gives 0.6B total; the exact count below is the sum written out in
        // `num_params` for these values: embed 151936*1024 + 28*(attn 1024*2048 + 2*1024*1024
        // + 2048*1024 + 2*128 + mlp 3*1024*3072 + 2*1024) + 1024.
        let c = QwenConfig::qwen3_shaped(1024, 3072, 28, 16, 8, 128);
        assert_eq!(c.num_params(), 596_049_920);
    }

    #[test]
    fn unsupported_model_type_names_field() {
        let err = QwenConfig::from_json(r#"{"model_type":"llama"}"#, "x/config.json")
            .expect_err("llama must be refused");
        let msg = err.to_string();
        assert!(
            msg.contains("model_type") && msg.contains("llama") && msg.contains("x/config.json"),
            "{msg}"
        );
    }

    #[test]
    fn eos_token_id_may_be_a_list() {
        let text = r#"{"model_type":"qwen3","vocab_size":100,"hidden_size":64,
            "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
            "num_key_value_heads":2,"head_dim":16,"eos_token_id":[151645,151643]}"#;
        let c = QwenConfig::from_json(text, "c.json").expect("valid");
        assert_eq!(
            c.eos_token_id.map(|e| e.ids()),
            Some(vec![151_645, 151_643])
        );
    }

    #[test]
    fn sliding_window_refused() {
        let mut c = QwenConfig::qwen3_shaped(64, 128, 2, 4, 2, 16);
        c.use_sliding_window = true;
        let msg = c.validate("c.json").expect_err("must refuse").to_string();
        assert!(msg.contains("use_sliding_window"), "{msg}");
    }

    #[test]
    fn qwen2_defaults_to_bias_and_derived_head_dim() {
        let text = r#"{"model_type":"qwen2","vocab_size":100,"hidden_size":64,
            "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
            "num_key_value_heads":2,"rope_theta":10000.0}"#;
        let c = QwenConfig::from_json(text, "c.json").expect("valid");
        assert!(c.qkv_bias() && !c.qk_norm());
        assert_eq!(c.head_dim(), 16);
    }
}
