//! `kd data ...`: inspecting review files.

use std::path::PathBuf;

use anyhow::Result;
use kd_imdb::{DataStats, read_any};

/// Subcommands of `kd data`.
#[derive(Debug, clap::Subcommand)]
pub enum DataCommand {
    /// Count reviews per split and label and show their lengths, or the first bad record.
    ///
    /// Accepts the aclImdb `.tar.gz`, an extracted `aclImdb` folder, Kaggle's
    /// `labeledTrainData.tsv`, or a CSV with `review,sentiment` columns.
    Stats {
        /// The file or folder.
        path: PathBuf,
    },
}

/// Runs a `kd data` subcommand.
pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Stats { path } => {
            let corpus = read_any(&path)?;
            let stats = DataStats::from_corpus(&corpus);
            #[allow(clippy::print_stdout)] // the report is the command's output
            {
                println!("{}\n{stats}", path.display());
            }
            Ok(())
        }
    }
}
