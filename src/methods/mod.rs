//! Fine-tuning methods. Each attaches to named linear sites of a model and owns its trainable
//! parameters; see METHODS.md §0 for the contract.

pub mod lora;
pub mod targets;

pub use lora::{Lora, LoraConfig};
pub use targets::TargetModules;
