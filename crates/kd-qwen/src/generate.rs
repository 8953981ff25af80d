//! Padded batches and minimal greedy decoding with the KV cache.
//!
//! The full generation engine (sampling, stop strings, streaming) lives in kd-infer; this is
//! the reference it can be checked against.

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::{ForwardOptions, KvCache, Qwen};

/// Which side of a short row the padding goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Padding {
    /// Real tokens first, padding after (training, scoring).
    #[default]
    Right,
    /// Padding first, so every row's last token is at the last column (generation).
    Left,
}

/// Pads `rows` to the longest with `pad_id` and returns `(input_ids, attention_mask)`.
///
/// # Shapes
/// - returns `[batch, longest]` twice; the mask is 1 on real tokens, 0 on padding.
pub fn pad_batch(
    rows: &[Vec<u32>],
    pad_id: u32,
    padding: Padding,
    device: &Device,
) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(rows.len() * width);
    let mut mask = Vec::with_capacity(rows.len() * width);
    for row in rows {
        let pad = width - row.len();
        let real = row.iter().map(|&t| i64::from(t));
        let pads = std::iter::repeat_n(i64::from(pad_id), pad);
        let (ones, zeros) = (
            std::iter::repeat_n(1i64, row.len()),
            std::iter::repeat_n(0i64, pad),
        );
        match padding {
            Padding::Right => {
                ids.extend(real.chain(pads));
                mask.extend(ones.chain(zeros));
            }
            Padding::Left => {
                ids.extend(pads.chain(real));
                mask.extend(zeros.chain(ones));
            }
        }
    }
    let shape = [rows.len(), width];
    (
        Tensor::from_data(TensorData::new(ids, shape), device),
        Tensor::from_data(TensorData::new(mask, shape), device),
    )
}

/// Greedy continuation of each prompt: a left-padded batch, then one token per step through
/// the KV cache. A row stops after `eos` (which is included); the others go on to
/// `max_new_tokens`.
pub fn greedy(
    model: &Qwen,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    eos: Option<u32>,
) -> Vec<Vec<u32>> {
    let device = model.model.embed_tokens.weight.val().device();
    let batch = prompts.len();
    let pad_id = model.config().pad_token_id.unwrap_or(0);
    let (mut input, mut mask) = pad_batch(prompts, pad_id, Padding::Left, &device);
    let mut cache = KvCache::new(model.config().num_hidden_layers);
    let mut out = vec![Vec::new(); batch];
    let mut done = vec![false; batch];
    for _ in 0..max_new_tokens {
        // 1. Run the new tokens; only the last position's logits are needed.
        let options = ForwardOptions {
            attention_mask: Some(mask.clone()),
        };
        let hidden = model.forward_hidden(input, &options, Some(&mut cache));
        let [_, seq, width] = hidden.dims();
        let last = hidden.narrow(1, seq - 1, 1).reshape([batch, width]);
        let next = model.lm_logits(last).argmax(1); // [batch, 1]
        let next: Vec<i64> = next
            .into_data()
            .convert::<i64>()
            .try_into_vec()
            .unwrap_or_default();

        // 2. Record, stop rows at eos, feed the tokens back with the mask grown by one.
        for (row, &token) in next.iter().enumerate() {
            if !done[row] {
                out[row].push(token as u32);
                done[row] = eos == Some(token as u32);
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        input = Tensor::from_data(TensorData::new(next, [batch, 1]), &device);
        mask = Tensor::cat(vec![mask, Tensor::ones([batch, 1], &device)], 1);
    }
    out
}
