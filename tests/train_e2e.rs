//! The trainer end to end on a tiny model: accumulation equivalence, bit-exact resume,
//! NaN handling, and clear errors for bad input.

mod common;

use common::*;
use ferrotune::config::TrainConfig;
use ferrotune::formats::gguf::GgmlType;
use ferrotune::train::{train, TrainOptions};
use std::path::Path;

fn dataset(dir: &Path) {
    let lines: Vec<String> = (0..12)
        .map(|i| {
            serde_json::json!({
                "prompt": format!("Question {i}: what is {i} plus {}?\n", i * 3),
                "completion": format!("The answer is {}.", i + i * 3),
            })
            .to_string()
        })
        .collect();
    write_lines(&dir.join("train.jsonl"), &lines);
    write_lines(&dir.join("val.jsonl"), &lines[..3]);
}

fn plan(dir: &Path, extra: &str) -> TrainConfig {
    write_tiny_hf(&dir.join("model"), &TinySpec::default());
    plan_for(dir, "model", extra)
}

/// A plan whose base is a tiny GGUF with its projections stored as `ty`.
fn plan_gguf(dir: &Path, ty: GgmlType, extra: &str) -> TrainConfig {
    write_tiny_gguf(&dir.join("m.gguf"), &TinySpec::default(), ty);
    plan_for(dir, "m.gguf", extra)
}

fn plan_for(dir: &Path, base: &str, extra: &str) -> TrainConfig {
    dataset(dir);
    let text = format!(
        r#"
base_model = {base:?}
datasets = [{{ path = "train.jsonl" }}]
val_set = {{ path = "val.jsonl" }}
lora_r = 4
lora_alpha = 8
lora_target_modules = "all-linear"
sequence_len = 48
learning_rate = 1e-2
lr_scheduler = "cosine"
warmup_steps = 1
weight_decay = 0.01
max_grad_norm = 1.0
output_dir = {out:?}
seed = 3
{extra}
"#,
        out = dir.join("out"),
    );
    std::fs::write(dir.join("run.toml"), text).unwrap();
    // Paths in the plan are relative to the config file.
    TrainConfig::load(&dir.join("run.toml"), &[]).unwrap()
}

fn losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64())
        .collect()
}

fn adapter_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("adapter_model.safetensors")).unwrap()
}

fn load_adapter(dir: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    ferrotune::formats::safetensors::load_f32(&dir.join("adapter_model.safetensors")).unwrap()
}

#[test]
fn micro_batches_with_accumulation_give_the_same_update() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let pa = plan(a.path(), "micro_batch_size = 4\ngradient_accumulation_steps = 1\nmax_steps = 3\nshuffle = false");
    let pb = plan(b.path(), "micro_batch_size = 1\ngradient_accumulation_steps = 4\nmax_steps = 3\nshuffle = false");
    let sa = train(&pa, &TrainOptions::default()).unwrap();
    let sb = train(&pb, &TrainOptions::default()).unwrap();
    let (la, lb) = (losses(&pa.output_dir), losses(&pb.output_dir));
    assert_eq!(la.len(), 3);
    for (x, y) in la.iter().zip(&lb) {
        assert!((x - y).abs() < 1e-5 * x.abs(), "step losses differ: {la:?} vs {lb:?}");
    }
    let (ta, tb) = (load_adapter(&sa.adapter_dir), load_adapter(&sb.adapter_dir));
    for (k, t) in &ta {
        let d = (t - &tb[k]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let s = t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d <= 1e-4 * s.max(1e-3), "{k}: adapters differ by {d}");
    }
    assert!(la[2] < la[0], "training should lower the loss: {la:?}");
}

/// Runs two plans and returns their per-step losses, checking both have `steps` of them.
fn two_runs(a: &TrainConfig, b: &TrainConfig, steps: usize) -> (Vec<f64>, Vec<f64>) {
    train(a, &TrainOptions::default()).unwrap();
    train(b, &TrainOptions::default()).unwrap();
    let (la, lb) = (losses(&a.output_dir), losses(&b.output_dir));
    assert_eq!((la.len(), lb.len()), (steps, steps));
    (la, lb)
}

fn max_rel_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs() / x.abs()).fold(0.0, f64::max)
}

