//! The decoder's hyper-parameters, read from a Hugging Face `config.json` or GGUF metadata.

use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// How RoPE frequencies are adjusted for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.x: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
    /// Positions divided by `factor` (equivalently every frequency).
    Linear { factor: f32 },
    /// Per-frequency divisors given explicitly (llama.cpp's `rope_freqs.weight`).
    Factors(Vec<f32>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// `llama`, `mistral`, `qwen2` (SmolLM2 is `llama`).
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (Qwen2).
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2"];

impl ModelConfig {
    /// Parses a transformers `config.json` (v4 `rope_theta`/`rope_scaling` or v5 `rope_parameters`).
    pub fn from_hf_json(path: &Path, text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::format(path, format!("invalid JSON: {e}")))?;
        let field = |k: &str| v.get(k).filter(|x| !x.is_null());
        let usize_of = |k: &str| -> Result<usize> {
            field(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| Error::format(path, format!("field `{k}` is missing or not a non-negative integer")))
        };
        let model_type = field("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::format(path, "field `model_type` is missing"))?
            .to_string();
        if !SUPPORTED_MODEL_TYPES.contains(&model_type.as_str()) {
            return Err(Error::format(
                path,
                format!("model_type `{model_type}` is not supported (supported: {})", SUPPORTED_MODEL_TYPES.join(", ")),
            ));
        }
        let hidden_size = usize_of("hidden_size")?;
        let num_attention_heads = usize_of("num_attention_heads")?;
        let num_key_value_heads = field("num_key_value_heads").map_or(Ok(num_attention_heads), |_| usize_of("num_key_value_heads"))?;
        let head_dim = match field("head_dim") {
            Some(_) => usize_of("head_dim")?,
            None => hidden_size / num_attention_heads.max(1),
        };
        let rope = field("rope_parameters");
        let rope_theta = rope
            .and_then(|r| r.get("rope_theta"))
            .or_else(|| field("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0);
        let scaling_json = match rope {
            Some(r) if r.get("rope_type").and_then(Value::as_str).is_some_and(|t| t != "default") => Some(r),
            _ => field("rope_scaling"),
        };
        let rope_scaling = scaling_json.map(|s| parse_rope_scaling(path, s)).transpose()?.flatten();
        let eos_token_ids = match field("eos_token_id") {
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
            Some(x) => x.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            None => vec![],
        };
        let cfg = ModelConfig {
            attention_bias: field("attention_bias").and_then(Value::as_bool).unwrap_or(model_type == "qwen2"),
            model_type,
            vocab_size: usize_of("vocab_size")?,
            hidden_size,
            intermediate_size: usize_of("intermediate_size")?,
            num_hidden_layers: usize_of("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: field("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: field("max_position_embeddings").and_then(Value::as_u64).unwrap_or(2048) as usize,
            tie_word_embeddings: field("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            bos_token_id: field("bos_token_id").and_then(Value::as_u64).map(|x| x as u32),
            eos_token_ids,
        };
        cfg.validate().map_err(|e| Error::format(path, e))?;
        Ok(cfg)
    }

    /// Checks the shape relations the model code relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let at_least_one = [
            ("vocab_size", "vocab_size / the tokenizer's token list", self.vocab_size),
            ("hidden_size", "embedding_length", self.hidden_size),
            ("intermediate_size", "feed_forward_length", self.intermediate_size),
            ("num_hidden_layers", "block_count", self.num_hidden_layers),
            ("max_position_embeddings", "context_length", self.max_position_embeddings),
        ];
        for (hf, gguf, v) in at_least_one {
            if v == 0 {
                return Err(format!("{hf} (GGUF: {gguf}) is 0; a usable model needs at least 1"));
            }
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(format!("rms_norm_eps is {}; expected a small positive number such as 1e-5", self.rms_norm_eps));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(format!("rope_theta (GGUF: rope.freq_base) is {}; expected a positive number such as 10000", self.rope_theta));
        }
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 || self.head_dim == 0 {
            return Err("attention heads and head_dim must be positive".into());
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim ({}) must be even for RoPE", self.head_dim));
        }
        // The projections are `heads · head_dim` wide; the model code multiplies unchecked.
        for (what, heads) in [("num_attention_heads", self.num_attention_heads), ("num_key_value_heads", self.num_key_value_heads)] {
            if heads.checked_mul(self.head_dim).is_none() {
                return Err(format!("{what} ({heads}) × head_dim ({}) overflows", self.head_dim));
            }
        }
        Ok(())
    }

    /// RoPE inverse frequencies, `head_dim / 2` of them, with any scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / (self.rope_theta as f32).powf((2 * i) as f32 / d as f32))
            .collect();
        match &self.rope_scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Factors(fs)) => base.iter().zip(fs).map(|(f, s)| f / s).collect(),
            Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
                let old = *original_max_position_embeddings as f32;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

fn parse_rope_scaling(path: &Path, s: &Value) -> Result<Option<RopeScaling>> {
    let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
    let num = |k: &str| -> Result<f32> {
        s.get(k)
            .and_then(Value::as_f64)
            .map(|x| x as f32)
            .ok_or_else(|| Error::format(path, format!("rope scaling `{kind}` needs a numeric `{k}`")))
    };
    Ok(match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear { factor: num("factor")? }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        }),
        other => {
            return Err(Error::format(
                path,
                format!("rope scaling type `{other}` is not supported (supported: default, linear, llama3)"),
            ))
        }
    })
}

impl ModelConfig {
    /// A transformers-loadable `config.json` for this model (used by merged exports).
    pub fn to_hf_json(&self) -> Value {
        let arch = match self.model_type.as_str() {
            "mistral" => "MistralForCausalLM",
            "qwen2" => "Qwen2ForCausalLM",
            _ => "LlamaForCausalLM",
        };
        let rope_scaling = match &self.rope_scaling {
            None => Value::Null,
            Some(RopeScaling::Linear { factor }) => serde_json::json!({"rope_type": "linear", "factor": factor}),
            Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => serde_json::json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor, "original_max_position_embeddings": original_max_position_embeddings,
            }),
            // Explicit per-frequency factors have no transformers equivalent; exporters refuse them.
            Some(RopeScaling::Factors(_)) => Value::Null,
        };
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => Value::from(*one),
            many => Value::from(many.to_vec()),
        };
        serde_json::json!({
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": false,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "torch_dtype": "float32",
        })
    }
}
