//! The fuzz targets: one per parser of user files, each with its seeds (real files from the
//! repository where there are some, plus tiny models, tokenizers and adapters built here) and
//! a runner that writes the input where the parser expects it and calls the public entry point
//! a user's file goes through.

use super::{gguf_mut, json_mut, template_mut};
use crate::data::{self, DatasetFormat, EncodeOptions, Example, Message, TextTokenizer};
use crate::error::{Error, Result};
use crate::formats::gguf::{GgmlType, GgufFile, GgufValue, GgufWriter};
use crate::formats::safetensors::{self as st, SaveDType};
use crate::methods::{Lora, LoraConfig, TargetModules};
use crate::models::load::{load_gguf, load_hf_dir};
use crate::models::{Llama, ModelConfig};
use crate::rng::SplitMix64;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Makes a new input from a seed (`others` are splice partners).
pub type Mutator = fn(&mut SplitMix64, &[u8], &[Vec<u8>]) -> Vec<u8>;
/// Parses one input; the path is the target's scratch folder.
pub type Runner = Box<dyn Fn(&[u8], &Path) -> Result<()> + Send + Sync>;

/// One parser under test.
pub struct Target {
    pub name: &'static str,
    pub seeds: Vec<Vec<u8>>,
    pub mutate: Mutator,
    pub run: Runner,
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// The repository, for the real seed files (a test binary runs from it anyway).
fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Bytes of the real GGUF's header region, when the model has been fetched (`.models/`).
const REAL_GGUF: &str = ".models/SmolLM2-135M-Instruct.Q4_1.gguf";
const REAL_GGUF_PREFIX: usize = 64 << 10;

fn real_gguf_prefix() -> Option<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(repo().join(REAL_GGUF)).ok()?;
    let mut buf = Vec::with_capacity(REAL_GGUF_PREFIX);
    f.take(REAL_GGUF_PREFIX as u64).read_to_end(&mut buf).ok()?;
    Some(buf)
}

// ---------------------------------------------------------------------------------------------
// A tiny model, tokenizer and adapter to seed from

/// hidden 32 (so 32-wide quant blocks fit a row), 2 heads of 16, 1 KV head, one layer.
const HIDDEN: usize = 32;
const HEADS: usize = 2;
const KV_HEADS: usize = 1;
const INTERMEDIATE: usize = 32;

struct Tiny {
    config: ModelConfig,
    config_json: String,
    weights: HashMap<String, Tensor>,
    /// `model.safetensors` in F32, F16 and BF16 (the reader converts each differently).
    safetensors: Vec<Vec<u8>>,
    tokenizer_json: String,
    tokenizer_config_json: String,
    tokenizer: TextTokenizer,
    /// Tokenizer metadata as llama.cpp writes it.
    tokenizer_meta: Vec<(String, GgufValue)>,
    adapter_config: Vec<u8>,
    adapter_weights: Vec<u8>,
}

fn tiny_weights(vocab: usize) -> Vec<(String, Vec<usize>)> {
    let hd = HIDDEN / HEADS;
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![vocab, HIDDEN])];
    let p = "model.layers.0";
    for (name, shape) in [
        ("input_layernorm.weight", vec![HIDDEN]),
        ("self_attn.q_proj.weight", vec![HEADS * hd, HIDDEN]),
        ("self_attn.k_proj.weight", vec![KV_HEADS * hd, HIDDEN]),
        ("self_attn.v_proj.weight", vec![KV_HEADS * hd, HIDDEN]),
        ("self_attn.o_proj.weight", vec![HIDDEN, HEADS * hd]),
        ("post_attention_layernorm.weight", vec![HIDDEN]),
        ("mlp.gate_proj.weight", vec![INTERMEDIATE, HIDDEN]),
        ("mlp.up_proj.weight", vec![INTERMEDIATE, HIDDEN]),
        ("mlp.down_proj.weight", vec![HIDDEN, INTERMEDIATE]),
    ] {
        out.push((format!("{p}.{name}"), shape));
    }
    out.push(("model.norm.weight".into(), vec![HIDDEN]));
    out
}

