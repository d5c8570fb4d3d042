//! The training loop and everything around it: evaluation, metrics, checkpoints, progress.

pub mod checkpoint;
pub mod dataset;
pub mod eval;
pub mod grads;
pub mod interrupt;
pub mod memory;
pub mod metrics;
pub mod preference;
pub mod progress;
pub mod rollout;
pub mod run_dir;
pub mod trainer;
pub mod zo_offload;

pub use eval::{evaluate, EvalResult};
pub use trainer::{train, TrainOptions, TrainSummary};
