//! Every bad input a user can hand the `ferrotune` binary gets a non-zero exit and one message
//! that names the file (and line or field) and says what was expected: never a panic, never a
//! silent no-op. Good-but-unusual input (a BOM, CRLF line ends) is simply accepted.

mod common;

use common::*;
use ferrotune::formats::gguf::{GgmlType, GgufFile, GgufValue, GgufWriter};
use std::path::Path;
use std::process::Command;

struct Run {
    ok: bool,
    code: Option<i32>,
    err: String,
}

fn ferrotune(dir: &Path, args: &[&str]) -> Run {
    let o = Command::new(env!("CARGO_BIN_EXE_ferrotune")).args(args).current_dir(dir).output().unwrap();
    Run { ok: o.status.success(), code: o.status.code(), err: String::from_utf8_lossy(&o.stderr).into_owned() }
}

/// Asserts a clean refusal (exit 1, no panic) whose message contains every one of `needles`.
#[track_caller]
fn refused(r: &Run, needles: &[&str]) {
    assert!(!r.ok && r.code == Some(1), "expected exit code 1, got {:?}: {}", r.code, r.err);
    assert!(!r.err.contains("panicked") && !r.err.contains("RUST_BACKTRACE"), "a panic: {}", r.err);
    for n in needles {
        assert!(r.err.contains(n), "expected `{n}` in: {}", r.err);
    }
}

/// Rewrites one adapter tensor: (key, shape, values) → (shape, values).
type Reshape = dyn Fn(&str, &[usize], Vec<f32>) -> (Vec<usize>, Vec<f32>);

const PLAN: &str = "base_model = \"model\"\ndatasets = [{ path = \"train.jsonl\" }]\nlora_r = 2\nlora_alpha = 4\n\
                    sequence_len = 64\nmax_steps = 1\noutput_dir = \"out\"\n";

fn setup(dir: &Path) {
    write_tiny_hf(&dir.join("model"), &TinySpec::default());
    std::fs::write(dir.join("run.toml"), PLAN).unwrap();
    good_data(dir);
}

fn good_data(dir: &Path) {
    let lines: Vec<String> = (0..4).map(|i| serde_json::json!({"prompt": format!("Q{i}?"), "completion": format!(" A{i}.")}).to_string()).collect();
    write_lines(&dir.join("train.jsonl"), &lines);
}

/// `ferrotune train run.toml --overwrite` (so consecutive cases never trip over each other's runs).
fn train(dir: &Path, set: &[&str]) -> Run {
    let mut args = vec!["train", "run.toml", "--overwrite"];
    for s in set {
        args.extend(["--set", s]);
    }
    ferrotune(dir, &args)
}

