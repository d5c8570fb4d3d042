//! A merged Hugging Face model directory: `config.json`, `model.safetensors` with the adapter
//! folded in, and the tokenizer files, written into a temporary folder and renamed into place
//! (file by file when the folder exists, so nothing else in it is touched).

use crate::error::{Error, Result};
use crate::formats::safetensors::{self as st, SaveDType};
use crate::models::load::ModelSource;
use crate::models::{Llama, RopeScaling, WeightRef};
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

/// Which groups of linear sites hold biases, `(attention q/k/v/o, MLP gate/up/down)`, after
/// checking that the architecture can say so: transformers' Llama has one `attention_bias`
/// flag for q, k, v and o and one `mlp_bias` for the MLP; Qwen2 has q/k/v biases only and
/// Mistral none. (llama.cpp reads the same optional biases for its `llama` architecture.)
pub fn bias_layout(model: &Llama) -> Result<(bool, bool)> {
    let c = &model.config;
    let (mut attn, mut mlp) = (false, false);
    for l in model.linears().filter(|l| l.bias.is_some()) {
        let is_mlp = l.name.contains(".mlp.");
        let allowed = match c.model_type.as_str() {
            "qwen2" => !is_mlp && !l.name.ends_with("o_proj"),
            "mistral" => false,
            _ => true,
        };
        if !allowed {
            return Err(Error::Model(format!(
                "`{}` has a bias (from the merged adapter), which a {} model cannot hold; export the adapter itself instead of a merged model",
                l.name, c.model_type
            )));
        }
        if is_mlp { mlp = true } else { attn = true }
    }
    Ok((attn, mlp))
}

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
    let (attn_bias, mlp_bias) = bias_layout(&session.model)?;
    let mut json = cfg.to_hf_json();
    json["attention_bias"] = serde_json::Value::from(attn_bias);
    json["mlp_bias"] = serde_json::Value::from(mlp_bias);
    json["torch_dtype"] = serde_json::Value::from(match dtype {
        SaveDType::F32 => "float32",
        SaveDType::F16 => "float16",
        SaveDType::BF16 => "bfloat16",
    });
    let text = serde_json::to_string_pretty(&json).expect("serialisable");
    crate::io_util::write_atomic(&tmp.join("config.json"), text.as_bytes())?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    // `None`: a zero bias.
    let mut named: Vec<(String, Vec<usize>, Option<WeightRef>)> = session.model.weight_refs().into_iter().map(|(n, w)| (n, w.shape(), Some(w))).collect();
    // transformers' flags are per group: a group with any bias needs one on every member.
    let qwen2 = cfg.model_type == "qwen2";
    for l in session.model.linears().filter(|l| l.bias.is_none()) {
        let is_mlp = l.name.contains(".mlp.");
        let flagged = if is_mlp { mlp_bias } else { attn_bias && !(qwen2 && l.name.ends_with("o_proj")) };
        if flagged {
            named.push((format!("{}.bias", l.name), vec![l.info().out_features], None));
        }
    }
    let shapes: Vec<(String, Vec<usize>)> = named.iter().map(|(n, s, _)| (n.clone(), s.clone())).collect();
    let mut ticker = crate::console::Ticker::new("writing model.safetensors", named.len(), "tensors");
    let mut written = 0;
    st::save_streamed(&tmp.join("model.safetensors"), &shapes, dtype, Some(meta), |i| {
        ticker.tick(written, None);
        written += 1;
        match &named[i].2 {
            Some(w) => w.to_f32_vec(),
            None => Ok(vec![0.0; named[i].1.iter().product()]),
        }
    })?;

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
