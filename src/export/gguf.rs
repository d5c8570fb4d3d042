//! GGUF exports for llama.cpp: a merged model (the adapter folded in, matrices re-quantized)
//! and a LoRA adapter file (`llama-cli --lora`).
//!
//! Both follow llama.cpp's converters (`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`):
//! - tensor names `token_embd.weight`, `blk.N.attn_q.weight`, …, `output_norm.weight`,
//!   `output.weight` (untied heads only);
//! - for the `llama` family (`llama`, `mistral`) the rows of `attn_q`/`attn_k` are permuted for
//!   llama.cpp's interleaved RoPE ([`permute_rows`], the inverse of what our loader undoes). A
//!   LoRA's B matrix spans the output dimension, so its rows are permuted the same way (A is
//!   untouched), as `convert_lora_to_gguf.py`'s `LoraTorchTensor` does;
//! - 1-d tensors (norms, biases) are always F32; a matrix whose row length is not a whole
//!   number of blocks of the chosen type falls back as `llama-quantize` does (Q4_K → Q5_0,
//!   Q5_K → Q5_1, Q6_K → Q8_0, then F16 if that still does not fit; the 32-element types fall
//!   back to F16 directly, as `convert_hf_to_gguf.py` does on a `QuantError`).
//!
//! A merged model built from a GGUF base keeps every metadata key of the source file (tokenizer,
//! chat template, hyper-parameters, …) in order; only `general.file_type` is rewritten (and
//! `general.quantization_version` added when absent). From a Hugging Face directory the
//! hyper-parameters and a `gpt2` (byte-level BPE) tokenizer are written as
//! `convert_hf_to_gguf.py` writes them for a Llama/SmolLM2 model.

use crate::error::{Error, Result};
use crate::formats::gguf::quants::{self, GgmlType};
use crate::formats::gguf::{GgufFile, GgufValue, GgufWriter};
use crate::models::load::{permute_rows, ModelSource};
use crate::models::{ModelConfig, RopeScaling, WeightRef};
use crate::session::Session;
use rayon::prelude::*;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

/// The `--quant` types a merged GGUF can be written in.
pub const MERGED_TYPES: [GgmlType; 11] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

/// The element types of a LoRA GGUF's A/B matrices (`--dtype`).
pub const LORA_TYPES: [GgmlType; 3] = [GgmlType::F32, GgmlType::F16, GgmlType::BF16];

fn type_list(types: &[GgmlType]) -> String {
    types.iter().map(|t| t.name().to_ascii_lowercase()).collect::<Vec<_>>().join(", ")
}

/// Parses a `--quant` value (`q8_0`, `Q4_K`, `f16`, …).
pub fn parse_merged_type(s: &str) -> Result<GgmlType> {
    GgmlType::from_name(s)
        .filter(|t| MERGED_TYPES.contains(t))
        .ok_or_else(|| Error::flag("--quant", format!("`{s}` is not a supported type (expected one of: {})", type_list(&MERGED_TYPES))))
}

/// Parses the `--dtype` of a LoRA GGUF (`f32`, `f16`, `bf16`).
pub fn parse_lora_type(s: &str) -> Result<GgmlType> {
    GgmlType::from_name(s)
        .filter(|t| LORA_TYPES.contains(t))
        .ok_or_else(|| Error::flag("--dtype", format!("`{s}` is not supported for a LoRA GGUF (expected one of: {})", type_list(&LORA_TYPES))))
}

/// llama.cpp's `general.file_type` (`enum llama_ftype`) for a model whose matrices are `t`.
/// A K-quant everywhere is closest to the "small" mixes (Q4_K_S, Q5_K_S).
pub fn file_type(t: GgmlType) -> u32 {
    match t {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q8_0 => 7,
        GgmlType::Q5_0 => 8,
        GgmlType::Q5_1 => 9,
        GgmlType::Q2K => 10,
        GgmlType::Q3K => 11,
        GgmlType::Q4K => 14,
        GgmlType::Q5K => 16,
        GgmlType::Q6K => 18,
        GgmlType::BF16 => 32,
        _ => 1024, // LLAMA_FTYPE_GUESSED
    }
}

/// Hugging Face tensor name → llama.cpp's (the loader's table, read the other way).
pub fn gguf_tensor_name(hf: &str) -> Option<String> {
    crate::models::load::gguf_name(hf)
}

/// Whether llama.cpp's converter permutes q/k rows for this model family.
fn permuted(cfg: &ModelConfig) -> bool {
    matches!(cfg.model_type.as_str(), "llama" | "mistral")
}

