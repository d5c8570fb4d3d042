//! Loading a pre-trained model from a Hugging Face directory or a GGUF file.

mod gguf;
mod hf;

use super::llama::Llama;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

pub use gguf::{config_from_gguf, gguf_name, hf_name, load_gguf, permute_rows, unpermute_rows};

pub use hf::load_hf_dir;
pub(crate) use gguf::is_frozen_matrix;
pub(crate) use hf::weight_files;

/// Where a model comes from; everything that takes `--model PATH` accepts both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    HfDir(PathBuf),
    Gguf(PathBuf),
}

impl ModelSource {
    pub fn detect(path: &Path) -> Result<Self> {
        if path.is_dir() {
            if !path.join("config.json").is_file() {
                return Err(Error::format(path, "directory has no config.json (expected a Hugging Face model directory)"));
            }
            Ok(Self::HfDir(path.to_path_buf()))
        } else if path.is_file() {
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if ext.eq_ignore_ascii_case("gguf") {
                Ok(Self::Gguf(path.to_path_buf()))
            } else {
                Err(Error::format(path, "expected a .gguf file or a Hugging Face model directory"))
            }
        } else {
            Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory")))
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            Self::HfDir(p) | Self::Gguf(p) => p,
        }
    }
}

/// How the frozen base matrices are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Keep a GGUF's quantized (or f16/bf16) matrices in their blocks instead of dequantizing
    /// them to f32 (config key `load_quantized`).
    pub keep_quantized: bool,
    /// Store the f32 base matrices in bf16 (config key `base_dtype = "bf16"`): half the
    /// memory, products still accumulate in f32. Matrices kept in GGUF blocks are unchanged.
    pub bf16: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { keep_quantized: true, bf16: false }
    }
}

impl LoadOptions {
    /// Every weight in f32, as stored or dequantized.
    pub fn f32() -> Self {
        Self { keep_quantized: false, bf16: false }
    }
}

/// Loads the model at `path` (HF directory or `.gguf`) with the default [`LoadOptions`]
/// (GGUF blocks kept, other weights f32).
pub fn load_model(path: &Path) -> Result<Llama> {
    load_model_with(path, &LoadOptions::default())
}

pub fn load_model_with(path: &Path, opts: &LoadOptions) -> Result<Llama> {
    let mut model = match ModelSource::detect(path)? {
        ModelSource::HfDir(dir) => load_hf_dir(&dir)?,
        ModelSource::Gguf(file) => load_gguf(&file, opts.keep_quantized)?,
    };
    if opts.bf16 {
        model.frozen_to_bf16()?;
    }
    Ok(model)
}

/// Loads the tokenizer that belongs to the model at `path`: `tokenizer.json` (+ config) from a
/// Hugging Face directory, or the vocabulary and chat template in a GGUF's metadata.
pub fn load_tokenizer(path: &Path) -> Result<crate::data::TextTokenizer> {
    match ModelSource::detect(path)? {
        ModelSource::HfDir(dir) => crate::data::TextTokenizer::from_hf_dir(&dir),
        ModelSource::Gguf(file) => {
            let g = crate::formats::gguf::GgufFile::open(&file)?;
            crate::data::TextTokenizer::from_gguf_metadata(&file, &|k| g.get(k))
        }
    }
}
