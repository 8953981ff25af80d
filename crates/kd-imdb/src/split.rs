//! Seeded, label-stratified splits and balanced samples.
//!
//! Randomness comes from a SplitMix64 generator and a Fisher–Yates shuffle written here
//! rather than from `rand`, so a seed selects the same reviews whatever `rand` version the
//! workspace resolves (`rand` documents `StdRng` streams as not portable across versions).

use crate::{Error, Result, Review, Sentiment};

/// How large the validation part of [`stratified_split`] is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValSize {
    /// A fraction of all reviews in `[0, 1]`, rounded to the nearest count.
    Fraction(f64),
    /// An exact number of reviews.
    Count(usize),
}

/// Splits `reviews` into `(train, val)` with `val` of the requested size and both parts keeping
/// the label ratio of the input (per-label counts are rounded so that they add up exactly).
///
/// Both parts come back in a seeded random order; the same input and seed give the same split.
pub fn stratified_split(
    reviews: &[Review],
    val: ValSize,
    seed: u64,
) -> Result<(Vec<Review>, Vec<Review>)> {
    let total = reviews.len();
    let val_total = match val {
        ValSize::Fraction(f) if (0.0..=1.0).contains(&f) => (f * total as f64).round() as usize,
        ValSize::Fraction(f) => {
            return Err(Error::InvalidArgument(format!(
                "validation fraction {f} is outside [0, 1]"
            )));
        }
        ValSize::Count(n) if n <= total => n,
        ValSize::Count(n) => {
            return Err(Error::InvalidArgument(format!(
                "validation count {n} exceeds the {total} reviews available"
            )));
        }
    };
    let mut rng = SplitMix64::new(seed);
    let [mut neg, mut pos] = indices_by_label(reviews);
    rng.shuffle(&mut neg);
    rng.shuffle(&mut pos);
    // Negative gets its proportional share rounded; positive takes the rest, clamped.
    let neg_val = if total == 0 {
        0
    } else {
        ((val_total as f64 * neg.len() as f64 / total as f64).round() as usize).min(neg.len())
    };
    let pos_val = (val_total - neg_val).min(pos.len());
    let neg_val = val_total - pos_val;
    let mut val_idx: Vec<usize> = neg[..neg_val]
        .iter()
        .chain(&pos[..pos_val])
        .copied()
        .collect();
    let mut train_idx: Vec<usize> = neg[neg_val..]
        .iter()
        .chain(&pos[pos_val..])
        .copied()
        .collect();
    rng.shuffle(&mut val_idx);
    rng.shuffle(&mut train_idx);
    Ok((pick(reviews, &train_idx), pick(reviews, &val_idx)))
}

/// Picks `n / 2` negative and `n - n / 2` positive reviews (so an odd `n` gives one more
/// positive), chosen and ordered by `seed`.
///
/// Fails when a label has too few reviews.
pub fn balanced_sample(reviews: &[Review], n: usize, seed: u64) -> Result<Vec<Review>> {
    let mut rng = SplitMix64::new(seed);
    let [mut neg, mut pos] = indices_by_label(reviews);
    let wanted = [n / 2, n - n / 2];
    for (label, (have, want)) in Sentiment::ALL
        .iter()
        .zip([neg.len(), pos.len()].iter().zip(wanted))
    {
        if *have < want {
            return Err(Error::InvalidArgument(format!(
                "a balanced sample of {n} needs {want} {label} reviews, only {have} available"
            )));
        }
    }
    rng.shuffle(&mut neg);
    rng.shuffle(&mut pos);
    let mut chosen: Vec<usize> = neg[..wanted[0]]
        .iter()
        .chain(&pos[..wanted[1]])
        .copied()
        .collect();
    rng.shuffle(&mut chosen);
    Ok(pick(reviews, &chosen))
}

/// Indices of the negative and the positive reviews, in input order.
fn indices_by_label(reviews: &[Review]) -> [Vec<usize>; 2] {
    let mut by_label = [Vec::new(), Vec::new()];
    for (i, review) in reviews.iter().enumerate() {
        by_label[review.label.index()].push(i);
    }
    by_label
}

