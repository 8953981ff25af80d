//! The decoder: embedding → N × (attention, SwiGLU MLP) → final norm → LM head.
//!
//! Module field names are exactly Hugging Face's checkpoint keys (`model.layers.3.self_attn.q_proj`),
//! so loading maps names one to one.
//!
//! Axis names used in shape comments: `batch`, `seq` (new tokens of this call), `past` (tokens
//! already in the KV cache), `total = past + seq`, `hidden`, `heads`, `kv_heads`, `head_dim`,
//! `vocab`.

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig};
use burn::tensor::activation::silu;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use crate::QwenConfig;
use crate::cache::KvCache;
use crate::lora::{AttentionLora, LoraAdapter, MlpLora, QwenLora};

/// Root-mean-square normalisation with a learned per-channel scale, computed in f32.
#[derive(Module, Debug)]
pub struct RmsNorm {
    /// Per-channel scale, `[width]`.
    pub weight: Param<Tensor<1>>,
    /// Added to the mean square before the root.
    #[module(skip)]
    pub eps: f64,
}

impl RmsNorm {
    /// A norm of the given width with unit scale.
    pub fn new(width: usize, eps: f64, device: &Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([width], device)),
            eps,
        }
    }

    /// Normalises over the last axis.
    ///
    /// # Shapes
    /// - x: `[..., width]` → `[..., width]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let rms = x
            .clone()
            .square()
            .mean_dim(D - 1)
            .add_scalar(self.eps)
            .sqrt();
        x.div(rms).mul(self.weight.val().unsqueeze())
    }

    /// Normalises over the first axis (the feature-major layout of [`Qwen::forward_hidden_t`]).
    ///
    /// # Shapes
    /// - x: `[width, rows]` → `[width, rows]`
    fn forward_t(&self, x: Tensor<2>) -> Tensor<2> {
        let rms = x.clone().square().mean_dim(0).add_scalar(self.eps).sqrt(); // [1, rows]
        x.div(rms).mul(self.weight.val().unsqueeze_dim(1))
    }
}

fn linear(d_in: usize, d_out: usize, bias: bool, std: f64, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out)
        .with_bias(bias)
        .with_initializer(Initializer::Normal { mean: 0.0, std })
        .init(device)
}

/// `base.forward(x)` as one `[batch * seq, in] · [in, out]` product.
///
/// # Shapes
/// - x: `[batch, seq, in]` → `[batch, seq, out]`
fn linear_forward(base: &Linear, x: Tensor<3>) -> Tensor<3> {
    let [batch, seq, d_in] = x.dims();
    let weight = base.weight.val();
    let [_, d_out] = weight.dims();
    let y = x
        .reshape([batch * seq, d_in])
        .matmul(weight)
        .reshape([batch, seq, d_out]);
    match &base.bias {
        Some(bias) => y + bias.val().unsqueeze(),
        None => y,
    }
}

/// A projection plus, when it has one, its LoRA adapter's contribution.
fn project(base: &Linear, adapter: Option<&LoraAdapter>, x: Tensor<3>) -> Tensor<3> {
    match adapter {
        Some(adapter) => linear_forward(base, x.clone()) + adapter.forward(x),
        None => linear_forward(base, x),
    }
}

/// A linear layer in the feature-major layout: `wᵀ · x` (+ bias) for the logical `[in, out]`
/// weight `w`. The weight is the left operand, so a layer stored as `[out, in]` (see
/// [`WeightLayout::Inference`]) streams through gemm contiguously.
///
/// # Shapes
/// - x: `[in, rows]` → `[out, rows]`
fn project_t(base: &Linear, x: Tensor<2>) -> Tensor<2> {
    let y = base.weight.val().transpose().matmul(x); // [out, in] · [in, rows]
    match &base.bias {
        Some(bias) => y + bias.val().unsqueeze_dim(1),
        None => y,
    }
}

/// Grouped-query self-attention with rotary positions (and, for Qwen3, q/k RMSNorm).
#[derive(Module, Debug)]
pub struct Attention {
    /// `[hidden] → [heads * head_dim]`.
    pub q_proj: Linear,
    /// `[hidden] → [kv_heads * head_dim]`.
    pub k_proj: Linear,
    /// `[hidden] → [kv_heads * head_dim]`.
    pub v_proj: Linear,
    /// `[heads * head_dim] → [hidden]`.
    pub o_proj: Linear,
    /// Per-head norm of the queries (Qwen3).
    pub q_norm: Option<RmsNorm>,
    /// Per-head norm of the keys (Qwen3).
    pub k_norm: Option<RmsNorm>,
    #[module(skip)]
    pub(crate) heads: usize,
    #[module(skip)]
    pub(crate) kv_heads: usize,
    #[module(skip)]
    pub(crate) head_dim: usize,
}