#[test]
fn bad_datasets_name_the_file_line_and_field() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    setup(dir);
    let data = |bytes: &[u8]| std::fs::write(dir.join("train.jsonl"), bytes).unwrap();

    data(b"{\"text\": \"one\"}\n{\"text\": \"two\"}\n{\"text\": oops}\n{\"text\": \"four\"}\n");
    refused(&train(dir, &[]), &["train.jsonl:3", "invalid JSON"]);
    data(b"{\"prompt\": 5, \"completion\": \"x\"}\n");
    refused(&train(dir, &[]), &["train.jsonl:1", "prompt", "string"]);
    data(b"[1, 2]\n");
    refused(&train(dir, &[]), &["train.jsonl:1", "expected a JSON object"]);
    data(b"");
    refused(&train(dir, &[]), &["train.jsonl", "no records"]);
    data(b"  \n\n\t\n");
    refused(&train(dir, &[]), &["train.jsonl", "no records"]);
    data(b"{\"text\": \"fine\"}\n{\"text\": \"bad \xff\xfe byte\"}\n");
    refused(&train(dir, &[]), &["train.jsonl:2", "invalid UTF-8"]);
    data(b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"wizard\", \"content\": \"x\"}]}\n");
    refused(&train(dir, &[]), &["train.jsonl:1", "wizard", "assistant"]);
    data(b"{\"messages\": \"hello\"}\n");
    refused(&train(dir, &[]), &["train.jsonl:1", "messages"]);
    data(b"{\"unrelated\": 1}\n");
    refused(&train(dir, &[]), &["train.jsonl:1"]);
    // Every example's prompt longer than sequence_len: nothing left to train on.
    let long: Vec<String> = (0..3).map(|i| serde_json::json!({"prompt": "p".repeat(200), "completion": format!("c{i}")}).to_string()).collect();
    write_lines(&dir.join("train.jsonl"), &long);
    refused(&train(dir, &[]), &["sequence_len", "no training example has a target token"]);
    // Empty texts: a lone EOS predicts nothing, so they are dropped rather than trained on.
    data(b"{\"text\": \"\"}\n{\"text\": \"\"}\n");
    refused(&train(dir, &[]), &["no training example has a target token"]);

    // Unusual but valid: a byte-order mark and CRLF line ends train normally.
    data(b"\xEF\xBB\xBF{\"text\": \"one two\"}\r\n{\"text\": \"three four\"}\r\n");
    let r = train(dir, &[]);
    assert!(r.ok, "BOM + CRLF: {}", r.err);
    // A 10 MB line is read (and truncated to sequence_len), with a note.
    let big = serde_json::json!({"text": "x".repeat(10 << 20)}).to_string();
    std::fs::write(dir.join("train.jsonl"), format!("{big}\n{{\"text\": \"short\"}}\n")).unwrap();
    let r = train(dir, &[]);
    assert!(r.ok && r.err.contains("cut at sequence_len = 64: 1 of 2 training examples (") && r.err.contains("target tokens lost)"), "{}", r.err);
    // Some examples dropped by truncation: a visible warning, not only a count in run.json.
    let mut mixed = long.clone();
    mixed.push(serde_json::json!({"prompt": "short?", "completion": " yes"}).to_string());
    write_lines(&dir.join("train.jsonl"), &mixed);
    let r = train(dir, &[]);
    assert!(r.ok && r.err.contains("warning: 3 of 4 examples were dropped"), "{}", r.err);
}

#[test]
fn bad_plans_and_flags_name_the_key_and_the_source() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    setup(dir);
    refused(&train(dir, &["learning_rate=fast"]), &["learning_rate", "--set learning_rate=fast", "expected"]);
    refused(&train(dir, &["learning_rate=nan"]), &["learning_rate", "--set learning_rate=nan", "positive"]);
    refused(&train(dir, &["learning_rate=-1e-4"]), &["learning_rate", "positive"]);
    refused(&train(dir, &["adam_beta2=1.5"]), &["adam_beta2", "1.5", "[0, 1)"]);
    refused(&train(dir, &["adam_epsilon=0"]), &["adam_epsilon", "positive"]);
    refused(&train(dir, &["lora_alpha=0"]), &["lora_alpha", "positive"]);
    refused(&train(dir, &["lora_dropout=1"]), &["lora_dropout", "[0, 1)"]);
    refused(&train(dir, &["weight_decay=-0.1"]), &["weight_decay"]);
    refused(&train(dir, &["max_grad_norm=inf"]), &["max_grad_norm"]);
    refused(&train(dir, &["micro_batch_size=-1"]), &["micro_batch_size", "--set micro_batch_size=-1"]);
    refused(&train(dir, &["max_steps=0"]), &["max_steps", "at least 1"]);
    refused(&train(dir, &["lora_rank=4"]), &["lora_rank", "--set lora_rank=4", "unknown field"]);
    refused(&train(dir, &["nonsense"]), &["--set nonsense", "KEY=VALUE"]);

    // The same mistakes in the file name the file, the key and its line.
    std::fs::write(dir.join("run.toml"), format!("{PLAN}learning_rate = \"fast\"\n")).unwrap();
    refused(&train(dir, &[]), &["run.toml", "learning_rate", "line 8", "expected"]);
    std::fs::write(dir.join("run.toml"), format!("{PLAN}adam_beta2 = 1.5\n")).unwrap();
    refused(&train(dir, &[]), &["run.toml", "adam_beta2"]);
    std::fs::write(dir.join("run.toml"), "base_model = \"model\"\n").unwrap();
    refused(&train(dir, &[]), &["run.toml", "datasets"]);
    std::fs::write(dir.join("run.toml"), "this is = = not toml").unwrap();
    refused(&train(dir, &[]), &["run.toml", "invalid TOML"]);
    std::fs::write(dir.join("run.toml"), PLAN).unwrap();

    // output_dir: a file, or a folder that cannot be created.
    std::fs::write(dir.join("a-file"), "x").unwrap();
    refused(&train(dir, &["output_dir=a-file"]), &["a-file is a file"]);
    refused(&train(dir, &["output_dir=/proc/ferrotune-cannot-write-here"]), &["/proc/ferrotune-cannot-write-here"]);
    // A warm-up that never ends is said out loud.
    let r = train(dir, &["warmup_steps=2"]);
    assert!(r.ok && r.err.contains("warning: warmup_steps = 2"), "{}", r.err);
    // A missing config file.
    refused(&ferrotune(dir, &["train", "nope.toml"]), &["nope.toml", "No such file"]);
    assert!(!ferrotune(dir, &["train", "nope.toml"]).err.contains("No such file or directory (os error 2): No such file"), "the cause is said once");
}

