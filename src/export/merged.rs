//! A merged Hugging Face model directory: `config.json`, `model.safetensors` with the adapter
//! folded in, and the tokenizer files, written into a temporary folder and renamed into place
//! (file by file when the folder exists, so nothing else in it is touched).

use crate::error::{Error, Result};
use crate::formats::safetensors::{self as st, SaveDType};
use crate::models::load::ModelSource;
use crate::models::RopeScaling;
use crate::session::Session;
use std::path::Path;

/// Tokenizer-side files copied verbatim from a Hugging Face source directory.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
];

pub fn write_hf_dir(session: &Session, out: &Path, dtype: SaveDType) -> Result<()> {
    if session.method.is_some() {
        return Err(Error::Model("merge the adapter before writing a merged model".into()));
    }
    let cfg = &session.model.config;
    if matches!(cfg.rope_scaling, Some(RopeScaling::Factors(_))) {
        return Err(Error::Model(
            "this model's RoPE uses per-frequency factors (GGUF rope_freqs), which config.json cannot express; refusing to write a model with different positions".into(),
        ));
    }
    crate::io_util::write_files_into(out, |tmp| write_files(session, tmp, dtype))
}

fn write_files(session: &Session, tmp: &Path, dtype: SaveDType) -> Result<()> {
    let cfg = &session.model.config;
    let mut json = cfg.to_hf_json();
    json["torch_dtype"] = serde_json::Value::from(match dtype {
        SaveDType::F32 => "float32",
        SaveDType::F16 => "float16",
        SaveDType::BF16 => "bfloat16",
    });
    let text = serde_json::to_string_pretty(&json).expect("serialisable");
    crate::io_util::write_atomic(&tmp.join("config.json"), text.as_bytes())?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    st::save(&tmp.join("model.safetensors"), &session.model.named_weights()?, dtype, Some(meta))?;

    match &session.source {
        ModelSource::HfDir(dir) => {
            for f in TOKENIZER_FILES {
                let src = dir.join(f);
                if src.is_file() {
                    std::fs::copy(&src, tmp.join(f)).map_err(|e| Error::io(&src, e))?;
                }
            }
        }
        ModelSource::Gguf(_) => session.tokenizer.save_hf_files(tmp)?,
    }
    Ok(())
}
