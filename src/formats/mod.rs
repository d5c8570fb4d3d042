//! On-disk model formats shared by loading and export.
pub mod gguf;
pub mod safetensors;
pub mod sparse_diff;
