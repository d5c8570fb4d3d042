//! Fuzzing of every parser of user files (see `ferrotune::fuzz`) with a fixed seed —
//! `FERROTUNE_FUZZ_CASES` cases per parser, 10^4 by default — and one regression test per bug
//! the fuzzer found.

mod common;

use ferrotune::formats::gguf::{GgmlType, GgufFile, GgufValue, GgufWriter};
use ferrotune::fuzz::{self, alloc::TrackingAlloc, FailureKind, Options, Target};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Lets the driver bound each case's largest allocation, and refuses (and reports) any over
/// 2 GiB, so a length-driven allocation fails loudly instead of taking the machine's memory.
#[global_allocator]
static ALLOC: TrackingAlloc = TrackingAlloc;

const SEED: u64 = 20_261_203;

fn cases() -> u64 {
    std::env::var("FERROTUNE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000)
}

/// The targets are built once (tiny model, tokenizer, adapter) and shared by the tests.
fn targets() -> &'static (PathBuf, Vec<Target>) {
    static T: OnceLock<(PathBuf, Vec<Target>)> = OnceLock::new();
    T.get_or_init(|| {
        let dir = fuzz::scratch_dir("test").unwrap();
        let targets = fuzz::all_targets(&dir).unwrap();
        (dir, targets)
    })
}

fn target(name: &str) -> &'static Target {
    targets().1.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no fuzz target `{name}`"))
}

