//! Batched text generation with the KV cache: greedy or seeded sampling, stop conditions,
//! and finished rows leaving the batch.
//!
//! Prompts are left-padded so that every row's next token comes from the last column; the
//! model derives each row's positions from the attention mask (`cumsum(mask) - 1`), so a
//! padded row sees exactly what it would see alone. After every step the rows that have
//! finished are dropped from the batch (the cache, the mask and the next input are narrowed to
//! the rows still running), so a finished row costs nothing more.
//!
//! Stops come in two kinds. [`GenerateConfig::stop_sequences`] are **token-id** sequences: a
//! row stops when its generated ids end with one (exact for `</think>` and the chat markers,
//! which are single added tokens in the Qwen2 and Qwen3 tokenizers). A [`StopCondition`]
//! passed to [`generate_with`] sees each row's ids after every step; [`StopStrings`] is the
//! one for **text** stop strings: it decodes the tail of the row and searches the text, so
//! "Answer:" stops a row however BPE happened to split it.

use burn::tensor::{Int, Tensor, TensorData};
use kd_qwen::{ForwardOptions, KvCache, Padding, Qwen, pad_batch};

use crate::Error;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most likely token (ties go to the lowest id, as `argmax` breaks them).
    Greedy,
    /// A draw from the temperature-scaled distribution restricted by top-k and top-p.
    Sample {
        /// Divides the logits; must be > 0.
        temperature: f32,
        /// Keep only the `k` most likely tokens; 0 keeps all.
        top_k: usize,
        /// Keep the smallest set of most likely tokens whose probability reaches `top_p`;
        /// 1.0 keeps all.
        top_p: f32,
        /// Seed; each row draws from its own stream seeded by `(seed, stream)` (see
        /// [`GenerateConfig::row_streams`]), so a row's continuation does not depend on which
        /// rows share its batch.
        seed: u64,
    },
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// It produced an end-of-sequence token (kept as the last token).
    Eos,
    /// Its ids ended with a stop sequence (kept at the end).
    Stop,
    /// It reached `max_new_tokens`.
    Length,
}

impl FinishReason {
    /// `eos`, `stop` or `length`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Settings of one [`generate`] call.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateConfig {
    /// Most tokens generated per row.
    pub max_new_tokens: usize,
    /// Tokens that end a row.
    pub eos_ids: Vec<u32>,
    /// Id sequences that end a row when its generated ids end with one of them.
    pub stop_sequences: Vec<Vec<u32>>,
    /// Greedy or sampling.
    pub sampling: Sampling,
    /// The id written into padding (never attended to).
    pub pad_id: u32,
    /// The sampling stream of each prompt (e.g. its index in the whole job); empty means
    /// `0..prompts.len()`.
    pub row_streams: Vec<u64>,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            eos_ids: Vec::new(),
            stop_sequences: Vec::new(),
            sampling: Sampling::Greedy,
            pad_id: 0,
            row_streams: Vec::new(),
        }
    }
}

/// One row's continuation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// The generated ids, the final eos or stop sequence included.
    pub tokens: Vec<u32>,
    /// Why it stopped.
    pub finish: FinishReason,
}

/// Decides after every step whether a row has reached a stop of the caller's.
pub trait StopCondition {
    /// Whether a row whose generated ids so far are `tokens` (the newest last) stops here.
    fn should_stop(&self, tokens: &[u32]) -> bool;
}

/// No stop beyond those in the [`GenerateConfig`].
struct NoStop;

impl StopCondition for NoStop {
    fn should_stop(&self, _: &[u32]) -> bool {
        false
    }
}

/// Text stop strings: a row stops as soon as the decoded text of its generated ids contains
/// one of them.
///
/// Only the tail of the row is decoded, as many tokens as the longest string has bytes: every
/// token stands for at least one byte, so an occurrence that ends in the newest token lies
/// inside that tail, and earlier occurrences were seen at earlier steps.
pub struct StopStrings<F> {
    strings: Vec<String>,
    window: usize,
    decode: F,
}

