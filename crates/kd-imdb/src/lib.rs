//! IMDB sentiment data for the kd toolkit: readers, cleaning, splits, Qwen3 chat prompts and
//! batching.
//!
//! This crate is the data side of the project and has no burn dependency; the training and
//! inference crates (`kd-train`, `kd-infer`) turn its [`Batch`]es into tensors.
//!
//! - [`read`]: the Large Movie Review Dataset in its usual layouts (the Stanford `.tar.gz`,
//!   its extracted folder, Kaggle's `labeledTrainData.tsv`, the `review,sentiment` CSV), all
//!   returning a [`Corpus`]; [`read_any`] picks the reader from the path.
//! - [`clean_review`]: turns the `<br />` tags of the raw reviews into newlines.
//! - [`split`]: seeded, label-stratified train/validation splits and balanced samples.
//! - [`stats`]: counts and length distributions for `kd data stats`.
//! - [`assets`]: finds the IMDB archive and the Qwen3 tokenizer in local mirrors or a cache,
//!   downloading them when allowed.
//! - [`prompt`]: one Qwen3 chat turn per review (thinking disabled) with the answer tokens
//!   supervised.
//! - [`batch`]: padding examples into row-major `[batch, seq]` id and label buffers.
//!
//! Every fallible function returns [`Error`]; errors about input files name the file and,
//! for line formats, the line and the field.

pub mod assets;
pub mod batch;
mod clean;
mod error;
pub mod prompt;
pub mod read;
mod review;
pub mod split;
pub mod stats;

pub use assets::{Asset, AssetOptions, resolve};
pub use batch::{Batch, PadSide, collate, length_batches, sort_by_length};
pub use clean::clean_review;
pub use error::Error;
pub use prompt::{Example, IGNORE_INDEX, PromptBuilder};
pub use read::{read_aclimdb_archive, read_aclimdb_dir, read_any, read_csv, read_kaggle_tsv};
pub use review::{Corpus, Review, Sentiment, Split};
pub use split::{ValSize, balanced_sample, stratified_split};
pub use stats::{DataStats, LengthSummary, SplitStats};

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
