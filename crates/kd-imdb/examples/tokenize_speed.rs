//! Times prompt encoding of the first N reviews of a Kaggle TSV.
//!
//! `cargo run -p kd-imdb --example tokenize_speed -- TSV TOKENIZER N`
#![allow(clippy::print_stdout, clippy::unwrap_used, missing_docs)] // a developer's tool

use std::time::Instant;

use kd_imdb::{PromptBuilder, read_kaggle_tsv};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let corpus = read_kaggle_tsv(&args[0]).unwrap();
    let n: usize = args[2].parse().unwrap();
    let builder = PromptBuilder::new(&args[1], 192).unwrap();
    let reviews = &corpus.train[..n];
    let t = Instant::now();
    for r in reviews {
        builder.encode_review(r, true).unwrap();
    }
    println!("encode_review: {:?} for {n}", t.elapsed());
    let t = Instant::now();
    let _ = builder.encode_batch(reviews, true).unwrap();
    println!("encode_batch: {:?} for {n}", t.elapsed());
}