/// The tiny tokenizer's vocabulary as GGUF metadata (tokens by id, control types for the
/// special tokens, merges as "a b").
fn tokenizer_meta(tokenizer_json: &str, chat_template: &str) -> Vec<(String, GgufValue)> {
    let tj: serde_json::Value = serde_json::from_str(tokenizer_json).expect("tiny tokenizer is JSON");
    let vocab = tj["model"]["vocab"].as_object().expect("tiny vocab");
    let mut tokens = vec![String::new(); vocab.len()];
    for (tok, id) in vocab {
        tokens[id.as_u64().expect("id") as usize] = tok.clone();
    }
    let types = (0..tokens.len()).map(|i| GgufValue::I32(if i < 3 { 3 } else { 1 })).collect();
    let merges = tj["model"]["merges"]
        .as_array()
        .expect("tiny merges")
        .iter()
        .map(|m| GgufValue::String(format!("{} {}", m[0].as_str().unwrap_or(""), m[1].as_str().unwrap_or(""))))
        .collect();
    let s = |x: &str| GgufValue::String(x.to_string());
    vec![
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s("smollm")),
        ("tokenizer.ggml.tokens".into(), GgufValue::Array(tokens.into_iter().map(GgufValue::String).collect())),
        ("tokenizer.ggml.token_type".into(), GgufValue::Array(types)),
        ("tokenizer.ggml.merges".into(), GgufValue::Array(merges)),
        ("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(2)),
        ("tokenizer.ggml.padding_token_id".into(), GgufValue::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(false)),
        ("tokenizer.chat_template".into(), s(chat_template)),
    ]
}

impl Tiny {
    fn build(dir: &Path) -> Result<Tiny> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        crate::testutil::write_tiny_tokenizer(dir)?;
        let tokenizer = TextTokenizer::from_hf_dir(dir)?;
        let vocab = tokenizer.vocab_size();
        let config_json = serde_json::json!({
            "model_type": "llama", "vocab_size": vocab, "hidden_size": HIDDEN,
            "intermediate_size": INTERMEDIATE, "num_hidden_layers": 1,
            "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HIDDEN / HEADS,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64,
            "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2,
        })
        .to_string();
        let config = ModelConfig::from_hf_json(&dir.join("config.json"), &config_json)?;
        let mut rng = SplitMix64::new(7);
        let mut named = Vec::new();
        for (name, shape) in tiny_weights(vocab) {
            let n = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| rng.next_f32() - 0.5).collect();
            named.push((name, Tensor::from_vec(v, shape, &Device::Cpu)?));
        }
        let weights: HashMap<String, Tensor> = named.iter().cloned().collect();
        let st_path = dir.join("model.safetensors");
        let mut safetensors = Vec::new();
        for dtype in [SaveDType::F32, SaveDType::F16, SaveDType::BF16] {
            st::save(&st_path, &named, dtype, None)?;
            safetensors.push(read(&st_path)?);
        }

        let mut model = Llama::from_weights(config.clone(), &mut weights.clone(), dir)?;
        let lora_cfg = LoraConfig {
            r: 2,
            alpha: 4.0,
            dropout: 0.0,
            target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
            use_rslora: false,
            ..Default::default()
        };
        let lora = Lora::attach(&mut model, lora_cfg, 1)?;
        let adapter_dir = dir.join("adapter");
        lora.save_peft(&adapter_dir, "tiny")?;
        let tokenizer_json = crate::testutil::tiny_tokenizer_json();
        Ok(Tiny {
            config,
            config_json,
            weights,
            safetensors,
            tokenizer_meta: tokenizer_meta(&tokenizer_json, data::template::SMOLLM2_CHAT_TEMPLATE),
            tokenizer_json,
            tokenizer_config_json: crate::testutil::tiny_tokenizer_config_json(),
            tokenizer,
            adapter_config: read(&adapter_dir.join(crate::methods::lora::ADAPTER_CONFIG))?,
            adapter_weights: read(&adapter_dir.join(crate::methods::lora::ADAPTER_WEIGHTS))?,
        })
    }

    /// The tiny model as a GGUF, its matrices stored as `ty`, tokenizer metadata included.
    fn gguf(&self, ty: GgmlType) -> Result<Vec<u8>> {
        let mut w = GgufWriter::new();
        let u = |x: usize| GgufValue::U32(x as u32);
        for (k, v) in [
            ("general.architecture", GgufValue::String("llama".into())),
            ("llama.context_length", u(64)),
            ("llama.embedding_length", u(HIDDEN)),
            ("llama.feed_forward_length", u(INTERMEDIATE)),
            ("llama.block_count", u(1)),
            ("llama.attention.head_count", u(HEADS)),
            ("llama.attention.head_count_kv", u(KV_HEADS)),
            ("llama.attention.layer_norm_rms_epsilon", GgufValue::F32(1e-5)),
            ("llama.rope.freq_base", GgufValue::F32(10000.0)),
        ] {
            w.add_metadata(k, v);
        }
        for (k, v) in &self.tokenizer_meta {
            w.add_metadata(k.clone(), v.clone());
        }
        let mut names: Vec<&String> = self.weights.keys().collect();
        names.sort();
        for name in names {
            let t = &self.weights[name];
            let gname = crate::models::load::gguf_name(name).unwrap_or_else(|| name.clone());
            let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
            let ty = if t.dims().len() == 2 { ty } else { GgmlType::F32 };
            w.add_tensor_f32(gname, t.dims(), &v, ty).map_err(Error::Model)?;
        }
        w.to_bytes().map_err(Error::Model)
    }

    /// A GGUF with only the tokenizer metadata.
    fn tokenizer_gguf(&self) -> Result<Vec<u8>> {
        let mut w = GgufWriter::new();
        for (k, v) in &self.tokenizer_meta {
            w.add_metadata(k.clone(), v.clone());
        }
        w.to_bytes().map_err(Error::Model)
    }
}