/// Rotary tables for one call: `cos` and `sin`, each `[batch, 1, seq, head_dim]`.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor<4>,
    sin: Tensor<4>,
}

impl Rope {
    /// Builds the tables for the given absolute positions, in f32 as Hugging Face does.
    ///
    /// # Shapes
    /// - positions: `[batch, seq]`
    pub fn new(positions: Tensor<2, Int>, head_dim: usize, theta: f64) -> Self {
        let device = positions.device();
        let [batch, seq] = positions.dims();
        let half = head_dim / 2;
        // inv_freq[i] = theta^(-2i / head_dim), i < head_dim / 2.
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
            .collect();
        let inv_freq = Tensor::<1>::from_floats(inv_freq.as_slice(), &device);
        // [batch, seq, 1] * [1, 1, half] -> [batch, seq, half]
        let angles = positions
            .float()
            .unsqueeze_dim::<3>(2)
            .mul(inv_freq.reshape([1, 1, half]));
        // Hugging Face repeats the half-table: emb = cat(freqs, freqs).
        let angles = Tensor::cat(vec![angles.clone(), angles], 2); // [batch, seq, head_dim]
        let angles = angles.reshape([batch, 1, seq, head_dim]);
        Self {
            cos: angles.clone().cos(),
            sin: angles.sin(),
        }
    }

    /// Rotates `x` by rotate-half: `x * cos + rotate_half(x) * sin`.
    ///
    /// # Shapes
    /// - x: `[batch, heads, seq, head_dim]`
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let [_, _, _, head_dim] = x.dims();
        let half = head_dim / 2;
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.clone().narrow(3, half, half);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x.mul(self.cos.clone()) + rotated.mul(self.sin.clone())
    }
}

impl Attention {
    fn new(config: &QwenConfig, device: &Device) -> Self {
        let (d, hd) = (config.hidden_size, config.head_dim());
        let (heads, kv_heads) = (config.num_attention_heads, config.num_key_value_heads);
        let std = config.initializer_range;
        let bias = config.qkv_bias();
        let norm = || {
            config
                .qk_norm()
                .then(|| RmsNorm::new(hd, config.rms_norm_eps, device))
        };
        Self {
            q_proj: linear(d, heads * hd, bias, std, device),
            k_proj: linear(d, kv_heads * hd, bias, std, device),
            v_proj: linear(d, kv_heads * hd, bias, std, device),
            o_proj: linear(heads * hd, d, false, std, device),
            q_norm: norm(),
            k_norm: norm(),
            heads,
            kv_heads,
            head_dim: hd,
        }
    }

    /// # Shapes
    /// - x: `[batch, seq, hidden]` → `[batch, seq, hidden]`
    /// - mask: `[batch, heads, seq, total]`, true where attention is forbidden; `None` means
    ///   plain causal attention over this call's tokens (no cache, no left padding).
    fn forward(
        &self,
        x: Tensor<3>,
        rope: &Rope,
        mask: Option<Tensor<4, Bool>>,
        cache: Option<&mut (Option<Tensor<4>>, Option<Tensor<4>>)>,
        lora: Option<&AttentionLora>,
    ) -> Tensor<3> {
        let [batch, seq, _] = x.dims();
        let (heads, kv_heads, hd) = (self.heads, self.kv_heads, self.head_dim);

        // 1. Project (with the LoRA adapters, if any) and split heads:
        //    [batch, seq, n * hd] -> [batch, n, seq, hd].
        let q = project(
            &self.q_proj,
            lora.and_then(|l| l.q_proj.as_ref()),
            x.clone(),
        )
        .reshape([batch, seq, heads, hd]);
        let k = project(
            &self.k_proj,
            lora.and_then(|l| l.k_proj.as_ref()),
            x.clone(),
        )
        .reshape([batch, seq, kv_heads, hd]);
        let v = project(&self.v_proj, lora.and_then(|l| l.v_proj.as_ref()), x)
            .reshape([batch, seq, kv_heads, hd]);

        // 2-4. Norms, RoPE, cache, attention; 5. merge heads and project back.
        let out = self.attend(q, k, v, rope, mask, cache); // [batch, seq, heads * hd]
        project(&self.o_proj, lora.and_then(|l| l.o_proj.as_ref()), out)
    }

