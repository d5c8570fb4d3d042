//! Training objectives (`objective = …`): each one's defining property on a tiny model.

mod common;

use candle_core::{Tensor, Var};
use common::*;
use ferrotune::data::{make_batch, Batch, EncodedExample};
use ferrotune::methods::TargetModules;
use ferrotune::models::Llama;
use ferrotune::objectives::{self, Objective, ObjectiveSpec};
use ferrotune::train::grads::{step_gradients, StepGradients, StepPlan};

fn model_with_lora(dir: &std::path::Path) -> (Llama, Vec<Var>) {
    tiny_with_lora(dir, TargetModules::Names(vec!["q_proj".into(), "down_proj".into()]))
}

fn batch(seqs: &[(Vec<u32>, usize)]) -> Batch {
    // (ids, prompt length): labels on the completion only.
    let ex: Vec<EncodedExample> = seqs
        .iter()
        .map(|(ids, p)| EncodedExample { input_ids: ids.clone(), labels: ids.iter().enumerate().map(|(i, &t)| if i < *p { -100 } else { t as i32 }).collect(), truncated: false, targets_cut: 0, rejected: None, reference_logp: None, packed: Vec::new() })
        .collect();
    make_batch(&ex.iter().collect::<Vec<_>>(), 0)
}

fn objective(name: &str, options: &[(&str, f64)]) -> Box<dyn Objective> {
    let options = options.iter().map(|(k, v)| (k.to_string(), toml::Value::Float(*v))).collect();
    objectives::create(&ObjectiveSpec { name: name.into(), options }).unwrap()
}

fn grads(m: &Llama, params: &[Var], b: &Batch, o: &dyn Objective, checkpointing: bool) -> StepGradients {
    step_gradients(m, params, std::slice::from_ref(b), o.units(b), &StepPlan { seed: 1, step: 0, total_steps: 10, checkpointing }, o).unwrap()
}

fn max_rel(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    let scale = a.iter().flatten().fold(0f32, |s, x| s.max(x.abs())) as f64;
    let diff = a.iter().flatten().zip(b.iter().flatten()).fold(0f32, |s, (x, y)| s.max((x - y).abs())) as f64;
    diff / scale.max(1e-30)
}

/// DFT's gradient is `p·∇ℓ` (the weight is detached): with one target token, exactly `p` times
/// SFT's gradient, where a gradient through the weight would give `p·(1 − ℓ)` times it.
#[test]
fn dft_gradient_is_the_probability_times_the_nll_gradient() {
    let d = tempfile::tempdir().unwrap();
    let (m, params) = model_with_lora(d.path());
    perturb(&params, 1);
    let ids = ids(64, 9, 4);
    let b = batch(&[(ids, 8)]);
    assert_eq!(b.n_targets, 1);
    let sft = grads(&m, &params, &b, objective("sft", &[]).as_ref(), false);
    let dft = grads(&m, &params, &b, objective("dft", &[]).as_ref(), false);
    let p = (-sft.loss).exp();
    assert!((dft.loss - p * sft.loss).abs() < 1e-6, "DFT loss {} vs p·ℓ {}", dft.loss, p * sft.loss);
    assert!((dft.metrics["nll"] - sft.loss).abs() < 1e-6, "DFT logs the plain NLL");
    let scaled: Vec<Vec<f32>> = sft.grads.iter().map(|g| g.iter().map(|x| x * p as f32).collect()).collect();
    assert!(max_rel(&dft.grads, &scaled) < 1e-5, "DFT gradient vs p·∇ℓ: {}", max_rel(&dft.grads, &scaled));
    assert!(sft.loss > 0.5, "the check needs ℓ away from 1 (ℓ = {})", sft.loss);
}

