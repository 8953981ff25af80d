//! The generation engine against one-row-at-a-time greedy decoding on the committed tiny
//! Hugging Face checkpoints (`crates/kd-qwen/tests/fixtures`, see the generator beside them).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use kd_infer::{
    FinishReason, GenerateConfig, Sampling, StopStrings, generate, generate_with, length_buckets,
};
use kd_qwen::{Qwen, load_checkpoint};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../kd-qwen/tests/fixtures")
        .join(name)
}

fn model(family: &str) -> Qwen {
    load_checkpoint(&fixture(family), &Device::flex()).unwrap()
}

/// Rows of different lengths (1 to 13 tokens), so the batch is left-padded by up to 12.
fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![5, 17, 33, 2, 40, 41, 7],
        vec![9],
        vec![60, 12, 11, 10, 3, 3, 3, 80, 81, 82, 14, 15, 16],
        vec![21, 22, 23],
        vec![70, 4],
    ]
}

fn greedy_config(max_new_tokens: usize) -> GenerateConfig {
    GenerateConfig {
        max_new_tokens,
        ..GenerateConfig::default()
    }
}

fn check_batched_equals_alone(family: &str) {
    let model = model(family);
    let prompts = prompts();
    let config = greedy_config(12);
    let batched = generate(&model, &prompts, &config).unwrap();
    for (prompt, got) in prompts.iter().zip(&batched) {
        let alone = generate(&model, std::slice::from_ref(prompt), &config).unwrap();
        assert_eq!(got.tokens, alone[0].tokens, "{family}: prompt {prompt:?}");
        assert_eq!(got.finish, FinishReason::Length);
        assert_eq!(got.tokens.len(), 12);
    }
    // The kd-qwen reference decoder (checked against transformers) agrees too.
    let reference = kd_qwen::greedy(&model, &prompts, 12, None);
    let ours: Vec<Vec<u32>> = batched.into_iter().map(|g| g.tokens).collect();
    assert_eq!(ours, reference, "{family}: against kd_qwen::greedy");
}

#[test]
fn qwen3_batched_greedy_equals_one_row_at_a_time() {
    check_batched_equals_alone("qwen3");
}

#[test]
fn qwen2_batched_greedy_equals_one_row_at_a_time() {
    check_batched_equals_alone("qwen2");
}

/// Rows that finish early (eos, stop sequence) leave the batch; the others must go on
/// exactly as they would alone.
fn check_finished_rows_leave(family: &str) {
    let model = model(family);
    let prompts = prompts();
    let free = generate(&model, &prompts, &greedy_config(12)).unwrap();
    // Make row 0's 3rd token an eos and row 2's 2nd..4th tokens a stop sequence.
    let eos = free[0].tokens[2];
    let stop = free[2].tokens[1..4].to_vec();
    let config = GenerateConfig {
        eos_ids: vec![eos],
        stop_sequences: vec![stop.clone()],
        ..greedy_config(12)
    };
    let batched = generate(&model, &prompts, &config).unwrap();
    for (i, prompt) in prompts.iter().enumerate() {
        let alone = generate(&model, std::slice::from_ref(prompt), &config).unwrap();
        assert_eq!(batched[i], alone[0], "{family}: row {i}");
        // Each row is the free continuation cut at its first stop.
        let n = batched[i].tokens.len();
        assert_eq!(
            batched[i].tokens[..],
            free[i].tokens[..n],
            "{family}: row {i}"
        );
    }
    let first_eos = free[0].tokens.iter().position(|&t| t == eos).unwrap();
    assert_eq!(batched[0].tokens.len(), first_eos + 1);
    assert_eq!(batched[0].finish, FinishReason::Eos);
    assert!(batched[2].tokens.len() <= 4, "row 2 stops by step 4");
    assert!(matches!(
        batched[2].finish,
        FinishReason::Stop | FinishReason::Eos
    ));
}

#[test]
fn qwen3_finished_rows_leave_without_changing_the_others() {
    check_finished_rows_leave("qwen3");
}

#[test]
fn qwen2_finished_rows_leave_without_changing_the_others() {
    check_finished_rows_leave("qwen2");
}

