//! Optimisation: AdamW, learning-rate schedules, gradient clipping.

pub mod adamw;
pub mod clip;
pub mod schedule;

pub use adamw::{AdamW, AdamWConfig};
pub use clip::clip_grad_norm;
pub use schedule::{LrSchedule, Scheduler};
