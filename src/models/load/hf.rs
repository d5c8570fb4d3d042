//! Hugging Face model directories: `config.json` + one or sharded `*.safetensors`.

use crate::error::{Error, Result};
use crate::formats::safetensors::load_f32;
use crate::io_util::read_to_string;
use crate::models::{Llama, ModelConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The safetensors files of a model directory: the shards its index names, else
/// `model.safetensors`.
pub(crate) fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let v: serde_json::Value = serde_json::from_str(&read_to_string(&index)?)
            .map_err(|e| Error::format(&index, format!("invalid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::format(&index, "field `weight_map` is missing or not an object"))?;
        let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_string)).collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(Error::format(dir, "no model.safetensors or model.safetensors.index.json in the model directory"))
}

pub fn load_hf_dir(dir: &Path) -> Result<Llama> {
    let cfg_path = dir.join("config.json");
    let config = ModelConfig::from_hf_json(&cfg_path, &read_to_string(&cfg_path)?)?;
    let files = weight_files(dir)?;
    let mut weights = HashMap::new();
    for f in &files {
        weights.extend(load_f32(f)?);
    }
    let src = if files.len() == 1 { files[0].clone() } else { dir.to_path_buf() };
    Llama::from_weights(config, &mut weights, &src)
}
