//! Parity with Hugging Face PEFT 0.21 for the methods PEFT has (DoRA, …) on the real
//! SmolLM2-135M-Instruct, from the references in `tests/fixtures/peft-reference/methods/`
//! (copied from the shared `bench/peers/reference/methods/`). Each run starts from the adapter
//! PEFT started from, trains 5 AdamW steps on the reference text through the real trainer, and
//! must give PEFT's losses and eval losses to 1e-4 relative. Runs when the GGUF is present
//! (`.ci/run` fetches it); otherwise prints why it is skipped.

mod common;

use ferrotune::config::TrainConfig;
use ferrotune::train::{train, TrainOptions};
use serde_json::Value;
use std::path::{Path, PathBuf};


fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft-reference/methods")
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

fn reference(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(format!("{name}.json"))).unwrap()).unwrap()
}

/// Trains `adapter` from `init` as the reference `<name>.json` describes; checks losses and
/// eval losses against `results` (a node of it). `extra` adds plan lines.
fn check_against_reference(name: &str, results: &Value, adapter: &str, init: &Path, extra: &str) {
    let Some(gguf) = common::smollm2_gguf() else {
        common::skipped("method_references", "SmolLM2 GGUF not found (set FERROTUNE_SMOLLM2_GGUF or run .ci/run / the quickstart to fetch it)");
        return;
    };
    let reference = reference(name);
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
        lr = if reference["optimizer"]["lr"].is_null() { &reference["trainer"]["learning_rate"] } else { &reference["optimizer"]["lr"] },
        out = dir.path().join("out"),
    );
    std::fs::write(dir.path().join("run.toml"), cfg).unwrap();
    let plan = TrainConfig::load(&dir.path().join("run.toml"), &[]).unwrap();
    let summary = train(&plan, &TrainOptions::default()).unwrap();
    let metrics = std::fs::read_to_string(dir.path().join("out/metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics.lines().filter_map(|l| serde_json::from_str::<Value>(l).unwrap()["loss"].as_f64()).collect();
    let want: Vec<f64> = results["losses"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let worst = losses.iter().zip(&want).map(|(a, b)| rel(*a, *b)).fold(0.0, f64::max);
    eprintln!("{name}: losses {losses:?}\nreference {want:?}\nmax relative difference {worst:.2e}");
    assert_eq!(losses.len(), want.len());
    assert!(worst < 1e-4, "{name}: losses differ from PEFT's by {worst:.2e} (relative)");
    let (before, after) = (summary.eval_before.unwrap(), summary.eval_after.unwrap());
    let (wb, wa) = (results["eval_loss_before"].as_f64().unwrap(), results["eval_loss_after"].as_f64().unwrap());
    eprintln!("{name}: eval loss before {before} (ref {wb}), after {after} (ref {wa})");
    assert!(rel(before, wb) < 1e-4 && rel(after, wa) < 1e-4, "{name}: eval losses differ");
}

/// TRL's `SFTTrainer(loss_type = "dft")` from the plain LoRA PEFT started from.
#[test]
fn dft_training_matches_trl_reference() {
    check_against_reference("dft", &reference("dft")["results"], "lora", &fixtures().join("lora_r4_init"), "objective = \"dft\"");
}

#[test]
fn dora_training_matches_peft_reference() {
    check_against_reference("dora", &reference("dora")["results"], "dora", &fixtures().join("dora/init"), "");
}

/// PEFT's CorDA init adapter as a ferrotune native CorDA folder: the adapter is also the initial
/// `A0`, `B0`, so loading rebuilds PEFT's residual `W − s·B0·A0` from the base.
fn native_corda_init(peft_init: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(peft_init.join("adapter_config.json")).unwrap()).unwrap();
    cfg["init_lora_weights"] = true.into();
    cfg["ferrotune_method"] = "corda".into();
    cfg["ferrotune_residual"] = true.into();
    std::fs::write(to.join("adapter_config.json"), cfg.to_string()).unwrap();
    let t = ferrotune::formats::safetensors::load_f32(&peft_init.join("adapter_model.safetensors")).unwrap();
    let mut all: Vec<(String, candle_core::Tensor)> = Vec::new();
    for (k, v) in &t {
        all.push((k.clone(), v.clone()));
        all.push((k.replace(".lora_A.weight", ".lora_A0.weight").replace(".lora_B.weight", ".lora_B0.weight"), v.clone()));
    }
    ferrotune::formats::safetensors::save(&to.join("adapter_model.safetensors"), &all, ferrotune::formats::safetensors::SaveDType::F32, None).unwrap();
}

#[test]
fn corda_training_matches_peft_reference() {
    let r = reference("corda");
    for mode in ["ipm", "kpm"] {
        let d = tempfile::tempdir().unwrap();
        native_corda_init(&fixtures().join(format!("corda/{mode}/init")), d.path());
        check_against_reference("corda", &r["results"]["modes"][mode], "corda", d.path(), &format!("corda_method = \"{mode}\""));
    }
}

/// CorDA's prepare and decomposition from the reference's calibration rows reproduce PEFT's
/// initial update `s·B0·A0` (sign-free, unlike the factors) on the first and last layers.
#[test]
fn corda_init_matches_peft_decomposition() {
    let Some(gguf) = common::smollm2_gguf() else {
        common::skipped("method_references", "SmolLM2 GGUF not found");
        return;
    };
    use ferrotune::methods::{registry, TargetModules};
    let r = reference("corda");
    let calib: Vec<Vec<u32>> = r["results"]["calibration_ids"].as_array().unwrap().iter().map(|row| row.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()).collect();
    let batches: Vec<ferrotune::data::Batch> = calib
        .iter()
        .map(|ids| ferrotune::data::Batch { input_ids: ids.clone(), targets: vec![-100; ids.len()], batch_size: 1, seq_len: ids.len(), n_targets: 0, lengths: vec![ids.len()], ..Default::default() })
        .collect();
    for mode in ["ipm", "kpm"] {
        let mut model = ferrotune::models::load::load_model(&gguf).unwrap();
        let spec = common::method_spec("corda", 4, 8.0, TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]), 0, [("corda_method".to_string(), toml::Value::String(mode.into())), ("init_batches".to_string(), toml::Value::Integer(8))].into_iter().collect());
        let mut m = registry::create(&spec).unwrap();
        assert_eq!(m.init_batches(), 8);
        m.prepare(&mut model, &batches).unwrap();
        m.attach(&mut model).unwrap();
        let ours: std::collections::HashMap<String, (candle_core::Tensor, candle_core::Tensor)> = model
            .linears()
            .filter(|l| l.hook.is_some())
            .map(|l| l.name.clone())
            .zip(m.params().chunks(2).map(|p| (p[0].1.as_detached_tensor(), p[1].1.as_detached_tensor())))
            .collect();
        let theirs = ferrotune::formats::safetensors::load_f32(&fixtures().join(format!("corda/{mode}/init/adapter_model.safetensors"))).unwrap();
        // KPM keeps the smallest directions; q_proj's are at f32 noise level in PEFT's run
        // (S ≈ 1e-4 of 800), so only v_proj's (S ≈ 0.05 of 250) are determined well enough.
        let sites: &[&str] = if mode == "ipm" {
            &["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.29.self_attn.v_proj"]
        } else {
            &["model.layers.0.self_attn.v_proj", "model.layers.29.self_attn.v_proj"]
        };
        for &site in sites {
            let (a, b) = &ours[site];
            let ta = &theirs[&format!("base_model.model.{site}.lora_A.weight")];
            let tb = &theirs[&format!("base_model.model.{site}.lora_B.weight")];
            let d_ours = b.matmul(a).unwrap();
            let d_theirs = tb.matmul(ta).unwrap();
            let norm = |t: &candle_core::Tensor| t.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt() as f64;
            let rel = norm(&(&d_ours - &d_theirs).unwrap()) / norm(&d_theirs);
            eprintln!("corda {mode} {site}: ‖ΔW0 − PEFT's‖/‖PEFT's‖ = {rel:.2e}");
            // PEFT works in f32: its damped covariance inverse is itself off by inv_error ≈ 4e-3
            // (Frobenius, in the reference), and ferrotune's f64 result sits within that.
            let tol = if mode == "ipm" { 1e-2 } else { 5e-2 };
            assert!(rel < tol, "corda {mode} {site}: initial update differs from PEFT's by {rel:.2e}");
        }
    }
}

