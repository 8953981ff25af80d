//! The crate's error type.

/// Everything that can go wrong reading, checking or writing a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `config.json` that cannot be used.
    #[error("{file}: {}{msg}", field.as_ref().map(|f| format!("field `{f}`: ")).unwrap_or_default())]
    Config {
        /// The file (or other origin) the configuration came from.
        file: String,
        /// The offending field, when one can be named.
        field: Option<String>,
        /// What is wrong.
        msg: String,
    },
    /// An I/O failure on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A checkpoint file that could not be read or written.
    #[error("{path}: {msg}")]
    Checkpoint {
        /// The file.
        path: String,
        /// What went wrong.
        msg: String,
    },
    /// A tensor of a checkpoint that is missing, misshapen, of an unexpected dtype or cut short.
    #[error("{path}: tensor `{tensor}`: {msg}")]
    Tensor {
        /// The file holding (or expected to hold) the tensor.
        path: String,
        /// The tensor's Hugging Face name.
        tensor: String,
        /// What is wrong, with the expected and found shape or dtype.
        msg: String,
    },
    /// A sequence longer than the model's positions allow.
    #[error(
        "{tokens} tokens exceed the model's max_position_embeddings of {max} (from its config.json)"
    )]
    TooLong {
        /// Tokens the call would need (cached, new and to be generated).
        tokens: usize,
        /// The model's `max_position_embeddings`.
        max: usize,
    },
}
