//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong while reading, resolving or encoding IMDB data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder could not be opened or read.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A line-oriented file (TSV, CSV) has a malformed field.
    #[error("{}:{line}: field `{field}`: {message}", .path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// One-based line number (the header is line 1).
        line: u64,
        /// The column name, or `record` when the line as a whole is wrong.
        field: String,
        /// What is wrong.
        message: String,
    },

    /// An entry of the aclImdb archive or folder is malformed.
    #[error("{}: entry `{entry}`: {message}", .path.display())]
    Entry {
        /// The archive or folder.
        path: PathBuf,
        /// The entry's path inside it.
        entry: String,
        /// What is wrong.
        message: String,
    },

    /// A file is not in the expected format as a whole (empty, wrong header, unknown kind).
    #[error("{}: {message}", .path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// An asset was found nowhere and could not be downloaded.
    #[error(
        "asset `{}` not found; looked in: {}; download: {download}",
        .file.display(),
        .looked_in.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    AssetNotFound {
        /// The asset's path relative to a mirror folder.
        file: PathBuf,
        /// Every full path that was tried, in order.
        looked_in: Vec<PathBuf>,
        /// Why downloading did not help (disabled, or the download error).
        download: String,
    },

    /// The tokenizer could not be loaded or failed to encode.
    #[error("tokenizer {}: {message}", .path.display())]
    Tokenizer {
        /// The `tokenizer.json` file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },

    /// An argument is out of its valid range (split sizes, prompt lengths).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
