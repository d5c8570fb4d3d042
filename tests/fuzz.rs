//! Regression tests for bugs found by fuzzing the parsers of user files (see `ferrotune::fuzz`).

mod common;

use ferrotune::formats::gguf::{GgmlType, GgufFile, GgufValue, GgufWriter};
use ferrotune::fuzz::alloc::TrackingAlloc;
use std::time::{Duration, Instant};

/// Refuses (and reports) allocations of more than 2 GiB, so a length-driven allocation fails
/// loudly instead of taking the machine's memory.
#[global_allocator]
static ALLOC: TrackingAlloc = TrackingAlloc;

/// Bug: a GGUF (or config.json) claiming 2^32-1 layers made the loader reserve memory for that
/// many layers before looking for their tensors (a 500 GB allocation, then an abort).
#[test]
fn huge_layer_count_is_an_error_not_an_allocation() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("tiny.gguf");
    common::write_tiny_gguf(&src, &common::TinySpec::default(), GgmlType::Q8_0);
    let g = GgufFile::open(&src).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in g.metadata() {
        w.add_metadata(k.clone(), v.clone());
    }
    w.add_metadata("llama.block_count", GgufValue::U32(u32::MAX));
    for t in g.tensors() {
        w.add_tensor_raw(t.name.clone(), &t.shape(), t.ggml_type, g.tensor_bytes(&t.name).unwrap().to_vec()).unwrap();
    }
    let bad = tmp.path().join("bad.gguf");
    w.write(&bad).unwrap();
    let e = ferrotune::models::load::load_gguf(&bad, true).err().expect("loading must fail").to_string();
    assert!(e.contains("bad.gguf") && e.contains("model.layers.2.") && e.contains("missing"), "{e}");
}

/// Bug: the `tokenizers` library panics (instead of returning an error) when a
/// `tokenizer.json`'s decoder cannot be deserialized, e.g. nested past serde_json's depth limit.
#[test]
fn tokenizer_json_with_an_undecodable_decoder_is_an_error() {
    let mut v: serde_json::Value = serde_json::from_str(&ferrotune::testutil::tiny_tokenizer_json()).unwrap();
    let mut deep = serde_json::json!({"type": "ByteLevel"});
    for _ in 0..200 {
        deep = serde_json::Value::Array(vec![deep]);
    }
    v["decoder"] = deep;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), v.to_string()).unwrap();
    let e = ferrotune::data::TextTokenizer::from_hf_dir(dir.path()).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json") && e.contains("cannot load the tokenizer"), "{e}");
}

/// Bug: the `tokenizers` library panics (slice index underflow) building a BPE model whose
/// `continuing_subword_prefix` is longer than a merged token.
#[test]
fn tokenizer_json_with_a_long_subword_prefix_is_an_error() {
    let mut v: serde_json::Value = serde_json::from_str(&ferrotune::testutil::tiny_tokenizer_json()).unwrap();
    v["model"]["continuing_subword_prefix"] = serde_json::json!("#####");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), v.to_string()).unwrap();
    let e = ferrotune::data::TextTokenizer::from_hf_dir(dir.path()).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json") && e.contains("tokenizers library failed"), "{e}");
}

/// Bug: a chat template with nested loops rendered for hours (10^10 iterations).
#[test]
fn endless_chat_template_runs_out_of_fuel() {
    let src = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
    let t = ferrotune::data::ChatTemplate::new(src, String::new(), String::new()).unwrap();
    let started = Instant::now();
    let e = t.render(&[ferrotune::data::Message::new("user", "hi")], false).unwrap_err().to_string();
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    assert!(e.contains("chat template") && e.contains("fuel"), "{e}");
}

/// Bug: a chat template could write without bound (100 MB strings in a loop).
#[test]
fn chat_template_output_is_capped() {
    let src = "{% for i in range(100) %}{{ 'abcdefghij' * 1000000 }}{% endfor %}";
    let t = ferrotune::data::ChatTemplate::new(src, String::new(), String::new()).unwrap();
    let e = t.render(&[ferrotune::data::Message::new("user", "hi")], false).unwrap_err().to_string();
    assert!(e.contains("longer than 64 MiB"), "{e}");
    // The cap is far above what a real conversation renders to.
    let ok = "{% for i in range(10) %}{{ 'abcdefghij' * 100000 }}{% endfor %}";
    let t = ferrotune::data::ChatTemplate::new(ok, String::new(), String::new()).unwrap();
    assert_eq!(t.render(&[], false).unwrap().len(), 10_000_000);
}

/// Found reading the loader while fixing the above (release builds wrap instead of panicking,
/// so the fuzzer cannot see it): `heads × head_dim` from a config.json could overflow.
#[test]
fn head_dim_overflow_is_an_error() {
    let cfg = r#"{"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 4611686018427387904, "num_key_value_heads": 4611686018427387904, "head_dim": 8}"#;
    let e = ferrotune::models::ModelConfig::from_hf_json(std::path::Path::new("config.json"), cfg).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("overflows"), "{e}");
}
