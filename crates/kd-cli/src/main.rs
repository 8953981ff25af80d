//! `kd`: knowledge distillation of Qwen decoder models, from the command line.
//!
//! Each subcommand lives in its own module; this file parses flags, installs logging and
//! prints the error chain once.

mod cache_cmd;
mod data_cmd;
mod device;
mod distill;
mod eval_cmd;
mod model_cmd;
mod preset;
mod rationales_cmd;
mod settings;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Knowledge distillation of Qwen decoder language models on burn.
#[derive(Debug, Parser)]
#[command(name = "kd", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train a teacher, distil a student from it and a baseline without it, evaluate all three.
    Distill(distill::DistillArgs),
    /// Look at a review file before using it.
    #[command(subcommand)]
    Data(data_cmd::DataCommand),
    /// Print a checkpoint folder's architecture, parameter count and dtypes.
    Inspect(model_cmd::InspectArgs),
    /// Write the logits of every position of one or more token sequences.
    Logits(model_cmd::LogitsArgs),
    /// Write a checkpoint as a Hugging Face folder (config, safetensors, tokenizer).
    Export(model_cmd::ExportArgs),
    /// Have a model explain each review's label inside <think> tags; stream them to CSV.
    Rationales(rationales_cmd::RationalesArgs),
    /// Evaluate a checkpoint (full precision or quantized) on labelled reviews.
    Eval(eval_cmd::EvalArgs),
    /// Classify reviews given as arguments or one per line on stdin.
    Predict(eval_cmd::PredictArgs),
    /// Write a weight-only int8/int4 copy of a checkpoint (dequantized on load).
    Quantize(eval_cmd::QuantizeArgs),
    /// Run a teacher once over the training set and cache its top-k log-probabilities.
    CacheTeacher(cache_cmd::CacheTeacherArgs),
}

fn main() -> std::process::ExitCode {
    // Logs go to stderr; `RUST_LOG` overrides the default level.
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Distill(args) => distill::run(args),
        Command::Data(cmd) => data_cmd::run(cmd),
        Command::Inspect(args) => model_cmd::inspect(args),
        Command::Logits(args) => model_cmd::logits(args),
        Command::Export(args) => model_cmd::export(args),
        Command::Rationales(args) => rationales_cmd::run(args),
        Command::Eval(args) => eval_cmd::eval(args),
        Command::Predict(args) => eval_cmd::predict(args),
        Command::Quantize(args) => eval_cmd::quantize(args),
        Command::CacheTeacher(args) => cache_cmd::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", error_chain(&err));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes, `: `-separated as anyhow's `{:#}` prints them, leaving out a
/// cause whose text the message before it already ends with (the library errors write their
/// source into their own message, e.g. `PATH: No such file or directory`).
fn error_chain(err: &anyhow::Error) -> String {
    let mut text = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !text.ends_with(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_already_in_the_message_is_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let err = anyhow::Error::new(kd_qwen::Error::Io {
            path: "/x/config.json".into(),
            source: io,
        })
        .context("loading /x");
        assert_eq!(
            error_chain(&err),
            "loading /x: /x/config.json: no such file"
        );
    }
}