#[test]
fn bad_models_adapters_and_sampling_options() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    setup(dir);
    assert!(train(dir, &[]).ok);
    std::fs::write(dir.join("text.jsonl"), "{\"text\": \"one two three\"}\n").unwrap();

    // Truncated and random model files.
    let weights = std::fs::read(dir.join("model/model.safetensors")).unwrap();
    std::fs::create_dir_all(dir.join("cut")).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(dir.join("model").join(f), dir.join("cut").join(f)).unwrap();
    }
    std::fs::write(dir.join("cut/model.safetensors"), &weights[..weights.len() / 2]).unwrap();
    refused(&ferrotune(dir, &["eval", "--model", "cut", "--data", "text.jsonl"]), &["cut/model.safetensors", "tensor `", "truncated"]);
    let mut rng = ferrotune::rng::SplitMix64::new(5);
    let random: Vec<u8> = (0..4096).map(|_| (rng.next_f32() * 256.0) as u8).collect();
    std::fs::write(dir.join("random.gguf"), &random).unwrap();
    refused(&ferrotune(dir, &["eval", "--model", "random.gguf", "--data", "text.jsonl"]), &["random.gguf"]);
    write_tiny_gguf(&dir.join("m.gguf"), &TinySpec::default(), GgmlType::Q8_0);
    let gguf = std::fs::read(dir.join("m.gguf")).unwrap();
    std::fs::write(dir.join("cut.gguf"), &gguf[..gguf.len() - 100]).unwrap();
    refused(&ferrotune(dir, &["eval", "--model", "cut.gguf", "--data", "text.jsonl"]), &["cut.gguf"]);

    // GGUF metadata that describes no usable model.
    for (key, what) in [("llama.block_count", "block_count"), ("llama.context_length", "context_length")] {
        let src = GgufFile::open(&dir.join("m.gguf")).unwrap();
        let mut w = GgufWriter::new();
        for (k, v) in src.metadata() {
            w.add_metadata(k.clone(), if k == key { GgufValue::U32(0) } else { v.clone() });
        }
        for t in src.tensors() {
            let shape: Vec<usize> = t.dims.iter().rev().map(|&x| x as usize).collect();
            w.add_tensor_raw(t.name.clone(), &shape, t.ggml_type, src.tensor_bytes(&t.name).unwrap().to_vec()).unwrap();
        }
        let name = format!("zero-{what}.gguf");
        w.write(&dir.join(&name)).unwrap();
        refused(&ferrotune(dir, &["eval", "--model", &name, "--data", "text.jsonl"]), &[&name, what, "at least 1"]);
    }

    // Adapters that do not fit the model, or hold NaN.
    let adapter = dir.join("out/adapter");
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap()).unwrap();
    let variant = |name: &str, edit: &dyn Fn(&mut serde_json::Value), tensors: &Reshape| {
        let out = dir.join(name);
        std::fs::create_dir_all(&out).unwrap();
        let mut c = cfg.clone();
        edit(&mut c);
        std::fs::write(out.join("adapter_config.json"), c.to_string()).unwrap();
        let loaded = ferrotune::formats::safetensors::load_f32(&adapter.join("adapter_model.safetensors")).unwrap();
        let mut ts: Vec<(String, candle_core::Tensor)> = Vec::new();
        for (k, t) in loaded {
            let (shape, vals) = tensors(&k, t.dims(), t.flatten_all().unwrap().to_vec1().unwrap());
            ts.push((k, candle_core::Tensor::from_vec(vals, shape, &candle_core::Device::Cpu).unwrap()));
        }
        ferrotune::formats::safetensors::save(&out.join("adapter_model.safetensors"), &ts, ferrotune::formats::safetensors::SaveDType::F32, None).unwrap();
    };
    let same = |_: &str, s: &[usize], v: Vec<f32>| (s.to_vec(), v);
    variant("ia3", &|c| c["peft_type"] = "IA3".into(), &same);
    refused(&ferrotune(dir, &["eval", "--model", "model", "--adapter", "ia3", "--data", "text.jsonl"]), &["ia3/adapter_config.json", "peft_type", "LORA"]);
    variant("wide", &|_| {}, &|k, s, v| {
        // Every lora_A one column wider than the model's input features.
        if !k.contains("lora_A") {
            return (s.to_vec(), v);
        }
        let shape = vec![s[0], s[1] + 1];
        (shape.clone(), v.into_iter().cycle().take(shape[0] * shape[1]).collect())
    });
    refused(&ferrotune(dir, &["eval", "--model", "model", "--adapter", "wide", "--data", "text.jsonl"]), &["wide/adapter_model.safetensors", "shape", "this model needs"]);
    variant("nan", &|_| {}, &|k, s, mut v| {
        if k.contains("lora_B") {
            v[0] = f32::NAN;
        }
        (s.to_vec(), v)
    });
    for args in [
        &["eval", "--model", "model", "--adapter", "nan", "--data", "text.jsonl"][..],
        &["generate", "--model", "model", "--adapter", "nan", "--prompt", "hi"],
        &["export", "--model", "model", "--adapter", "nan", "--format", "peft", "--out", "nan-copy"],
    ] {
        refused(&ferrotune(dir, args), &["nan/adapter_model.safetensors", "NaN", "lora_B"]);
    }

    // Sampling options that would silently do something else.
    let gen = |extra: &[&str]| ferrotune(dir, &[&["generate", "--model", "model", "--prompt", "hi", "--max-new-tokens", "2"][..], extra].concat());
    refused(&gen(&["--top-p", "2", "--temperature", "0.7"]), &["--top-p", "(0, 1]"]);
    refused(&gen(&["--top-p=-0.5", "--temperature", "0.7"]), &["--top-p"]);
    refused(&gen(&["--top-p", "NaN", "--temperature", "0.7"]), &["--top-p"]);
    refused(&gen(&["--temperature=-1"]), &["--temperature", "-1"]);
    refused(&gen(&["--temperature", "NaN"]), &["--temperature", "NaN"]);
    refused(&gen(&["--top-p", "0.9"]), &["--top-p", "--temperature"]);
    assert!(gen(&["--temperature", "0.7", "--top-p", "0.9"]).ok);
    // A prompt past the context (256 tokens for the tiny model) is refused; one near it stops there.
    let long = "a ".repeat(400);
    refused(&ferrotune(dir, &["generate", "--model", "model", "--prompt", &long]), &["prompt", "context of 256"]);
    let r = ferrotune(dir, &["generate", "--model", "model", "--prompt", &"a".repeat(250), "--max-new-tokens", "50"]);
    assert!(r.ok && r.err.contains("generation stops there"), "{}", r.err);
    // A plan whose examples outrun the context is refused before training.
    let long_lines: Vec<String> = vec![serde_json::json!({"text": "word ".repeat(200)}).to_string()];
    write_lines(&dir.join("train.jsonl"), &long_lines);
    refused(&train(dir, &["sequence_len=1000"]), &["sequence_len", "context of 256"]);
    // eval with nothing to score.
    std::fs::write(dir.join("empty.jsonl"), "").unwrap();
    refused(&ferrotune(dir, &["eval", "--model", "model", "--data", "empty.jsonl"]), &["empty.jsonl"]);
}
