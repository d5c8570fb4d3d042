//! GGUF model files: metadata → config, tensors under Hugging Face names: matrices of the
//! linear layers and the embedding kept in their GGUF blocks (frozen weights the kernels read
//! tile by tile) or dequantized to f32, everything else in f32.
//!
//! Two conventions differ from Hugging Face and are undone here, as transformers does:
//! tensor names (`blk.N.attn_q.weight` → `model.layers.N.self_attn.q_proj.weight`), and for
//! the `llama` architecture the row order of `attn_q`/`attn_k`, which llama.cpp's converter
//! permutes for its interleaved RoPE.

use crate::error::{Error, Result};
use crate::formats::gguf::quants::GgmlType;
use crate::formats::gguf::GgufFile;
use crate::kernels::FrozenWeight;
use crate::models::{Llama, ModelConfig, RopeScaling};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// llama.cpp architecture name → transformers `model_type`.
fn model_type(arch: &str) -> Option<&'static str> {
    match arch {
        "llama" => Some("llama"),
        "mistral" => Some("mistral"),
        "qwen2" => Some("qwen2"),
        _ => None,
    }
}

pub fn config_from_gguf(g: &GgufFile) -> Result<ModelConfig> {
    let arch = g.get_str("general.architecture")?.to_string();
    let model_type = model_type(&arch).ok_or_else(|| {
        Error::format(g.path(), format!("architecture `{arch}` is not supported (supported: llama, mistral, qwen2)"))
    })?;
    let key = |k: &str| format!("{arch}.{k}");
    let hidden_size = g.get_u32(&key("embedding_length"))? as usize;
    let num_attention_heads = g.get_u32(&key("attention.head_count"))? as usize;
    let num_key_value_heads = g.get_opt_u32(&key("attention.head_count_kv"))?.map_or(num_attention_heads, |v| v as usize);
    let head_dim = match g.get_opt_u32(&key("attention.key_length"))? {
        Some(v) => v as usize,
        None => hidden_size / num_attention_heads.max(1),
    };
    let vocab_size = match g.get_opt_u32(&key("vocab_size"))? {
        Some(v) => v as usize,
        None => g.get_array("tokenizer.ggml.tokens")?.len(),
    };
    let rope_scaling = match g.get_opt_str(&key("rope.scaling.type"))? {
        None | Some("none") => None,
        Some("linear") => Some(RopeScaling::Linear { factor: g.get_f32(&key("rope.scaling.factor"))? }),
        Some(other) => {
            return Err(Error::format(g.path(), format!("rope scaling type `{other}` is not supported (supported: none, linear)")))
        }
    };
    // Llama 3 GGUFs carry their frequency adjustment as a tensor instead of metadata.
    let rope_scaling = match g.tensor_info("rope_freqs.weight") {
        Some(_) => Some(RopeScaling::Factors(g.tensor_f32("rope_freqs.weight")?)),
        None => rope_scaling,
    };
    let cfg = ModelConfig {
        model_type: model_type.to_string(),
        vocab_size,
        hidden_size,
        intermediate_size: g.get_u32(&key("feed_forward_length"))? as usize,
        num_hidden_layers: g.get_u32(&key("block_count"))? as usize,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: g.get_f32(&key("attention.layer_norm_rms_epsilon"))? as f64,
        rope_theta: g.get_opt_f32(&key("rope.freq_base"))?.unwrap_or(10000.0) as f64,
        rope_scaling,
        max_position_embeddings: g.get_opt_u32(&key("context_length"))?.unwrap_or(2048) as usize,
        tie_word_embeddings: g.tensor_info("output.weight").is_none(),
        attention_bias: g.tensor_info("blk.0.attn_q.bias").is_some(),
        bos_token_id: g.get_opt_u32("tokenizer.ggml.bos_token_id")?,
        eos_token_ids: g.get_opt_u32("tokenizer.ggml.eos_token_id")?.into_iter().collect(),
    };
    cfg.validate().map_err(|e| Error::format(g.path(), e))?;
    Ok(cfg)
}

