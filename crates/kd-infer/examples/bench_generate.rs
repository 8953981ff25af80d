//! Generated tokens per second of [`kd_infer::generate`] (a benchmark, not a test). Driven by
//! `reference/bench_generate.py`, which runs the same measurements through Hugging Face
//! `generate` and writes `docs/bench-generate.md`; it prints one JSON object per measurement
//! on stdout.
//!
//! - `bench_generate tiny DIR PROMPT_LEN NEW_TOKENS`: whole `generate` calls (prefill
//!   included) at batch 1, 8 and 32 on the checkpoint in `DIR`.
//! - `bench_generate r1`: a randomly initialised model of DeepSeek-R1-Distill-Qwen-1.5B's
//!   shape (Qwen2, 1.78 G parameters, about 7 GB in f32), built in memory. Prefill is timed
//!   on one 256-token prompt; decoding from the moments the steps finish within one
//!   `generate` call of `1 + DECODE_STEPS` new tokens (the last `DECODE_STEPS` of them), at
//!   batch 8, 32 and 64. Also one `[rows, 1536] · [1536, 8960]` product, the gemm shape that
//!   sets the pace of decoding.

#![allow(clippy::print_stdout, clippy::unwrap_used)] // a benchmark binary: stdout is its output

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor};
use kd_infer::{GenerateConfig, StopCondition, generate, generate_with};
use kd_qwen::{ModelType, Qwen, QwenConfig, WeightLayout};

/// Decoding steps timed per batch in `r1` mode.
const DECODE_STEPS: usize = 8;
/// Prompt length of the `r1` decode runs (short: prefill is timed separately, and attention
/// over a longer cache is a few percent of the 1.5 G weights multiplied per token).
const R1_DECODE_PROMPT: usize = 8;
/// Prompt length of the `r1` prefill run.
const R1_PREFILL_PROMPT: usize = 256;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("tiny") => tiny(
            &PathBuf::from(&args[1]),
            args[2].parse().unwrap(),
            args[3].parse().unwrap(),
        ),
        Some("r1") => r1(),
        _ => panic!("usage: bench_generate tiny DIR PROMPT_LEN NEW_TOKENS | bench_generate r1"),
    }
}

/// The layout `kd rationales` loads into; `KD_BENCH_LAYOUT=training` measures the other.
fn layout() -> WeightLayout {
    match std::env::var("KD_BENCH_LAYOUT").as_deref() {
        Ok("training") => WeightLayout::Training,
        _ => WeightLayout::Inference,
    }
}

/// `batch` deterministic prompts of `len` ids in `1..vocab`, the same as the Python side's.
fn prompts(batch: usize, len: usize, vocab: u32) -> Vec<Vec<u32>> {
    (0..batch)
        .map(|r| {
            (0..len)
                .map(|i| ((r * 7919 + i * 104_729) as u32 % (vocab - 1)) + 1)
                .collect()
        })
        .collect()
}

/// Seconds of one `generate` call of exactly `new_tokens` per row (no eos, as the Python side
/// sets `min_new_tokens`).
fn timed(model: &Qwen, prompts: &[Vec<u32>], new_tokens: usize) -> f64 {
    let config = GenerateConfig {
        max_new_tokens: new_tokens,
        ..GenerateConfig::default()
    };
    let start = Instant::now();
    let out = generate(model, prompts, &config).unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert!(out.iter().all(|g| g.tokens.len() == new_tokens));
    secs
}

fn tiny(dir: &Path, prompt_len: usize, new_tokens: usize) {
    let model = kd_qwen::load_checkpoint_with(dir, &Device::flex(), layout()).unwrap();
    let vocab = model.config().vocab_size as u32;
    for batch in [1usize, 8, 32] {
        let prompts = prompts(batch, prompt_len, vocab);
        timed(&model, &prompts[..1], 2); // warm-up
        let secs = timed(&model, &prompts, new_tokens);
        let tokens = batch * new_tokens;
        println!(
            "{{\"batch\": {batch}, \"tokens\": {tokens}, \"secs\": {secs:.4}, \"tok_s\": {:.2}}}",
            tokens as f64 / secs
        );
    }
}

