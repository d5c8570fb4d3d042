//! Online objectives (GRPO, SASR): rewards, group advantages, the policy-gradient and KL terms
//! of the loss, SASR's step choice, and runs through the trainer that resume exactly.

mod common;

use candle_core::{Tensor, Var};
use common::*;
use ferrotune::data::batch::RolloutRows;
use ferrotune::data::{make_batch, Batch, EncodedExample};
use ferrotune::methods::TargetModules;
use ferrotune::models::Llama;
use ferrotune::objectives::grpo::group_advantages;
use ferrotune::objectives::reward::{gsm8k_answer, Reward};
use ferrotune::objectives::sasr::sft_probability;
use ferrotune::objectives::{self, MixState, Objective, ObjectiveSpec, StepInfo, StepKind};
use ferrotune::train::grads::{step_gradients, StepGradients, StepPlan};

fn model_with_lora(dir: &std::path::Path) -> (Llama, Vec<Var>) {
    tiny_with_lora(dir, TargetModules::Names(vec!["q_proj".into(), "down_proj".into()]))
}

fn spec(name: &str, options: &[(&str, toml::Value)]) -> ObjectiveSpec {
    ObjectiveSpec { name: name.into(), options: options.iter().map(|(k, v)| (k.to_string(), v.clone())).collect() }
}

fn grpo(beta: f64) -> Box<dyn Objective> {
    objectives::create(&spec("grpo", &[("grpo_beta", toml::Value::Float(beta)), ("grpo_group_size", toml::Value::Integer(2))])).unwrap()
}

/// Completions `(prompt + completion ids, prompt length)` with their advantages.
fn rollout_batch(rows: &[(Vec<u32>, usize)], advantages: &[f32]) -> Batch {
    let ex: Vec<EncodedExample> = rows
        .iter()
        .map(|(ids, p)| EncodedExample { input_ids: ids.clone(), labels: ids.iter().enumerate().map(|(i, &t)| if i < *p { -100 } else { t as i32 }).collect(), ..Default::default() })
        .collect();
    let mut b = make_batch(&ex.iter().collect::<Vec<_>>(), 0);
    b.rollout = Some(RolloutRows { rewards: vec![0.0; rows.len()], advantages: advantages.to_vec() });
    b
}

fn grads(m: &Llama, params: &[Var], b: &Batch, o: &dyn Objective) -> StepGradients {
    step_gradients(m, params, std::slice::from_ref(b), o.units(b), &StepPlan { seed: 1, step: 0, total_steps: 10, checkpointing: false }, o).unwrap()
}

fn max_abs(a: &[Vec<f32>]) -> f32 {
    a.iter().flatten().fold(0f32, |s, x| s.max(x.abs()))
}

#[test]
fn rewards_read_gsm8k_answers_exact_text_and_patterns() {
    assert_eq!(gsm8k_answer("so 48 + 24 = 72\n#### 72"), Some(72.0));
    assert_eq!(gsm8k_answer("#### 1,000.50 dollars"), Some(1000.5));
    assert_eq!(gsm8k_answer("#### -3"), Some(-3.0));
    assert_eq!(gsm8k_answer("#### 5 then #### 6"), Some(6.0), "the last answer counts");
    assert_eq!(gsm8k_answer("#### about 7"), None);
    assert_eq!(gsm8k_answer("the answer is 72"), None);
    let g = Reward::Gsm8k;
    assert_eq!(g.score("... #### 72.0", "Natalia ... #### 72"), 1.0);
    assert_eq!(g.score("... #### 71", "#### 72"), 0.0);
    assert_eq!(g.score("no answer", "no answer either"), 0.0, "nothing readable never matches");
    assert_eq!(Reward::Exact.score(" Paris\n", "Paris"), 1.0);
    let re = Reward::from_spec(&spec("grpo", &[("grpo_reward", "regex".into()), ("grpo_reward_pattern", r"answer: (\w+)".into())])).unwrap();
    assert_eq!(re.score("so the answer: blue.", "answer: blue"), 1.0);
    assert_eq!(re.score("answer: red", "answer: blue"), 0.0);
    let err = |o: &[(&str, toml::Value)]| objectives::create(&spec("grpo", o)).err().expect("refused").to_string();
    assert!(err(&[("grpo_reward", "regex".into())]).contains("grpo_reward_pattern"));
    assert!(err(&[("grpo_reward", "regex".into()), ("grpo_reward_pattern", "(".into())]).contains("not a valid regular expression"));
    assert!(err(&[("grpo_group_size", toml::Value::Integer(1))]).contains("at least 2"));
    assert!(err(&[("sasr_gamma", toml::Value::Float(1.0))]).contains("applies to objective = sasr"));
}

