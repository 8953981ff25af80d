//! Whole-test-set evaluation: accuracy, ROC AUC, confusion matrix, accuracy by review length
//! and throughput, from the label scores of [`crate::score_labels`].
//!
//! The probability of "positive" is the softmax of the two label-word logits at the answer
//! position, `sigmoid(logit_pos - logit_neg)`: the model's preference between the two words
//! only, ignoring the rest of the vocabulary.

use std::time::Instant;

use burn::tensor::Device;
use kd_imdb::Example;
use kd_qwen::Qwen;
use serde::Serialize;

use crate::{Error, LabelScores, score_labels};

/// Upper bounds (exclusive, in words of the review) of the length buckets; the last bucket is
/// open. IMDB reviews have a median of about 174 words, so the first two buckets split the
/// short half and the last two the long half.
pub const LENGTH_BUCKETS: [usize; 3] = [100, 200, 400];

/// `P(positive)` from the two label logits `[negative, positive]`.
pub fn positive_probability(scores: LabelScores) -> f64 {
    let diff = f64::from(scores[1]) - f64::from(scores[0]);
    1.0 / (1.0 + (-diff).exp())
}

/// ROC AUC of `scores` for the binary `labels` (true = positive), as the Mann–Whitney
/// statistic: the fraction of (positive, negative) pairs in which the positive scores higher,
/// a tie counting one half. Ranks are computed once with ties given their average rank, so
/// the cost is `O(n log n)`.
///
/// Returns `None` when one class is absent (the AUC is undefined).
///
/// # Panics
/// When `scores` and `labels` differ in length, or a score is NaN.
pub fn roc_auc(scores: &[f64], labels: &[bool]) -> Option<f64> {
    assert_eq!(scores.len(), labels.len(), "one label per score");
    let n_pos = labels.iter().filter(|&&l| l).count();
    let n_neg = labels.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| {
        scores[a]
            .partial_cmp(&scores[b])
            .expect("scores are not NaN")
    });
    // Sum of the (1-based, tie-averaged) ranks of the positives.
    let mut rank_sum = 0.0;
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && scores[order[end]] == scores[order[start]] {
            end += 1;
        }
        // Ranks start + 1 ..= end share their mean.
        let mean_rank = (start + 1 + end) as f64 / 2.0;
        let positives = order[start..end].iter().filter(|&&i| labels[i]).count();
        rank_sum += mean_rank * positives as f64;
        start = end;
    }
    let u = rank_sum - (n_pos * (n_pos + 1)) as f64 / 2.0;
    Some(u / (n_pos as f64 * n_neg as f64))
}

/// Counts of a binary classifier's outcomes (positive = the positive sentiment).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Confusion {
    /// Negative reviews predicted negative.
    pub true_negative: usize,
    /// Negative reviews predicted positive.
    pub false_positive: usize,
    /// Positive reviews predicted negative.
    pub false_negative: usize,
    /// Positive reviews predicted positive.
    pub true_positive: usize,
}

impl Confusion {
    /// Adds one outcome.
    pub fn add(&mut self, label: bool, predicted: bool) {
        match (label, predicted) {
            (false, false) => self.true_negative += 1,
            (false, true) => self.false_positive += 1,
            (true, false) => self.false_negative += 1,
            (true, true) => self.true_positive += 1,
        }
    }
}

/// Accuracy over the reviews of one length range.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LengthBucket {
    /// Smallest review length (words) in the bucket.
    pub min_words: usize,
    /// One past the largest length; `None` for the open last bucket.
    pub max_words: Option<usize>,
    /// Reviews in the bucket.
    pub examples: usize,
    /// Their accuracy (`NaN`-free: 0 when the bucket is empty).
    pub accuracy: f64,
}

/// Everything `kd eval` reports.
#[derive(Debug, Clone, Serialize)]
pub struct EvalSummary {
    /// Reviews scored.
    pub examples: usize,
    /// Fraction predicted correctly (the label word with the higher logit).
    pub accuracy: f64,
    /// ROC AUC of `P(positive)`; `None` when the data has a single class.
    pub roc_auc: Option<f64>,
    /// Outcome counts.
    pub confusion: Confusion,
    /// Accuracy by review length, see [`LENGTH_BUCKETS`].
    pub by_length: Vec<LengthBucket>,
    /// Reviews per second of scoring (tokenisation and loading excluded).
    pub reviews_per_s: f64,
    /// Prompt tokens per second (padding excluded).
    pub tokens_per_s: f64,
    /// Wall time of scoring in seconds.
    pub seconds: f64,
    /// `P(positive)` per review, in input order.
    #[serde(skip)]
    pub probabilities: Vec<f64>,
}