fn fuzz(name: &str) {
    let (dir, _) = targets();
    let r = fuzz::run_target(target(name), &Options::new(SEED, cases(), dir.clone()));
    println!("{name}: {} cases, {} ok, {} errors, {} failures in {:.1}s", r.cases, r.ok, r.errors, r.failures.len(), r.elapsed.as_secs_f64());
    let failures: Vec<String> = r
        .failures
        .iter()
        .map(|f| format!("{f} (reproduce: cargo run --release --example fuzz -- --only {name} --seed {SEED} --case {})", f.case))
        .collect();
    assert!(failures.is_empty(), "{} failing cases:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(r.ok + r.errors, r.cases);
    // A mutator that only produced garbage would never get past the first check.
    assert!(r.ok > 0 && r.errors > 0, "{name}: {} ok, {} errors: the mutations are not reaching the parser", r.ok, r.errors);
}

#[test]
fn fuzz_gguf() {
    fuzz("gguf");
}

#[test]
fn fuzz_gguf_tokenizer() {
    fuzz("gguf-tokenizer");
}

#[test]
fn fuzz_safetensors() {
    fuzz("safetensors");
}

#[test]
fn fuzz_config_json() {
    fuzz("config.json");
}

#[test]
fn fuzz_tokenizer_json() {
    fuzz("tokenizer.json");
}

#[test]
fn fuzz_tokenizer_config_json() {
    fuzz("tokenizer_config.json");
}

#[test]
fn fuzz_chat_template() {
    fuzz("chat-template");
}

#[test]
fn fuzz_adapter_config_json() {
    fuzz("adapter_config.json");
}

#[test]
fn fuzz_adapter_weights() {
    fuzz("adapter_model.safetensors");
}

#[test]
fn fuzz_run_plan() {
    fuzz("run-plan");
}

#[test]
fn fuzz_jsonl() {
    fuzz("jsonl");
}

/// Every target has a test above (a new parser must not go unfuzzed by accident).
#[test]
fn every_target_is_fuzzed() {
    let src = include_str!("fuzz.rs");
    for t in &targets().1 {
        assert!(src.contains(&format!("fuzz(\"{}\")", t.name)), "target `{}` has no test", t.name);
    }
}

/// The unmutated seeds parse: the fixtures are valid, so mutations start from working files.
#[test]
fn first_seed_of_every_target_parses() {
    let (dir, targets) = targets();
    for t in targets {
        let d = dir.join(format!("seed-{}", t.name));
        std::fs::create_dir_all(&d).unwrap();
        if let Err(e) = (t.run)(&t.seeds[0], &d) {
            panic!("target `{}`: its first seed fails: {e}", t.name);
        }
        let _ = std::fs::remove_dir_all(&d);
    }
}

/// The driver reports each kind of failure (so a clean run means something).
#[test]
fn driver_catches_panics_slowness_and_big_allocations() {
    let dir = fuzz::scratch_dir("driver").unwrap();
    let make = |name: &'static str, run: ferrotune::fuzz::Runner| Target {
        name,
        seeds: vec![b"seed".to_vec()],
        mutate: |_, s, _| s.to_vec(),
        run,
    };
    let mut opts = Options::new(1, 3, dir.clone());
    opts.slow_case = Duration::from_millis(50);
    let r = fuzz::run_target(&make("panics", Box::new(|_, _| panic!("boom"))), &opts);
    assert_eq!(r.panics(), 3);
    assert!(matches!(&r.failures[0].kind, FailureKind::Panic(m) if m.contains("boom")), "{:?}", r.failures);
    let r = fuzz::run_target(&make("slow", Box::new(|_, _| Ok(std::thread::sleep(Duration::from_millis(80))))), &opts);
    assert!(r.failures.iter().all(|f| matches!(f.kind, FailureKind::Slow(_))) && r.failures.len() == 3);
    let r = fuzz::run_target(
        &make("allocates", Box::new(|_, _| Ok(drop(std::hint::black_box(vec![1u8; 200 << 20]))))),
        &opts,
    );
    let big = r.failures.iter().filter(|f| matches!(f.kind, FailureKind::Allocation { bytes, input: 4 } if bytes >= 200 << 20));
    assert_eq!(big.count(), 3, "{:?}", r.failures);
    let r = fuzz::run_target(&make("fine", Box::new(|_, _| Ok(()))), &opts);
    assert!(r.failures.is_empty() && r.ok == 3);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Regressions: one per bug the fuzzer found

/// The tiny GGUF model of `tests/common` (2 layers, Q8_0 projections), rewritten with some
/// metadata values and some tensors (name, torch shape, F32 bytes) replaced.
fn edited_tiny_gguf(dir: &Path, meta: &[(&str, GgufValue)], tensors: &[(&str, &[usize], Vec<u8>)]) -> PathBuf {
    let src = dir.join("tiny.gguf");
    common::write_tiny_gguf(&src, &common::TinySpec::default(), GgmlType::Q8_0);
    let g = GgufFile::open(&src).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in g.metadata() {
        w.add_metadata(k.clone(), v.clone());
    }
    for (k, v) in meta {
        w.add_metadata(*k, v.clone());
    }
    for t in g.tensors() {
        match tensors.iter().find(|(name, _, _)| *name == t.name) {
            Some((name, shape, bytes)) => w.add_tensor_raw(*name, shape, GgmlType::F32, bytes.clone()).unwrap(),
            None => w.add_tensor_raw(t.name.clone(), &t.shape(), t.ggml_type, g.tensor_bytes(&t.name).unwrap().to_vec()).unwrap(),
        }
    }
    let out = dir.join("edited.gguf");
    w.write(&out).unwrap();
    out
}

fn load_error(path: &Path) -> String {
    ferrotune::models::load::load_gguf(path, true).err().expect("loading must fail").to_string()
}

/// Bug: a GGUF (or config.json) claiming 2^32-1 layers made the loader reserve memory for that
/// many layers before looking for their tensors (a 500 GB allocation, then an abort).
#[test]
fn huge_layer_count_is_an_error_not_an_allocation() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = edited_tiny_gguf(tmp.path(), &[("llama.block_count", GgufValue::U32(u32::MAX))], &[]);
    let e = load_error(&bad);
    assert!(e.contains("edited.gguf") && e.contains("model.layers.2.") && e.contains("missing"), "{e}");
}

