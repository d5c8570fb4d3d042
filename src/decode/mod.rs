//! Decoding: text generation (and later emulated fine-tuning at decode time).

pub mod generate;

pub use generate::{generate, SamplingOptions};