    /// The part of [`forward`](Self::forward) between the projections: per-head norms, RoPE,
    /// the KV cache and grouped-query attention.
    ///
    /// # Shapes
    /// - q: `[batch, seq, heads, hd]`, k and v: `[batch, seq, kv_heads, hd]`
    /// - returns `[batch, seq, heads * hd]`
    fn attend(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        rope: &Rope,
        mask: Option<Tensor<4, Bool>>,
        cache: Option<&mut (Option<Tensor<4>>, Option<Tensor<4>>)>,
    ) -> Tensor<3> {
        let [batch, seq, heads, hd] = q.dims();

        // 2. Qwen3 normalises q and k per head, before RoPE.
        let q = match &self.q_norm {
            Some(norm) => norm.forward(q),
            None => q,
        };
        let k = match &self.k_norm {
            Some(norm) => norm.forward(k),
            None => k,
        };
        let q = rope.apply(q.swap_dims(1, 2)); // [batch, heads, seq, hd]
        let k = rope.apply(k.swap_dims(1, 2)); // [batch, kv_heads, seq, hd]
        let v = v.swap_dims(1, 2); // [batch, kv_heads, seq, hd]

        // 3. Append to the cache: keys and values become [batch, kv_heads, total, hd].
        let (k, v) = match cache {
            Some(slot) => {
                let k = match slot.0.take() {
                    Some(past) => Tensor::cat(vec![past, k], 2),
                    None => k,
                };
                let v = match slot.1.take() {
                    Some(past) => Tensor::cat(vec![past, v], 2),
                    None => v,
                };
                slot.0 = Some(k.clone());
                slot.1 = Some(v.clone());
                (k, v)
            }
            None => (k, v),
        };

        // 4. Grouped-query attention: each kv head serves heads / kv_heads query heads.
        let (k, v) = (self.repeat_kv(k), self.repeat_kv(v)); // [batch, heads, total, hd]
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: mask.is_none(),
        };
        let out = attention(q, k, v, mask, None, options); // [batch, heads, seq, hd]
        out.swap_dims(1, 2).reshape([batch, seq, heads * hd])
    }

    /// [`forward`](Self::forward) in the feature-major layout (no LoRA).
    ///
    /// # Shapes
    /// - x: `[hidden, batch * seq]` (column `b * seq + s` is token `s` of row `b`) → the same
    fn forward_t(
        &self,
        x: Tensor<2>,
        batch: usize,
        rope: &Rope,
        mask: Option<Tensor<4, Bool>>,
        cache: Option<&mut (Option<Tensor<4>>, Option<Tensor<4>>)>,
    ) -> Tensor<2> {
        let [_, rows] = x.dims();
        let seq = rows / batch;
        let (heads, kv_heads, hd) = (self.heads, self.kv_heads, self.head_dim);
        // [n * hd, rows] -> [batch, seq, n, hd]: a copy the size of the activations.
        let split = |t: Tensor<2>, n: usize| t.transpose().reshape([batch, seq, n, hd]);
        let q = split(project_t(&self.q_proj, x.clone()), heads);
        let k = split(project_t(&self.k_proj, x.clone()), kv_heads);
        let v = split(project_t(&self.v_proj, x), kv_heads);
        let out = self.attend(q, k, v, rope, mask, cache); // [batch, seq, heads * hd]
        project_t(&self.o_proj, out.reshape([rows, heads * hd]).transpose())
    }

    fn repeat_kv(&self, x: Tensor<4>) -> Tensor<4> {
        let groups = self.heads / self.kv_heads;
        if groups == 1 {
            return x;
        }
        let [batch, kv_heads, total, hd] = x.dims();
        // [batch, kv_heads, 1, total, hd] -> [batch, kv_heads, groups, total, hd]
        x.unsqueeze_dim::<5>(2)
            .expand([batch, kv_heads, groups, total, hd])
            .reshape([batch, kv_heads * groups, total, hd])
    }
}

