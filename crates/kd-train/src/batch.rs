//! Turning collated token batches into the tensors one training step needs.

use burn::tensor::{Device, Int, Tensor, TensorData};
use kd_imdb::{Batch, IGNORE_INDEX};

/// Where the loss is taken: for every supervised label at `(row, t + 1)`, the logits of
/// position `(row, t)` predict it, because a causal LM's output at `t` is its guess for the
/// token at `t + 1`. Returns flat indices `row * seq + t` and the target ids.
///
/// The Python original masked logits with labels *without* this shift; this function is the
/// one place the shift happens.
pub fn supervised_positions(labels: &[i64], batch: usize, seq: usize) -> (Vec<i64>, Vec<i64>) {
    assert_eq!(
        labels.len(),
        batch * seq,
        "labels must be [batch, seq] row-major"
    );
    let mut positions = Vec::new();
    let mut targets = Vec::new();
    for row in 0..batch {
        for t in 0..seq.saturating_sub(1) {
            let label = labels[row * seq + t + 1];
            if label != IGNORE_INDEX {
                positions.push((row * seq + t) as i64);
                targets.push(label);
            }
        }
    }
    (positions, targets)
}

/// One batch on a device: token ids plus the supervised positions and their targets.
#[derive(Debug, Clone)]
pub struct StepBatch {
    /// `[batch, seq]` token ids, right-padded.
    pub input_ids: Tensor<2, Int>,
    /// `[n]` flat indices of the positions whose logits are supervised.
    pub positions: Tensor<1, Int>,
    /// `[n]` target token ids.
    pub targets: Tensor<1, Int>,
    /// Number of supervised tokens `n`.
    pub supervised: usize,
    /// Number of non-padding tokens in the batch.
    pub tokens: usize,
    /// Supervised positions of each row, in row order (they sum to `supervised`).
    pub row_supervised: Vec<usize>,
    /// Indices of the batch's rows in the run's example list, when the caller knows them
    /// (a teacher cache looks its rows up by them).
    pub examples: Vec<usize>,
}

impl StepBatch {
    /// Uploads a collated batch to `device`.
    pub fn new(batch: &Batch, device: &Device) -> Self {
        let (positions, targets) = supervised_positions(&batch.labels, batch.batch, batch.seq_len);
        let n = positions.len();
        let mut row_supervised = vec![0; batch.batch];
        for &p in &positions {
            row_supervised[p as usize / batch.seq_len] += 1;
        }
        Self {
            input_ids: Tensor::from_data(
                TensorData::new(batch.input_ids.clone(), [batch.batch, batch.seq_len]),
                device,
            ),
            positions: Tensor::from_data(TensorData::new(positions, [n]), device),
            targets: Tensor::from_data(TensorData::new(targets, [n]), device),
            supervised: n,
            tokens: batch.lengths.iter().sum(),
            row_supervised,
            examples: Vec::new(),
        }
    }

    /// The same batch, recording which examples its rows are.
    pub fn with_examples(mut self, examples: Vec<usize>) -> Self {
        self.examples = examples;
        self
    }

    /// The same batch on another device (the teacher's, say).
    pub fn to_device(&self, device: &Device) -> Self {
        Self {
            input_ids: self.input_ids.clone().to_device(device),
            positions: self.positions.clone().to_device(device),
            targets: self.targets.clone().to_device(device),
            supervised: self.supervised,
            tokens: self.tokens,
            row_supervised: self.row_supervised.clone(),
            examples: self.examples.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supervised_position_is_the_one_before_the_label() {
        // Two rows of length 5. Row 0 supervises tokens at 3 and 4 (label word, <|im_end|>);
        // row 1 is shorter: supervises 2 and 3, position 4 is padding.
        let ignore = IGNORE_INDEX;
        let labels = vec![
            ignore, ignore, ignore, 7, 9, //
            ignore, ignore, 8, 9, ignore,
        ];
        let (positions, targets) = supervised_positions(&labels, 2, 5);
        // Label at (0, 3) is predicted by (0, 2) = flat 2; (0, 4) by (0, 3) = flat 3;
        // (1, 2) by (1, 1) = flat 6; (1, 3) by (1, 2) = flat 7.
        assert_eq!(positions, vec![2, 3, 6, 7]);
        assert_eq!(targets, vec![7, 9, 8, 9]);
    }

    #[test]
    fn label_at_position_zero_cannot_be_supervised() {
        // Nothing precedes position 0, so its label has no predicting position.
        let (positions, _) = supervised_positions(&[5, IGNORE_INDEX], 1, 2);
        assert!(positions.is_empty());
    }
}
