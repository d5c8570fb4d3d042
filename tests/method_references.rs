//! Parity with Hugging Face PEFT 0.21 for the methods PEFT has (DoRA, …) on the real
//! SmolLM2-135M-Instruct, from the references in `tests/fixtures/peft-reference/methods/`
//! (copied from the shared `bench/peers/reference/methods/`). Each run starts from the adapter
//! PEFT started from, trains 5 AdamW steps on the reference text through the real trainer, and
//! must give PEFT's losses and eval losses to 1e-4 relative. Runs when the GGUF is present
//! (`.ci/run` fetches it); otherwise prints why it is skipped.

use ferrotune::config::TrainConfig;
use ferrotune::train::{train, TrainOptions};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn gguf_path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("FERROTUNE_SMOLLM2_GGUF") {
        return Some(PathBuf::from(p));
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".models/SmolLM2-135M-Instruct.Q4_1.gguf");
    p.is_file().then_some(p)
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft-reference/methods")
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

/// Trains `adapter` from `init` as the reference `<name>.json` describes; checks losses and
/// eval losses against it. `extra` adds plan lines.
fn check_against_reference(name: &str, adapter: &str, init: &Path, extra: &str) {
    let Some(gguf) = gguf_path() else {
        eprintln!("skipped: SmolLM2 GGUF not found (set FERROTUNE_SMOLLM2_GGUF or run .ci/run / the quickstart to fetch it)");
        return;
    };
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join(format!("{name}.json"))).unwrap()).unwrap();
    let lora = &reference["lora"];
    let targets: Vec<String> = lora["target_modules"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    let dir = tempfile::tempdir().unwrap();
    let line = |k: &str| serde_json::json!({ "text": reference[k] }).to_string();
    std::fs::write(dir.path().join("train.jsonl"), line("train_text") + "\n").unwrap();
    std::fs::write(dir.path().join("eval.jsonl"), line("eval_text") + "\n").unwrap();
    let cfg = format!(
        r#"
base_model = {gguf:?}
datasets = [{{ path = "train.jsonl", type = "text" }}]
val_set = {{ path = "eval.jsonl", type = "text" }}
adapter = "{adapter}"
init_adapter = {init:?}
lora_r = {r}
lora_alpha = {alpha}
lora_target_modules = {targets:?}
sequence_len = 64
micro_batch_size = 1
max_steps = 5
learning_rate = {lr}
lr_scheduler = "constant"
weight_decay = 0.0
max_grad_norm = 0.0
add_eos = false
shuffle = false
output_dir = {out:?}
threads = 2
{extra}
"#,
        r = lora["r"],
        alpha = lora["lora_alpha"],
        lr = reference["optimizer"]["lr"],
        out = dir.path().join("out"),
    );
    std::fs::write(dir.path().join("run.toml"), cfg).unwrap();
    let plan = TrainConfig::load(&dir.path().join("run.toml"), &[]).unwrap();
    let summary = train(&plan, &TrainOptions::default()).unwrap();
    let metrics = std::fs::read_to_string(dir.path().join("out/metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics.lines().filter_map(|l| serde_json::from_str::<Value>(l).unwrap()["loss"].as_f64()).collect();
    let want: Vec<f64> = reference["results"]["losses"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let worst = losses.iter().zip(&want).map(|(a, b)| rel(*a, *b)).fold(0.0, f64::max);
    eprintln!("{name}: losses {losses:?}\nreference {want:?}\nmax relative difference {worst:.2e}");
    assert_eq!(losses.len(), want.len());
    assert!(worst < 1e-4, "{name}: losses differ from PEFT's by {worst:.2e} (relative)");
    let (before, after) = (summary.eval_before.unwrap(), summary.eval_after.unwrap());
    let (wb, wa) = (reference["results"]["eval_loss_before"].as_f64().unwrap(), reference["results"]["eval_loss_after"].as_f64().unwrap());
    eprintln!("{name}: eval loss before {before} (ref {wb}), after {after} (ref {wa})");
    assert!(rel(before, wb) < 1e-4 && rel(after, wa) < 1e-4, "{name}: eval losses differ");
}

#[test]
fn dora_training_matches_peft_reference() {
    check_against_reference("dora", "dora", &fixtures().join("dora/init"), "");
}