/// Heads whose rows a tensor's permutation runs over (q: attention heads, k: kv heads).
fn permute_heads(cfg: &ModelConfig, hf: &str) -> Option<usize> {
    if !permuted(cfg) {
        return None;
    }
    if hf.contains(".self_attn.q_proj.") {
        Some(cfg.num_attention_heads)
    } else if hf.contains(".self_attn.k_proj.") {
        Some(cfg.num_key_value_heads)
    } else {
        None
    }
}

/// llama.cpp's architecture name for a model written from a Hugging Face directory
/// (`convert_hf_to_gguf.py` writes Mistral as `llama`).
fn arch_for(cfg: &ModelConfig) -> &'static str {
    match cfg.model_type.as_str() {
        "qwen2" => "qwen2",
        _ => "llama",
    }
}

/// The type a tensor of `shape` (torch order) is stored in when `want` is asked for, and
/// whether that is a fallback. 1-d tensors stay F32; matrices whose rows do not hold whole
/// blocks fall back as llama.cpp does.
pub fn storage_type(want: GgmlType, shape: &[usize]) -> (GgmlType, bool) {
    if shape.len() < 2 {
        return (GgmlType::F32, false);
    }
    let row = *shape.last().unwrap_or(&1);
    if row % want.block_size() == 0 {
        return (want, false);
    }
    let next = match want {
        GgmlType::Q4K => GgmlType::Q5_0,
        GgmlType::Q5K => GgmlType::Q5_1,
        GgmlType::Q6K => GgmlType::Q8_0,
        GgmlType::Q2K | GgmlType::Q3K => GgmlType::IQ4NL,
        _ => GgmlType::F16,
    };
    if row % next.block_size() == 0 && next.can_quantize() {
        (next, true)
    } else {
        (GgmlType::F16, true)
    }
}

/// Quantizes `data` (`rows` rows of whole blocks), rows split over the worker threads.
fn quantize_rows(ty: GgmlType, data: &[f32], row: usize) -> std::result::Result<Vec<u8>, String> {
    let row_bytes = ty.bytes_for(row).ok_or_else(|| format!("a row of {row} is not whole {ty} blocks"))?;
    let rows = data.len() / row.max(1);
    let per_chunk = (rows / (4 * rayon::current_num_threads().max(1))).max(1);
    let parts: Vec<std::result::Result<Vec<u8>, String>> =
        data.par_chunks(per_chunk * row).map(|c| quants::quantize(ty, c)).collect();
    let mut out = Vec::with_capacity(rows * row_bytes);
    for p in parts {
        out.extend_from_slice(&p?);
    }
    Ok(out)
}

/// One tensor that took a different type than asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Fallback {
    pub tensor: String,
    pub row: usize,
    pub wanted: GgmlType,
    pub used: GgmlType,
}

/// What [`write_merged_gguf`] wrote.
#[derive(Debug, Clone)]
pub struct MergedGgufReport {
    pub tensors: usize,
    pub bytes: u64,
    pub fallbacks: Vec<Fallback>,
    /// Whether the metadata came from a source GGUF (else it was built from a HF directory).
    pub metadata_from_source: bool,
}