/// The SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp {
    /// `[hidden] → [intermediate]`, through SiLU.
    pub gate_proj: Linear,
    /// `[hidden] → [intermediate]`.
    pub up_proj: Linear,
    /// `[intermediate] → [hidden]`.
    pub down_proj: Linear,
}

impl Mlp {
    fn new(config: &QwenConfig, device: &Device) -> Self {
        let (d, f, std) = (
            config.hidden_size,
            config.intermediate_size,
            config.initializer_range,
        );
        Self {
            gate_proj: linear(d, f, false, std, device),
            up_proj: linear(d, f, false, std, device),
            down_proj: linear(f, d, false, std, device),
        }
    }

    fn forward(&self, x: Tensor<3>, lora: Option<&MlpLora>) -> Tensor<3> {
        let gate = project(
            &self.gate_proj,
            lora.and_then(|l| l.gate_proj.as_ref()),
            x.clone(),
        );
        let up = project(&self.up_proj, lora.and_then(|l| l.up_proj.as_ref()), x);
        let h = silu(gate).mul(up);
        project(&self.down_proj, lora.and_then(|l| l.down_proj.as_ref()), h)
    }

    /// # Shapes
    /// - x: `[hidden, rows]` → `[hidden, rows]`
    fn forward_t(&self, x: Tensor<2>) -> Tensor<2> {
        let gate = project_t(&self.gate_proj, x.clone());
        let up = project_t(&self.up_proj, x);
        project_t(&self.down_proj, silu(gate).mul(up))
    }
}

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    /// Self-attention.
    pub self_attn: Attention,
    /// Feed-forward block.
    pub mlp: Mlp,
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn new(config: &QwenConfig, device: &Device) -> Self {
        let (d, eps) = (config.hidden_size, config.rms_norm_eps);
        Self {
            self_attn: Attention::new(config, device),
            mlp: Mlp::new(config, device),
            input_layernorm: RmsNorm::new(d, eps, device),
            post_attention_layernorm: RmsNorm::new(d, eps, device),
        }
    }
}

/// The transformer body (Hugging Face's `model.` prefix).
#[derive(Module, Debug)]
pub struct QwenBody {
    /// Token embedding, `[vocab, hidden]`.
    pub embed_tokens: Embedding,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer>,
    /// Final norm.
    pub norm: RmsNorm,
}

/// A Qwen2 or Qwen3 causal language model.
#[derive(Module, Debug)]
pub struct Qwen {
    /// The transformer body.
    pub model: QwenBody,
    /// Output projection `[hidden] → [vocab]`; `None` when tied to the embedding.
    pub lm_head: Option<Linear>,
    /// LoRA adapters beside the decoder layers' projections; `None` for a plain model. Set by
    /// [`attach_lora`](crate::attach_lora) / [`load_adapters`](crate::load_adapters), folded
    /// into the weights and cleared by [`merge_lora`](crate::merge_lora).
    pub lora: Option<QwenLora>,
    #[module(skip)]
    pub(crate) config: QwenConfig,
}

/// How the linear layers' weights sit in memory. Both layouts compute the same function
/// (logically every weight is burn's `[in, out]`); they differ in which products are fast.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightLayout {
    /// Contiguous `[in, out]`, as burn's `Linear` initialises and the optimizer updates them.
    /// A run resumed from a checkpoint needs it to round exactly as the uninterrupted run.
    #[default]
    Training,
    /// Contiguous `[out, in]`, the checkpoint's own layout, seen through a transposed view.
    /// The feature-major forward ([`Qwen::forward_hidden_t`], used for generation) multiplies
    /// each weight as the left operand, which gemm streams 2-3× faster from this layout on the
    /// CPU with a few rows; loading skips the transpose. The ordinary forward (training,
    /// scoring) is about 30% slower on it.
    Inference,
}

/// `w` (logically `[in, out]`) stored in `layout`: a copy through the host.
fn relaid(w: Tensor<2>, layout: WeightLayout) -> Tensor<2> {
    let device = w.device();
    match layout {
        WeightLayout::Training => Tensor::from_data(w.into_data(), &device),
        WeightLayout::Inference => {
            Tensor::<2>::from_data(w.transpose().into_data(), &device).transpose()
        }
    }
}

