//! Qwen2 and Qwen3 decoder language models on burn.
//!
//! One implementation serves both families, switched by the fields of a Hugging Face
//! `config.json` ([`QwenConfig`]): grouped-query attention, rotate-half RoPE computed in f32,
//! SwiGLU, RMSNorm, optional per-head q/k RMSNorm (Qwen3), optional q/k/v bias (Qwen2),
//! tied or separate LM head, and `head_dim` independent of `hidden_size / heads`.
//! LoRA adapters ([`attach_lora`], [`save_adapters`], [`merge_lora`]) fine-tune it with the base
//! weights frozen, in Hugging Face PEFT's formula and file format.
//!
//! Two forwards compute the same function: [`Qwen::forward_hidden`] (row-major, for training
//! and scoring) and [`Qwen::forward_hidden_t`] (feature-major, for generation, fastest on
//! weights loaded in [`WeightLayout::Inference`]).
//!
//! The crate never picks a backend: every constructor takes a `&Device`.
//!
//! ```no_run
//! # use burn::tensor::{Device, Int, Tensor};
//! # use kd_qwen::{Qwen, QwenConfig, ForwardOptions};
//! let device = Device::default();
//! let config = QwenConfig::qwen3_shaped(64, 128, 2, 4, 2, 32);
//! let model = Qwen::new(&config, &device);
//! let ids = Tensor::<2, Int>::from_data([[1, 2, 3]], &device);
//! let logits = model.forward(ids, &ForwardOptions::default()); // [1, 3, 151936]
//! ```

mod cache;
mod config;
mod error;
mod generate;
mod io;
mod lora;
mod model;

pub use cache::KvCache;
pub use config::{ModelType, QwenConfig, TokenIds};
pub use error::Error;
pub use generate::{Padding, greedy, pad_batch};
pub use io::{
    Checkpoint, StoreDtype, TensorEntry, export_hf, load_checkpoint, load_checkpoint_with,
    make_shareable, save_checkpoint,
};
pub use lora::{
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, AttentionLora, LayerLora, LoraAdapter, LoraConfig, MlpLora,
    QwenLora, attach_lora, has_lora, load_adapters, merge_lora, save_adapters,
};
pub use model::{
    Attention, DecoderLayer, ForwardOptions, Mlp, Qwen, QwenBody, RmsNorm, Rope, WeightLayout,
};