#[test]
fn eva_training_matches_peft_reference() {
    check_against_reference("eva", &reference("eva")["results"], "eva", &fixtures().join("eva/init"), "");
}

/// EVA's prepare on the reference's calibration batches (2 × 4 rows × 64 tokens, no labels)
/// gives the ranks an exact PCA of the same rows gets under PEFT's budget rule.
#[test]
fn eva_ranks_match_the_exact_pca_rule() {
    let Some(gguf) = common::smollm2_gguf() else {
        common::skipped("method_references", "SmolLM2 GGUF not found");
        return;
    };
    use ferrotune::methods::{registry, TargetModules};
    let r = reference("eva");
    let rows: Vec<Vec<u32>> = r["results"]["calibration_ids"].as_array().unwrap().iter().map(|row| row.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()).collect();
    let batches: Vec<ferrotune::data::Batch> = rows
        .chunks(4)
        .map(|c| {
            let t = c[0].len();
            ferrotune::data::Batch { input_ids: c.concat(), targets: vec![-100; 4 * t], batch_size: 4, seq_len: t, n_targets: 0, lengths: vec![t; 4], ..Default::default() }
        })
        .collect();
    let mut model = ferrotune::models::load::load_model(&gguf).unwrap();
    let opts = [("eva_use_label_mask", toml::Value::Boolean(false)), ("eva_max_passes", toml::Value::Integer(1)), ("init_batches", toml::Value::Integer(2))];
    let spec = common::method_spec("eva", 4, 8.0, TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]), 0, opts.iter().map(|(k, v)| (k.to_string(), v.clone())).collect());
    let mut m = registry::create(&spec).unwrap();
    m.prepare(&mut model, &batches).unwrap();
    m.attach(&mut model).unwrap();
    let ranks: std::collections::BTreeMap<String, u64> =
        m.params().iter().filter(|(k, _)| k.ends_with("lora_A.weight")).map(|(k, v)| (k.trim_start_matches("base_model.model.").trim_end_matches(".lora_A.weight").to_string(), v.dims()[0] as u64)).collect();
    let want = r["results"]["ranks_if_exact_pca_fed_the_same_budget_rule"].as_object().unwrap();
    let differ: Vec<String> = want.iter().filter(|(k, v)| ranks.get(*k).copied() != v.as_u64()).map(|(k, v)| format!("{k}: {:?} vs {v}", ranks.get(k))).collect();
    eprintln!("EVA ranks: {} of {} differ from the exact-PCA rule {differ:?}", differ.len(), want.len());
    assert_eq!(ranks.values().sum::<u64>(), 240, "the budget r × modules");
    assert!(differ.is_empty(), "ranks differ: {differ:?}");
}

