//! The review record and its labels.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The binary sentiment label of an IMDB review.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sentiment {
    /// Rating 1–4 in the original dataset; label index 0.
    Negative,
    /// Rating 7–10 in the original dataset; label index 1.
    Positive,
}

impl Sentiment {
    /// Both labels, in index order.
    pub const ALL: [Sentiment; 2] = [Sentiment::Negative, Sentiment::Positive];

    /// The answer word the model is taught to produce: `"negative"` or `"positive"`.
    pub fn word(self) -> &'static str {
        match self {
            Sentiment::Negative => "negative",
            Sentiment::Positive => "positive",
        }
    }

    /// The class index: 0 for negative, 1 for positive (the Kaggle and HF convention).
    pub fn index(self) -> usize {
        match self {
            Sentiment::Negative => 0,
            Sentiment::Positive => 1,
        }
    }

    /// The label with class index `index`, if it is 0 or 1.
    pub fn from_index(index: usize) -> Option<Self> {
        match index {
            0 => Some(Sentiment::Negative),
            1 => Some(Sentiment::Positive),
            _ => None,
        }
    }
}

impl fmt::Display for Sentiment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.word())
    }
}

/// The two halves of the dataset as published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// The 25,000 training reviews.
    Train,
    /// The 25,000 test reviews.
    Test,
}

impl Split {
    /// The folder name in the aclImdb layout: `train` or `test`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// One labelled movie review.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Review {
    /// `<file id>_<rating>` for the aclImdb and Kaggle layouts, the zero-based row number for
    /// the CSV layout.
    pub id: String,
    /// The review as stored, `<br />` tags included; see [`crate::clean_review`].
    pub text: String,
    /// The sentiment label.
    pub label: Sentiment,
    /// The reviewer's 1–10 star rating, where the layout records it.
    pub rating: Option<u8>,
}

/// A dataset read from disk: its train and test reviews (test is empty for train-only files).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Corpus {
    /// The training reviews.
    pub train: Vec<Review>,
    /// The test reviews.
    pub test: Vec<Review>,
}

impl Corpus {
    /// The reviews of `split`.
    pub fn split(&self, split: Split) -> &[Review] {
        match split {
            Split::Train => &self.train,
            Split::Test => &self.test,
        }
    }

    /// The total number of reviews.
    pub fn len(&self) -> usize {
        self.train.len() + self.test.len()
    }

    /// Whether there are no reviews at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