/// Writes `session`'s model (adapter already merged) as a GGUF file with its matrices in
/// `quant`. See the module docs for names, types and metadata.
pub fn write_merged_gguf(session: &Session, out: &Path, quant: GgmlType) -> Result<MergedGgufReport> {
    if session.method.is_some() {
        return Err(Error::Model("merge the adapter before writing a merged model".into()));
    }
    if !MERGED_TYPES.contains(&quant) {
        return Err(Error::flag("--quant", format!("`{quant}` is not supported (expected one of: {})", type_list(&MERGED_TYPES))));
    }
    let cfg = &session.model.config;
    crate::export::merged::bias_layout(&session.model)?;
    let named = session.model.weight_refs();
    let mut order: Vec<String> = named.iter().map(|(n, _)| n.clone()).collect();
    let mut weights: HashMap<String, WeightRef> = named.into_iter().collect();
    let mut w = GgufWriter::new();
    let mut raw: Vec<(String, Vec<usize>, GgmlType, Vec<u8>)> = Vec::new();
    let metadata_from_source;
    match &session.source {
        ModelSource::Gguf(path) => {
            metadata_from_source = true;
            let src = GgufFile::open(path)?;
            for (k, v) in src.metadata() {
                w.add_metadata(k.clone(), v.clone());
            }
            // Follow the source's tensor order; tensors we do not model (rope_freqs) are copied.
            let by_gguf: HashMap<String, String> =
                order.iter().filter_map(|hf| Some((gguf_tensor_name(hf)?, hf.clone()))).collect();
            let mut src_order = Vec::new();
            for info in src.tensors() {
                match by_gguf.get(&info.name) {
                    Some(hf) => src_order.push(hf.clone()),
                    None => raw.push((info.name.clone(), info.shape(), info.ggml_type, src.tensor_bytes(&info.name)?.to_vec())),
                }
            }
            for hf in order.drain(..) {
                if !src_order.contains(&hf) {
                    src_order.push(hf);
                }
            }
            order = src_order;
        }
        ModelSource::HfDir(dir) => {
            metadata_from_source = false;
            for (k, v) in hf_metadata(dir, cfg)? {
                w.add_metadata(k, v);
            }
            if let Some(f) = rope_factors(cfg) {
                raw.push(("rope_freqs.weight".into(), vec![f.len()], GgmlType::F32, quants::quantize(GgmlType::F32, &f).map_err(Error::Model)?));
            }
        }
    }
    w.add_metadata("general.file_type", GgufValue::U32(file_type(quant)));
    if w.metadata().iter().all(|(k, _)| k != "general.quantization_version") {
        w.add_metadata("general.quantization_version", GgufValue::U32(2));
    }

    let mut fallbacks = Vec::new();
    let mut n = 0;
    let mut bytes = 0u64;
    for (name, shape, ty, data) in raw {
        bytes += data.len() as u64;
        w.add_tensor_raw(name, &shape, ty, data).map_err(|e| Error::format(out, e))?;
        n += 1;
    }
    let mut ticker = crate::console::Ticker::new(format!("quantizing to {quant}"), order.len(), "tensors");
    for (k, hf) in order.into_iter().enumerate() {
        ticker.tick(k, None);
        let t = weights.remove(&hf).ok_or_else(|| Error::Model(format!("internal: tensor `{hf}` listed twice")))?;
        let name = gguf_tensor_name(&hf).ok_or_else(|| Error::Model(format!("tensor `{hf}` has no llama.cpp name")))?;
        let shape = t.shape();
        let mut data: Vec<f32> = t.to_f32_vec()?;
        if let Some(h) = permute_heads(cfg, &hf) {
            let cols = if shape.len() == 2 { shape[1] } else { 1 };
            data = permute_rows(&data, h, cols);
        }
        let (ty, fell_back) = storage_type(quant, &shape);
        let row = *shape.last().unwrap_or(&1);
        if fell_back {
            fallbacks.push(Fallback { tensor: name.clone(), row, wanted: quant, used: ty });
        }
        let blocks = quantize_rows(ty, &data, row).map_err(|e| Error::Model(format!("tensor `{name}`: {e}")))?;
        bytes += blocks.len() as u64;
        w.add_tensor_raw(name, &shape, ty, blocks).map_err(|e| Error::format(out, e))?;
        n += 1;
    }
    w.write(out)?;
    Ok(MergedGgufReport { tensors: n, bytes, fallbacks, metadata_from_source })
}

