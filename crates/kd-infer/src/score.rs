//! Scoring the two label words at the answer position.

use std::time::Instant;

use burn::tensor::{Device, Int, Tensor, TensorData};
use kd_imdb::{Example, PadSide, collate};
use kd_qwen::{ForwardOptions, Qwen};
use serde::Serialize;

use crate::Error;

/// Logits of the two label tokens for one prompt: `[negative, positive]`.
pub type LabelScores = [f32; 2];

/// Scores prompt-only examples (encoded without a label), batching them by length.
///
/// `label_ids` are the first tokens of the negative and positive label words. `on_progress`
/// receives the number of examples scored so far.
///
/// Returns one [`LabelScores`] per example, in input order.
pub fn score_labels(
    model: &Qwen,
    prompts: &[Example],
    label_ids: [u32; 2],
    pad_id: u32,
    batch_size: usize,
    device: &Device,
    on_progress: &mut dyn FnMut(usize),
) -> Result<Vec<LabelScores>, Error> {
    if let Some(index) = prompts.iter().position(|e| e.input_ids.is_empty()) {
        return Err(Error::EmptyPrompt { index });
    }
    model.check_positions(prompts.iter().map(|e| e.input_ids.len()).max().unwrap_or(0))?;
    // Sorting by length keeps padding (and so wasted compute) small.
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| prompts[i].input_ids.len());
    let label_index = Tensor::<1, Int>::from_data(
        TensorData::new(vec![i64::from(label_ids[0]), i64::from(label_ids[1])], [2]),
        device,
    );

    let mut scores = vec![[0.0f32; 2]; prompts.len()];
    let mut done = 0;
    for chunk in order.chunks(batch_size.max(1)) {
        let picked: Vec<&Example> = chunk.iter().map(|&i| &prompts[i]).collect();
        let batch = collate(&picked, pad_id, PadSide::Right);
        // The last real token of each row predicts the answer's first token.
        let last: Vec<i64> = (0..batch.batch)
            .map(|row| (row * batch.seq_len + batch.lengths[row] - 1) as i64)
            .collect();
        let ids = Tensor::<2, Int>::from_data(
            TensorData::new(batch.input_ids.clone(), [batch.batch, batch.seq_len]),
            device,
        );
        let positions = Tensor::<1, Int>::from_data(TensorData::new(last, [batch.batch]), device);
        let logits = model.forward_at(ids, positions, &ForwardOptions::default()); // [b, vocab]
        let picked_logits = logits.select(1, label_index.clone()); // [b, 2]
        let values = picked_logits
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| Error::Backend(format!("{e:?}")))?;
        for (row, &i) in chunk.iter().enumerate() {
            scores[i] = [values[row * 2], values[row * 2 + 1]];
        }
        done += chunk.len();
        on_progress(done);
    }
    Ok(scores)
}

/// Accuracy and throughput of one evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Reviews scored.
    pub examples: usize,
    /// Correct predictions.
    pub correct: usize,
    /// `correct / examples`.
    pub accuracy: f64,
    /// Reviews per second.
    pub reviews_per_s: f64,
    /// Prompt tokens per second.
    pub tokens_per_s: f64,
    /// Wall time in seconds.
    pub seconds: f64,
}

/// Scores `prompts` and compares the preferred label with `labels` (0 = negative,
/// 1 = positive). Returns the report and the scores it was computed from, so a caller that
/// compares models review by review need not score them again.
#[allow(clippy::too_many_arguments)] // one call site per binary; a struct would only rename them
pub fn evaluate(
    model: &Qwen,
    prompts: &[Example],
    labels: &[usize],
    label_ids: [u32; 2],
    pad_id: u32,
    batch_size: usize,
    device: &Device,
    on_progress: &mut dyn FnMut(usize),
) -> Result<(EvalReport, Vec<LabelScores>), Error> {
    let started = Instant::now();
    let scores = score_labels(
        model,
        prompts,
        label_ids,
        pad_id,
        batch_size,
        device,
        on_progress,
    )?;
    let correct = scores
        .iter()
        .zip(labels)
        .filter(|&(s, &label)| usize::from(s[1] > s[0]) == label)
        .count();
    let seconds = started.elapsed().as_secs_f64();
    let tokens: usize = prompts.iter().map(|e| e.input_ids.len()).sum();
    let report = EvalReport {
        examples: prompts.len(),
        correct,
        accuracy: correct as f64 / prompts.len().max(1) as f64,
        reviews_per_s: prompts.len() as f64 / seconds,
        tokens_per_s: tokens as f64 / seconds,
        seconds,
    };
    Ok((report, scores))
}