/// Bug: an attention projection with a zero dimension divided by zero while undoing
/// llama.cpp's q/k row permutation; its shape is now checked against the heads first.
#[test]
fn q_projection_with_a_zero_dimension_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let hd = common::TinySpec::default().head_dim();
    for (shape, expected) in [(vec![0, 32], "expected 32 rows"), (vec![32, 0], "expected [32, 32]"), (vec![hd, 32], "expected 32 rows")] {
        let n: usize = shape.iter().product();
        let bad = edited_tiny_gguf(tmp.path(), &[], &[("blk.0.attn_q.weight", &shape, vec![0u8; 4 * n])]);
        let e = load_error(&bad);
        let names_it = e.contains("blk.0.attn_q.weight") || e.contains("model.layers.0.self_attn.q_proj.weight");
        assert!(e.contains("edited.gguf") && names_it && e.contains(expected), "{shape:?}: {e}");
    }
}

/// Bug: `block_count = 0` (or any zero size) loaded "successfully" as an empty model.
#[test]
fn zero_layers_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = edited_tiny_gguf(tmp.path(), &[("llama.block_count", GgufValue::U32(0))], &[]);
    let e = load_error(&bad);
    assert!(e.contains("edited.gguf") && e.contains("num_hidden_layers (GGUF: block_count) is 0"), "{e}");
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

/// Preference pairs (fed by the fuzzer, plain and chat-style) are read as pairs; one that mixes
/// strings and messages is refused naming the file and line.
#[test]
fn preference_pairs_are_read_and_malformed_ones_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prefs.jsonl");
    let chat = r#"{"prompt": [{"role": "user", "content": "Sky?"}], "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": [{"role": "assistant", "content": "Green."}]}"#;
    let mixed = r#"{"prompt": "Sky?", "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": "Green."}"#;
    std::fs::write(&path, format!("\n{{\"prompt\": \"Sky?\", \"chosen\": \"Blue.\", \"rejected\": \"Green.\"}}\n{chat}\n{mixed}\n")).unwrap();
    let records = ferrotune::data::read_jsonl(&path).unwrap();
    for r in &records[..2] {
        let e = ferrotune::data::Example::from_record(r, ferrotune::data::DatasetFormat::Auto).unwrap();
        assert_eq!(e.format(), ferrotune::data::DatasetFormat::Preference);
    }
    let e = ferrotune::data::Example::from_record(&records[2], ferrotune::data::DatasetFormat::Auto).unwrap_err().to_string();
    assert!(e.contains("prefs.jsonl:4") && e.contains("all be strings or all be chat messages"), "{e}");
}

/// Found reading the fuzzer's sample errors: a run-plan value of the wrong type was reported as
/// "invalid type: sequence, expected f64" without saying which key.
#[test]
fn run_plan_type_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.toml");
    std::fs::write(&path, "base_model = \"m.gguf\"\ndatasets = [{ path = \"d.jsonl\" }]\nmax_steps = 3\noutput_dir = \"out\"\nlora_alpha = []\n").unwrap();
    let e = ferrotune::config::TrainConfig::load(&path, &[]).unwrap_err().to_string();
    assert!(e.contains("run.toml") && e.contains("key `lora_alpha` (line 5)") && e.contains("expected a number"), "{e}");
    let e = ferrotune::config::TrainConfig::load(&path, &["lora_alpha=2".into(), "lora_r=-1".into()]).unwrap_err().to_string();
    assert!(e.contains("lora_r") && e.contains("--set lora_r=-1"), "{e}");
    let e = ferrotune::config::TrainConfig::load(&path, &["lora_alpha=2".into(), "datasets=[{ path = 1 }]".into()]).unwrap_err().to_string();
    assert!(e.contains("--set datasets=[{ path = 1 }]") && e.contains("datasets"), "{e}");
    // `--set =x` used to end as "unknown field ``".
    let e = ferrotune::config::TrainConfig::load(&path, &["=2".into()]).unwrap_err().to_string();
    assert!(e.contains("`=2`") && e.contains("the key before `=` is empty"), "{e}");
}