/// TRL 1.16's `DPOTrainer` (sigmoid loss, β = 0.1, reference = the adapter switched off,
/// reference log-probabilities precomputed) from the plain LoRA it started from: the pairs
/// tokenize to TRL's ids, and 3 steps give TRL's losses, rewards and log-probabilities.
#[test]
fn dpo_training_matches_trl_reference() {
    let Some(gguf) = common::smollm2_gguf() else {
        common::skipped("method_references", "SmolLM2 GGUF not found");
        return;
    };
    let r = reference("dpo");
    let res = &r["results"];
    let dir = tempfile::tempdir().unwrap();
    let pairs = res["pairs"].as_array().unwrap();
    let lines: Vec<String> = pairs
        .iter()
        .map(|p| serde_json::json!({"prompt": p["prompt_text"], "chosen": p["chosen_text"], "rejected": p["rejected_text"]}).to_string())
        .collect();
    std::fs::write(dir.path().join("pairs.jsonl"), lines.join("\n") + "\n").unwrap();
    // Tokenization: TRL's prompt / chosen / rejected ids.
    let tok = ferrotune::models::load::load_tokenizer(&gguf).unwrap();
    let opts = ferrotune::data::EncodeOptions { sequence_len: 48, ..Default::default() };
    let data = ferrotune::data::load_jsonl_dataset(&dir.path().join("pairs.jsonl"), ferrotune::data::DatasetFormat::Auto, &tok, &opts).unwrap();
    let ids = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<u32>>();
    for (e, p) in data.examples.iter().zip(pairs) {
        let prompt = ids(&p["prompt_ids"]);
        let want_chosen: Vec<u32> = prompt.iter().copied().chain(ids(&p["chosen_ids"])).collect();
        let want_rejected: Vec<u32> = prompt.iter().copied().chain(ids(&p["rejected_ids"])).collect();
        assert_eq!(e.input_ids, want_chosen, "prompt + chosen ids");
        assert_eq!(e.rejected.as_ref().unwrap().input_ids, want_rejected, "prompt + rejected ids");
        assert_eq!(e.labels.iter().take_while(|&&l| l == -100).count(), prompt.len(), "labels start after the prompt");
    }
    let cfg = format!(
        r#"
base_model = {gguf:?}
datasets = [{{ path = "pairs.jsonl" }}]
adapter = "lora"
init_adapter = {init:?}
lora_r = 4
lora_alpha = 8
lora_target_modules = ["q_proj", "v_proj"]
objective = "dpo"
dpo_beta = 0.1
sequence_len = 48
micro_batch_size = 4
max_steps = 3
learning_rate = 1e-4
lr_scheduler = "constant"
weight_decay = 0.0
max_grad_norm = 0.0
shuffle = false
output_dir = {out:?}
threads = 2
"#,
        init = fixtures().join("lora_r4_init"),
        out = dir.path().join("out"),
    );
    std::fs::write(dir.path().join("run.toml"), cfg).unwrap();
    let plan = TrainConfig::load(&dir.path().join("run.toml"), &[]).unwrap();
    train(&plan, &TrainOptions::default()).unwrap();
    let steps: Vec<Value> = std::fs::read_to_string(dir.path().join("out/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &Value| v.get("loss").is_some())
        .collect();
    let want = res["losses"].as_array().unwrap();
    let trl = res["trl_logged_metrics"].as_array().unwrap();
    assert_eq!(steps.len(), want.len());
    for (i, s) in steps.iter().enumerate() {
        let loss = s["loss"].as_f64().unwrap();
        eprintln!("dpo step {}: loss {loss} (TRL {}), rewards/margins {} (TRL {}), grad norm {} (TRL {})", i + 1, want[i], s["rewards/margins"], trl[i]["rewards/margins"][0], s["grad_norm"], res["grad_norm_before_each_step"][i]);
        assert!(rel(loss, want[i].as_f64().unwrap()) < 1e-4, "step {}: loss {loss} vs TRL's {}", i + 1, want[i]);
        for key in ["logps/chosen", "logps/rejected"] {
            let (ours, theirs) = (s[key].as_f64().unwrap(), trl[i][key][0].as_f64().unwrap());
            assert!(rel(ours, theirs) < 1e-4, "step {}: {key} {ours} vs TRL's {theirs}", i + 1);
        }
        for key in ["rewards/chosen", "rewards/rejected", "rewards/margins"] {
            let (ours, theirs) = (s[key].as_f64().unwrap(), trl[i][key][0].as_f64().unwrap());
            // β·(a difference of two ~100-nat sums): 1e-4 absolute is 1e-6 of the sums.
            assert!((ours - theirs).abs() < 1e-4, "step {}: {key} {ours} vs TRL's {theirs}", i + 1);
        }
        assert_eq!(s["rewards/accuracies"].as_f64().unwrap(), trl[i]["rewards/accuracies"][0].as_f64().unwrap());
    }
    assert!(dir.path().join("out/reference_logps.json").exists(), "the reference log-probabilities are kept with the run");
}