/// A GGUF holding one value of every type (nested arrays included), a non-default alignment
/// and tensors of several ggml types.
fn every_type_gguf() -> Result<Vec<u8>> {
    use GgufValue as V;
    let mut w = GgufWriter::new();
    w.add_metadata("general.alignment", V::U32(64));
    for (i, v) in [
        V::U8(1), V::I8(-1), V::U16(2), V::I16(-2), V::U32(3), V::I32(-3), V::F32(0.5),
        V::Bool(true), V::String("s".into()), V::U64(4), V::I64(-4), V::F64(0.25),
        V::Array(vec![V::Array(vec![V::U8(1), V::U8(2)]), V::Array(vec![])]),
    ]
    .into_iter()
    .enumerate()
    {
        w.add_metadata(format!("k{i}"), v);
    }
    let data: Vec<f32> = (0..64).map(|i| i as f32 / 7.0).collect();
    for (name, ty) in [("f32", GgmlType::F32), ("f16", GgmlType::F16), ("q8", GgmlType::Q8_0), ("q4", GgmlType::Q4_1)] {
        w.add_tensor_f32(name, &[2, 32], &data, ty).map_err(Error::Model)?;
    }
    w.to_bytes().map_err(Error::Model)
}

const SAMPLE_TEXT: &str = "Hello <|im_start|>wörld\n\t 12345 ✓";

fn messages() -> Vec<Message> {
    vec![
        Message::new("system", "Be brief."),
        Message::new("user", "What is 2+2? <|im_end|> {{ not a tag }}"),
        Message::new("assistant", "4 ✓"),
        Message::new("user", "And, 3+3?"),
    ]
}