fn pick(reviews: &[Review], indices: &[usize]) -> Vec<Review> {
    indices.iter().map(|&i| reviews[i].clone()).collect()
}

/// SplitMix64 (Steele, Lea and Flood, OOPSLA 2014): a tiny, well-mixed 64-bit generator.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..bound` by multiply-shift; the bias is below `bound / 2^64`, far under
    /// anything a dataset shuffle could notice.
    fn below(&mut self, bound: usize) -> usize {
        ((u128::from(self.next_u64()) * bound as u128) >> 64) as usize
    }

    /// Fisher–Yates shuffle.
    pub(crate) fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reviews(neg: usize, pos: usize) -> Vec<Review> {
        let make = |i: usize, label| Review {
            id: i.to_string(),
            text: format!("review {i}"),
            label,
            rating: None,
        };
        (0..neg)
            .map(|i| make(i, Sentiment::Negative))
            .chain((neg..neg + pos).map(|i| make(i, Sentiment::Positive)))
            .collect()
    }

    fn count(reviews: &[Review], label: Sentiment) -> usize {
        reviews.iter().filter(|r| r.label == label).count()
    }

    #[test]
    fn splitmix_matches_reference_stream() {
        // Reference values from Vigna's splitmix64.c, re-computed in Python:
        // M = 2**64 - 1; s = (1234567 + 0x9E3779B97F4A7C15) & M
        // z = ((s ^ (s >> 30)) * 0xBF58476D1CE4E5B9) & M
        // z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M; print(z ^ (z >> 31))
        let mut rng = SplitMix64::new(1_234_567);
        assert_eq!(rng.next_u64(), 6_457_827_717_110_365_317);
        assert_eq!(rng.next_u64(), 3_203_168_211_198_807_973);
    }

    #[test]
    fn stratified_split_keeps_ratio_and_is_seeded() {
        let all = reviews(300, 100);
        let (train, val) = stratified_split(&all, ValSize::Fraction(0.1), 7).expect("split");
        assert_eq!((train.len(), val.len()), (360, 40));
        assert_eq!(
            (
                count(&val, Sentiment::Negative),
                count(&val, Sentiment::Positive)
            ),
            (30, 10)
        );
        let mut ids: Vec<&str> = train.iter().chain(&val).map(|r| r.id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 400, "train and val must partition the input");

        let (train2, val2) = stratified_split(&all, ValSize::Fraction(0.1), 7).expect("split");
        assert_eq!((&train, &val), (&train2, &val2));
        let (_, val3) = stratified_split(&all, ValSize::Fraction(0.1), 8).expect("split");
        assert_ne!(val, val3);
    }

    #[test]
    fn stratified_split_by_count_and_bad_sizes() {
        let all = reviews(5, 5);
        let (train, val) = stratified_split(&all, ValSize::Count(3), 0).expect("split");
        assert_eq!((train.len(), val.len()), (7, 3));
        assert!(stratified_split(&all, ValSize::Count(11), 0).is_err());
        assert!(stratified_split(&all, ValSize::Fraction(1.5), 0).is_err());
        let (train, val) = stratified_split(&[], ValSize::Fraction(0.5), 0).expect("empty");
        assert!(train.is_empty() && val.is_empty());
    }

    #[test]
    fn balanced_sample_takes_half_of_each() {
        let all = reviews(50, 10);
        let sample = balanced_sample(&all, 20, 3).expect("sample");
        assert_eq!(sample.len(), 20);
        assert_eq!(count(&sample, Sentiment::Negative), 10);
        assert_eq!(sample, balanced_sample(&all, 20, 3).expect("sample"));
        let odd = balanced_sample(&all, 7, 3).expect("odd sample");
        assert_eq!(count(&odd, Sentiment::Positive), 4);
        let err = balanced_sample(&all, 30, 3).expect_err("too few positives");
        assert!(err.to_string().contains("positive"), "{err}");
    }
}