/// DeepSeek-R1-Distill-Qwen-1.5B's `config.json`: Qwen2, hidden 1536, 28 layers,
/// intermediate 8960, 12 heads / 2 kv heads (head_dim 128), untied head, θ = 10,000.
fn r1_config() -> QwenConfig {
    let mut c = QwenConfig::qwen3_shaped(1536, 8960, 28, 12, 2, 128);
    c.model_type = ModelType::Qwen2;
    c.head_dim = None;
    c.attention_bias = Some(true);
    c.tie_word_embeddings = false;
    c.rope_theta = 10_000.0;
    c.max_position_embeddings = 131_072;
    c
}

/// GFLOP/s of one `[rows, 1536] · [1536, 8960]` product (an R1 MLP projection at decode),
/// best of 10.
fn gemm_gflops(rows: usize, device: &Device) -> f64 {
    let (d_in, d_out) = (1536, 8960);
    let x = Tensor::<2>::random([rows, d_in], Distribution::Normal(0.0, 1.0), device);
    let w = Tensor::<2>::random([d_in, d_out], Distribution::Normal(0.0, 0.02), device);
    let mut best = f64::MAX;
    for _ in 0..11 {
        let start = Instant::now();
        let y = x.clone().matmul(w.clone());
        let _ = y.slice([0..1, 0..1]).into_scalar::<f32>();
        best = best.min(start.elapsed().as_secs_f64());
    }
    2.0 * (rows * d_in * d_out) as f64 / best / 1e9
}

fn r1() {
    let device = Device::flex();
    for rows in [32usize, 256] {
        println!(
            "{{\"phase\": \"gemm\", \"batch\": {rows}, \"gflops\": {:.1}}}",
            gemm_gflops(rows, &device)
        );
    }
    let config = r1_config();
    let start = Instant::now();
    let model = Qwen::new(&config, &device).into_layout(layout());
    // Parameters are initialised lazily: a first call touches them all before any timing.
    let _ = timed(&model, &prompts(1, 4, 151_000), 1);
    eprintln!(
        "r1-shaped model ready in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let vocab = config.vocab_size as u32;

    let secs = timed(&model, &prompts(1, R1_PREFILL_PROMPT, vocab), 1);
    println!(
        "{{\"phase\": \"prefill\", \"batch\": 1, \"tokens\": {R1_PREFILL_PROMPT}, \"secs\": \
         {secs:.4}, \"tok_s\": {:.2}}}",
        R1_PREFILL_PROMPT as f64 / secs
    );
    for batch in [8usize, 32, 64] {
        let prompts = prompts(batch, R1_DECODE_PROMPT, vocab);
        let clock = StepClock::default();
        let config = GenerateConfig {
            max_new_tokens: 1 + DECODE_STEPS,
            ..GenerateConfig::default()
        };
        generate_with(&model, &prompts, &config, &clock).unwrap();
        let ends = clock.ends.borrow();
        assert_eq!(ends.len(), 1 + DECODE_STEPS);
        let secs = (ends[DECODE_STEPS] - ends[0]).as_secs_f64();
        let tokens = batch * DECODE_STEPS;
        println!(
            "{{\"phase\": \"decode\", \"batch\": {batch}, \"tokens\": {tokens}, \"secs\": \
             {secs:.4}, \"tok_s\": {:.2}}}",
            tokens as f64 / secs
        );
    }
}

/// Notes when each step finishes: the engine asks the stop condition about every row after
/// every step, and the first question about a row of `n` tokens comes at the end of step `n`.
#[derive(Default)]
struct StepClock {
    ends: RefCell<Vec<Instant>>,
}

impl StopCondition for StepClock {
    fn should_stop(&self, tokens: &[u32]) -> bool {
        let mut ends = self.ends.borrow_mut();
        if ends.len() < tokens.len() {
            ends.push(Instant::now());
        }
        false
    }
}