/// Metrics of already computed label scores. `labels` are 0 (negative) or 1 (positive);
/// `words` is each review's length in words (for the length buckets).
///
/// # Panics
/// When the three slices differ in length.
pub fn summarize(scores: &[LabelScores], labels: &[usize], words: &[usize]) -> EvalSummary {
    assert_eq!(scores.len(), labels.len(), "one label per score");
    assert_eq!(scores.len(), words.len(), "one length per score");
    let probabilities: Vec<f64> = scores.iter().map(|&s| positive_probability(s)).collect();
    let truth: Vec<bool> = labels.iter().map(|&l| l == 1).collect();
    let mut confusion = Confusion::default();
    let bounds: Vec<(usize, Option<usize>)> = std::iter::once(0)
        .chain(LENGTH_BUCKETS)
        .zip(LENGTH_BUCKETS.map(Some).into_iter().chain([None]))
        .collect();
    let mut buckets = vec![(0usize, 0usize); bounds.len()];
    for ((s, &label), &w) in scores.iter().zip(&truth).zip(words) {
        // Same rule as accuracy everywhere in kd: positive wins only when strictly higher.
        let predicted = s[1] > s[0];
        confusion.add(label, predicted);
        let b = LENGTH_BUCKETS
            .iter()
            .take_while(|&&bound| w >= bound)
            .count();
        buckets[b].0 += 1;
        buckets[b].1 += usize::from(predicted == label);
    }
    let correct = confusion.true_negative + confusion.true_positive;
    EvalSummary {
        examples: scores.len(),
        accuracy: correct as f64 / scores.len().max(1) as f64,
        roc_auc: roc_auc(&probabilities, &truth),
        confusion,
        by_length: bounds
            .into_iter()
            .zip(buckets)
            .map(|((min_words, max_words), (n, ok))| LengthBucket {
                min_words,
                max_words,
                examples: n,
                accuracy: ok as f64 / n.max(1) as f64,
            })
            .collect(),
        reviews_per_s: 0.0,
        tokens_per_s: 0.0,
        seconds: 0.0,
        probabilities,
    }
}

/// Scores `prompts` (batched by length, see [`score_labels`]) and summarises them with
/// throughput. Returns the raw scores too, for agreement between models.
#[allow(clippy::too_many_arguments)] // mirrors `evaluate`; each caller passes them once
pub fn evaluate_full(
    model: &Qwen,
    prompts: &[Example],
    labels: &[usize],
    words: &[usize],
    label_ids: [u32; 2],
    pad_id: u32,
    batch_size: usize,
    device: &Device,
    on_progress: &mut dyn FnMut(usize),
) -> Result<(EvalSummary, Vec<LabelScores>), Error> {
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
    let seconds = started.elapsed().as_secs_f64();
    let tokens: usize = prompts.iter().map(|e| e.input_ids.len()).sum();
    let mut summary = summarize(&scores, labels, words);
    summary.seconds = seconds;
    summary.reviews_per_s = prompts.len() as f64 / seconds;
    summary.tokens_per_s = tokens as f64 / seconds;
    Ok((summary, scores))
}