/// Llama 3's per-frequency RoPE divisors as `convert_hf_to_gguf.py` computes them
/// (`rope_freqs.weight`), or the explicit factors a GGUF base carried.
fn rope_factors(cfg: &ModelConfig) -> Option<Vec<f32>> {
    match &cfg.rope_scaling {
        Some(RopeScaling::Factors(f)) => Some(f.clone()),
        Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
            let dim = cfg.head_dim;
            let base = cfg.rope_theta as f32;
            let old = *original_max_position_embeddings as f32;
            let (low_wl, high_wl) = (old / low_freq_factor, old / high_freq_factor);
            let out = (0..dim)
                .step_by(2)
                .map(|i| {
                    let freq = 1.0 / base.powf(i as f32 / dim as f32);
                    let wavelen = 2.0 * std::f32::consts::PI / freq;
                    if wavelen < high_wl {
                        1.0
                    } else if wavelen > low_wl {
                        *factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        1.0 / ((1.0 - smooth) / factor + smooth)
                    }
                })
                .collect();
            Some(out)
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Metadata for a Hugging Face base
// ---------------------------------------------------------------------------------------------

/// The metadata `convert_hf_to_gguf.py` writes for a Llama-family model with a byte-level BPE
/// tokenizer (general.*, `{arch}.*` hyper-parameters, `tokenizer.*`), except `general.file_type`.
pub fn hf_metadata(dir: &Path, cfg: &ModelConfig) -> Result<Vec<(String, GgufValue)>> {
    let arch = arch_for(cfg);
    let s = |x: &str| GgufValue::String(x.to_string());
    let u = |x: usize| GgufValue::U32(x as u32);
    let k = |x: &str| format!("{arch}.{x}");
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into());
    let mut m: Vec<(String, GgufValue)> = vec![
        ("general.architecture".into(), s(arch)),
        ("general.type".into(), s("model")),
        ("general.name".into(), s(&name)),
        (k("block_count"), u(cfg.num_hidden_layers)),
        (k("context_length"), u(cfg.max_position_embeddings)),
        (k("embedding_length"), u(cfg.hidden_size)),
        (k("feed_forward_length"), u(cfg.intermediate_size)),
        (k("attention.head_count"), u(cfg.num_attention_heads)),
        (k("attention.head_count_kv"), u(cfg.num_key_value_heads)),
        (k("rope.freq_base"), GgufValue::F32(cfg.rope_theta as f32)),
        (k("attention.layer_norm_rms_epsilon"), GgufValue::F32(cfg.rms_norm_eps as f32)),
    ];
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size {
        m.push((k("attention.key_length"), u(cfg.head_dim)));
        m.push((k("attention.value_length"), u(cfg.head_dim)));
    }
    m.push((k("vocab_size"), u(cfg.vocab_size)));
    m.push((k("rope.dimension_count"), u(cfg.head_dim)));
    if let Some(RopeScaling::Linear { factor }) = &cfg.rope_scaling {
        m.push((k("rope.scaling.type"), s("linear")));
        m.push((k("rope.scaling.factor"), GgufValue::F32(*factor)));
    }
    m.extend(hf_tokenizer_metadata(dir, cfg)?);
    Ok(m)
}

/// llama.cpp token types.
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

fn read_json(path: &Path) -> Result<Value> {
    serde_json::from_str(&crate::io_util::read_to_string(path)?).map_err(|e| Error::format(path, format!("invalid JSON: {e}")))
}

/// `convert_hf_to_gguf.py`'s `does_token_look_special`.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// The text of a special token in `tokenizer_config.json` (a string or `{"content": …}`).
fn config_token(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// The `tokenizer.*` metadata of a byte-level BPE (`gpt2`) tokenizer, as
/// `convert_hf_to_gguf.py`'s `_set_vocab_gpt2` + `SpecialVocab` write it.
pub fn hf_tokenizer_metadata(dir: &Path, cfg: &ModelConfig) -> Result<Vec<(String, GgufValue)>> {
    let tj_path = dir.join("tokenizer.json");
    let tj = read_json(&tj_path)?;
    let model = &tj["model"];
    let ty = model["type"].as_str().unwrap_or("");
    if ty != "BPE" {
        return Err(Error::format(
            &tj_path,
            format!("tokenizer model `{ty}` cannot be written as a llama.cpp `gpt2` tokenizer (only byte-level BPE is supported); export from a GGUF base instead"),
        ));
    }
    if model["byte_fallback"].as_bool() == Some(true) {
        return Err(Error::format(
            &tj_path,
            "this BPE tokenizer uses byte fallback (SentencePiece-style, llama.cpp's `llama` tokenizer with scores), which is not supported here; export from a GGUF base instead",
        ));
    }
    let vocab = model["vocab"].as_object().ok_or_else(|| Error::format(&tj_path, "field `model.vocab` is missing"))?;
    let mut by_id: HashMap<u64, String> = HashMap::new();
    for (tok, id) in vocab {
        if let Some(id) = id.as_u64() {
            by_id.insert(id, tok.clone());
        }
    }
    let mut added: HashMap<u64, bool> = HashMap::new(); // id → special
    for t in tj["added_tokens"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let (Some(id), Some(content)) = (t["id"].as_u64(), t["content"].as_str()) else { continue };
        by_id.insert(id, content.to_string());
        added.insert(id, t["special"].as_bool().unwrap_or(false));
    }
    let mut tokens = Vec::with_capacity(cfg.vocab_size);
    let mut types = Vec::with_capacity(cfg.vocab_size);
    for i in 0..cfg.vocab_size as u64 {
        match by_id.get(&i) {
            None => {
                tokens.push(GgufValue::String(format!("[PAD{i}]")));
                types.push(GgufValue::I32(TOKEN_USER_DEFINED));
            }
            Some(tok) => match added.get(&i) {
                Some(&special) if special || looks_special(tok) => {
                    tokens.push(GgufValue::String(tok.clone()));
                    types.push(GgufValue::I32(TOKEN_CONTROL));
                }
                Some(_) => {
                    tokens.push(GgufValue::String(tok.replace('\u{2581}', " ")));
                    types.push(GgufValue::I32(TOKEN_USER_DEFINED));
                }
                None => {
                    tokens.push(GgufValue::String(tok.clone()));
                    types.push(GgufValue::I32(TOKEN_NORMAL));
                }
            },
        }
    }
    // Merges as gguf-py writes them: "a b", a space inside a part spelled U+0120.
    let merges: Vec<GgufValue> = model["merges"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .filter_map(|m| match m {
            Value::String(s) => Some(s.clone()),
            Value::Array(p) if p.len() == 2 => {
                let part = |v: &Value| v.as_str().map(|s| s.replace(' ', "\u{120}"));
                Some(format!("{} {}", part(&p[0])?, part(&p[1])?))
            }
            _ => None,
        })
        .map(GgufValue::String)
        .collect();

    let pre = pre_tokenizer_name(dir)?;
    let s = |x: &str| GgufValue::String(x.to_string());
    let mut m: Vec<(String, GgufValue)> = vec![
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s(&pre)),
        ("tokenizer.ggml.tokens".into(), GgufValue::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), GgufValue::Array(types)),
    ];
    if !merges.is_empty() {
        m.push(("tokenizer.ggml.merges".into(), GgufValue::Array(merges)));
    }
    m.extend(special_vocab(dir, &tj, cfg.vocab_size)?);
    // LlamaModel.set_vocab's additions.
    if arch_for(cfg) == "llama" {
        let tc_path = dir.join("tokenizer_config.json");
        if tc_path.is_file() {
            if let Some(b) = read_json(&tc_path)?.get("add_prefix_space").and_then(Value::as_bool) {
                m.push(("tokenizer.ggml.add_space_prefix".into(), GgufValue::Bool(b)));
            }
        }
        if cfg.vocab_size == 49152 {
            // "Apply to granite small models only" (which includes SmolLM/SmolLM2).
            set_kv(&mut m, "tokenizer.ggml.add_bos_token", GgufValue::Bool(false));
        }
    }
    Ok(m)
}

fn set_kv(m: &mut Vec<(String, GgufValue)>, key: &str, v: GgufValue) {
    match m.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = v,
        None => m.push((key.to_string(), v)),
    }
}