/// ASFT with λ = 0 is DFT; its KL is 0 where the model is still the reference (a fresh LoRA),
/// and positive once the adapter moved.
#[test]
fn asft_is_dft_plus_a_divergence_that_starts_at_zero() {
    let d = tempfile::tempdir().unwrap();
    let (m, params) = model_with_lora(d.path());
    let b = batch(&[(ids(64, 12, 5), 4), (ids(64, 8, 6), 3)]);
    let fresh = grads(&m, &params, &b, objective("asft", &[]).as_ref(), false);
    assert_eq!(fresh.metrics["kl"], 0.0, "a fresh adapter is the reference model");
    perturb(&params, 2);
    let dft = grads(&m, &params, &b, objective("dft", &[]).as_ref(), false);
    let asft0 = grads(&m, &params, &b, objective("asft", &[("asft_lambda", 0.0)]).as_ref(), false);
    assert!((asft0.loss - dft.loss).abs() < 1e-7 && max_rel(&asft0.grads, &dft.grads) < 1e-6, "λ = 0 must be DFT");
    assert!(asft0.metrics["kl"] > 1e-4, "a moved adapter diverges from the reference");
    let lambda = 0.5;
    let asft = grads(&m, &params, &b, objective("asft", &[("asft_lambda", lambda)]).as_ref(), false);
    assert!((asft.loss - (dft.loss + lambda * asft.metrics["kl"])).abs() < 1e-6);
    // The KL's own gradient, (∇ASFT − ∇DFT)/λ, against finite differences of the logged KL.
    let kl_at = |v: &Var, base: &[f32], i: usize, delta: f32| {
        let mut w = base.to_vec();
        w[i] += delta;
        v.set(&Tensor::from_vec(w, v.shape(), v.device()).unwrap()).unwrap();
        grads(&m, &params, &b, objective("asft", &[("asft_lambda", lambda)]).as_ref(), false).metrics["kl"]
    };
    for (pi, v) in params.iter().enumerate().take(2) {
        let base: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for i in [0, base.len() / 2] {
            let h = 1e-2;
            let fd = (kl_at(v, &base, i, h) - kl_at(v, &base, i, -h)) / (2.0 * h as f64);
            v.set(&Tensor::from_vec(base.clone(), v.shape(), v.device()).unwrap()).unwrap();
            let g = (asft.grads[pi][i] - dft.grads[pi][i]) as f64 / lambda;
            assert!((fd - g).abs() < 2e-2 * (1.0 + fd.abs()), "param {pi}[{i}]: KL gradient {g} vs finite difference {fd}");
        }
    }
    // Per-block checkpointing computes the same step.
    let ckpt = grads(&m, &params, &b, objective("asft", &[("asft_lambda", lambda)]).as_ref(), true);
    assert!((ckpt.loss - asft.loss).abs() < 1e-6 && max_rel(&ckpt.grads, &asft.grads) < 1e-5, "checkpointing changes ASFT's step");
}

#[test]
fn objectives_and_their_keys_are_checked_by_name() {
    let err = |name: &str, options: &[(&str, f64)]| {
        let options = options.iter().map(|(k, v)| (k.to_string(), toml::Value::Float(*v))).collect();
        objectives::create(&ObjectiveSpec { name: name.into(), options }).err().expect("refused").to_string()
    };
    assert!(err("ppo", &[]).contains("known: sft, dft, asft"));
    assert!(err("dft", &[("asft_lambda", 0.1)]).contains("applies to objective = asft"));
    assert!(err("asft", &[("asft_lambda", -1.0)]).contains("asft_lambda"));
}

