//! Analyses of what fine-tuning changed (METHODS.md §8), behind `ferrotune analyze`.

pub mod forgetting;
pub mod spectrum;
pub mod tuco;