/// gguf-py's `SpecialVocab` (without merges): special token ids from `tokenizer_config.json`
/// (matched against the added tokens) then `config.json`, BOS/EOS flags from a simple
/// `TemplateProcessing` post-processor and `add_*_token`, and the chat template.
fn special_vocab(dir: &Path, tj: &Value, n_vocab: usize) -> Result<Vec<(String, GgufValue)>> {
    const TYPES: [(&str, &str); 7] = [
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("unk", "unknown_token_id"),
        ("sep", "seperator_token_id"), // sic: llama.cpp's key
        ("pad", "padding_token_id"),
        ("cls", "cls_token_id"),
        ("mask", "mask_token_id"),
    ];
    let tc_path = dir.join("tokenizer_config.json");
    let tc = if tc_path.is_file() { read_json(&tc_path)? } else { Value::Null };
    let tc_token = |typ: &str| config_token(tc.get(format!("{typ}_token").as_str()));
    let mut ids: Vec<(&str, u32)> = Vec::new();
    let mut flags: Vec<(&str, bool)> = Vec::new();
    let set_id = |ids: &mut Vec<(&str, u32)>, typ: &'static str, id: Option<u64>| {
        if let Some(id) = id.filter(|&i| (i as usize) < n_vocab) {
            if ids.iter().all(|(t, _)| *t != typ) {
                ids.push((typ, id as u32));
            }
        }
    };
    let set_flag = |flags: &mut Vec<(&str, bool)>, typ: &'static str, v: bool| match flags.iter_mut().find(|(t, _)| *t == typ) {
        Some(slot) => slot.1 = v,
        None => flags.push((typ, v)),
    };
    // TemplateProcessing<single> with a leading/trailing special token.
    let post = &tj["post_processor"];
    let processors: Vec<&Value> = match post["processors"].as_array() {
        Some(list) => list.iter().collect(),
        None if !post.is_null() => vec![post],
        None => vec![],
    };
    for p in processors {
        if p["type"].as_str() == Some("TemplateProcessing") {
            let single = p["single"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            if single.len() > 1 {
                let (bos, cls, eos) = (tc_token("bos"), tc_token("cls"), tc_token("eos"));
                if let Some(first) = single[0]["SpecialToken"]["id"].as_str() {
                    let known = tc.is_null() || Some(first) == bos.as_deref() || Some(first) == cls.as_deref();
                    set_flag(&mut flags, "bos", known);
                }
                if let Some(last) = single[single.len() - 1]["SpecialToken"]["id"].as_str() {
                    let known = tc.is_null() || Some(last) == eos.as_deref();
                    set_flag(&mut flags, "eos", known);
                }
            }
        }
    }
    let added = tj["added_tokens"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    if !tc.is_null() {
        for (typ, _) in TYPES {
            if let Some(b) = tc.get(format!("add_{typ}_token").as_str()).and_then(Value::as_bool) {
                set_flag(&mut flags, typ, b);
            }
            if let Some(content) = tc_token(typ) {
                let id = added.iter().find(|a| a["content"].as_str() == Some(content.as_str())).and_then(|a| a["id"].as_u64());
                set_id(&mut ids, typ, id);
            }
        }
    }
    let cfg_path = dir.join("config.json");
    if cfg_path.is_file() {
        let c = read_json(&cfg_path)?;
        for (typ, _) in TYPES {
            set_id(&mut ids, typ, c.get(format!("{typ}_token_id").as_str()).and_then(Value::as_u64));
        }
    }
    let mut m: Vec<(String, GgufValue)> = Vec::new();
    for (typ, id) in ids {
        let key = TYPES.iter().find(|(t, _)| *t == typ).map(|(_, k)| *k).unwrap_or("bos_token_id");
        m.push((format!("tokenizer.ggml.{key}"), GgufValue::U32(id)));
    }
    for (typ, v) in flags {
        m.push((format!("tokenizer.ggml.add_{typ}_token"), GgufValue::Bool(v)));
    }
    // Chat template: tokenizer_config.json, else chat_template.jinja, else chat_template.json.
    let jinja = dir.join("chat_template.jinja");
    let json_t = dir.join("chat_template.json");
    let template = match tc.get("chat_template") {
        Some(t) if !t.is_null() => Some(t.clone()),
        _ if jinja.is_file() => Some(Value::String(crate::io_util::read_to_string(&jinja)?)),
        _ if json_t.is_file() => read_json(&json_t)?.get("chat_template").cloned(),
        _ => None,
    };
    match template {
        Some(Value::String(t)) => m.push(("tokenizer.chat_template".into(), GgufValue::String(t))),
        Some(Value::Array(list)) => {
            let mut names = Vec::new();
            for e in &list {
                let (Some(name), Some(t)) = (e["name"].as_str(), e["template"].as_str()) else { continue };
                if name == "default" {
                    m.push(("tokenizer.chat_template".into(), GgufValue::String(t.to_string())));
                } else {
                    m.push((format!("tokenizer.chat_template.{name}"), GgufValue::String(t.to_string())));
                    names.push(GgufValue::String(name.to_string()));
                }
            }
            if !names.is_empty() {
                m.push(("tokenizer.chat_templates".into(), GgufValue::Array(names)));
            }
        }
        _ => {}
    }
    Ok(m)
}

/// The text `convert_hf_to_gguf.py` tokenizes to identify a BPE pre-tokenizer.
const CHKTXT: &str = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u{200d}🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL";

/// (sha256 of the token ids of [`CHKTXT`], `tokenizer.ggml.pre`), from `convert_hf_to_gguf.py`
/// (the Llama-family entries).
const PRE_HASHES: &[(&str, &str)] = &[
    ("0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5", "llama-bpe"),
    ("855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249", "smollm"),
    ("e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea", "qwen2"),
    ("d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c", "qwen2"),
    ("3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454", "gpt-2"),
];

/// `tokenizer.ggml.pre` for the tokenizer in `dir`, identified as `convert_hf_to_gguf.py`
/// does: sha256 of `str(tokenizer.encode(CHKTXT))`. An unknown tokenizer gets `default` and a
/// warning (the Python converter refuses it).
pub fn pre_tokenizer_name(dir: &Path) -> Result<String> {
    let tok = crate::data::TextTokenizer::from_hf_dir(dir)?;
    let ids = tok.encode(CHKTXT, true)?;
    let text = format!("[{}]", ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", "));
    let hash = sha256_hex(text.as_bytes());
    match PRE_HASHES.iter().find(|(h, _)| *h == hash) {
        Some((_, name)) => Ok(name.to_string()),
        None => {
            crate::warning!(
                "the BPE pre-tokenizer of {} was not recognized (hash {hash}); writing tokenizer.ggml.pre = \"default\"",
                dir.display()
            );
            Ok("default".into())
        }
    }
}

