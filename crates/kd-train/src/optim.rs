//! AdamW as practitioners configure it: no weight decay on norms and biases, gradients clipped
//! by their global norm, state that survives a restart.
//!
//! The update itself is burn's `AdamW` (two instances: one with decay, one without, selected
//! per parameter path). Two things burn does differently from what a distillation run needs
//! are handled here:
//!
//! - burn's `GradientClipping::Norm` clips each parameter tensor on its own; clipping by the
//!   norm over *all* gradients (PyTorch's `clip_grad_norm_`) is done in [`clip_global_norm`].
//! - burn keys optimizer state by `ParamId`, which is random for a freshly built or reloaded
//!   model. [`stable_param_ids`] gives every parameter an id derived from its path, so the
//!   state saved with a checkpoint finds its parameters again after a restart.

use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamGroup, ParamId};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::Tensor;

/// Parameters excluded from weight decay: RMSNorm scales (`…norm.weight`, q/k norms included)
/// and biases. Matched against burn's dotted module path, e.g.
/// `model.layers.0.post_attention_layernorm.weight`.
pub const NO_DECAY_PATTERN: &str = r"(norm\.weight|\.bias)$";

/// The optimizer of one training run.
pub struct Optimizer {
    inner: ModuleOptimizer,
    max_grad_norm: Option<f64>,
}

impl Optimizer {
    /// AdamW (β = 0.9, 0.999, ε = 1e-8, burn's defaults) with `weight_decay` on every
    /// parameter except those matching [`NO_DECAY_PATTERN`], and clipping by global norm when
    /// `max_grad_norm` is set.
    pub fn adamw(weight_decay: f64, max_grad_norm: Option<f64>) -> Self {
        let decayed = AdamWConfig::new()
            .with_weight_decay(weight_decay as f32)
            .build();
        let plain = AdamWConfig::new().with_weight_decay(0.0).build();
        let no_decay = ParamGroup::from_regex(NO_DECAY_PATTERN)
            .expect("NO_DECAY_PATTERN is a valid regular expression");
        let inner = ModuleOptimizer::from(decayed).with_group(no_decay, plain, None);
        Self {
            inner,
            max_grad_norm,
        }
    }

    /// Clips `grads` (when configured) and applies one update with learning rate `lr`.
    /// Returns the updated module and the global gradient norm *before* clipping.
    pub fn step<M: Module>(&mut self, lr: f64, module: M, mut grads: GradientsParams) -> (M, f64) {
        let norm = global_norm(&module, &grads);
        if let Some(max) = self.max_grad_norm
            && norm > max
        {
            // PyTorch's rule: scale by max / (norm + 1e-6).
            clip_global_norm(&module, &mut grads, max / (norm + 1e-6));
        }
        (self.inner.step(lr, module, grads), norm)
    }

    /// Writes the optimizer state (burn's burnpack format) to `path`.
    pub fn save(&self, path: &Path) -> Result<(), String> {
        self.inner.save(path).map_err(|e| format!("{e:?}"))
    }

    /// Restores state written by [`Optimizer::save`]. The module it applies to must carry
    /// [`stable_param_ids`].
    pub fn load(self, path: &Path) -> Result<Self, String> {
        let inner = self.inner.load(path).map_err(|e| format!("{e:?}"))?;
        Ok(Self {
            inner,
            max_grad_norm: self.max_grad_norm,
        })
    }
}

/// The L2 norm of all gradients in `grads` together.
pub fn global_norm<M: Module>(module: &M, grads: &GradientsParams) -> f64 {
    struct SumSquares<'a> {
        grads: &'a GradientsParams,
        total: Option<Tensor<1>>,
    }
    impl ModuleVisitor for SumSquares<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                let s = g.square().sum();
                self.total = Some(match self.total.take() {
                    Some(t) => t + s,
                    None => s,
                });
            }
        }
    }
    let mut visitor = SumSquares { grads, total: None };
    module.visit(&mut visitor);
    visitor
        .total
        .map_or(0.0, |t| f64::from(t.into_scalar::<f32>()).sqrt())
}

