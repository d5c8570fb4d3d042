//! What every method must do, checked the same way for each (`tests/methods.rs` calls this
//! once per method): train through the real trainer, reload its adapter through the registry to
//! the same logits, merge to the unmerged logits where it is mergeable, export to every format
//! that can hold it and refuse the others with a reason, and resume bit for bit.
#![allow(dead_code)]

use super::*;
use ferrotune::config::TrainConfig;
use ferrotune::session::Session;
use ferrotune::train::{train, TrainOptions};
use std::path::{Path, PathBuf};
use std::process::Command;

/// What a method promises; the checks hold it to exactly that.
pub struct Promise {
    /// `adapter = "<name>"` and any further plan lines (method keys, `lora_r`, …).
    pub adapter: &'static str,
    pub extra: &'static str,
    pub mergeable: bool,
    /// Its adapter folder loads in PEFT as it is.
    pub peft: bool,
    /// It is (or converts exactly to) plain LoRA pairs.
    pub gguf_lora: bool,
    /// Its freshly attached state leaves the model's output unchanged (zero-init methods).
    pub identity_at_init: bool,
}

/// A tiny HF model, 12 prompt/completion examples and a plan for `p`, in `dir`.
pub fn plan(dir: &Path, p: &Promise, steps: usize) -> TrainConfig {
    plan_text(dir, p, steps);
    TrainConfig::load(&dir.join("run.toml"), &[]).unwrap()
}

/// [`plan`]'s files, `run.toml` not yet loaded (for plans that must be refused).
pub fn plan_text(dir: &Path, p: &Promise, steps: usize) {
    write_tiny_hf(&dir.join("model"), &TinySpec::default());
    let lines: Vec<String> = (0..12)
        .map(|i| serde_json::json!({"prompt": format!("Question {i}: what is {i} plus {}?\n", i * 3), "completion": format!("The answer is {}.", i + i * 3)}).to_string())
        .collect();
    write_lines(&dir.join("train.jsonl"), &lines);
    write_lines(&dir.join("val.jsonl"), &lines[..3]);
    let text = format!(
        r#"
base_model = "model"
datasets = [{{ path = "train.jsonl" }}]
val_set = {{ path = "val.jsonl" }}
adapter = "{adapter}"
lora_r = 4
lora_alpha = 8
lora_target_modules = "all-linear"
sequence_len = 48
micro_batch_size = 2
gradient_accumulation_steps = 2
max_steps = {steps}
save_steps = 2
learning_rate = 1e-2
lr_scheduler = "cosine"
warmup_steps = 1
weight_decay = 0.01
max_grad_norm = 1.0
output_dir = {out:?}
seed = 3
{extra}
"#,
        adapter = p.adapter,
        extra = p.extra,
        out = dir.join("out"),
    );
    std::fs::write(dir.join("run.toml"), text).unwrap();
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferrotune"))
}

fn read_dir_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    v
}

