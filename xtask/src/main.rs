//! `cargo xtask`: the project's own commands, so that a newcomer needs nothing but cargo.
//!
//! - `cargo xtask distill [FLAGS]` runs `kd distill` (the default `tiny` preset on the CPU).
//! - `cargo xtask bench` runs the benchmarks and writes their tables to `docs/`.
//! - `cargo xtask ci` runs what CI runs.

use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    about = "kd's project commands",
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Run the main job: `kd distill` with the given flags (see `cargo xtask distill --help`).
    #[command(disable_help_flag = true)]
    Distill {
        /// Flags passed to `kd distill` unchanged.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the benchmarks; each writes its table under `docs/`.
    Bench {
        /// Only the benchmarks whose name contains this.
        filter: Option<String>,
    },
    /// Run the test suite, then the smoke preset end to end (what `.ci/run` does).
    Ci,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Distill { args } => {
            let mut all = vec!["distill".to_string()];
            all.extend(args);
            kd(&all)
        }
        Task::Bench { filter } => bench(filter.as_deref()),
        Task::Ci => {
            cargo(&["test", "--workspace"])?;
            kd(&[
                "distill".into(),
                "--preset".into(),
                "smoke".into(),
                "--out".into(),
                "runs/ci-smoke".into(),
            ])
        }
    }
}

/// `cargo run` of the `kd` binary in the workspace's shared (optimised) dev profile.
fn kd(args: &[String]) -> Result<()> {
    let mut full = vec!["run", "--quiet", "--package", "kd-cli", "--bin", "kd", "--"];
    full.extend(args.iter().map(String::as_str));
    cargo(&full)
}

/// Every benchmark: a name and the cargo command that runs it. They build in the dev profile
/// (dependencies optimised, see the workspace `Cargo.toml`) so that burn is compiled once.
const BENCHES: &[(&str, &[&str])] = &[
    (
        "kd-loss/rkl-memory",
        &[
            "bench",
            "--profile",
            "dev",
            "-p",
            "kd-loss",
            "--bench",
            "rkl_memory",
        ],
    ),
    (
        "kd-qwen/load",
        &[
            "bench",
            "--profile",
            "dev",
            "-p",
            "kd-qwen",
            "--bench",
            "load",
        ],
    ),
    // Picks the newest runs/tiny-* (run `cargo xtask distill` first).
    (
        "kd-infer/quant",
        &["run", "-p", "kd-infer", "--example", "bench_quant"],
    ),
];

/// The generation benchmark is driven from Python: it times Hugging Face `generate` and runs
/// the Rust example on the same shapes in the same run.
const GENERATE_BENCH: (&str, &str) = (
    "kd-infer/generate",
    "crates/kd-infer/reference/bench_generate.py",
);

fn bench(filter: Option<&str>) -> Result<()> {
    let wanted = |name: &str| filter.is_none_or(|f| name.contains(f));
    let mut ran = 0;
    for (name, args) in BENCHES {
        if !wanted(name) {
            continue;
        }
        eprintln!("bench {name}");
        cargo(args)?;
        ran += 1;
    }
    let (name, script) = GENERATE_BENCH;
    if wanted(name) {
        // A venv from crates/kd-qwen/reference/requirements.txt (torch, transformers).
        let python = std::env::var("KD_REF_PYTHON").unwrap_or_else(|_| "python3".into());
        eprintln!("bench {name} (with {python}; set KD_REF_PYTHON to choose the interpreter)");
        let status = Command::new(&python)
            .arg(script)
            .status()
            .with_context(|| format!("starting {python}"))?;
        if !status.success() {
            bail!(
                "`{python} {script}` failed ({status}); it needs torch and transformers \
                 (crates/kd-qwen/reference/requirements.txt)"
            );
        }
        ran += 1;
    }
    if ran == 0 {
        bail!("no benchmark matches {filter:?}");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .status()
        .with_context(|| format!("starting {cargo}"))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}