/// Uses a freshly loaded tokenizer the way training does, so a tokenizer that loads but cannot
/// run is caught too.
fn exercise_tokenizer(tok: &TextTokenizer) -> Result<()> {
    let ids = tok.encode(SAMPLE_TEXT, true)?;
    tok.decode(&ids, false)?;
    if let Some(t) = tok.chat_template() {
        t.render(&messages(), true)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Seeds from the repository

fn quickstart_seeds() -> Vec<Vec<u8>> {
    let data = repo().join("examples/quickstart/data");
    ["gsm8k_dev_50.jsonl", "gsm8k_train_400.jsonl"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(data.join(f)).ok())
        .map(|t| t.lines().take(4).collect::<Vec<_>>().join("\n").into_bytes())
        .collect()
}

/// Records of every format the loader knows, and preference pairs, which it does not read.
const JSONL_SEEDS: [&str; 5] = [
    "{\"text\": \"plain text\"}\n{\"prompt\": \"2+2=\", \"completion\": \"4\"}\n",
    "{\"messages\": [{\"role\": \"system\", \"content\": \"s\"}, {\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": [{\"type\": \"text\", \"text\": \"yo\"}]}]}\n",
    "{\"instruction\": \"add\", \"input\": \"2 2\", \"output\": \"4\"}\n\n{\"instruction\": \"say hi\", \"output\": \"hi\"}\r\n",
    "{\"prompt\": \"Is the sky blue?\", \"chosen\": \"Yes.\", \"rejected\": \"No.\"}\n",
    "{\"prompt\": [{\"role\": \"user\", \"content\": \"hi\"}], \"chosen\": [{\"role\": \"assistant\", \"content\": \"hello\"}], \"rejected\": [{\"role\": \"assistant\", \"content\": \"go away\"}]}\n",
];

const TEMPLATE_SEEDS: [&str; 3] = [
    "{{ bos_token }}{% for m in messages %}{% if m.content.strip().startswith('#') %}[{{ m['role'].upper() }}]{% endif %}{{ m.content.strip() | trim }}|{{ m.content.split(',') | length }}\n{% endfor %}{{ messages[0] | tojson }}{{ {'b': [1, 2.5, none, true]} | tojson(indent=2) }}{% for k, v in messages[0].items() %}{{ k }}={{ v }};{% endfor %}{{ eos_token }}",
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}",
    "{% set date = strftime_now('%d %b %Y') %}{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}{{ date }}",
];

const CONFIG_SEEDS: [&str; 2] = [
    r#"{"model_type": "llama", "vocab_size": 319, "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, "tie_word_embeddings": true, "eos_token_id": [1, 2]}"#,
    r#"{"model_type": "qwen2", "vocab_size": 319, "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "rope_parameters": {"rope_type": "linear", "rope_theta": 500000.0, "factor": 2.0}, "attention_bias": false, "tie_word_embeddings": true}"#,
];

const PLAN_MINIMAL: &str = "base_model = \"m.gguf\"\ndatasets = [{ path = \"d.jsonl\", type = \"chat\" }]\nmax_steps = 3\noutput_dir = \"out\"\n";

// ---------------------------------------------------------------------------------------------
// The targets

/// Every target, with seeds and fixtures built under `workdir/fixtures`.
pub fn all_targets(workdir: &Path) -> Result<Vec<Target>> {
    let fixtures = workdir.join("fixtures");
    let tiny = Arc::new(Tiny::build(&fixtures)?);
    // Everything needed was read into memory.
    let _ = std::fs::remove_dir_all(&fixtures);
    let mut gguf_seeds = vec![
        tiny.gguf(GgmlType::F32)?,
        tiny.gguf(GgmlType::Q8_0)?,
        tiny.gguf(GgmlType::Q4_1)?,
        tiny.gguf(GgmlType::F16)?,
        every_type_gguf()?,
    ];
    let mut tokenizer_gguf_seeds = vec![tiny.tokenizer_gguf()?];
    if let Some(real) = real_gguf_prefix() {
        gguf_seeds.push(real.clone());
        tokenizer_gguf_seeds.push(real);
    }
    let peft_ref = repo().join("tests/fixtures/peft-reference/lora_init");
    let mut adapter_config_seeds = vec![tiny.adapter_config.clone()];
    adapter_config_seeds.extend(std::fs::read(peft_ref.join("adapter_config.json")).ok());
    // The reference adapter's weights are 19 MB; its header and first tensor bytes are enough.
    let mut safetensors_seeds = tiny.safetensors.clone();
    safetensors_seeds.push(tiny.adapter_weights.clone());
    if let Ok(b) = std::fs::read(peft_ref.join("adapter_model.safetensors")) {
        safetensors_seeds.push(b[..b.len().min(64 << 10)].to_vec());
    }
    let mut plan_seeds = vec![PLAN_MINIMAL.as_bytes().to_vec()];
    plan_seeds.extend(std::fs::read(repo().join("examples/quickstart/gsm8k-lora.toml")).ok());
    let mut jsonl_seeds: Vec<Vec<u8>> = JSONL_SEEDS.iter().map(|s| s.as_bytes().to_vec()).collect();
    jsonl_seeds.extend(quickstart_seeds());
    let mut template_seeds: Vec<Vec<u8>> = TEMPLATE_SEEDS.iter().map(|s| s.as_bytes().to_vec()).collect();
    template_seeds.push(data::template::SMOLLM2_CHAT_TEMPLATE.as_bytes().to_vec());
    let mut config_seeds: Vec<Vec<u8>> = CONFIG_SEEDS.iter().map(|s| s.as_bytes().to_vec()).collect();
    config_seeds.push(tiny.config_json.clone().into_bytes());

    let gguf = Target {
        name: "gguf",
        seeds: gguf_seeds,
        mutate: gguf_mut::mutate_any,
        run: Box::new(run_gguf),
    };
    let gguf_tokenizer = Target {
        name: "gguf-tokenizer",
        seeds: tokenizer_gguf_seeds,
        mutate: gguf_mut::mutate_metadata,
        run: Box::new(|input, dir| {
            let path = dir.join("tok.gguf");
            write(&path, input)?;
            let g = GgufFile::open(&path)?;
            exercise_tokenizer(&TextTokenizer::from_gguf_metadata(&path, &|k| g.get(k))?)
        }),
    };
    let t = tiny.clone();
    let safetensors = Target {
        name: "safetensors",
        seeds: safetensors_seeds,
        mutate: json_mut::mutate_safetensors,
        run: Box::new(move |input, dir| {
            write(&dir.join("config.json"), t.config_json.as_bytes())?;
            let path = dir.join("model.safetensors");
            write(&path, input)?;
            st::load_f32(&path)?;
            load_hf_dir(dir).map(drop)
        }),
    };
    let t = tiny.clone();
    let config_json = Target {
        name: "config.json",
        seeds: config_seeds,
        mutate: json_mut::mutate_json,
        run: Box::new(move |input, dir| {
            write(&dir.join("model.safetensors"), &t.safetensors[0])?;
            let path = dir.join("config.json");
            write(&path, input)?;
            ModelConfig::from_hf_json(&path, &String::from_utf8_lossy(input))?;
            load_hf_dir(dir).map(drop)
        }),
    };
    let t = tiny.clone();
    let tokenizer_json = Target {
        name: "tokenizer.json",
        seeds: vec![tiny.tokenizer_json.clone().into_bytes()],
        mutate: json_mut::mutate_json,
        run: Box::new(move |input, dir| {
            write(&dir.join("tokenizer_config.json"), t.tokenizer_config_json.as_bytes())?;
            write(&dir.join("tokenizer.json"), input)?;
            exercise_tokenizer(&TextTokenizer::from_hf_dir(dir)?)
        }),
    };
    let t = tiny.clone();
    let tokenizer_config = Target {
        name: "tokenizer_config.json",
        seeds: vec![tiny.tokenizer_config_json.clone().into_bytes()],
        mutate: json_mut::mutate_json,
        run: Box::new(move |input, dir| {
            write(&dir.join("tokenizer.json"), t.tokenizer_json.as_bytes())?;
            write(&dir.join("tokenizer_config.json"), input)?;
            exercise_tokenizer(&TextTokenizer::from_hf_dir(dir)?)
        }),
    };
    let chat_template = Target {
        name: "chat-template",
        seeds: template_seeds,
        mutate: template_mut::mutate,
        run: Box::new(|input, _dir| {
            let src = String::from_utf8_lossy(input);
            let t = data::ChatTemplate::new(&src, "<|im_start|>".into(), "<|im_end|>".into())?;
            t.render(&messages(), true)?;
            t.render(&messages()[1..2], false).map(drop)
        }),
    };
    let t = tiny.clone();
    let peft_config = Target {
        name: "adapter_config.json",
        seeds: adapter_config_seeds,
        mutate: json_mut::mutate_json,
        run: Box::new(move |input, dir| {
            write(&dir.join(crate::methods::lora::ADAPTER_WEIGHTS), &t.adapter_weights)?;
            write(&dir.join(crate::methods::lora::ADAPTER_CONFIG), input)?;
            load_peft(&t, dir)
        }),
    };
    let t = tiny.clone();
    let peft_weights = Target {
        name: "adapter_model.safetensors",
        seeds: vec![tiny.adapter_weights.clone()],
        mutate: json_mut::mutate_safetensors,
        run: Box::new(move |input, dir| {
            write(&dir.join(crate::methods::lora::ADAPTER_CONFIG), &t.adapter_config)?;
            write(&dir.join(crate::methods::lora::ADAPTER_WEIGHTS), input)?;
            load_peft(&t, dir)
        }),
    };
    let plan = Target {
        name: "run-plan",
        seeds: plan_seeds,
        mutate: json_mut::mutate_plan,
        run: Box::new(|input, dir| {
            let text = String::from_utf8_lossy(input);
            let (toml_text, sets) = text.split_once(json_mut::SETS_MARKER).unwrap_or((&text, ""));
            let path = dir.join("plan.toml");
            write(&path, toml_text.as_bytes())?;
            let sets: Vec<String> = sets.lines().map(str::to_string).collect();
            crate::config::TrainConfig::load(&path, &sets).map(drop)
        }),
    };
    let t = tiny.clone();
    let jsonl = Target {
        name: "jsonl",
        seeds: jsonl_seeds,
        mutate: json_mut::mutate_jsonl,
        run: Box::new(move |input, dir| run_jsonl(input, dir, &t.tokenizer)),
    };
    Ok(vec![
        gguf,
        gguf_tokenizer,
        safetensors,
        config_json,
        tokenizer_json,
        tokenizer_config,
        chat_template,
        peft_config,
        peft_weights,
        plan,
        jsonl,
    ])
}

/// The GGUF reader (every tensor read back), then the model loader in both weight modes.
fn run_gguf(input: &[u8], dir: &Path) -> Result<()> {
    let path = dir.join("model.gguf");
    write(&path, input)?;
    let g = GgufFile::open(&path)?;
    for t in g.tensors() {
        g.tensor_f32(&t.name)?;
    }
    load_gguf(&path, false)?;
    load_gguf(&path, true).map(drop)
}

fn load_peft(tiny: &Tiny, dir: &Path) -> Result<()> {
    let mut model = Llama::from_weights(tiny.config.clone(), &mut tiny.weights.clone(), &PathBuf::from("tiny"))?;
    crate::methods::registry::load(&mut model, dir).map(drop)
}

/// Reading, then every record in every format, then encoding with the tiny tokenizer.
fn run_jsonl(input: &[u8], dir: &Path, tok: &TextTokenizer) -> Result<()> {
    let path = dir.join("data.jsonl");
    write(&path, input)?;
    let records = data::read_jsonl(&path)?;
    let formats = [DatasetFormat::Text, DatasetFormat::Completion, DatasetFormat::Chat, DatasetFormat::Alpaca];
    for r in &records {
        for f in formats {
            let _ = Example::from_record(r, f);
        }
    }
    let opts = EncodeOptions { sequence_len: 64, ..Default::default() };
    data::encode_records(&records, DatasetFormat::Auto, tok, &opts).map(drop)
}