#[test]
fn gradient_checkpointing_gives_the_same_run() {
    // Dropout on, so the recomputed forward must redraw exactly the same masks.
    let extra = "micro_batch_size = 2\ngradient_accumulation_steps = 2\nmax_steps = 3\nlora_dropout = 0.1";
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let pa = plan(a.path(), extra);
    let pb = plan(b.path(), &format!("{extra}\ngradient_checkpointing = true"));
    let (la, lb) = two_runs(&pa, &pb, 3);
    eprintln!("checkpointed vs stored activations: largest relative loss difference {:.2e}", max_rel_diff(&la, &lb));
    assert!(max_rel_diff(&la, &lb) < 1e-5, "losses differ: {la:?} vs {lb:?}");
    let (ta, tb) = (load_adapter(&pa.output_dir.join("adapter")), load_adapter(&pb.output_dir.join("adapter")));
    for (k, t) in &ta {
        let d = (t - &tb[k]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let s = t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d <= 1e-4 * s.max(1e-3), "{k}: adapters differ by {d}");
    }
}

/// The bf16 path (base matrices stored in bf16, f32 accumulation, f32 adapter and AdamW)
/// follows the f32 run over 20 steps.
#[test]
fn bf16_base_follows_the_f32_run_over_20_steps() {
    let extra = "micro_batch_size = 2\nmax_steps = 20";
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (la, lb) = two_runs(&plan(a.path(), extra), &plan(b.path(), &format!("{extra}\nbase_dtype = \"bf16\"")), 20);
    let d = max_rel_diff(&la, &lb);
    eprintln!("bf16 vs f32: largest relative loss difference over 20 steps {d:.2e}");
    assert!(d > 0.0 && d < 0.01, "bf16 losses differ from f32 by {d} (relative): {la:?} vs {lb:?}");
    assert!(lb[19] < lb[0], "bf16 training should lower the loss: {lb:?}");
}

/// Training on a quantized GGUF kept in its blocks follows the run on the dequantized model
/// (the same values, products in another summation order) over 20 steps.
#[test]
fn quantized_gguf_base_follows_the_dequantized_run() {
    for ty in [GgmlType::Q8_0, GgmlType::Q4_1] {
        let extra = "micro_batch_size = 2\nmax_steps = 20";
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let pa = plan_gguf(a.path(), ty, &format!("{extra}\nload_quantized = false"));
        let pb = plan_gguf(b.path(), ty, extra);
        let (la, lb) = two_runs(&pa, &pb, 20);
        let d = max_rel_diff(&la, &lb);
        eprintln!("{ty} blocks vs dequantized: largest relative loss difference over 20 steps {d:.2e}");
        assert!(d < 1e-3, "{ty}: losses on blocks differ from the dequantized run by {d}: {la:?} vs {lb:?}");
        assert!(lb[19] < lb[0], "{ty}: training should lower the loss: {lb:?}");
    }
}

/// Packing changes the rows, not the training: steps over all twelve examples packed into
/// shared rows give the losses and the update of the same steps one example per row (with
/// positions and attention restarting per example; without that they would differ).
#[test]
fn sample_packing_gives_the_unpacked_update() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let extra = "lora_dropout = 0.0\nmax_steps = 3\nshuffle = false";
    plan(a.path(), extra);
    plan(b.path(), &format!("{extra}\nsample_packing = true"));
    let load = |dir: &Path, sets: &[String]| TrainConfig::load(&dir.join("run.toml"), sets).unwrap();
    let seq = "sequence_len=128".to_string();
    let packed = load(b.path(), std::slice::from_ref(&seq));
    let tok = ferrotune::data::TextTokenizer::from_hf_dir(&b.path().join("model")).unwrap();
    let stats = ferrotune::train::dataset::prepare(&packed, &tok).unwrap().packing.expect("packing stats");
    assert_eq!(stats.examples, 12);
    assert!(stats.rows > 1 && stats.rows <= 6, "twelve short examples should share rows of 128: {stats:?}");
    // One step = every example: all twelve in one micro-batch, or all the packed rows.
    let pa = load(a.path(), &[seq.clone(), "micro_batch_size=12".into()]);
    let pb = load(b.path(), &[seq, format!("micro_batch_size={}", stats.rows)]);
    let (la, lb) = two_runs(&pa, &pb, 3);
    assert!(max_rel_diff(&la, &lb) < 1e-5, "packed losses differ from unpacked: {la:?} vs {lb:?}");
    assert!(la[2] < la[0], "training should lower the loss (the first step warms up at learning rate 0): {la:?}");
    let (ta, tb) = (load_adapter(&pa.output_dir.join("adapter")), load_adapter(&pb.output_dir.join("adapter")));
    for (k, t) in &ta {
        let d = (t - &tb[k]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let s = t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d <= 1e-4 * s.max(1e-3), "{k}: adapters differ by {d}");
    }
    let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(pb.output_dir.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["resolved"]["packed_rows"], stats.rows);
    assert_eq!(run["resolved"]["train_examples"], 12);

    // Objectives that need one example per row refuse packing, naming the key.
    let err = TrainConfig::load(&b.path().join("run.toml"), &["objective=\"ift\"".into()]).err().expect("ift with packing is refused").to_string();
    assert!(err.contains("sample_packing") && err.contains("ift"), "{err}");
}

