//! Extractive stand-in rationales for `kd distill --rationales`, for when no reasoning model
//! is at hand (none can be downloaded here): for each review, the sentence that on its own
//! moves the teacher furthest towards the review's label, written as the "reasoning" of a
//! `kd rationales` CSV.
//!
//! ```sh
//! cargo run -p kd-cli --example evidence_rationales -- TEACHER_DIR IDS_FILE OUT_CSV
//! ```
//!
//! `IDS_FILE` is a run's `student_ids.txt`; the reviews come from the aclImdb archive and the
//! tokenizer from the mirrors (`KD_MIRROR`), as `kd distill` finds them. This is not the
//! "distilling step-by-step" of a reasoning model: it tests the multi-task plumbing and
//! whether evidence picked by the teacher helps a student at this scale.

#![allow(clippy::print_stdout)] // a developer's tool: its summary is its output

use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use kd_imdb::assets::{Asset, AssetOptions, resolve};
use kd_imdb::{PromptBuilder, Review, clean_review, read_any};
use kd_infer::rationale::{Extraction, RationaleRow, RationaleWriter};
use kd_infer::score_labels;

/// Sentences shorter than this many characters ("Wow.") carry too little to explain a label.
const MIN_SENTENCE_CHARS: usize = 20;
/// Prompt length for scoring one sentence (a sentence rarely needs more).
const SENTENCE_MAX_LEN: usize = 96;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [teacher, ids, out] = &args[..] else {
        bail!("usage: evidence_rationales TEACHER_DIR IDS_FILE OUT_CSV");
    };
    let options = AssetOptions::from_env();
    let archive = resolve(Asset::ImdbArchive, &options)?;
    let tokenizer = resolve(Asset::QwenTokenizer, &options)?;
    let text = std::fs::read_to_string(ids).with_context(|| format!("reading {ids}"))?;
    let wanted: HashSet<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let reviews: Vec<Review> = read_any(&archive)?
        .train
        .into_iter()
        .filter(|r| wanted.contains(r.id.as_str()))
        .collect();
    if reviews.len() != wanted.len() {
        bail!(
            "{ids}: {} ids, {} found in {}",
            wanted.len(),
            reviews.len(),
            archive.display()
        );
    }

    let device = Device::flex();
    let model = kd_qwen::load_checkpoint(&PathBuf::from(teacher), &device)?;
    let builder = PromptBuilder::new(&tokenizer, SENTENCE_MAX_LEN)?;

    // 1. Every candidate sentence of every review, as a review of its own.
    let mut owner = Vec::new();
    let mut sentences = Vec::new();
    for (i, review) in reviews.iter().enumerate() {
        for sentence in split_sentences(&clean_review(&review.text)) {
            owner.push(i);
            sentences.push(sentence);
        }
    }
    let prompts = sentences
        .iter()
        .map(|s| builder.encode(s, None))
        .collect::<Result<Vec<_>, _>>()?;

    // 2. The teacher's margin for the review's label on each sentence alone.
    let scores = score_labels(
        &model,
        &prompts,
        builder.label_token_ids(),
        builder.pad_id(),
        64,
        &device,
        &mut |_| {},
    )?;
    let mut best: Vec<Option<(f32, usize)>> = vec![None; reviews.len()];
    for (k, (&i, s)) in owner.iter().zip(&scores).enumerate() {
        let gold = reviews[i].label.index();
        let margin = s[gold] - s[1 - gold];
        if best[i].is_none_or(|(m, _)| margin > m) {
            best[i] = Some((margin, k));
        }
    }

    // 3. One row per review with a sentence; the others are left out (distill keeps their
    //    label-only example).
    let mut rows = Vec::new();
    let mut agreeing = 0;
    for (review, best) in reviews.iter().zip(&best) {
        let Some((margin, k)) = *best else { continue };
        agreeing += usize::from(margin > 0.0);
        rows.push(RationaleRow {
            id: review.id.clone(),
            sentiment: review.label.word().to_string(),
            review: clean_review(&review.text),
            reasoning: format!("The telling sentence: \"{}\"", sentences[k]),
            new_tokens: 0,
            finish_reason: "extractive".into(),
            extraction: Extraction::Both,
        });
    }
    let mut writer = RationaleWriter::create(&PathBuf::from(out))?;
    writer.write_batch(&rows)?;
    println!(
        "{} rationales for {} reviews ({} sentences scored); the chosen sentence alone points \
         to the label for {agreeing}; written to {out}",
        rows.len(),
        reviews.len(),
        sentences.len()
    );
    Ok(())
}

/// Sentences of a cleaned review: split at line breaks and after `.`, `!` or `?` followed by
/// a space, trimmed, short ones dropped.
fn split_sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut start = 0;
    let bytes = text.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        let ends = b == b'\n'
            || matches!(b, b'.' | b'!' | b'?') && bytes.get(i + 1).is_some_and(|&n| n == b' ');
        if ends || i + 1 == bytes.len() {
            let sentence = text[start..=i].trim();
            if sentence.len() >= MIN_SENTENCE_CHARS {
                out.push(sentence.to_string());
            }
            start = i + 1;
        }
    }
    out
}