/// Advantages are centred per group and scaled by its spread; a group whose rewards are all
/// equal gets zeros.
#[test]
fn group_advantages_have_zero_mean_and_vanish_for_equal_rewards() {
    let a = group_advantages(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.0, 0.0, 0.0], 4);
    for g in a.chunks(4) {
        assert!(g.iter().sum::<f64>().abs() < 1e-12, "group {g:?} is not centred");
    }
    assert!(a[4..8].iter().all(|&v| v == 0.0));
    // Bessel's correction: rewards (1, 0, 0, 1) have std sqrt(1/3).
    assert!((a[0] - 0.5 / ((1.0f64 / 3.0).sqrt() + 1e-4)).abs() < 1e-12);
    assert!(a[8] > 0.0 && a[9] < 0.0);
}

/// Without the KL term, GRPO's gradient is `−(1/N)·Σ_i Â_i·∇(mean log-prob of completion i)`:
/// each completion's SFT gradient weighted by its advantage. A group of equal rewards (zero
/// advantages) contributes nothing.
#[test]
fn grpo_gradient_is_the_advantage_weighted_completion_gradient() {
    let d = tempfile::tempdir().unwrap();
    let (m, params) = model_with_lora(d.path());
    perturb(&params, 3);
    let rows = vec![(ids(64, 9, 1), 4), (ids(64, 7, 2), 4), (ids(64, 8, 3), 3), (ids(64, 6, 4), 2)];
    let adv = [1.2f32, -1.2, 0.7, -0.7];
    let o = grpo(0.0);
    let got = grads(&m, &params, &rollout_batch(&rows, &adv), o.as_ref());
    let sft = objectives::create(&spec("sft", &[])).unwrap();
    let mut want: Vec<Vec<f32>> = got.grads.iter().map(|g| vec![0.0; g.len()]).collect();
    for (row, &a) in rows.iter().zip(&adv) {
        // SFT's gradient of one completion: ∇(mean NLL over its tokens) = −∇(mean log-prob).
        let b = rollout_batch(std::slice::from_ref(row), &[0.0]);
        let b = Batch { rollout: None, ..b };
        let g = grads(&m, &params, &b, sft.as_ref());
        for (w, gi) in want.iter_mut().zip(&g.grads) {
            w.iter_mut().zip(gi).for_each(|(w, x)| *w += a * x / rows.len() as f32);
        }
    }
    let scale = max_abs(&want);
    let diff = got.grads.iter().flatten().zip(want.iter().flatten()).fold(0f32, |s, (x, y)| s.max((x - y).abs()));
    assert!(scale > 1e-4 && diff / scale < 1e-4, "GRPO gradient vs Σ Â·∇: relative difference {}", diff / scale);
    assert!((got.loss + adv.iter().sum::<f32>() as f64 / 4.0).abs() < 1e-6, "the surrogate's value is −mean(Â)");
    // Equal rewards: zero advantages, no gradient at all (β = 0).
    let flat = grads(&m, &params, &rollout_batch(&rows, &[0.0; 4]), o.as_ref());
    assert_eq!(max_abs(&flat.grads), 0.0);
}