#[test]
fn resume_continues_bit_for_bit() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let extra = "micro_batch_size = 2\ngradient_accumulation_steps = 2\nmax_steps = 6\nsave_steps = 3\nlora_dropout = 0.1";
    let pa = plan(a.path(), extra);
    let pb = plan(b.path(), extra);
    let full = train(&pa, &TrainOptions::default()).unwrap();

    // Simulate a run killed after its step-3 checkpoint: keep only that checkpoint.
    train(&pb, &TrainOptions::default()).unwrap();
    std::fs::remove_dir_all(pb.output_dir.join("checkpoints/step-6")).unwrap();
    std::fs::remove_dir_all(pb.output_dir.join("adapter")).unwrap();
    let resumed = train(&pb, &TrainOptions { resume: true, ..Default::default() }).unwrap();

    assert_eq!(losses(&pa.output_dir), losses(&pb.output_dir), "the resumed trajectory must equal the uninterrupted one");
    assert_eq!(adapter_bytes(&full.adapter_dir), adapter_bytes(&resumed.adapter_dir));
}

#[test]
fn nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint() {
    let a = tempfile::tempdir().unwrap();
    plan(a.path(), "micro_batch_size = 2\nmax_steps = 50\nsave_steps = 1");
    let sets: Vec<String> = ["max_grad_norm=0", "learning_rate=1e30", "lr_scheduler=constant", "warmup_steps=0"].map(String::from).to_vec();
    let p = TrainConfig::load(&a.path().join("run.toml"), &sets).unwrap();
    let err = train(&p, &TrainOptions::default()).err().expect("an absurd learning rate must end in a NaN/inf loss").to_string();
    assert!(err.contains("step ") && (err.contains("NaN") || err.contains("inf")), "{err}");
    let last = ferrotune::train::checkpoint::latest(&p.output_dir).expect("a checkpoint before the NaN");
    // The kept checkpoint loads as an adapter.
    let mut m = ferrotune::models::load::load_model(&a.path().join("model")).unwrap();
    ferrotune::methods::Lora::load_peft(&mut m, &last).unwrap();
}

#[test]
fn bad_input_gives_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let p = plan(d.path(), "max_steps = 1");

    // Unknown config key.
    std::fs::write(d.path().join("bad.toml"), std::fs::read_to_string(d.path().join("run.toml")).unwrap() + "\nlora_rank = 4\n").unwrap();
    let e = TrainConfig::load(&d.path().join("bad.toml"), &[]).err().unwrap().to_string();
    assert!(e.contains("lora_rank"), "{e}");
    let e = TrainConfig::load(&d.path().join("run.toml"), &["lr_scheduler=wavy".into()]).err().unwrap().to_string();
    assert!(e.contains("lr_scheduler") && e.contains("wavy"), "{e}");

    // Malformed JSONL line: the file and line are named.
    std::fs::write(d.path().join("train.jsonl"), "{\"text\": \"fine\"}\n{\"text\": oops}\n").unwrap();
    let e = train(&p, &TrainOptions::default()).err().unwrap().to_string();
    assert!(e.contains("train.jsonl:2"), "{e}");

    // A record without the field its format needs.
    std::fs::write(d.path().join("train.jsonl"), "{\"prompt\": \"hi\"}\n").unwrap();
    let e = TrainConfig::load(&d.path().join("run.toml"), &["datasets=[{path=\"train.jsonl\", type=\"completion\"}]".into()])
        .and_then(|p| train(&p, &TrainOptions::default()).map(|_| ()))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("train.jsonl:1") && e.contains("completion"), "{e}");

    // A target module that matches nothing.
    dataset(d.path());
    let p2 = TrainConfig::load(&d.path().join("run.toml"), &["lora_target_modules=[\"q_prj\"]".into()]).unwrap();
    let e = train(&p2, &TrainOptions::default()).err().unwrap().to_string();
    assert!(e.contains("q_prj"), "{e}");

    // Missing and garbled model files.
    let e = ferrotune::models::load::load_model(&d.path().join("nope.gguf")).err().unwrap().to_string();
    assert!(e.contains("nope.gguf"), "{e}");
    std::fs::write(d.path().join("junk.gguf"), b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let e = ferrotune::models::load::load_model(&d.path().join("junk.gguf")).err().unwrap().to_string();
    assert!(e.contains("junk.gguf"), "{e}");
    std::fs::write(d.path().join("model/model.safetensors"), b"not safetensors at all").unwrap();
    let e = ferrotune::models::load::load_model(&d.path().join("model")).err().unwrap().to_string();
    assert!(e.contains("model.safetensors"), "{e}");
}