/// Multiplies every gradient in `grads` by `factor`.
pub fn clip_global_norm<M: Module>(module: &M, grads: &mut GradientsParams, factor: f64) {
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
    }
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                self.grads.register(param.id, g.mul_scalar(self.factor));
            }
        }
    }
    module.visit(&mut Scale { grads, factor });
}

/// Gives every float parameter of `module` an id computed from its dotted path (FNV-1a), so
/// that a model rebuilt or reloaded after a crash has the same ids as the one whose optimizer
/// state was saved.
///
/// # Panics
///
/// When two paths hash to the same id (never seen; it would mean a 64-bit collision).
pub fn stable_param_ids<M: Module>(module: M) -> M {
    struct Assign {
        path: Vec<String>,
        seen: std::collections::HashMap<u64, String>,
    }
    impl ModuleMapper for Assign {
        fn enter_module(&mut self, name: &str, _container: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let path = self.path.join(".");
            let id = fnv1a(path.as_bytes());
            if let Some(other) = self.seen.insert(id, path.clone()) {
                panic!("parameters `{other}` and `{path}` hash to the same id");
            }
            let (_, tensor, mapper) = param.consume();
            Param::from_mapped_value(ParamId::from(id), tensor, mapper)
        }
    }
    module.map(&mut Assign {
        path: Vec::new(),
        seen: Default::default(),
    })
}

/// Dotted paths of all float parameters, in visiting order.
pub fn param_paths<M: Module>(module: &M) -> Vec<String> {
    struct Paths {
        path: Vec<String>,
        out: Vec<String>,
    }
    impl ModuleVisitor for Paths {
        fn enter_module(&mut self, name: &str, _container: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, _param: &Param<Tensor<D>>) {
            self.out.push(self.path.join("."));
        }
    }
    let mut paths = Paths {
        path: Vec::new(),
        out: Vec::new(),
    };
    module.visit(&mut paths);
    paths.out
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use burn::tensor::Device;
    use kd_qwen::{Qwen, QwenConfig};

    use super::*;

    #[test]
    fn no_decay_pattern_picks_norms_and_biases_only() {
        let device = Device::flex();
        let mut config = QwenConfig::qwen3_shaped(16, 32, 1, 2, 1, 8);
        config.vocab_size = 20;
        config.attention_bias = Some(true); // Qwen2-style biases on q/k/v
        let model = Qwen::new(&config, &device);
        let group = ParamGroup::from_regex(NO_DECAY_PATTERN).expect("the pattern compiles");
        let paths = param_paths(&model);
        let skipped: Vec<&str> = paths
            .iter()
            .filter(|p| group.matches(&ParamId::new(), Some(p)))
            .map(String::as_str)
            .collect();
        assert_eq!(
            skipped,
            [
                "model.layers.0.self_attn.q_proj.bias",
                "model.layers.0.self_attn.k_proj.bias",
                "model.layers.0.self_attn.v_proj.bias",
                "model.layers.0.self_attn.q_norm.weight",
                "model.layers.0.self_attn.k_norm.weight",
                "model.layers.0.input_layernorm.weight",
                "model.layers.0.post_attention_layernorm.weight",
                "model.norm.weight",
            ]
        );
    }

    #[test]
    fn stable_ids_do_not_depend_on_construction() {
        let device = Device::flex();
        let config = QwenConfig::qwen3_shaped(16, 32, 1, 2, 1, 8);
        let ids = |m: &Qwen| {
            struct Ids(Vec<u64>);
            impl ModuleVisitor for Ids {
                fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
                    self.0.push(p.id.val());
                }
            }
            let mut v = Ids(Vec::new());
            m.visit(&mut v);
            v.0
        };
        let a = stable_param_ids(Qwen::new(&config, &device));
        let b = stable_param_ids(Qwen::new(&config, &device));
        assert_eq!(ids(&a), ids(&b));
    }
}