/// The KL term is 0 while the policy is the reference (a fresh adapter) and then adds exactly
/// its own gradient: with zero advantages the loss is `β·KL`, whose gradient matches finite
/// differences.
#[test]
fn grpo_kl_term_starts_at_zero_and_its_gradient_matches_finite_differences() {
    let d = tempfile::tempdir().unwrap();
    let (m, params) = model_with_lora(d.path());
    let rows = vec![(ids(64, 9, 5), 4), (ids(64, 7, 6), 3)];
    let o = grpo(0.5);
    let fresh = grads(&m, &params, &rollout_batch(&rows, &[1.0, -1.0]), o.as_ref());
    assert!(fresh.metrics["kl"].abs() < 1e-7, "KL at the reference: {}", fresh.metrics["kl"]);
    perturb(&params, 4);
    let b = rollout_batch(&rows, &[0.0, 0.0]);
    let full = grads(&m, &params, &b, o.as_ref());
    assert!(full.metrics["kl"] > 1e-4 && (full.loss - 0.5 * full.metrics["kl"]).abs() < 1e-6, "loss {} vs β·KL {}", full.loss, full.metrics["kl"]);
    for (pi, v) in params.iter().enumerate().take(2) {
        let base: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for i in [0, base.len() - 1] {
            let at = |delta: f32| {
                let mut w = base.clone();
                w[i] += delta;
                v.set(&Tensor::from_vec(w, v.shape(), v.device()).unwrap()).unwrap();
                grads(&m, &params, &b, o.as_ref()).loss
            };
            let h = 1e-2;
            let fd = (at(h) - at(-h)) / (2.0 * h as f64);
            v.set(&Tensor::from_vec(base.clone(), v.shape(), v.device()).unwrap()).unwrap();
            let g = full.grads[pi][i] as f64;
            assert!((fd - g).abs() < 1e-3 + 0.05 * fd.abs(), "param {pi}[{i}]: {g} vs finite difference {fd}");
        }
    }
}

/// SASR: warm-up steps are SFT; afterwards SFT is chosen with probability
/// `‖g‖ / (‖g‖ + γ·G_warm)`, and the norms are recorded from SFT steps only.
#[test]
fn sasr_warms_up_with_sft_then_mixes_by_gradient_norm() {
    assert_eq!(sft_probability(1.0, 1.0, 1.0), 0.5);
    assert!((sft_probability(9.0, 1.0, 1.0) - 0.9).abs() < 1e-12);
    assert!((sft_probability(1.0, 1.0, 3.0) - 0.25).abs() < 1e-12);
    let o = objectives::create(&spec("sasr", &[("sasr_warmup_steps", toml::Value::Integer(3)), ("grpo_group_size", toml::Value::Integer(2))])).unwrap();
    let at = |step: usize| StepInfo { step, total_steps: 5000, seed: 11 };
    let mut mix = MixState::default();
    for step in 0..3 {
        assert_eq!(o.step_kind(&at(step), &mix), StepKind::Demonstrations, "warm-up step {step}");
        o.after_step(&mut mix, &at(step), StepKind::Demonstrations, 2.0 + step as f64);
    }
    assert_eq!(mix, MixState { warmup_grad_norm: Some(4.0), last_sft_grad_norm: Some(4.0) });
    // A GRPO step leaves the norms alone.
    o.after_step(&mut mix, &at(3), StepKind::Rollouts, 100.0);
    assert_eq!(mix.last_sft_grad_norm, Some(4.0));
    let share = |mix: &MixState| (3..4003).filter(|&s| o.step_kind(&at(s), mix) == StepKind::Demonstrations).count() as f64 / 4000.0;
    let even = share(&mix);
    assert!((even - 0.5).abs() < 0.03, "‖g‖ = G_warm: SFT share {even}");
    let drifted = share(&MixState { warmup_grad_norm: Some(1.0), last_sft_grad_norm: Some(9.0) });
    assert!((drifted - 0.9).abs() < 0.03, "‖g‖ = 9·G_warm: SFT share {drifted}");
    // The draw is a function of seed and step: the same choices every time.
    assert_eq!(share(&mix), even);
}