/// Fraction of reviews on which two models prefer the same label word.
pub fn agreement(a: &[LabelScores], b: &[LabelScores]) -> f64 {
    let same = a
        .iter()
        .zip(b)
        .filter(|(x, y)| (x[1] > x[0]) == (y[1] > y[0]))
        .count();
    same as f64 / a.len().min(b.len()).max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A known case with ties, worked by counting pairs.
    ///
    /// scores:  0.1  0.4  0.4  0.4  0.8  0.9
    /// labels:   N    P    N    P    N    P
    ///
    /// Positives {0.4, 0.4, 0.9}, negatives {0.1, 0.4, 0.8}; the 9 (P, N) pairs:
    /// - P=0.4 vs N: 0.1 win, 0.4 tie, 0.8 loss → 1.5 (twice: 3.0)
    /// - P=0.9 vs N: three wins → 3.0
    ///
    /// AUC = 6.0 / 9 = 2/3. (Via ranks: 0.4 ties over ranks 2..=4, mean 3; positive rank sum
    /// 3 + 3 + 6 = 12; U = 12 − 3·4/2 = 6.)
    #[test]
    fn auc_with_ties_matches_pair_count() {
        let scores = [0.1, 0.4, 0.4, 0.4, 0.8, 0.9];
        let labels = [false, true, false, true, false, true];
        let auc = roc_auc(&scores, &labels).expect("both classes present");
        assert!((auc - 2.0 / 3.0).abs() < 1e-12, "{auc}");
        // An independent O(n²) pair count over the same inputs.
        let mut sum = 0.0;
        let mut pairs = 0.0;
        let positives = scores
            .iter()
            .zip(labels)
            .filter(|&(_, l)| l)
            .map(|(&s, _)| s);
        for p in positives {
            for (&n, _) in scores.iter().zip(labels).filter(|&(_, l)| !l) {
                sum += if p > n {
                    1.0
                } else if p == n {
                    0.5
                } else {
                    0.0
                };
                pairs += 1.0;
            }
        }
        assert!((auc - sum / pairs).abs() < 1e-12);
    }

    /// The rank formula against the direct O(n²) pair count on 300 scores drawn from 7 levels
    /// (so most scores are tied), labels from a fixed LCG.
    #[test]
    fn auc_equals_pair_count_with_many_ties() {
        let mut state = 12_345u64;
        let mut next = || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            state >> 33
        };
        let scores: Vec<f64> = (0..300).map(|_| (next() % 7) as f64 / 6.0).collect();
        let labels: Vec<bool> = scores
            .iter()
            .map(|&s| ((next() % 100) as f64) < 30.0 + 40.0 * s)
            .collect();
        let mut sum = 0.0;
        let mut pairs = 0.0;
        for (p, _) in scores.iter().zip(&labels).filter(|&(_, &l)| l) {
            for (n, _) in scores.iter().zip(&labels).filter(|&(_, &l)| !l) {
                sum += f64::from(u8::from(p > n)) + 0.5 * f64::from(u8::from(p == n));
                pairs += 1.0;
            }
        }
        let auc = roc_auc(&scores, &labels).expect("both classes present");
        // Both are exact sums of halves divided by the same count: equal to rounding.
        assert!(
            (auc - sum / pairs).abs() < 1e-12,
            "{auc} vs {}",
            sum / pairs
        );
    }

    #[test]
    fn auc_edge_cases() {
        // Perfect separation, perfect inversion, all tied, one class only.
        assert_eq!(roc_auc(&[0.1, 0.9], &[false, true]), Some(1.0));
        assert_eq!(roc_auc(&[0.9, 0.1], &[false, true]), Some(0.0));
        assert_eq!(roc_auc(&[0.5; 4], &[false, true, true, false]), Some(0.5));
        assert_eq!(roc_auc(&[0.2, 0.3], &[true, true]), None);
    }

    #[test]
    fn summary_counts_confusion_and_buckets() {
        // [neg, pos] logits; labels; word counts.
        let scores = [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5]];
        let labels = [0, 1, 0, 1, 1];
        let words = [10, 150, 250, 500, 99];
        let s = summarize(&scores, &labels, &words);
        assert_eq!(
            s.confusion,
            Confusion {
                true_negative: 1,
                false_positive: 1,
                false_negative: 2, // a tie predicts negative
                true_positive: 1,
            }
        );
        assert!((s.accuracy - 0.4).abs() < 1e-12);
        let counts: Vec<usize> = s.by_length.iter().map(|b| b.examples).collect();
        assert_eq!(counts, [2, 1, 1, 1]);
        assert_eq!(s.by_length[3].max_words, None);
        assert!((s.by_length[0].accuracy - 0.5).abs() < 1e-12);
        // sigmoid(0) = 0.5; sigmoid(1) ≈ 0.7310586.
        assert!((s.probabilities[4] - 0.5).abs() < 1e-12);
        assert!((s.probabilities[1] - 0.731_058_578_630_004_9).abs() < 1e-9);
        assert!((agreement(&scores, &scores) - 1.0).abs() < 1e-12);
    }
}