/// Runs every check for `p`; returns the run's output folder for method-specific checks.
pub fn check_method(dir: &Path, p: &Promise) -> PathBuf {
    let steps = 4;
    let cfg = plan(dir, p, steps);
    let model_dir = dir.join("model");
    let probe = ids(64, 12, 99);

    // Zero-init methods leave the base model's output unchanged when attached.
    if p.identity_at_init {
        let mut m = ferrotune::models::load::load_model(&model_dir).unwrap();
        let base = logits(&m, &probe);
        let mut method = ferrotune::methods::registry::create(&ferrotune::methods::MethodSpec::from_config(&cfg)).unwrap();
        method.attach(&mut m).unwrap();
        let attached = logits(&m, &probe);
        assert!(max_abs_diff(&base, &attached) < 1e-5, "{}: attaching changed the output by {}", p.adapter, max_abs_diff(&base, &attached));
    }

    // Train through the real trainer; the loss must move.
    let s = train(&cfg, &TrainOptions::default()).unwrap_or_else(|e| panic!("{}: training failed: {e}", p.adapter));
    assert_eq!(s.steps, steps);
    let out = dir.join("out");
    let adapter = out.join("adapter");
    let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["resolved"]["method"]["name"], p.adapter, "run.json names the method");
    assert!(run["resolved"]["trainable_params"].as_u64().unwrap() > 0);
    let (before, after) = (s.eval_before.unwrap(), s.eval_after.unwrap());
    assert!(after.is_finite() && after != before, "{}: eval loss {before} → {after}: training changed nothing", p.adapter);

    // The adapter reloads through the registry, as `eval` loads it, to the loss training saw.
    let session = Session::load(&model_dir, Some(&adapter)).unwrap_or_else(|e| panic!("{}: the adapter does not reload: {e}", p.adapter));
    assert_eq!(session.method.as_ref().unwrap().name(), p.adapter);
    let unmerged = logits(&session.model, &probe);
    // … and gives the model training ended with: the same validation loss.
    let data = ferrotune::train::dataset::prepare(&cfg, &session.tokenizer).unwrap();
    let reloaded = ferrotune::train::evaluate(&session.model, &data.val, 2, session.tokenizer.pad_id()).unwrap().loss;
    assert!((reloaded - after).abs() <= 1e-4 * after.abs(), "{}: the saved adapter evaluates to {reloaded}, training ended at {after}", p.adapter);
    let base = logits(&ferrotune::models::load::load_model(&model_dir).unwrap(), &probe);
    assert!(max_abs_diff(&base, &unmerged) > 1e-6, "{}: the reloaded adapter does nothing", p.adapter);
    // A reference pass (the method switched off, as ASFT and DPO use it) is the model training
    // started from: the base, also where the method rewrote the base weights (residual inits).
    let reference = reference_logits(&session.model, &probe);
    let scale = base.iter().fold(0f32, |a, x| a.max(x.abs())).max(1.0);
    assert!(max_abs_diff(&base, &reference) <= 1e-4 * scale, "{}: the reference pass differs from the base by {}", p.adapter, max_abs_diff(&base, &reference));
    let eval = bin()
        .args(["eval", "--model", "model", "--adapter", "out/adapter", "--data", "val.jsonl", "--sequence-len", "48"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(eval.status.success(), "{}: eval failed: {}", p.adapter, String::from_utf8_lossy(&eval.stderr));

    // Merge reproduces the unmerged logits, or is refused.
    let mut session = session;
    let merged = session.merge_adapter();
    assert_eq!(merged.is_ok(), p.mergeable, "{}: merge result {:?}", p.adapter, merged.as_ref().err().map(|e| e.to_string()));
    if p.mergeable {
        let m = logits(&session.model, &probe);
        let scale = unmerged.iter().fold(0f32, |a, x| a.max(x.abs()));
        assert!(max_abs_diff(&m, &unmerged) <= 1e-4 * scale.max(1.0), "{}: merged logits differ by {}", p.adapter, max_abs_diff(&m, &unmerged));
    }

    // Every format that can hold the result is written; the others are refused with a reason.
    for (format, ok, out_name) in [
        ("peft", p.peft, "x-peft"),
        ("merged-safetensors", p.mergeable, "x-merged"),
        ("merged-gguf", p.mergeable, "x-merged.gguf"),
        ("gguf-lora", p.gguf_lora, "x-lora.gguf"),
    ] {
        let o = bin()
            .args(["export", "--model", "model", "--adapter", "out/adapter", "--format", format, "--out", out_name])
            .current_dir(dir)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.success(), ok, "{} → {format}: {err}", p.adapter);
        assert!(!err.contains("panicked"), "{err}");
        if !ok {
            assert!(err.contains(p.adapter) && err.contains(format), "{} → {format}: the refusal names the method and format: {err}", p.adapter);
            assert!(!dir.join(out_name).exists(), "a refused export writes nothing");
        }
    }
    if p.mergeable {
        // The merged model alone gives the adapter's logits.
        let m = ferrotune::models::load::load_model(&dir.join("x-merged")).unwrap();
        let got = logits(&m, &probe);
        let scale = unmerged.iter().fold(0f32, |a, x| a.max(x.abs()));
        assert!(max_abs_diff(&got, &unmerged) <= 1e-4 * scale.max(1.0), "{}: merged export differs by {}", p.adapter, max_abs_diff(&got, &unmerged));
    }

    // Resume is bit-exact: drop the last checkpoint and the adapter, resume from step 2.
    let want = read_dir_files(&adapter);
    let want_metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    std::fs::remove_dir_all(out.join("checkpoints").join(format!("step-{steps}"))).unwrap();
    std::fs::remove_dir_all(&adapter).unwrap();
    let r = train(&cfg, &TrainOptions { resume: true, ..Default::default() }).unwrap_or_else(|e| panic!("{}: resume failed: {e}", p.adapter));
    assert_eq!(r.steps, steps);
    let got = read_dir_files(&adapter);
    let differing: Vec<&str> = want.iter().zip(&got).filter(|(a, b)| a != b).map(|(a, _)| a.0.as_str()).collect();
    assert!(got.len() == want.len() && differing.is_empty(), "{}: the resumed run's adapter differs from the uninterrupted run's in {differing:?}", p.adapter);
    let losses = |t: &str| -> Vec<String> { t.lines().filter(|l| l.contains("\"loss\"")).map(|l| l.split("\"tokens_per_s\"").next().unwrap().to_string()).collect() };
    assert_eq!(losses(&std::fs::read_to_string(out.join("metrics.jsonl")).unwrap()), losses(&want_metrics), "{}: resumed losses differ", p.adapter);
    out
}
