//! Pre-trained models: configuration, the Llama-family decoder and loading from disk.

pub mod block_site;
pub mod config;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod load;
pub mod qat;

pub use block_site::{BlockHook, BlockSite, BlockSiteInfo};
pub use config::{ModelConfig, RopeScaling};
pub use linear::{add_bias, ForwardCtx, Linear, SiteHook, SiteInfo};
pub use kv_cache::{KvCache, RowCache};
pub use llama::{block_index, Llama, WeightRef};