impl<F: Fn(&[u32]) -> String> StopStrings<F> {
    /// Stops on any of `strings` (empty ones are ignored); `decode` turns ids into text, with
    /// special tokens written out (e.g. `tokenizers`' `decode(ids, false)`).
    pub fn new(strings: impl IntoIterator<Item = String>, decode: F) -> Self {
        let strings: Vec<String> = strings.into_iter().filter(|s| !s.is_empty()).collect();
        let window = strings.iter().map(String::len).max().unwrap_or(0);
        Self {
            strings,
            window,
            decode,
        }
    }
}

impl<F: Fn(&[u32]) -> String> StopCondition for StopStrings<F> {
    fn should_stop(&self, tokens: &[u32]) -> bool {
        if self.strings.is_empty() {
            return false;
        }
        let tail = &tokens[tokens.len().saturating_sub(self.window)..];
        let text = (self.decode)(tail);
        self.strings.iter().any(|s| text.contains(s.as_str()))
    }
}

/// Continues every prompt in one left-padded batch.
///
/// Returns one [`Generation`] per prompt, in order. Empty prompts are an error, and so is a
/// longest prompt plus `max_new_tokens` beyond the model's `max_position_embeddings`.
pub fn generate(
    model: &Qwen,
    prompts: &[Vec<u32>],
    config: &GenerateConfig,
) -> Result<Vec<Generation>, Error> {
    generate_with(model, prompts, config, &NoStop)
}

/// [`generate`] with a further stop condition (e.g. [`StopStrings`]); a row it stops ends
/// with [`FinishReason::Stop`].
pub fn generate_with(
    model: &Qwen,
    prompts: &[Vec<u32>],
    config: &GenerateConfig,
    stop: &dyn StopCondition,
) -> Result<Vec<Generation>, Error> {
    if let Some(index) = prompts.iter().position(Vec::is_empty) {
        return Err(Error::EmptyPrompt { index });
    }
    if let Sampling::Sample { temperature, .. } = config.sampling
        && (temperature.is_nan() || temperature <= 0.0)
    {
        return Err(Error::InvalidArgument(format!(
            "temperature must be > 0, got {temperature}"
        )));
    }
    let mut out: Vec<Generation> = prompts
        .iter()
        .map(|_| Generation {
            tokens: Vec::new(),
            finish: FinishReason::Length,
        })
        .collect();
    if prompts.is_empty() || config.max_new_tokens == 0 {
        return Ok(out);
    }
    // The longest prompt and every token it may still get must have a position.
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    model.check_positions(longest + config.max_new_tokens)?;
    let device = model.model.embed_tokens.weight.val().device();
    if !config.row_streams.is_empty() && config.row_streams.len() != prompts.len() {
        return Err(Error::InvalidArgument(format!(
            "{} row streams for {} prompts",
            config.row_streams.len(),
            prompts.len()
        )));
    }
    let seed = match config.sampling {
        Sampling::Sample { seed, .. } => seed,
        Sampling::Greedy => 0,
    };
    let mut rngs: Vec<SplitMix64> = (0..prompts.len())
        .map(|i| SplitMix64::new(seed, config.row_streams.get(i).copied().unwrap_or(i as u64)))
        .collect();

    let (mut input, mut mask) = pad_batch(prompts, config.pad_id, Padding::Left, &device);
    let mut cache = KvCache::new(model.config().num_hidden_layers);
    // `live[j]` is the prompt index of the batch's row j.
    let mut live: Vec<usize> = (0..prompts.len()).collect();
    for step in 0..config.max_new_tokens {
        // 1. Run the new tokens (the whole prompts first, then one token per row); only the
        //    last position's logits are needed.
        let options = ForwardOptions {
            attention_mask: Some(mask.clone()),
        };
        let logits = model.next_token_logits(input, &options, &mut cache); // [vocab, batch]
        let next = choose(logits, &config.sampling, &live, &mut rngs)?;

        // 2. Record, and decide which rows stop.
        let last_step = step + 1 == config.max_new_tokens;
        let mut keep = Vec::with_capacity(live.len());
        for (j, (&row, &token)) in live.iter().zip(&next).enumerate() {
            let generation = &mut out[row];
            generation.tokens.push(token);
            if config.eos_ids.contains(&token) {
                generation.finish = FinishReason::Eos;
            } else if config
                .stop_sequences
                .iter()
                .any(|s| !s.is_empty() && generation.tokens.ends_with(s))
                || stop.should_stop(&generation.tokens)
            {
                generation.finish = FinishReason::Stop;
            } else {
                keep.push(j);
            }
        }
        if keep.is_empty() || last_step {
            break;
        }

        // 3. Finished rows leave the batch: narrow cache, mask and input to the live rows.
        let next_live: Vec<i64> = keep.iter().map(|&j| i64::from(next[j])).collect();
        if keep.len() < live.len() {
            let rows: Vec<i64> = keep.iter().map(|&j| j as i64).collect();
            let rows = Tensor::<1, Int>::from_data(TensorData::new(rows, [keep.len()]), &device);
            cache.retain_rows(rows.clone());
            mask = mask.select(0, rows);
            live = keep.iter().map(|&j| live[j]).collect();
        }
        let n = live.len();
        input = Tensor::from_data(TensorData::new(next_live, [n, 1]), &device);
        mask = Tensor::cat(vec![mask, Tensor::ones([n, 1], &device)], 1);
    }
    Ok(out)
}

