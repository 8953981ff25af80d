//! Padding examples into rectangular batches.

use crate::prompt::{Example, IGNORE_INDEX};

/// Which end of a row receives the padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PadSide {
    /// Tokens first, padding after (training and full-sequence scoring).
    Right,
    /// Padding first, so every row ends at the same position (batched generation).
    Left,
}

/// Examples padded to a common length, as row-major `[batch, seq_len]` buffers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Token ids, padding included; `[batch, seq_len]` row-major.
    pub input_ids: Vec<i64>,
    /// Labels with [`IGNORE_INDEX`] on padding; `[batch, seq_len]` row-major.
    pub labels: Vec<i64>,
    /// Number of rows.
    pub batch: usize,
    /// Length of every row (the longest example).
    pub seq_len: usize,
    /// Unpadded length of each row.
    pub lengths: Vec<usize>,
    /// Each row's [`Example::answer_pos`], moved by the padding when it is on the left.
    pub answer_pos: Vec<usize>,
    /// Where the padding is.
    pub pad_side: PadSide,
}

impl Batch {
    /// 1 on real tokens and 0 on padding; `[batch, seq_len]` row-major.
    pub fn attention_mask(&self) -> Vec<i64> {
        let mut mask = Vec::with_capacity(self.batch * self.seq_len);
        for &len in &self.lengths {
            let pad = self.seq_len - len;
            let (first, second) = match self.pad_side {
                PadSide::Right => ((1, len), (0, pad)),
                PadSide::Left => ((0, pad), (1, len)),
            };
            mask.extend(std::iter::repeat_n(first.0, first.1));
            mask.extend(std::iter::repeat_n(second.0, second.1));
        }
        mask
    }
}

/// Pads `examples` with `pad_id` (labels with [`IGNORE_INDEX`]) to the longest one.
pub fn collate(examples: &[&Example], pad_id: u32, side: PadSide) -> Batch {
    let batch = examples.len();
    let seq_len = examples.iter().map(|e| e.len()).max().unwrap_or(0);
    let mut input_ids = Vec::with_capacity(batch * seq_len);
    let mut labels = Vec::with_capacity(batch * seq_len);
    let mut lengths = Vec::with_capacity(batch);
    let mut answer_pos = Vec::with_capacity(batch);
    let pad_id = i64::from(pad_id);
    for example in examples {
        let len = example.len();
        let pad = seq_len - len;
        let ids = example.input_ids.iter().map(|&id| i64::from(id));
        match side {
            PadSide::Right => {
                input_ids.extend(ids.chain(std::iter::repeat_n(pad_id, pad)));
                labels.extend(example.labels.iter().copied());
                labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
                answer_pos.push(example.answer_pos);
            }
            PadSide::Left => {
                input_ids.extend(std::iter::repeat_n(pad_id, pad).chain(ids));
                labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
                labels.extend(example.labels.iter().copied());
                answer_pos.push(example.answer_pos + pad);
            }
        }
        lengths.push(len);
    }
    Batch {
        input_ids,
        labels,
        batch,
        seq_len,
        lengths,
        answer_pos,
        pad_side: side,
    }
}

/// Indices ordered from the longest to the shortest length (ties keep input order), so that
/// batches of neighbours waste little padding and the largest batch runs first.
pub fn sort_by_length(lengths: &[usize]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    order
}

/// [`sort_by_length`] cut into batches of at most `batch_size` indices (for evaluation).
///
/// # Panics
///
/// If `batch_size` is zero.
pub fn length_batches(lengths: &[usize], batch_size: usize) -> Vec<Vec<usize>> {
    assert!(batch_size > 0, "batch_size must be at least 1");
    sort_by_length(lengths)
        .chunks(batch_size)
        .map(<[usize]>::to_vec)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(ids: &[u32], answer_pos: usize) -> Example {
        let labels = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                if i < answer_pos {
                    IGNORE_INDEX
                } else {
                    i64::from(id)
                }
            })
            .collect();
        Example {
            input_ids: ids.to_vec(),
            labels,
            answer_pos,
            truncated: false,
            label: None,
        }
    }

    #[test]
    fn right_padding() {
        let (a, b) = (example(&[1, 2, 3], 2), example(&[4], 1));
        let batch = collate(&[&a, &b], 0, PadSide::Right);
        assert_eq!((batch.batch, batch.seq_len), (2, 3));
        assert_eq!(batch.input_ids, vec![1, 2, 3, 4, 0, 0]);
        assert_eq!(batch.labels, vec![-100, -100, 3, -100, -100, -100]);
        assert_eq!(batch.lengths, vec![3, 1]);
        assert_eq!(batch.answer_pos, vec![2, 1]);
        assert_eq!(batch.attention_mask(), vec![1, 1, 1, 1, 0, 0]);
    }

    #[test]
    fn left_padding_moves_answer_positions() {
        let (a, b) = (example(&[1, 2, 3], 2), example(&[4, 5], 1));
        let batch = collate(&[&a, &b], 9, PadSide::Left);
        assert_eq!(batch.input_ids, vec![1, 2, 3, 9, 4, 5]);
        assert_eq!(batch.labels, vec![-100, -100, 3, -100, -100, 5]);
        assert_eq!(batch.answer_pos, vec![2, 2]);
        assert_eq!(batch.attention_mask(), vec![1, 1, 1, 0, 1, 1]);
    }

    #[test]
    fn empty_batch_and_length_order() {
        let batch = collate(&[], 0, PadSide::Right);
        assert_eq!((batch.batch, batch.seq_len), (0, 0));
        assert_eq!(sort_by_length(&[2, 5, 1, 5]), vec![1, 3, 0, 2]);
        assert_eq!(
            length_batches(&[2, 5, 1, 5], 3),
            vec![vec![1, 3, 0], vec![2]]
        );
    }
}