/// Whole-model tensors: (llama.cpp name, Hugging Face name).
const MODEL_TENSORS: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// Per-block modules: (llama.cpp `blk.N.<name>`, Hugging Face `model.layers.N.<name>`).
const BLOCK_MODULES: [(&str, &str); 9] = [
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// Maps a name between the two conventions; `to_hf` picks the direction.
fn map_name(name: &str, to_hf: bool) -> Option<String> {
    let pick = |pair: &(&'static str, &'static str)| if to_hf { (pair.0, pair.1) } else { (pair.1, pair.0) };
    if let Some((_, to)) = MODEL_TENSORS.iter().map(pick).find(|(from, _)| *from == name) {
        return Some(to.to_string());
    }
    let (from_prefix, to_prefix) = if to_hf { ("blk.", "model.layers.") } else { ("model.layers.", "blk.") };
    let (layer, rest) = name.strip_prefix(from_prefix)?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let (_, to) = BLOCK_MODULES.iter().map(pick).find(|(from, _)| *from == module)?;
    Some(format!("{to_prefix}{layer}.{to}.{suffix}"))
}

/// GGUF tensor name → Hugging Face name.
pub fn hf_name(gguf_name: &str) -> Option<String> {
    map_name(gguf_name, true)
}

/// Hugging Face tensor name → GGUF (llama.cpp) name.
pub fn gguf_name(hf_name: &str) -> Option<String> {
    map_name(hf_name, false)
}

/// Undoes llama.cpp's q/k row permutation: within each head, GGUF row `2j + t` is Hugging
/// Face row `t·(d/2) + j`. Works for weights (`cols` > 1) and biases (`cols` = 1).
/// `cols` is the length of a row in elements of `T` (for a quantized matrix, its row's bytes:
/// the permutation moves whole rows, so it applies to blocks unchanged).
pub fn unpermute_rows<T: Copy + Default>(data: &[T], n_heads: usize, cols: usize) -> Vec<T> {
    reorder_rows(data, n_heads, cols, true)
}

/// The inverse of [`unpermute_rows`] (for writing GGUF files).
pub fn permute_rows<T: Copy + Default>(data: &[T], n_heads: usize, cols: usize) -> Vec<T> {
    reorder_rows(data, n_heads, cols, false)
}

fn reorder_rows<T: Copy + Default>(data: &[T], n_heads: usize, cols: usize, to_hf: bool) -> Vec<T> {
    if data.is_empty() || cols == 0 || n_heads == 0 {
        return data.to_vec(); // nothing to move (and nothing to divide by)
    }
    let head_dim = data.len() / cols / n_heads;
    let half = head_dim / 2;
    let mut out = vec![T::default(); data.len()];
    for h in 0..n_heads {
        for j in 0..half {
            for t in 0..2 {
                let gguf_row = (h * head_dim + 2 * j + t) * cols;
                let hf_row = (h * head_dim + t * half + j) * cols;
                let (src, dst) = if to_hf { (gguf_row, hf_row) } else { (hf_row, gguf_row) };
                out[dst..dst + cols].copy_from_slice(&data[src..src + cols]);
            }
        }
    }
    out
}

/// Whether the tensor `name` (Hugging Face naming) may stay in blocks: the matrices the kernels
/// read through [`FrozenWeight`] (linear layers, embedding, LM head).
pub(crate) fn is_frozen_matrix(name: &str) -> bool {
    const LINEARS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    name == "model.embed_tokens.weight"
        || name == "lm_head.weight"
        || LINEARS.iter().any(|l| name.ends_with(&format!(".{l}.weight")))
}

/// Loads a GGUF model. With `keep_blocks`, the linear, embedding and head matrices stay in
/// their stored type (Q4_1, Q8_0, F16, …) and are dequantized tile by tile when used;
/// otherwise every tensor is dequantized to f32 here.
pub fn load_gguf(path: &Path, keep_blocks: bool) -> Result<Llama> {
    let g = GgufFile::open(path)?;
    let config = config_from_gguf(&g)?;
    let permuted = matches!(config.model_type.as_str(), "llama" | "mistral");
    let mut blocks = HashMap::new();
    let mut weights = HashMap::new();
    for info in g.tensors() {
        if info.name == "rope_freqs.weight" {
            continue;
        }
        let Some(name) = hf_name(&info.name) else {
            return Err(Error::format(path, format!("tensor `{}` is not part of a {} model", info.name, config.model_type)));
        };
        let shape = info.shape();
        let heads = if name.ends_with("q_proj.weight") || name.ends_with("q_proj.bias") {
            Some(config.num_attention_heads)
        } else if name.ends_with("k_proj.weight") || name.ends_with("k_proj.bias") {
            Some(config.num_key_value_heads)
        } else {
            None
        };
        if let Some(h) = heads {
            // The row permutation below needs whole heads; check before touching the data.
            let want = h * config.head_dim;
            if shape.first() != Some(&want) {
                return Err(Error::format(
                    path,
                    format!("tensor `{}` has shape {shape:?}, expected {want} rows ({h} heads of {})", info.name, config.head_dim),
                ));
            }
        }
        let ty = info.ggml_type;
        if let (true, &[rows, cols]) = (keep_blocks && is_frozen_matrix(&name), shape.as_slice()) {
            if ty != GgmlType::F32 && ty.can_dequantize() {
                let mut bytes = g.tensor_bytes(&info.name)?.to_vec();
                if let (true, Some(h)) = (permuted, heads) {
                    bytes = unpermute_rows(&bytes, h, bytes.len() / rows);
                }
                let w = FrozenWeight::from_blocks(ty, bytes, rows, cols).map_err(|e| Error::format(path, format!("tensor `{}`: {e}", info.name)))?;
                blocks.insert(name, w);
                continue;
            }
        }
        let mut data = g.tensor_f32(&info.name)?;
        if let (true, Some(h)) = (permuted, heads) {
            let cols = if shape.len() == 2 { shape[1] } else { 1 };
            data = unpermute_rows(&data, h, cols);
        }
        weights.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
    }
    Llama::from_mixed_weights(config, &mut weights, &mut blocks, path)
}