/// Through the trainer: the run records its objective, and its metrics carry the objective's
/// own quantities.
#[test]
fn an_asft_run_logs_its_divergence_and_records_the_objective() {
    let d = tempfile::tempdir().unwrap();
    let p = common::contract::Promise { adapter: "lora", extra: "objective = \"asft\"\nasft_lambda = 0.2", mergeable: true, peft: true, gguf_lora: true, identity_at_init: true };
    let cfg = common::contract::plan(d.path(), &p, 3);
    let s = ferrotune::train::train(&cfg, &Default::default()).unwrap();
    assert!(s.eval_after.unwrap().is_finite());
    let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.path().join("out/run.json")).unwrap()).unwrap();
    assert_eq!(run["resolved"]["objective"], serde_json::json!({"name": "asft", "asft_lambda": 0.2}));
    let steps: Vec<serde_json::Value> = std::fs::read_to_string(d.path().join("out/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("loss").is_some())
        .collect();
    assert_eq!(steps.len(), 3);
    assert_eq!(steps[0]["kl"], 0.0, "the first step starts at the reference");
    assert!(steps[2]["kl"].as_f64().unwrap() > 0.0 && steps[2]["nll"].as_f64().unwrap() > 0.0);
}

/// A pair batch: chosen rows first, then rejected, with reference log-probabilities from the
/// reference pass, as the trainer builds it.
fn pair_batch(m: &Llama, pairs: &[(Vec<u32>, Vec<u32>, Vec<u32>)]) -> Batch {
    let mut ex: Vec<EncodedExample> = pairs
        .iter()
        .map(|(p, c, r)| {
            let seq = |resp: &[u32]| {
                let ids: Vec<u32> = p.iter().chain(resp).copied().collect();
                let labels = ids.iter().enumerate().map(|(i, &t)| if i < p.len() { -100 } else { t as i32 }).collect();
                EncodedExample { input_ids: ids, labels, truncated: false, targets_cut: 0, rejected: None, reference_logp: None, packed: Vec::new() }
            };
            EncodedExample { rejected: Some(Box::new(seq(r))), ..seq(c) }
        })
        .collect();
    let n = ex.len();
    objectives::dpo::compute_reference_logps(m, &mut ex, n, 0, |_, _| {}).unwrap();
    make_batch(&ex.iter().collect::<Vec<_>>(), 0)
}

/// DPO with chosen = rejected: loss ln 2 and no gradient, whatever the adapter.
#[test]
fn dpo_with_identical_responses_is_ln2_without_gradient() {
    let d = tempfile::tempdir().unwrap();
    let (m, params) = model_with_lora(d.path());
    perturb(&params, 3);
    let (p, c) = (ids(64, 5, 7), ids(64, 6, 8));
    let b = pair_batch(&m, &[(p.clone(), c.clone(), c.clone()), (ids(64, 4, 9), ids(64, 3, 10), ids(64, 3, 10))]);
    assert_eq!((b.pairs, b.batch_size), (2, 4));
    let g = grads(&m, &params, &b, objective("dpo", &[]).as_ref(), false);
    assert!((g.loss - std::f64::consts::LN_2).abs() < 1e-6, "loss {}", g.loss);
    let largest = g.grads.iter().flatten().fold(0f32, |a, x| a.max(x.abs()));
    assert!(largest < 1e-6, "largest gradient entry {largest}");
    assert_eq!(g.metrics["rewards/accuracies"], 0.0);
}

/// DPO's gradient against finite differences of its loss, with label smoothing; one batch of
/// two pairs equals two micro-batches of one (the loss is a mean over pairs).
#[test]
fn dpo_gradient_matches_finite_differences_and_averages_over_pairs() {
    let d = tempfile::tempdir().unwrap();
    let (m, params) = model_with_lora(d.path());
    let pairs = [(ids(64, 6, 11), ids(64, 5, 12), ids(64, 7, 13)), (ids(64, 4, 14), ids(64, 6, 15), ids(64, 3, 16))];
    let b = pair_batch(&m, &pairs);
    perturb(&params, 4);
    let o = objective("dpo", &[("dpo_beta", 0.5), ("dpo_label_smoothing", 0.1)]);
    let full = grads(&m, &params, &b, o.as_ref(), false);
    let loss_at = || grads(&m, &params, &b, o.as_ref(), false).loss;
    for (pi, v) in params.iter().enumerate().take(2) {
        let base: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for i in [1, base.len() - 2] {
            let at = |delta: f32| {
                let mut w = base.clone();
                w[i] += delta;
                v.set(&Tensor::from_vec(w, v.shape(), v.device()).unwrap()).unwrap();
                loss_at()
            };
            let h = 1e-2;
            let fd = (at(h) - at(-h)) / (2.0 * h as f64);
            v.set(&Tensor::from_vec(base.clone(), v.shape(), v.device()).unwrap()).unwrap();
            let g = full.grads[pi][i] as f64;
            assert!((fd - g).abs() < 2e-2 * (1.0 + fd.abs()) && (fd - g).abs() < 1e-3 + 0.05 * fd.abs(), "param {pi}[{i}]: {g} vs finite difference {fd}");
        }
    }
    // Micro-batches of one pair each, averaged over the step's two pairs.
    let singles: Vec<Batch> = pairs.iter().map(|p| pair_batch(&m, std::slice::from_ref(p))).collect();
    // (Reference log-probabilities come from the reference pass, which the adapter does not touch.)
    let split = step_gradients(&m, &params, &singles, 2, &StepPlan { seed: 1, step: 0, total_steps: 10, checkpointing: false }, o.as_ref()).unwrap();
    // (To f32 rounding: batches of different sizes may take different, equally exact product
    // paths, the dot-product one of decoding below 33 rows.)
    assert!((split.loss - full.loss).abs() < 1e-5 && max_rel(&split.grads, &full.grads) < 1e-5, "micro-batching changes the DPO step: loss {} vs {}, gradients {}", split.loss, full.loss, max_rel(&split.grads, &full.grads));
    assert!((split.metrics["rewards/margins"] - full.metrics["rewards/margins"]).abs() < 1e-5);
}

fn write_pairs(path: &std::path::Path, n: usize, offset: usize) {
    let lines: Vec<String> = (offset..offset + n)
        .map(|i| serde_json::json!({"prompt": format!("Q{i}: is {i} even?"), "chosen": format!(" {}", if i % 2 == 0 { "yes" } else { "no" }), "rejected": format!(" {}", if i % 2 == 0 { "no" } else { "yes" })}).to_string())
        .collect();
    write_lines(path, &lines);
}

fn dpo_plan(dir: &std::path::Path, out: &str, steps: usize) -> ferrotune::config::TrainConfig {
    let text = format!(
        r#"
base_model = "model"
datasets = [{{ path = "pairs.jsonl" }}]
val_set = {{ path = "val_pairs.jsonl" }}
adapter = "lora"
lora_r = 4
lora_alpha = 8
lora_target_modules = "all-linear"
objective = "dpo"
dpo_beta = 0.2
sequence_len = 32
micro_batch_size = 2
gradient_accumulation_steps = 2
max_steps = {steps}
save_steps = 2
learning_rate = 1e-2
lr_scheduler = "constant"
output_dir = {out:?}
seed = 5
"#,
        out = dir.join(out),
    );
    std::fs::write(dir.join(format!("{out}.toml")), text).unwrap();
    ferrotune::config::TrainConfig::load(&dir.join(format!("{out}.toml")), &[]).unwrap()
}

/// Through the trainer: a DPO run on pairs logs TRL's metrics, scores its validation pairs by
/// the DPO loss, keeps the reference log-probabilities with the run, and resumes bit for bit.
#[test]
fn a_dpo_run_trains_on_pairs_and_resumes_exactly() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    write_tiny_hf(&dir.join("model"), &TinySpec::default());
    write_pairs(&dir.join("pairs.jsonl"), 8, 0);
    write_pairs(&dir.join("val_pairs.jsonl"), 2, 100);
    let s = ferrotune::train::train(&dpo_plan(dir, "full", 4), &Default::default()).unwrap();
    // Before training the policy is the reference: the DPO loss is ln 2.
    assert!((s.eval_before.unwrap() - std::f64::consts::LN_2).abs() < 1e-6, "eval before {:?}", s.eval_before);
    assert!(s.eval_after.unwrap() < s.eval_before.unwrap(), "DPO did not lower its loss on the held-out pairs: {:?} → {:?}", s.eval_before, s.eval_after);
    let steps: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("full/metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).filter(|v: &serde_json::Value| v.get("loss").is_some()).collect();
    for key in ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"] {
        assert!(steps[3][key].is_number(), "metrics lack {key}");
    }
    assert!((steps[0]["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6);
    assert!(dir.join("full/reference_logps.json").exists());
    // Two steps, then --resume to four: the same adapter, byte for byte.
    ferrotune::train::train(&dpo_plan(dir, "part", 2), &Default::default()).unwrap();
    // A damaged cache is recomputed, not trusted (nor fatal): the result is unchanged.
    std::fs::write(dir.join("part/reference_logps.json"), "{\"data_fingerprint\": \"x\", \"train\": [[1e9").unwrap();
    let resumed = ferrotune::train::train(&dpo_plan(dir, "part", 4), &ferrotune::train::TrainOptions { resume: true, ..Default::default() }).unwrap();
    assert_eq!(resumed.steps, 4);
    let bytes = |run: &str| std::fs::read(dir.join(run).join("adapter/adapter_model.safetensors")).unwrap();
    assert!(bytes("full") == bytes("part"), "a resumed DPO run differs from an uninterrupted one");
    // `eval --objective dpo` scores the adapter against the model with it switched off; its last
    // line is the JSON summary, and the training's own final evaluation agrees with it.
    let eval = |adapter: Option<&str>| -> serde_json::Value {
        let mut args = vec!["eval", "--model", "model", "--data", "val_pairs.jsonl", "--objective", "dpo", "--dpo-beta", "0.2", "--sequence-len", "32"];
        if let Some(a) = adapter {
            args.extend(["--adapter", a]);
        }
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferrotune")).args(&args).current_dir(dir).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap()
    };
    let base = eval(None);
    assert_eq!(base["pairs"], 2);
    assert!((base["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6, "{base}");
    let tuned = eval(Some("full/adapter"));
    assert!((tuned["loss"].as_f64().unwrap() - s.eval_after.unwrap()).abs() < 1e-4, "{tuned} vs the run's {:?}", s.eval_after);
    assert!(tuned["reward_accuracy"].is_number() && tuned["reward_margin"].is_number());
}

/// Pairs train only with DPO, and DPO only on pairs, each refused naming the key.
#[test]
fn pairs_and_objectives_must_agree() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    write_tiny_hf(&dir.join("model"), &TinySpec::default());
    write_pairs(&dir.join("pairs.jsonl"), 4, 0);
    write_pairs(&dir.join("val_pairs.jsonl"), 2, 100);
    let mut cfg = dpo_plan(dir, "x", 1);
    cfg.objective = "sft".into();
    cfg.objective_options.clear();
    let err = ferrotune::train::train(&cfg, &Default::default()).unwrap_err().to_string();
    assert!(err.contains("objective = \"dpo\"") && err.contains("datasets"), "{err}");
    write_lines(&dir.join("pairs.jsonl"), &[serde_json::json!({"prompt": "a", "completion": "b"}).to_string()]);
    let err = ferrotune::train::train(&dpo_plan(dir, "y", 1), &Default::default()).unwrap_err().to_string();
    assert!(err.contains("preference pairs") && err.contains("datasets"), "{err}");
    // A pair with a missing or mistyped side names the line and the field.
    write_lines(&dir.join("bad.jsonl"), &[serde_json::json!({"prompt": "a", "chosen": "b", "rejected": 3}).to_string()]);
    let tok = ferrotune::models::load::load_tokenizer(&dir.join("model")).unwrap();
    let err = ferrotune::data::load_jsonl_dataset(&dir.join("bad.jsonl"), ferrotune::data::DatasetFormat::Auto, &tok, &Default::default()).unwrap_err().to_string();
    assert!(err.contains("bad.jsonl:1:") && err.contains("`rejected`"), "{err}");
}

/// Chat-message pairs: the prompt is rendered with the generation prompt, the responses are
/// what the template adds after it (end-of-turn marker included), and only they are targets.
#[test]
fn chat_pairs_split_at_the_generation_prompt() {
    let d = tempfile::tempdir().unwrap();
    write_tiny_hf(d.path(), &TinySpec::default());
    let tok = ferrotune::models::load::load_tokenizer(d.path()).unwrap();
    let msg = |role: &str, content: &str| serde_json::json!({"role": role, "content": content});
    let rec = serde_json::json!({"prompt": [msg("user", "Hi?")], "chosen": [msg("assistant", "Hello.")], "rejected": [msg("assistant", "Go away.")]});
    write_lines(&d.path().join("chat.jsonl"), &[rec.to_string()]);
    let data = ferrotune::data::load_jsonl_dataset(&d.path().join("chat.jsonl"), ferrotune::data::DatasetFormat::Auto, &tok, &Default::default()).unwrap();
    let e = &data.examples[0];
    let template = tok.chat_template().unwrap();
    let prompt = tok.encode(&template.render(&[ferrotune::data::Message::new("user", "Hi?")], true).unwrap(), false).unwrap();
    let prompt_len = e.labels.iter().take_while(|&&l| l == -100).count();
    assert_eq!(&e.input_ids[..prompt_len], &prompt[..], "the prompt is the rendered prompt with the generation prompt");
    let response = tok.decode(&e.input_ids[prompt_len..], false).unwrap();
    assert!(response.starts_with("Hello.") && response.contains("<|im_end|>"), "chosen response {response:?}");
    let rejected = e.rejected.as_ref().unwrap();
    assert_eq!(&rejected.input_ids[..prompt_len], &prompt[..]);
    assert!(tok.decode(&rejected.input_ids[prompt_len..], false).unwrap().starts_with("Go away."));
}

/// Masked Thought masks response tokens only, at its (ramped) rate, with the mean embedding,
/// and leaves the labels alone; at rate 0 it is SFT.
#[test]
fn masked_thought_masks_response_tokens_at_its_rate() {
    use objectives::masked_thought::{mask_positions, MaskedThought};
    let seqs: Vec<(Vec<u32>, usize)> = (0..8).map(|i| (ids(64, 200, 30 + i), 20 + i as usize)).collect();
    let b = batch(&seqs);
    let t = b.seq_len;
    let eligible = (0..b.input_ids.len()).filter(|&i| i % t != 0 && b.targets[i - 1] != -100).count();
    for p in [0.1, 0.25, 0.4] {
        let masked = mask_positions(&b, p, 77);
        assert!(masked.iter().all(|&i| i % t != 0 && b.targets[i - 1] != -100), "a prompt token was masked");
        let sigma = (p * (1.0 - p) / eligible as f64).sqrt();
        let rate = masked.len() as f64 / eligible as f64;
        assert!((rate - p).abs() < 3.0 * sigma, "rate {rate} for p = {p} (σ = {sigma})");
        assert_eq!(masked, mask_positions(&b, p, 77), "the same seed masks the same tokens");
    }
    let mft = MaskedThought::new(0.4, 0.66);
    assert_eq!((mft.rate(0, 100), mft.rate(66, 100), mft.rate(90, 100)), (0.0, 0.4, 0.4));
    assert!((mft.rate(33, 100) - 0.2).abs() < 1e-12);
    // The trained pass reads the mean embedding at masked positions and the tokens' elsewhere.
    let d = tempfile::tempdir().unwrap();
    let (m, params) = model_with_lora(d.path());
    let small = batch(&[(ids(64, 30, 3), 6), (ids(64, 24, 4), 10)]);
    let at = objectives::StepInfo { step: 50, total_steps: 100, seed: 9 };
    let x: Vec<f32> = mft.input_embeddings(&m, &small, &at).unwrap().unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let plain: Vec<f32> = m.embed_ids(&small.input_ids, small.batch_size, small.seq_len).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let mean = m.mean_embedding();
    let h = mean.len();
    let masked = mask_positions(&small, mft.rate(50, 100), 9);
    assert!(!masked.is_empty());
    for i in 0..small.input_ids.len() {
        let row = &x[i * h..(i + 1) * h];
        assert_eq!(row, if masked.contains(&i) { &mean[..] } else { &plain[i * h..(i + 1) * h] }, "position {i}");
    }
    // Rate 0 (the first step) is SFT exactly; later the corrupted prefix changes the loss.
    let o = objective("masked_thought", &[]);
    let first = step_gradients(&m, &params, std::slice::from_ref(&small), small.n_targets, &StepPlan { seed: 9, step: 0, total_steps: 100, checkpointing: false }, o.as_ref()).unwrap();
    let sft = step_gradients(&m, &params, std::slice::from_ref(&small), small.n_targets, &StepPlan { seed: 9, step: 0, total_steps: 100, checkpointing: false }, objective("sft", &[]).as_ref()).unwrap();
    assert_eq!((first.loss, &first.grads), (sft.loss, &sft.grads));
    let later = step_gradients(&m, &params, std::slice::from_ref(&small), small.n_targets, &StepPlan { seed: 9, step: 80, total_steps: 100, checkpointing: false }, o.as_ref()).unwrap();
    assert!(later.loss != sft.loss);
}

/// IFT with γ = 0 and λ = 0 is SFT averaged per sequence.
#[test]
fn ift_without_propagation_or_mixing_is_sft_per_sequence() {
    let d = tempfile::tempdir().unwrap();
    let (m, params) = model_with_lora(d.path());
    perturb(&params, 6);
    let seqs = [(ids(64, 14, 21), 5), (ids(64, 9, 22), 2)];
    let ift = objective("ift", &[("ift_gamma", 0.0), ("ift_lambda", 0.0)]);
    let both = grads(&m, &params, &batch(&seqs), ift.as_ref(), false);
    let singles: Vec<StepGradients> = seqs.iter().map(|s| grads(&m, &params, &batch(std::slice::from_ref(s)), objective("sft", &[]).as_ref(), false)).collect();
    let mean_loss = (singles[0].loss + singles[1].loss) / 2.0;
    assert!((both.loss - mean_loss).abs() < 1e-6, "{} vs {mean_loss}", both.loss);
    let mean_grads: Vec<Vec<f32>> = singles[0].grads.iter().zip(&singles[1].grads).map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x + y) / 2.0).collect()).collect();
    assert!(max_rel(&both.grads, &mean_grads) < 1e-5);
}

/// IFT's gradient (through its weights too) against finite differences; the trained pass reads
/// the model's own greedy predictions on response positions.
#[test]
fn ift_gradient_matches_finite_differences_and_mixes_in_predictions() {
    let d = tempfile::tempdir().unwrap();
    let (m, params) = model_with_lora(d.path());
    perturb(&params, 7);
    let seq = (ids(64, 16, 23), 6);
    let b = batch(std::slice::from_ref(&seq));
    // λ = 1: response positions read the embedding of the prediction made one position before.
    let full = objective("ift", &[("ift_lambda", 1.0)]);
    let x: Vec<f32> = full.input_embeddings(&m, &b, &objectives::StepInfo { step: 0, total_steps: 1, seed: 0 }).unwrap().unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let vocab = m.config.vocab_size;
    let logits = common::logits(&m, &seq.0);
    let argmax = |pos: usize| (0..vocab).max_by(|&a, &c| logits[pos * vocab + a].total_cmp(&logits[pos * vocab + c])).unwrap() as u32;
    let expected: Vec<u32> = (0..seq.0.len()).map(|j| if j > 0 && b.targets[j - 1] != -100 { argmax(j - 1) } else { seq.0[j] }).collect();
    let e: Vec<f32> = m.embed_ids(&expected, 1, expected.len()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert!(x.iter().zip(&e).all(|(a, b)| (a - b).abs() < 1e-6), "IFT's inputs are not the predictions' embeddings");
    let o = objective("ift", &[]);
    let g = grads(&m, &params, &b, o.as_ref(), false);
    for (pi, v) in params.iter().enumerate().take(2) {
        let base: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for i in [2, base.len() / 3] {
            let at = |delta: f32| {
                let mut w = base.clone();
                w[i] += delta;
                v.set(&Tensor::from_vec(w, v.shape(), v.device()).unwrap()).unwrap();
                grads(&m, &params, &b, o.as_ref(), false).loss
            };
            let h = 1e-2;
            let fd = (at(h) - at(-h)) / (2.0 * h as f64);
            v.set(&Tensor::from_vec(base.clone(), v.shape(), v.device()).unwrap()).unwrap();
            let gi = g.grads[pi][i] as f64;
            assert!((fd - gi).abs() < 2e-2 * (1.0 + fd.abs()), "param {pi}[{i}]: {gi} vs finite difference {fd}");
        }
    }
}
