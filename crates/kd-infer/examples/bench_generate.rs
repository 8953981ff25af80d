//! Generated tokens per second of [`kd_infer::generate`] at batch 1, 8 and 32 (a benchmark,
//! not a test). Driven by `reference/bench_generate.py`, which builds the checkpoint, runs the
//! same measurement through Hugging Face `generate` and writes `docs/bench-generate.md`.
//!
//! `cargo run -p kd-infer --example bench_generate -- DIR PROMPT_LEN NEW_TOKENS` prints one
//! JSON object per batch size on stdout.

#![allow(clippy::print_stdout, clippy::unwrap_used)] // a benchmark binary: stdout is its output

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::Device;
use kd_infer::{GenerateConfig, generate};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(&args[1]);
    let prompt_len: usize = args[2].parse().unwrap();
    let new_tokens: usize = args[3].parse().unwrap();
    let model = kd_qwen::load_checkpoint(&dir, &Device::flex()).unwrap();
    let vocab = model.config().vocab_size as u32;
    // No eos: every row runs to `new_tokens`, as in the Python side (min_new_tokens).
    let config = GenerateConfig {
        max_new_tokens: new_tokens,
        ..GenerateConfig::default()
    };
    for batch in [1usize, 8, 32] {
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|r| {
                (0..prompt_len)
                    .map(|i| ((r * 7919 + i * 104_729) as u32 % (vocab - 1)) + 1)
                    .collect()
            })
            .collect();
        // One warm-up call, then the timed one.
        generate(
            &model,
            &prompts[..1],
            &GenerateConfig {
                max_new_tokens: 2,
                ..config.clone()
            },
        )
        .unwrap();
        let start = Instant::now();
        let out = generate(&model, &prompts, &config).unwrap();
        let secs = start.elapsed().as_secs_f64();
        let tokens: usize = out.iter().map(|g| g.tokens.len()).sum();
        println!(
            "{{\"batch\": {batch}, \"tokens\": {tokens}, \"secs\": {secs:.4}, \"tok_s\": {:.2}}}",
            tokens as f64 / secs
        );
    }
}
