//! Pre-trained models: configuration, the Llama-family decoder and loading from disk.

pub mod config;
pub mod linear;
pub mod llama;
pub mod load;

pub use config::{ModelConfig, RopeScaling};
pub use linear::{ForwardCtx, Linear, SiteHook, SiteInfo};
pub use llama::{KvCache, Llama};
