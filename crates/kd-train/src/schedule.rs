//! Learning-rate schedule: linear warmup, then cosine decay to a floor.

/// Linear warmup from 0 to `peak` over `warmup` steps, then cosine decay to `peak * min_ratio`
/// at `total` steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WarmupCosine {
    /// Learning rate at the end of warmup.
    pub peak: f64,
    /// Steps of linear warmup.
    pub warmup: usize,
    /// Total number of optimizer steps.
    pub total: usize,
    /// Final learning rate as a fraction of `peak`.
    pub min_ratio: f64,
}

impl WarmupCosine {
    /// The learning rate for optimizer step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let progress = ((step - self.warmup) as f64 / span as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.peak * (self.min_ratio + (1.0 - self.min_ratio) * cosine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOL: f64 = 1e-12;

    #[test]
    fn warmup_then_cosine() {
        let s = WarmupCosine {
            peak: 1.0,
            warmup: 4,
            total: 14,
            min_ratio: 0.1,
        };
        // Warmup: (step + 1) / 4.
        assert!((s.lr(0) - 0.25).abs() < TOL);
        assert!((s.lr(3) - 1.0).abs() < TOL);
        // Halfway through the 10 decay steps cos(pi/2) = 0: 0.1 + 0.9 * 0.5 = 0.55.
        assert!((s.lr(9) - 0.55).abs() < TOL);
        // At the end: the floor.
        assert!((s.lr(14) - 0.1).abs() < TOL);
    }
}