fn write_problems(path: &std::path::Path, n: usize, offset: usize) {
    let lines: Vec<String> = (offset..offset + n).map(|i| serde_json::json!({"prompt": format!("Q{i}: name a letter."), "completion": format!(" answer {}", ["a", "b", "c"][i % 3])}).to_string()).collect();
    write_lines(path, &lines);
}

fn online_plan(dir: &std::path::Path, objective: &str, out: &str, steps: usize) -> ferrotune::config::TrainConfig {
    let text = format!(
        r#"
base_model = "model"
datasets = [{{ path = "problems.jsonl" }}]
val_set = {{ path = "val.jsonl" }}
adapter = "lora"
lora_r = 4
lora_alpha = 8
lora_target_modules = "all-linear"
objective = "{objective}"
grpo_group_size = 3
grpo_max_new_tokens = 6
grpo_reward = "regex"
grpo_reward_pattern = "([a-z])"
sequence_len = 48
micro_batch_size = 3
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
    let extra = if objective == "sasr" { "sasr_warmup_steps = 1\n" } else { "" };
    std::fs::write(dir.join(format!("{out}.toml")), text + extra).unwrap();
    ferrotune::config::TrainConfig::load(&dir.join(format!("{out}.toml")), &[]).unwrap()
}

/// Through the trainer: GRPO and SASR runs sample, score and train, log their rollout metrics,
/// record the objective, and a run stopped after two steps and resumed ends byte-identical to
/// an uninterrupted one (the samples and SASR's choices are seeded per step).
#[test]
fn grpo_and_sasr_runs_log_rollouts_and_resume_exactly() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    write_tiny_hf(&dir.join("model"), &TinySpec::default());
    write_problems(&dir.join("problems.jsonl"), 6, 0);
    write_problems(&dir.join("val.jsonl"), 2, 50);
    for objective in ["grpo", "sasr"] {
        let full = format!("{objective}-full");
        ferrotune::train::train(&online_plan(dir, objective, &full, 4), &Default::default()).unwrap();
        let steps: Vec<serde_json::Value> = std::fs::read_to_string(dir.join(&full).join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).filter(|v: &serde_json::Value| v.get("loss").is_some()).collect();
        assert_eq!(steps.len(), 4);
        let rollout_steps: Vec<&serde_json::Value> = steps.iter().filter(|s| s["rollout_step"] == 1.0).collect();
        if objective == "grpo" {
            assert_eq!(rollout_steps.len(), 4);
        } else {
            assert_eq!(steps[0]["rollout_step"], 0.0, "SASR starts with its SFT warm-up");
        }
        for s in &rollout_steps {
            for key in ["reward", "kl", "completion_length", "rollout/tokens_per_s", "rollout/informative_groups"] {
                assert!(s[key].is_number(), "{objective}: metrics lack {key}: {s}");
            }
        }
        let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join(&full).join("run.json")).unwrap()).unwrap();
        assert_eq!(run["resolved"]["objective"]["name"], objective);
        assert_eq!(run["resolved"]["objective"]["grpo_group_size"], 3);
        let part = format!("{objective}-part");
        ferrotune::train::train(&online_plan(dir, objective, &part, 2), &Default::default()).unwrap();
        ferrotune::train::train(&online_plan(dir, objective, &part, 4), &ferrotune::train::TrainOptions { resume: true, ..Default::default() }).unwrap();
        let bytes = |run: &str| std::fs::read(dir.join(run).join("adapter/adapter_model.safetensors")).unwrap();
        assert!(bytes(&full) == bytes(&part), "{objective}: a resumed run differs from an uninterrupted one");
    }
    // A step must hold whole groups.
    let mut bad = online_plan(dir, "grpo", "bad", 2);
    bad.micro_batch_size = 2;
    bad.gradient_accumulation_steps = 1;
    let err = ferrotune::train::train(&bad, &Default::default()).expect_err("refused").to_string();
    assert!(err.contains("multiple of grpo_group_size"), "{err}");
}
