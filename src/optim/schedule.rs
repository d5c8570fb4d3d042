//! Learning-rate schedules with linear warm-up, as transformers' `get_*_schedule_with_warmup`:
//! the multiplier for optimizer step `s` (0-based) is computed before that step.

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LrSchedule {
    Constant,
    Linear,
    Cosine,
}

impl LrSchedule {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "constant" | "constant_with_warmup" => Ok(Self::Constant),
            "linear" => Ok(Self::Linear),
            "cosine" => Ok(Self::Cosine),
            other => Err(Error::config("lr_scheduler", format!("`{other}` is not one of constant, linear, cosine"))),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Scheduler {
    pub kind: LrSchedule,
    pub base_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Scheduler {
    pub fn lr(&self, step: usize) -> f64 {
        self.base_lr * self.multiplier(step)
    }

    fn multiplier(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return step as f64 / self.warmup_steps.max(1) as f64;
        }
        let decay_len = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = (step - self.warmup_steps) as f64 / decay_len;
        match self.kind {
            LrSchedule::Constant => 1.0,
            LrSchedule::Linear => (1.0 - progress).max(0.0),
            LrSchedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()).max(0.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        let s = |kind| Scheduler { kind, base_lr: 1.0, warmup_steps: 2, total_steps: 6 };
        assert_eq!(s(LrSchedule::Linear).lr(0), 0.0);
        assert_eq!(s(LrSchedule::Linear).lr(1), 0.5);
        assert_eq!(s(LrSchedule::Linear).lr(2), 1.0);
        assert_eq!(s(LrSchedule::Linear).lr(4), 0.5);
        assert!((s(LrSchedule::Cosine).lr(4) - 0.5).abs() < 1e-12);
        assert_eq!(s(LrSchedule::Constant).lr(5), 1.0);
        assert!(LrSchedule::parse("cosine_with_restarts").is_err());
    }
}
