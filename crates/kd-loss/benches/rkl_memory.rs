//! Time and peak memory of reverse KL (forward + backward) over `[positions, vocab]` logits:
//! the crate's chunked `kd_loss` against a plain autodiff version that materialises every
//! intermediate at full size.
//!
//!     cargo bench -p kd-loss --bench rkl_memory -- [positions] [vocab] [chunk_positions] [variants]
//!
//! (defaults 4096 151936 256 full,chunked,chunked-held: the size, about 15 GB at the
//! peak of `full`; `inputs` always runs first). Naming one variant lets a size whose `full` run
//! would not fit in memory still measure `chunked`. `chunked-held` is `chunked` with the caller
//! keeping its own handle on the teacher logits, so the loss cannot write its gradient over
//! them and allocates a buffer of its own. The table is printed and, at the default size,
//! written to `docs/bench-kd-loss.md`. Each variant runs
//! in its own child process (this executable, re-run with `--child <mode>`), and the child
//! reports the kernel's peak resident set (`VmHWM` in `/proc/self/status`), so one variant's
//! freed-but-cached memory cannot inflate another's. `inputs` only builds the two logit
//! tensors, marks the student as requiring a gradient and reads them back; subtracting its
//! peak gives what each loss adds on top of its inputs. Linux only.
#![allow(clippy::print_stdout)] // a benchmark's report is its stdout

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Distribution, Tensor};
use kd_loss::{Divergence, KdConfig, Reduction, kd_loss};

const MODES: [&str; 4] = ["inputs", "full", "chunked", "chunked-held"];

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.first().map(String::as_str) == Some("--child") {
        child(&args[1..]);
        return;
    }
    let positions = arg(&args, 0, DEFAULT_SIZE.0);
    let vocab = arg(&args, 1, DEFAULT_SIZE.1);
    let chunk = arg(&args, 2, 256);
    let chosen = args
        .get(3)
        .map_or("full,chunked,chunked-held", String::as_str);
    let modes: Vec<&str> = MODES
        .iter()
        .copied()
        .filter(|m| *m == "inputs" || chosen.split(',').any(|c| c == *m))
        .collect();
    let buffer_mb = (positions * vocab * 4) as f64 / 1e6;
    let exe = std::env::current_exe().expect("own path");
    let mut table = format!(
        "RKL forward + backward, {positions} x {vocab} f32 ({buffer_mb:.0} MB per buffer), \
         chunk {chunk}\n\n\
         | variant | time (s) | peak RSS (MB) | above inputs (MB) | above inputs (buffers) |\n\
         | --- | ---: | ---: | ---: | ---: |\n"
    );
    print!("{table}");
    let mut base = None;
    for mode in modes {
        let out = Command::new(&exe)
            .args([
                "--child",
                mode,
                &positions.to_string(),
                &vocab.to_string(),
                &chunk.to_string(),
            ])
            .output()
            .expect("child runs");
        let text = String::from_utf8_lossy(&out.stdout);
        let Some(line) = text.lines().find(|l| l.starts_with("RESULT")) else {
            let row = format!("| {mode} | failed: {} | | | |\n", out.status);
            print!("{row}");
            table += &row;
            continue;
        };
        let f: Vec<f64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let (secs, peak_mb) = (f[0], f[1] / 1e3);
        let above = peak_mb - *base.get_or_insert(peak_mb);
        let row = format!(
            "| {mode} | {secs:.2} | {peak_mb:.0} | {above:.0} | {:.1} |\n",
            above / buffer_mb
        );
        print!("{row}");
        table += &row;
    }
    if (positions, vocab) == DEFAULT_SIZE && chosen.split(',').count() == MODES.len() - 1 {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/bench-kd-loss.md");
        std::fs::write(&docs, format!("{DOC_HEAD}\n{table}\n{DOC_TAIL}"))
            .expect("docs/bench-kd-loss.md is writable");
        println!("\nwritten to {}", docs.display());
    }
}

/// The size: 4,096 positions of Qwen3's 151,936-token vocabulary.
const DEFAULT_SIZE: (usize, usize) = (4096, 151_936);

const DOC_HEAD: &str = "# kd-loss benchmark: reverse KL, forward + backward

Written by `cargo xtask bench kd-loss` (`cargo bench --profile dev -p kd-loss --bench
rkl_memory`, benches/rkl_memory.rs) on the 2-core CPU build machine, Flex backend, f32, one
run. Each variant is a separate child process; \"peak RSS\" is its `VmHWM`; \"above inputs\"
subtracts the `inputs` child, which only builds the student (requiring a gradient) and the
teacher logits. Every loss variant includes the student's gradient, one buffer that no
implementation can avoid.

- `full`: plain autodiff over `log_softmax`, `exp` and the product; every intermediate is a
  full `[positions, vocab]` buffer kept for the backward pass.
- `chunked`: `kd_loss` with `chunk_positions` rows at a time and a closed-form gradient; the
  teacher logits are handed over by value, so the gradient is written over their rows once
  they are used (what the trainer does).
- `chunked-held`: the same call while the caller keeps a handle on the teacher logits: the
  gradient then needs a buffer of its own.
";

const DOC_TAIL: &str = "The machine is shared and the times swing by tens of percent; the memory \
figures are stable to a few MB between runs.
";

fn arg(args: &[String], i: usize, default: usize) -> usize {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

fn child(args: &[String]) {
    let mode = args[0].as_str();
    let (positions, vocab, chunk) = (
        arg(args, 1, DEFAULT_SIZE.0),
        arg(args, 2, DEFAULT_SIZE.1),
        arg(args, 3, 256),
    );
    let device = Device::flex().autodiff();
    let dist = Distribution::Normal(0.0, 3.0);
    let student = Tensor::<2>::random([positions, vocab], dist, &device).require_grad();
    let teacher = Tensor::<2>::random([positions, vocab], dist, &device.clone().inner()).autodiff();
    // Materialise the inputs before timing.
    let _ = student.clone().sum().into_scalar::<f32>() + teacher.clone().sum().into_scalar::<f32>();

    let start = Instant::now();
    let grad_sum = match mode {
        "inputs" => 0.0,
        "full" => {
            // The straightforward version: every [positions, vocab] intermediate is kept by
            // autodiff for the backward pass.
            let ls = log_softmax(student.clone(), 1);
            let lt = log_softmax(teacher.inner(), 1).autodiff();
            let loss = (ls.clone().exp() * (ls - lt))
                .sum()
                .div_scalar(positions as f64);
            let grads = loss.backward();
            student
                .grad(&grads)
                .expect("grad")
                .sum()
                .into_scalar::<f32>()
        }
        "chunked" | "chunked-held" => {
            // Kept alive until after the backward pass in `chunked-held`.
            let held = (mode == "chunked-held").then(|| teacher.clone());
            let cfg = KdConfig {
                divergence: Divergence::ReverseKl,
                temperature: 1.0,
                t_squared: false,
                reduction: Reduction::TokenMean,
                chunk_positions: chunk,
            };
            let loss = kd_loss(student.clone(), teacher, None, &cfg).expect("valid");
            let grads = loss.backward();
            let sum = student
                .grad(&grads)
                .expect("grad")
                .sum()
                .into_scalar::<f32>();
            drop(held);
            sum
        }
        other => panic!("unknown variant {other}"),
    };
    let secs = start.elapsed().as_secs_f64();
    println!("RESULT {secs} {} {grad_sum}", peak_kb());
}

/// Peak resident set of this process in kB (`VmHWM`).
fn peak_kb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}
