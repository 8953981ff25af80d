//! Counts and token-free length distributions of a corpus (`kd data stats`).

use std::fmt;

use crate::{Corpus, Review, Sentiment, Split, clean_review};

/// Summary of a length distribution.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LengthSummary {
    /// Shortest length.
    pub min: usize,
    /// Arithmetic mean.
    pub mean: f64,
    /// Median (mean of the two middle values for an even count).
    pub median: f64,
    /// 90th percentile, nearest-rank method.
    pub p90: usize,
    /// Longest length.
    pub max: usize,
}

impl LengthSummary {
    /// Summarises `lengths`; all zero when it is empty.
    pub fn from_lengths(mut lengths: Vec<usize>) -> Self {
        if lengths.is_empty() {
            return Self::default();
        }
        lengths.sort_unstable();
        let n = lengths.len();
        let median = if n % 2 == 1 {
            lengths[n / 2] as f64
        } else {
            (lengths[n / 2 - 1] + lengths[n / 2]) as f64 / 2.0
        };
        // Nearest rank: the smallest value with at least 90% of the data at or below it.
        let p90_rank = (0.9 * n as f64).ceil() as usize;
        Self {
            min: lengths[0],
            mean: lengths.iter().sum::<usize>() as f64 / n as f64,
            median,
            p90: lengths[p90_rank.clamp(1, n) - 1],
            max: lengths[n - 1],
        }
    }
}

/// Counts and lengths of one split.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitStats {
    /// Which split.
    pub split: Split,
    /// Number of negative reviews.
    pub negative: usize,
    /// Number of positive reviews.
    pub positive: usize,
    /// Lengths in Unicode scalar values of the cleaned texts.
    pub chars: LengthSummary,
    /// Lengths in whitespace-separated words of the cleaned texts.
    pub words: LengthSummary,
}

impl SplitStats {
    /// Statistics of `reviews`, measured on their [`clean_review`] texts.
    pub fn from_reviews(split: Split, reviews: &[Review]) -> Self {
        let negative = reviews
            .iter()
            .filter(|r| r.label == Sentiment::Negative)
            .count();
        let (chars, words): (Vec<usize>, Vec<usize>) = reviews
            .iter()
            .map(|r| {
                let text = clean_review(&r.text);
                (text.chars().count(), text.split_whitespace().count())
            })
            .unzip();
        Self {
            split,
            negative,
            positive: reviews.len() - negative,
            chars: LengthSummary::from_lengths(chars),
            words: LengthSummary::from_lengths(words),
        }
    }

    /// Number of reviews.
    pub fn total(&self) -> usize {
        self.negative + self.positive
    }
}

/// Statistics of a whole corpus, one entry per non-empty split; its `Display` is a table.
#[derive(Debug, Clone, PartialEq)]
pub struct DataStats {
    /// Per-split statistics, train first.
    pub splits: Vec<SplitStats>,
}

impl DataStats {
    /// Computes the statistics of every non-empty split of `corpus`.
    pub fn from_corpus(corpus: &Corpus) -> Self {
        let splits = [Split::Train, Split::Test]
            .into_iter()
            .filter(|&s| !corpus.split(s).is_empty())
            .map(|s| SplitStats::from_reviews(s, corpus.split(s)))
            .collect();
        Self { splits }
    }
}

impl fmt::Display for DataStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<8}{:>10}{:>10}{:>10}",
            "split", "negative", "positive", "total"
        )?;
        for s in &self.splits {
            writeln!(
                f,
                "{:<8}{:>10}{:>10}{:>10}",
                s.split,
                s.negative,
                s.positive,
                s.total()
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "{:<8}{:<8}{:>8}{:>10}{:>10}{:>8}{:>8}",
            "length", "split", "min", "mean", "median", "p90", "max"
        )?;
        for (unit, pick) in [
            (
                "chars",
                (|s: &SplitStats| s.chars) as fn(&SplitStats) -> LengthSummary,
            ),
            ("words", |s: &SplitStats| s.words),
        ] {
            for s in &self.splits {
                let l = pick(s);
                writeln!(
                    f,
                    "{:<8}{:<8}{:>8}{:>10.1}{:>10.1}{:>8}{:>8}",
                    unit, s.split, l.min, l.mean, l.median, l.p90, l.max
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_known_lengths() {
        let s = LengthSummary::from_lengths((1..=10).collect());
        assert_eq!((s.min, s.p90, s.max), (1, 9, 10));
        assert!((s.mean - 5.5).abs() < 1e-12 && (s.median - 5.5).abs() < 1e-12);
        let s = LengthSummary::from_lengths(vec![7, 1, 4]);
        assert!((s.median - 4.0).abs() < 1e-12);
        assert_eq!(
            LengthSummary::from_lengths(Vec::new()),
            LengthSummary::default()
        );
    }

    #[test]
    fn corpus_table_lists_counts_and_lengths() {
        let review = |text: &str, label| Review {
            id: "0_1".into(),
            text: text.into(),
            label,
            rating: None,
        };
        let corpus = Corpus {
            train: vec![
                review("good fun<br /><br />yes", Sentiment::Positive),
                review("bad", Sentiment::Negative),
            ],
            test: Vec::new(),
        };
        let stats = DataStats::from_corpus(&corpus);
        assert_eq!(stats.splits.len(), 1);
        let train = &stats.splits[0];
        assert_eq!((train.negative, train.positive), (1, 1));
        assert_eq!((train.words.min, train.words.max), (1, 3));
        // "good fun\n\nyes" has 13 characters once the tags are gone.
        assert_eq!(train.chars.max, 13);
        let table = stats.to_string();
        assert!(
            table.contains("train") && table.contains("words"),
            "{table}"
        );
    }
}