/// SHA-256, lower-case hex (what Python's `hashlib.sha256(...).hexdigest()` prints).
fn sha256_hex(msg: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(msg).iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// LoRA adapter GGUF
// ---------------------------------------------------------------------------------------------

/// What [`write_gguf_lora`] wrote.
#[derive(Debug, Clone)]
pub struct LoraGgufReport {
    pub pairs: usize,
    /// The rank of the first pair (the rank of all, unless they differ).
    pub rank: usize,
    /// The `adapter.lora.alpha` written: scaling · rank of the first pair (α, or α·√r for rsLoRA).
    pub alpha: f32,
    pub architecture: String,
    /// Pairs whose scaling `alpha / r` could not express, with B scaled to make up for it.
    pub rescaled: usize,
}

/// Writes `session`'s attached adapter, as plain LoRA pairs, as a llama.cpp LoRA GGUF:
/// `general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha`, and per adapted
/// matrix `<name>.lora_a` (PEFT's A `[r, in]` as is: ggml `ne = [in, r]`) and `<name>.lora_b`
/// (B `[out, r]`: `ne = [r, out]`, rows permuted for llama q/k). llama.cpp scales each product
/// by `alpha / r` with one alpha per file; the alpha written is the first pair's `s·r` (α for
/// LoRA, α·√r for rsLoRA), and a pair whose scaling differs from `alpha / r` has its B scaled
/// by the ratio, which gives the same product.
pub fn write_gguf_lora(session: &Session, out: &Path, dtype: GgmlType) -> Result<LoraGgufReport> {
    let method = session.method.as_ref().ok_or_else(|| Error::Model("gguf-lora needs an adapter (--adapter)".into()))?;
    if !LORA_TYPES.contains(&dtype) {
        return Err(Error::flag("--dtype", format!("`{dtype}` is not supported for a LoRA GGUF (expected one of: {})", type_list(&LORA_TYPES))));
    }
    method.can_export(crate::export::ExportFormat::GgufLora).map_err(Error::Model)?;
    let pairs_in = method.as_lora().expect("can_export checked that the method is LoRA pairs");
    let first = pairs_in.first().ok_or_else(|| Error::Model("the adapter has no adapted module: nothing to write".into()))?;
    let rank0 = first.a.dims2()?.0;
    let alpha = first.scaling * rank0 as f64;
    if alpha == 0.0 || !alpha.is_finite() {
        return Err(Error::Model(format!(
            "lora_alpha = {alpha} cannot be written: llama.cpp reads adapter.lora.alpha = 0 as \"no scaling\" (scale 1), which would change the adapter"
        )));
    }
    let cfg = &session.model.config;
    let arch = match &session.source {
        ModelSource::Gguf(path) => GgufFile::open(path)?.get_str("general.architecture")?.to_string(),
        ModelSource::HfDir(_) => arch_for(cfg).to_string(),
    };
    let mut w = GgufWriter::new();
    let s = |x: &str| GgufValue::String(x.to_string());
    w.add_metadata("general.architecture", s(&arch));
    w.add_metadata("general.type", s("adapter"));
    w.add_metadata("general.name", s("ferrotune LoRA adapter"));
    w.add_metadata("general.file_type", GgufValue::U32(file_type(dtype)));
    w.add_metadata("adapter.type", s("lora"));
    w.add_metadata("adapter.lora.alpha", GgufValue::F32(alpha as f32));
    w.add_metadata("general.quantization_version", GgufValue::U32(2));
    let (mut pairs, mut rescaled) = (0, 0);
    for p in &pairs_in {
        let hf = format!("{}.weight", p.site);
        let base = gguf_tensor_name(&hf).ok_or_else(|| Error::Model(format!("adapted module `{}` has no llama.cpp tensor name; it would be lost", p.site)))?;
        let (r, inf) = p.a.dims2()?;
        let (outf, r2) = p.b.dims2()?;
        if r != r2 {
            return Err(Error::Model(format!("module `{}`: A has rank {r} but B has rank {r2}", p.site)));
        }
        let a_data: Vec<f32> = p.a.flatten_all()?.to_vec1()?;
        let mut b_data: Vec<f32> = p.b.flatten_all()?.to_vec1()?;
        // llama.cpp applies alpha / r; fold any difference from this pair's scaling into B.
        let ratio = p.scaling * r as f64 / alpha;
        if ratio != 1.0 {
            b_data.iter_mut().for_each(|x| *x = (*x as f64 * ratio) as f32);
            rescaled += 1;
        }
        if let Some(h) = permute_heads(cfg, &hf) {
            b_data = permute_rows(&b_data, h, r);
        }
        for (suffix, shape, data) in [("lora_a", [r, inf], a_data), ("lora_b", [outf, r], b_data)] {
            let bytes = quants::quantize(dtype, &data).map_err(Error::Model)?;
            w.add_tensor_raw(format!("{base}.{suffix}"), &shape, dtype, bytes).map_err(|e| Error::format(out, e))?;
        }
        pairs += 1;
    }
    w.write(out)?;
    Ok(LoraGgufReport { pairs, rank: rank0, alpha: alpha as f32, architecture: arch, rescaled })
}

/// Checks a PEFT `adapter_config.json` for what a llama.cpp LoRA GGUF cannot hold, naming what
/// would be lost; returns notes for what is dropped harmlessly (dropout).
pub fn check_lora_representable(adapter_dir: &Path) -> Result<Vec<String>> {
    let path = adapter_dir.join(crate::methods::lora::ADAPTER_CONFIG);
    let v = read_json(&path)?;
    let refuse = |what: String| Err(Error::format(&path, format!("cannot export as gguf-lora: {what}")));
    // Whether a method is LoRA pairs at all is the method's to say (`Method::can_export`);
    // here, what a PEFT LoRA config may carry beyond the pairs.
    if v["peft_type"].as_str() != Some("LORA") {
        return Ok(Vec::new());
    }
    if v["bias"].as_str().is_some_and(|b| b != "none") || v["lora_bias"].as_bool() == Some(true) {
        return refuse(format!("trained biases (bias = {}, lora_bias = {}) would be lost: llama.cpp LoRA GGUFs hold no bias deltas", v["bias"], v["lora_bias"]));
    }
    if v["modules_to_save"].as_array().is_some_and(|a| !a.is_empty()) {
        return refuse(format!("the fully trained modules {} (modules_to_save) would be lost", v["modules_to_save"]));
    }
    if v["lora_alpha"].as_f64() == Some(0.0) {
        return refuse("lora_alpha = 0: llama.cpp reads adapter.lora.alpha = 0 as \"no scaling\" (scale 1), so the adapter would change".into());
    }
    let mut notes = Vec::new();
    if let Some(p) = v["lora_dropout"].as_f64().filter(|&p| p > 0.0) {
        notes.push(format!("lora_dropout = {p} is a training-time setting and is not written (it does nothing at inference)"));
    }
    Ok(notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_known_vectors() {
        assert_eq!(sha256_hex(b""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let long = b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
        assert_eq!(sha256_hex(long), "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    }

    #[test]
    fn names_round_trip_and_fallbacks() {
        assert_eq!(gguf_tensor_name("model.embed_tokens.weight").as_deref(), Some("token_embd.weight"));
        assert_eq!(gguf_tensor_name("model.layers.3.self_attn.k_proj.weight").as_deref(), Some("blk.3.attn_k.weight"));
        assert_eq!(gguf_tensor_name("model.layers.0.post_attention_layernorm.weight").as_deref(), Some("blk.0.ffn_norm.weight"));
        assert_eq!(gguf_tensor_name("model.layers.1.self_attn.q_proj.bias").as_deref(), Some("blk.1.attn_q.bias"));
        assert_eq!(gguf_tensor_name("lm_head.weight").as_deref(), Some("output.weight"));
        for hf in ["model.norm.weight", "model.layers.12.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight"] {
            let g = gguf_tensor_name(hf).unwrap();
            assert_eq!(crate::models::load::hf_name(&g).as_deref(), Some(hf), "{g}");
        }
        assert_eq!(gguf_tensor_name("model.layers.x.mlp.up_proj.weight"), None);
        assert_eq!(gguf_tensor_name("model.layers.1.mlp.act_fn.weight"), None);
        assert_eq!(storage_type(GgmlType::Q4K, &[576, 576]), (GgmlType::Q5_0, true));
        assert_eq!(storage_type(GgmlType::Q6K, &[576, 1536]), (GgmlType::Q6K, false));
        assert_eq!(storage_type(GgmlType::Q8_0, &[4, 48]), (GgmlType::F16, true));
        assert_eq!(storage_type(GgmlType::Q8_0, &[576]), (GgmlType::F32, false));
    }
}