/// What one forward call needs besides the token ids.
#[derive(Debug, Clone, Default)]
pub struct ForwardOptions {
    /// `[batch, total]` with 1 for real tokens and 0 for padding, covering cached and new
    /// tokens (Hugging Face's `attention_mask`). `None`: no padding anywhere, or right padding
    /// without a cache, which causal attention already handles exactly.
    pub attention_mask: Option<Tensor<2, Int>>,
}

impl Qwen {
    /// A model with freshly initialised weights (normal, std `initializer_range`; norms at 1).
    pub fn new(config: &QwenConfig, device: &Device) -> Self {
        let std = config.initializer_range;
        let embed_tokens = EmbeddingConfig::new(config.vocab_size, config.hidden_size)
            .with_initializer(Initializer::Normal { mean: 0.0, std })
            .init(device);
        let layers = (0..config.num_hidden_layers)
            .map(|_| DecoderLayer::new(config, device))
            .collect();
        let lm_head = (!config.tie_word_embeddings)
            .then(|| linear(config.hidden_size, config.vocab_size, false, std, device));
        Self {
            model: QwenBody {
                embed_tokens,
                layers,
                norm: RmsNorm::new(config.hidden_size, config.rms_norm_eps, device),
            },
            lm_head,
            lora: None,
            config: config.clone(),
        }
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &QwenConfig {
        &self.config
    }

    /// The same model with its linear weights stored in `layout` (each weight copied once,
    /// through the host). [`Checkpoint::load_with`](crate::Checkpoint::load_with) loads
    /// straight into either layout; this converts a model built or trained in memory.
    pub fn into_layout(mut self, layout: WeightLayout) -> Self {
        let relay = |l: &mut Linear| l.weight = l.weight.clone().map(|w| relaid(w, layout));
        for layer in &mut self.model.layers {
            let (a, m) = (&mut layer.self_attn, &mut layer.mlp);
            for l in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj] {
                relay(l);
            }
            for l in [&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj] {
                relay(l);
            }
        }
        if let Some(head) = &mut self.lm_head {
            relay(head);
        }
        self
    }

    /// Checks that a sequence of `tokens` positions (cached, new and any still to be
    /// generated) fits the model's `max_position_embeddings`. Callers with user-supplied
    /// lengths check here first and get an error; the forward pass itself only asserts.
    pub fn check_positions(&self, tokens: usize) -> Result<(), crate::Error> {
        let max = self.config.max_position_embeddings;
        if tokens <= max {
            Ok(())
        } else {
            Err(crate::Error::TooLong { tokens, max })
        }
    }

