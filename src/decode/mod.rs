//! Decoding: text generation (and later emulated fine-tuning at decode time).

pub mod generate;
pub mod task;

pub use generate::{generate, generate_batch, prompt_ids, stop_tokens, Completion, SamplingOptions};
