//! The key/value cache for incremental decoding.

use burn::tensor::Tensor;

/// Keys and values of every layer for the tokens seen so far.
///
/// Each layer holds `[batch, kv_heads, len, head_dim]` keys and values after RoPE.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<(Option<Tensor<4>>, Option<Tensor<4>>)>,
    len: usize,
}

impl KvCache {
    /// An empty cache for a model of `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![(None, None); num_layers],
            len: 0,
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn layer_mut(&mut self, i: usize) -> &mut (Option<Tensor<4>>, Option<Tensor<4>>) {
        &mut self.layers[i]
    }

    pub(crate) fn advance(&mut self, seq: usize) {
        self.len += seq;
    }

    /// Keeps only the given batch rows (finished rows leave the batch).
    pub fn retain_rows(&mut self, rows: burn::tensor::Tensor<1, burn::tensor::Int>) {
        for (k, v) in &mut self.layers {
            *k = k.take().map(|t| t.select(0, rows.clone()));
            *v = v.take().map(|t| t.select(0, rows.clone()));
        }
    }
}