#[test]
fn sampling_is_deterministic_per_seed_and_row() {
    let model = model("qwen3");
    let prompts = prompts();
    let sample = |seed, row_streams: Vec<u64>| GenerateConfig {
        sampling: Sampling::Sample {
            temperature: 1.5,
            top_k: 20,
            top_p: 0.95,
            seed,
        },
        row_streams,
        ..greedy_config(10)
    };
    let a = generate(&model, &prompts, &sample(7, vec![])).unwrap();
    assert_eq!(a, generate(&model, &prompts, &sample(7, vec![])).unwrap());
    assert_ne!(a, generate(&model, &prompts, &sample(8, vec![])).unwrap());
    // Row 3 alone, with its stream offset, draws what it drew in the batch.
    let alone = generate(&model, &prompts[3..4], &sample(7, vec![3])).unwrap();
    assert_eq!(alone[0], a[3]);
    // top_k = 1 is greedy.
    let k1 = GenerateConfig {
        sampling: Sampling::Sample {
            temperature: 0.7,
            top_k: 1,
            top_p: 1.0,
            seed: 1,
        },
        ..greedy_config(10)
    };
    assert_eq!(
        generate(&model, &prompts, &k1).unwrap(),
        generate(&model, &prompts, &greedy_config(10)).unwrap()
    );
}

#[test]
fn bad_inputs_are_errors() {
    let model = model("qwen3");
    assert!(generate(&model, &[vec![1], vec![]], &greedy_config(2)).is_err());
    let zero_temp = GenerateConfig {
        sampling: Sampling::Sample {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        },
        ..greedy_config(2)
    };
    assert!(generate(&model, &[vec![1]], &zero_temp).is_err());
}

#[test]
fn buckets_group_similar_lengths() {
    let buckets = length_buckets(&[5, 1, 9, 1, 5, 2], 2);
    assert_eq!(buckets, vec![vec![1, 3], vec![5, 0], vec![4, 2]]);
    assert_eq!(length_buckets(&[], 4), Vec::<Vec<usize>>::new());
}

#[test]
fn a_prompt_that_would_outgrow_the_positions_is_refused_before_decoding() {
    let model = model("qwen3");
    let max = model.config().max_position_embeddings;
    // The 13-token prompt plus enough new tokens to pass the limit by one.
    let config = greedy_config(max - 13 + 1);
    let err = generate(&model, &prompts(), &config)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("{} tokens", max + 1))
            && err.contains(&format!("max_position_embeddings of {max}")),
        "{err}"
    );
    // Exactly at the limit is fine (one new token keeps the check cheap to run).
    let one = greedy_config(1);
    let prompt = vec![vec![5u32; max - 1]];
    assert_eq!(generate(&model, &prompt, &one).unwrap()[0].tokens.len(), 1);
}

/// A stand-in detokenizer in which every id is two letters: `ab` for 0, `bc` for 1, ... so
/// that a stop string can straddle two tokens, as text stop strings do under BPE.
fn two_letters(ids: &[u32]) -> String {
    ids.iter()
        .flat_map(|&t| {
            let a = b'a' + (t % 25) as u8;
            [a as char, (a + 1) as char]
        })
        .collect()
}

#[test]
fn a_text_stop_string_straddling_two_tokens_stops_the_row_there() {
    for family in ["qwen3", "qwen2"] {
        let model = model(family);
        let prompts = prompts();
        let free = generate(&model, &prompts, &greedy_config(12)).unwrap();
        // Row 1's text is two letters a token: the string made of the 2nd letter of its 3rd
        // token and the 1st letter of its 4th appears only once both are out.
        let text = two_letters(&free[1].tokens);
        let stop_text = text[5..7].to_string();
        let first = text.find(&stop_text).unwrap();
        // The token holding the string's last letter (at least the 4th: the text may hold the
        // string earlier by chance, in which case the row stops there).
        let stops_after = (first + stop_text.len()).div_ceil(2);
        let stops = StopStrings::new([stop_text.clone(), String::new()], two_letters);
        let config = greedy_config(12);
        let batched = generate_with(&model, &prompts, &config, &stops).unwrap();
        assert_eq!(
            batched[1].tokens,
            free[1].tokens[..stops_after],
            "{family}: {stop_text:?} in {text:?}"
        );
        assert_eq!(batched[1].finish, FinishReason::Stop);
        // Every row, stopped or not, is what it would be alone.
        for (i, prompt) in prompts.iter().enumerate() {
            let alone =
                generate_with(&model, std::slice::from_ref(prompt), &config, &stops).unwrap();
            assert_eq!(batched[i], alone[0], "{family}: row {i}");
            assert_eq!(
                batched[i].tokens[..],
                free[i].tokens[..batched[i].tokens.len()],
                "{family}: row {i} is its free continuation, cut"
            );
        }
    }
}
