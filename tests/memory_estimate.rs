//! The memory check of `ferrotune train`: the estimate made before loading stays within 25% of
//! the peak resident set the kernel measures (`VmHWM`, reported by the child process itself),
//! and a run over the available memory is refused with settings that would fit, unless
//! `--force`.
//!
//! The model is big enough for its activations (about 120 MB for 4 × 256 tokens) to dominate
//! the binary's own few MB, and small enough for one step to take a second or two.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

const SPEC: TinySpec = TinySpec { hidden: 256, intermediate: 768, layers: 6, heads: 8, kv_heads: 4, tied: true, qkv_bias: false, seed: 11 };

/// A model, 8 text examples of more than 256 tokens each (single bytes of the tiny tokenizer,
/// truncated to `sequence_len = 256`), and a plan of one step of 4 × 256 tokens.
fn setup(dir: &Path, gguf: bool) {
    let base = if gguf {
        write_tiny_gguf(&dir.join("m.gguf"), &SPEC, ferrotune::formats::gguf::GgmlType::Q8_0);
        "m.gguf"
    } else {
        write_tiny_hf(&dir.join("model"), &SPEC);
        "model"
    };
    let lines: Vec<String> = (0..8)
        .map(|i| {
            let text: String = (0..400).map(|j| char::from(b"qzxj7kv5"[(i + j * 3) % 8])).collect();
            serde_json::json!({ "text": text }).to_string()
        })
        .collect();
    write_lines(&dir.join("data.jsonl"), &lines);
    std::fs::write(
        dir.join("run.toml"),
        format!(
            "base_model = {base:?}\ndatasets = [{{ path = \"data.jsonl\", type = \"text\" }}]\nlora_r = 8\nlora_alpha = 16\n\
             lora_target_modules = \"all-linear\"\nsequence_len = 256\nmicro_batch_size = 4\nmax_steps = 1\noutput_dir = \"out\"\n"
        ),
    )
    .unwrap();
}

fn train(dir: &Path, args: &[&str], available_mib: Option<&str>) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrotune"));
    cmd.arg("train").arg("run.toml").args(args).current_dir(dir);
    match available_mib {
        Some(v) => cmd.env("FERROTUNE_AVAILABLE_MEMORY_MIB", v),
        None => cmd.env_remove("FERROTUNE_AVAILABLE_MEMORY_MIB"),
    };
    let out = cmd.output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `(estimate, measured peak)` in MiB of a training run, from its summary line.
fn estimate_and_peak(dir: &Path, out_dir: &str, extra: &[&str]) -> (f64, f64) {
    let set = format!("output_dir={out_dir}");
    let args: Vec<&str> = ["--set", set.as_str()].into_iter().chain(extra.iter().copied()).collect();
    let (ok, out, err) = train(dir, &args, None);
    assert!(ok, "train failed: {err}");
    assert!(err.contains("memory estimate: "), "the plan shows the estimate: {err}");
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join(out_dir).join("run.json")).unwrap()).unwrap();
    let est = v["memory_estimate_mib"].as_f64().expect("estimate in the summary");
    assert_eq!(run["resolved"]["memory_estimate_mib"].as_f64(), Some(est), "run.json records the same estimate");
    (est, v["peak_rss_mib"].as_f64().expect("peak RSS in the summary (Linux)"))
}

fn assert_within_25_percent(what: &str, est: f64, peak: f64) {
    eprintln!("{what}: estimate {est:.1} MiB, measured peak {peak:.1} MiB ({:+.1}%)", 100.0 * (est / peak - 1.0));
    assert!((est - peak).abs() <= 0.25 * peak, "{what}: estimate {est:.1} MiB vs measured peak {peak:.1} MiB");
}

#[test]
fn estimate_is_within_25_percent_of_the_measured_peak() {
    let d = tempfile::tempdir().unwrap();
    setup(d.path(), false);
    let (est, peak) = estimate_and_peak(d.path(), "out", &[]);
    assert!(peak > 100.0, "the workload is meant to dominate the process ({peak} MiB)");
    assert_within_25_percent("f32 base", est, peak);

    let (est_ckpt, peak_ckpt) = estimate_and_peak(d.path(), "out-ckpt", &["--set", "gradient_checkpointing=true"]);
    assert_within_25_percent("f32 base, gradient checkpointing", est_ckpt, peak_ckpt);
    assert!(est_ckpt < est * 0.7, "checkpointing is estimated to save memory: {est_ckpt} vs {est}");
}

#[test]
fn estimate_is_within_25_percent_on_a_quantized_gguf_base() {
    let d = tempfile::tempdir().unwrap();
    setup(d.path(), true);
    let (est, peak) = estimate_and_peak(d.path(), "out", &[]);
    assert_within_25_percent("Q8_0 GGUF base", est, peak);
}

#[test]
fn a_run_over_the_available_memory_is_refused_with_advice_unless_forced() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    setup(dir, false);
    // 110 MiB: less than the plain run needs (about 170 MiB beyond the process), more than
    // the checkpointed one does (about 85 MiB).
    let (ok, _, err) = train(dir, &[], Some("110"));
    assert!(!ok, "refused");
    assert!(err.contains("only 0.11 GiB is available ($FERROTUNE_AVAILABLE_MEMORY_MIB)"), "{err}");
    assert!(err.contains("gradient_checkpointing = true: ") && err.contains("micro_batch_size = "), "suggestions: {err}");
    assert!(err.contains("--force") && !err.contains("panicked"), "{err}");
    let fits_with_ckpt = err.lines().find(|l| l.contains("gradient_checkpointing = true")).unwrap();
    assert!(fits_with_ckpt.contains("(fits)"), "{fits_with_ckpt}");
    assert!(!dir.join("out/run.json").exists(), "refused before the run started");

    let (ok, out, err) = train(dir, &["--force", "--set", "output_dir=forced"], Some("110"));
    assert!(ok, "--force trains anyway: {err}");
    assert!(err.contains("warning: ") && err.contains("--force"), "{err}");
    assert!(out.lines().last().unwrap().contains("\"steps\":1"));

    let (ok, _, err) = train(dir, &[], Some("lots"));
    assert!(!ok && err.contains("FERROTUNE_AVAILABLE_MEMORY_MIB") && err.contains("`lots`") && !err.contains("panicked"), "{err}");
}

#[test]
fn the_weights_term_is_what_loading_stores() {
    use ferrotune::models::load::{load_model_with, LoadOptions};
    use ferrotune::train::memory::Footprint;
    let d = tempfile::tempdir().unwrap();
    let spec = TinySpec { tied: false, ..TinySpec::default() };
    write_tiny_hf(&d.path().join("hf"), &spec);
    write_tiny_gguf(&d.path().join("q.gguf"), &spec, ferrotune::formats::gguf::GgmlType::Q8_0);
    for base in ["hf", "q.gguf"] {
        for opts in [LoadOptions::f32(), LoadOptions { keep_quantized: true, bf16: false }, LoadOptions { keep_quantized: true, bf16: true }] {
            let path = d.path().join(base);
            let fp = Footprint::of_model(&path, &opts).unwrap();
            let m = load_model_with(&path, &opts).unwrap();
            assert_eq!(fp.frozen, m.frozen_bytes() as u64, "{base} {opts:?}");
        }
    }
}