    /// Runs the body and returns the final-norm hidden states of every new position.
    ///
    /// Positions come from the attention mask as Hugging Face derives them
    /// (`cumsum(mask) - 1`, so a left-padded row starts at position 0 on its first real token),
    /// or count up from the cache length when there is no mask.
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]` → `[batch, seq, hidden]`
    ///
    /// # Panics
    ///
    /// If the cached plus new tokens exceed `max_position_embeddings` (check user input with
    /// [`check_positions`](Self::check_positions) first), or if the attention mask's shape is
    /// not `[batch, past + seq]`.
    pub fn forward_hidden(
        &self,
        input_ids: Tensor<2, Int>,
        options: &ForwardOptions,
        mut cache: Option<&mut KvCache>,
    ) -> Tensor<3> {
        let [_, seq] = input_ids.dims();
        let past = cache.as_ref().map_or(0, |c| c.len());

        // 1. Positions and mask.
        let (rope, mask) = self.rope_and_mask(&input_ids, options, past);

        // 2. Embed and run the layers.
        let mut x = self.model.embed_tokens.forward(input_ids); // [batch, seq, hidden]
        for (i, layer) in self.model.layers.iter().enumerate() {
            let slot = cache.as_mut().map(|c| c.layer_mut(i));
            let lora = self.lora.as_ref().map(|l| &l.layers[i]);
            let h = layer.self_attn.forward(
                layer.input_layernorm.forward(x.clone()),
                &rope,
                mask.clone(),
                slot,
                lora.map(|l| &l.self_attn),
            );
            x = x + h;
            let h = layer.mlp.forward(
                layer.post_attention_layernorm.forward(x.clone()),
                lora.map(|l| &l.mlp),
            );
            x = x + h;
        }
        if let Some(c) = cache {
            c.advance(seq);
        }

        // 3. Final norm.
        self.model.norm.forward(x)
    }

    /// RoPE tables and attention mask for `input_ids` after `past` cached tokens: positions
    /// from the attention mask as Hugging Face derives them (`cumsum(mask) - 1`), or counting
    /// up from `past` without one.
    ///
    /// # Panics
    ///
    /// As [`forward_hidden`](Self::forward_hidden).
    fn rope_and_mask(
        &self,
        input_ids: &Tensor<2, Int>,
        options: &ForwardOptions,
        past: usize,
    ) -> (Rope, Option<Tensor<4, Bool>>) {
        let device = input_ids.device();
        let [batch, seq] = input_ids.dims();
        let total = past + seq;
        assert!(
            total <= self.config.max_position_embeddings,
            "sequence of {total} tokens exceeds max_position_embeddings {}",
            self.config.max_position_embeddings
        );
        let heads = self.config.num_attention_heads;
        let (positions, mask) = match &options.attention_mask {
            Some(attention_mask) => {
                let [mask_batch, mask_total] = attention_mask.dims();
                assert!(
                    mask_batch == batch && mask_total == total,
                    "attention_mask is [{mask_batch}, {mask_total}], expected [{batch}, {total}]"
                );
                let positions = attention_mask.clone().cumsum(1).sub_scalar(1).clamp_min(0);
                let positions = positions.narrow(1, past, seq); // [batch, seq]
                let mask = build_mask(attention_mask.clone(), past, seq, heads);
                (positions, Some(mask))
            }
            None => {
                let positions = Tensor::<1, Int>::arange(past as i64..total as i64, &device)
                    .unsqueeze::<2>()
                    .expand([batch, seq]);
                // Causal over this call only is right when nothing is cached.
                let mask = (past > 0).then(|| {
                    let ones = Tensor::<2, Int>::ones([batch, total], &device);
                    build_mask(ones, past, seq, heads)
                });
                (positions, mask)
            }
        };
        let rope = Rope::new(positions, self.config.head_dim(), self.config.rope_theta);
        (rope, mask)
    }

    /// [`forward_hidden`](Self::forward_hidden) with the residual stream kept feature-major,
    /// `[hidden, tokens]`, so that every weight is the left operand of its product. With a
    /// weight stored `[out, in]` ([`WeightLayout::Inference`]) gemm then streams it
    /// contiguously: 2-3× faster on the CPU with a few rows (decoding), and no slower with
    /// many (prefill). Attention works on the usual layout; moving q, k, v and its output
    /// between the two costs copies the size of the activations. A model with LoRA adapters
    /// takes the ordinary path.
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]` → `[hidden, batch * seq]` (column `b * seq + s` is token
    ///   `s` of row `b`)
    ///
    /// # Panics
    ///
    /// As [`forward_hidden`](Self::forward_hidden).
    pub fn forward_hidden_t(
        &self,
        input_ids: Tensor<2, Int>,
        options: &ForwardOptions,
        mut cache: Option<&mut KvCache>,
    ) -> Tensor<2> {
        let [batch, seq] = input_ids.dims();
        let (rows, width) = (batch * seq, self.config.hidden_size);
        if self.lora.is_some() {
            let hidden = self.forward_hidden(input_ids, options, cache);
            return hidden.reshape([rows, width]).transpose();
        }
        let past = cache.as_ref().map_or(0, |c| c.len());
        let (rope, mask) = self.rope_and_mask(&input_ids, options, past);

        // 1. Embed: [batch, seq, hidden] -> [hidden, batch * seq].
        let mut x = self
            .model
            .embed_tokens
            .forward(input_ids)
            .reshape([rows, width])
            .transpose();

        // 2. The layers.
        for (i, layer) in self.model.layers.iter().enumerate() {
            let slot = cache.as_mut().map(|c| c.layer_mut(i));
            let h = layer.self_attn.forward_t(
                layer.input_layernorm.forward_t(x.clone()),
                batch,
                &rope,
                mask.clone(),
                slot,
            );
            x = x + h;
            let h = layer
                .mlp
                .forward_t(layer.post_attention_layernorm.forward_t(x.clone()));
            x = x + h;
        }
        if let Some(c) = cache {
            c.advance(seq);
        }

        // 3. Final norm.
        self.model.norm.forward_t(x)
    }

    /// The logits of each row's last position, the step of generation, feature-major: runs
    /// [`forward_hidden_t`](Self::forward_hidden_t) (appending to `cache`) and the head on
    /// one column per row. Reduce over axis 0 (`argmax(0)`): on the CPU that is several times
    /// faster than reducing a transposed view over axis 1.
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]` → `[vocab, batch]`
    ///
    /// # Panics
    ///
    /// As [`forward_hidden`](Self::forward_hidden).
    pub fn next_token_logits(
        &self,
        input_ids: Tensor<2, Int>,
        options: &ForwardOptions,
        cache: &mut KvCache,
    ) -> Tensor<2> {
        let [batch, seq] = input_ids.dims();
        let device = input_ids.device();
        let hidden = self.forward_hidden_t(input_ids, options, Some(cache)); // [hidden, rows]
        let hidden = if seq == 1 {
            hidden
        } else {
            let last: Vec<i64> = (0..batch).map(|b| (b * seq + seq - 1) as i64).collect();
            hidden.select(
                1,
                Tensor::<1, Int>::from_data(TensorData::new(last, [batch]), &device),
            )
        };
        // [vocab, hidden] · [hidden, batch] -> [vocab, batch]
        match &self.lm_head {
            Some(head) => project_t(head, hidden),
            None => self.model.embed_tokens.weight.val().matmul(hidden),
        }
    }

    /// Projects hidden states to vocabulary logits (the tied embedding or `lm_head`).
    ///
    /// # Shapes
    /// - hidden: `[..., hidden]` → `[..., vocab]`
    pub fn lm_logits<const D: usize>(&self, hidden: Tensor<D>) -> Tensor<D> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                // [vocab, hidden] -> [hidden, vocab]
                let weight = self.model.embed_tokens.weight.val().transpose();
                let [h, v] = weight.dims();
                let mut dims = hidden.dims();
                let rows: usize = dims[..D - 1].iter().product();
                dims[D - 1] = v;
                hidden.reshape([rows, h]).matmul(weight).reshape(dims)
            }
        }
    }

    /// Logits of every position.
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]` → `[batch, seq, vocab]`
    pub fn forward(&self, input_ids: Tensor<2, Int>, options: &ForwardOptions) -> Tensor<3> {
        self.lm_logits(self.forward_hidden(input_ids, options, None))
    }

    /// Logits at selected positions only: the LM head runs on `positions.len()` rows instead
    /// of `batch * seq`, which is what training on a few supervised tokens needs when the
    /// vocabulary is 151,936 wide.
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]`; flat_positions: `[n]` indices into `batch * seq`
    ///   (row-major) → `[n, vocab]`
    pub fn forward_at(
        &self,
        input_ids: Tensor<2, Int>,
        flat_positions: Tensor<1, Int>,
        options: &ForwardOptions,
    ) -> Tensor<2> {
        let hidden = self.forward_hidden(input_ids, options, None);
        let [batch, seq, width] = hidden.dims();
        let rows = hidden
            .reshape([batch * seq, width])
            .select(0, flat_positions); // [n, hidden]
        self.lm_logits(rows)
    }
}

/// The boolean attention mask (true = forbidden) for `seq` new queries over `past + seq` keys.
///
/// # Shapes
/// - attention_mask: `[batch, total]` → `[batch, heads, seq, total]`
fn build_mask(
    attention_mask: Tensor<2, Int>,
    past: usize,
    seq: usize,
    heads: usize,
) -> Tensor<4, Bool> {
    let device = attention_mask.device();
    let [batch, total] = attention_mask.dims();
    // Query i (absolute index past + i) may see key j iff j <= past + i. burn's `tril_mask`
    // is true *outside* the lower triangle, i.e. exactly at the forbidden j > past + i.
    let future = Tensor::<2, Bool>::tril_mask([seq, total], past as i64, &device); // [seq, total]
    let padded = attention_mask.equal_elem(0); // [batch, total]
    let future = future.unsqueeze::<3>().expand([batch, seq, total]);
    let padded = padded.unsqueeze_dim::<3>(1).expand([batch, seq, total]);
    let mut mask = future.bool_or(padded);
    // A query row with every key masked (a left-pad query) would softmax to NaN; let it see
    // everything instead. Its output is padding and never read.
    let all_masked = mask.clone().int().sum_dim(2).equal_elem(total as i64); // [batch, seq, 1]
    mask = mask.bool_and(all_masked.bool_not().expand([batch, seq, total]));
    mask.unsqueeze_dim::<4>(1)
        .expand([batch, heads, seq, total])
}
