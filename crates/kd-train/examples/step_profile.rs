//! Times the parts of one training step (forward, backward, optimizer) on random tokens.
//!
//! `cargo run -p kd-train --example step_profile -- HIDDEN LAYERS BATCH SEQ`
#![allow(clippy::print_stdout, clippy::unwrap_used, missing_docs)] // a developer's tool

use std::time::Instant;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Distribution, Int, Tensor};
use kd_loss::{Reduction, cross_entropy};
use kd_qwen::{ForwardOptions, Qwen, QwenConfig};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let (hidden, layers, batch, seq) = (args[0], args[1], args[2], args[3]);
    let device = Device::flex().autodiff();
    let config = QwenConfig::qwen3_shaped(hidden, hidden * 3, layers, 4, 2, hidden / 4);
    let mut model = Qwen::new(&config, &device);
    let mut optim = AdamWConfig::new().init();
    let plain = Device::flex();
    let x = Tensor::<2>::random([2 * batch, 151936], Distribution::Default, &plain);
    for _ in 0..3 {
        let t = Instant::now();
        let _ = x.clone().exp().sum().into_scalar::<f32>();
        let exp = t.elapsed();
        let t = Instant::now();
        let _ = burn::tensor::activation::log_softmax(x.clone(), 1)
            .sum()
            .into_scalar::<f32>();
        let lsm = t.elapsed();
        let t = Instant::now();
        let _ = burn::tensor::activation::softmax(x.clone(), 1)
            .sum()
            .into_scalar::<f32>();
        let sm = t.elapsed();
        let t = Instant::now();
        let _ = (x.clone() * x.clone()).sum().into_scalar::<f32>();
        let mul = t.elapsed();
        println!("exp {exp:?} log_softmax {lsm:?} softmax {sm:?} mul {mul:?}");
    }
    for step in 0..4 {
        let ids =
            Tensor::<2, Int>::random([batch, seq], Distribution::Uniform(0.0, 150000.0), &device);
        let positions =
            Tensor::<1, Int>::arange(0..(2 * batch) as i64, &device).mul_scalar(seq as i64 / 2);
        let targets =
            Tensor::<1, Int>::random([2 * batch], Distribution::Uniform(0.0, 150000.0), &device);
        let t = Instant::now();
        let h = model.forward_hidden(ids.clone(), &ForwardOptions::default(), None);
        let _ = h.clone().sum().into_scalar::<f32>();
        let body = t.elapsed();
        let t = Instant::now();
        let rows = h.reshape([batch * seq, hidden]).narrow(0, 0, 2 * batch);
        let _ = model.lm_logits(rows).sum().into_scalar::<f32>();
        let head = t.elapsed();
        let e = model.model.embed_tokens.weight.val();
        let t = Instant::now();
        let _ = e.clone().transpose().sum().into_scalar::<f32>();
        let tr = t.elapsed();
        let t = Instant::now();
        let _ = cross_entropy(
            Tensor::<2>::random([2 * batch, 151936], Distribution::Default, &device),
            targets.clone(),
            &Reduction::TokenMean,
        )
        .into_scalar::<f32>();
        let ce = t.elapsed();
        println!("body {body:?} head {head:?} transpose-sum {tr:?} ce {ce:?}");
        let t = Instant::now();
        let logits = model.forward_at(ids, positions, &ForwardOptions::default());
        let loss = cross_entropy(logits, targets, &Reduction::TokenMean);
        let _ = loss.clone().into_scalar::<f32>();
        let fwd = t.elapsed();
        let t = Instant::now();
        let grads = loss.backward();
        let bwd = t.elapsed();
        let t = Instant::now();
        let grads = GradientsParams::from_grads(grads, &model);
        model = optim.step(1e-3, model, grads);
        let _ = model.model.norm.weight.val().sum().into_scalar::<f32>();
        let opt = t.elapsed();
        println!("step {step}: forward {fwd:?} backward {bwd:?} optimizer {opt:?}");
    }
    let _ = model.num_params();
}