/// Groups prompt indices into batches of at most `batch_size` prompts of similar length
/// (sorted by length, ties by index), so little of each batch is padding.
pub fn length_buckets(lengths: &[usize], batch_size: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (lengths[i], i));
    order
        .chunks(batch_size.max(1))
        .map(<[usize]>::to_vec)
        .collect()
}

/// The next token of every live row.
///
/// # Shapes
/// - logits: `[vocab, live]` (feature-major, as [`Qwen::next_token_logits`] returns them)
fn choose(
    logits: Tensor<2>,
    sampling: &Sampling,
    live: &[usize],
    rngs: &mut [SplitMix64],
) -> Result<Vec<u32>, Error> {
    match *sampling {
        Sampling::Greedy => {
            // Only the ids come back from the device.
            let ids = logits.argmax(0).into_data().convert::<i64>();
            let ids: Vec<i64> = ids
                .try_into_vec()
                .map_err(|e| Error::Backend(format!("{e:?}")))?;
            Ok(ids.into_iter().map(|t| t as u32).collect())
        }
        Sampling::Sample {
            temperature,
            top_k,
            top_p,
            ..
        } => {
            let [vocab, rows] = logits.dims();
            let values: Vec<f32> = logits
                .div_scalar(temperature)
                .into_data()
                .convert::<f32>()
                .try_into_vec()
                .map_err(|e| Error::Backend(format!("{e:?}")))?;
            // Column j of the [vocab, rows] values is row j's distribution.
            let mut row = vec![0.0f32; vocab];
            Ok(live
                .iter()
                .enumerate()
                .map(|(j, &i)| {
                    for (v, slot) in row.iter_mut().enumerate() {
                        *slot = values[v * rows + j];
                    }
                    sample_row(&row, top_k, top_p, &mut rngs[i])
                })
                .collect())
        }
    }
}

/// Draws one id from temperature-scaled logits restricted to top-k, then top-p.
fn sample_row(logits: &[f32], top_k: usize, top_p: f32, rng: &mut SplitMix64) -> u32 {
    // Candidates by decreasing logit (ties by id, so the order is deterministic).
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    let k = if top_k == 0 {
        logits.len()
    } else {
        top_k.min(logits.len())
    };
    if k < order.len() {
        order.select_nth_unstable_by(k - 1, by_logit);
        order.truncate(k);
    }
    order.sort_unstable_by(by_logit);

    // Softmax over the candidates, then the top-p cut (always keeping the first).
    let max = logits[order[0] as usize];
    let weights: Vec<f64> = order
        .iter()
        .map(|&t| f64::from(logits[t as usize] - max).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut kept = 0;
    let mut mass = 0.0;
    for w in &weights {
        kept += 1;
        mass += w / total;
        if mass >= f64::from(top_p) {
            break;
        }
    }
    let total: f64 = weights[..kept].iter().sum();
    let mut u = rng.next_f64() * total;
    for (&t, &w) in order[..kept].iter().zip(&weights) {
        if u < w {
            return t;
        }
        u -= w;
    }
    order[kept - 1]
}

/// A small seeded generator (SplitMix64, Steele et al. 2014): enough for sampling, and its
/// stream is fixed by this file rather than by a dependency's version.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64, stream: u64) -> Self {
        let mut s = Self(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        s.next_u64();
        s
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}
