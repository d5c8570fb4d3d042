//! `ferrotune bench`: the fixed LoRA training workload `../shared/bench/peers/compare.sh` runs
//! PyTorch + PEFT on (batch 4 × 256 random tokens, LoRA r=16 α=32 on all seven projections,
//! AdamW lr 2e-4, 2 warm-up + 5 timed steps), so the two can be compared side by side; and the
//! same workload for any other method of the registry (`--method dora`, …), which runs the
//! trainer's step with the method's own gradient transform, optimizer and per-step hook.

use crate::data::Batch;
use crate::error::{Error, Result};
use crate::kernels::IGNORE_INDEX;
use crate::train::grads::step_gradients;
use crate::methods::{registry, MethodSpec, TargetModules};
use crate::models::{ForwardCtx, Llama, ModelConfig};
use crate::methods::Method;
use crate::optim::AdamWConfig;
use crate::rng::SplitMix64;
use candle_core::{Device, Tensor, Var};
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub batch: usize,
    pub seq: usize,
    pub warmup: usize,
    pub steps: usize,
    /// Forward only (evaluation throughput) instead of training steps.
    pub forward_only: bool,
    /// A method's config name (`lora`, `dora`, …; see `methods::registry`), `rslora`, or `none`
    /// (the bare base model; forward-only only).
    pub method: String,
    /// Per-block activation checkpointing.
    pub checkpointing: bool,
    /// How the base weights were loaded (`f32`, `bf16`, `gguf`), for the report.
    pub dtype: String,
    /// `sft`, or `dpo`: the batch's rows become the chosen sides of as many preference pairs,
    /// each with a rejected row of its own (twice the tokens per step), and the step is DPO's
    /// with reference log-probabilities computed before timing (as the trainer caches them).
    pub objective: String,
    /// `adamw`, or `mezo`: the zeroth-order step (two forward passes, no backward).
    pub optimizer: String,
    /// With `mezo` and `full`: the trained matrices offloaded to a file (`zo_offload`).
    pub zo_offload: bool,
    /// Time batched generation of this many new tokens instead of training (see
    /// [`run_decode`]).
    pub decode: Option<usize>,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub tokens_per_s: f64,
    pub peak_rss_mib: f64,
    /// The peak `ferrotune train` would estimate for this workload before loading (see
    /// `train::memory`), to read beside `peak_rss_mib`.
    pub memory_estimate_mib: Option<f64>,
    pub step_s: Vec<f64>,
    /// Useful FLOPs per step divided by the measured GEMM peak ([`gemm_peak_gflops`]).
    pub mfu: f64,
    pub flops_per_token: f64,
    pub gemm_peak_gflops: f64,
    pub mode: &'static str,
    pub checkpointing: bool,
    pub method: String,
    pub dtype: String,
    /// Bytes of the frozen base matrices as stored, in MiB.
    pub frozen_weights_mib: f64,
    pub threads: usize,
    /// The SIMD/matrix features of this CPU that matter for the kernels (from /proc/cpuinfo).
    pub cpu_features: Vec<String>,
    /// The kernel of a bf16 base's products (`amx`, `avx512_bf16` or `none`: f32 products).
    pub bf16_kernel: &'static str,
    pub batch: usize,
    pub seq: usize,
    pub objective: String,
    pub optimizer: String,
    /// Whether the trained matrices were offloaded (`--zo-offload`).
    pub zo_offload: bool,
    /// Sequences per step: `batch`, or `2 × batch` for DPO's pairs.
    pub rows: usize,
}

/// SmolLM2-135M's architecture, for benchmarking without the weights.
pub fn shape_config(name: &str) -> Result<ModelConfig> {
    match name {
        "smollm2-135m" => Ok(ModelConfig {
            model_type: "llama".into(),
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 100000.0,
            rope_scaling: None,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            attention_bias: false,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        }),
        other => Err(Error::flag("--shape", format!("unknown shape `{other}` (known: smollm2-135m)"))),
    }
}

/// A model of the given architecture with small random weights.
pub fn random_model(cfg: ModelConfig, seed: u64) -> Result<Llama> {
    let mut rng = SplitMix64::new(seed);
    let mut w = HashMap::new();
    let mut put = |name: String, shape: Vec<usize>, scale: f32, offset: f32| -> Result<()> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| offset + scale * (2.0 * rng.next_f32() - 1.0)).collect();
        w.insert(name, Tensor::from_vec(v, shape, &Device::Cpu)?);
        Ok(())
    };
    let (d, hd, ff) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
    let s = 1.0 / (d as f32).sqrt();
    put("model.embed_tokens.weight".into(), vec![cfg.vocab_size, d], 0.05, 0.0)?;
    put("model.norm.weight".into(), vec![d], 0.0, 1.0)?;
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        put(format!("{p}.input_layernorm.weight"), vec![d], 0.0, 1.0)?;
        put(format!("{p}.post_attention_layernorm.weight"), vec![d], 0.0, 1.0)?;
        put(format!("{p}.self_attn.q_proj.weight"), vec![q, d], s, 0.0)?;
        put(format!("{p}.self_attn.k_proj.weight"), vec![kv, d], s, 0.0)?;
        put(format!("{p}.self_attn.v_proj.weight"), vec![kv, d], s, 0.0)?;
        put(format!("{p}.self_attn.o_proj.weight"), vec![d, q], s, 0.0)?;
        put(format!("{p}.mlp.gate_proj.weight"), vec![ff, d], s, 0.0)?;
        put(format!("{p}.mlp.up_proj.weight"), vec![ff, d], s, 0.0)?;
        put(format!("{p}.mlp.down_proj.weight"), vec![d, ff], 1.0 / (ff as f32).sqrt(), 0.0)?;
    }
    Llama::from_weights(cfg, &mut w, Path::new("<random>"))
}

/// Which of the features the kernels could use this CPU reports (Linux `/proc/cpuinfo`).
pub fn cpu_features() -> Vec<String> {
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let line = flags.lines().find(|l| l.starts_with("flags")).unwrap_or("");
    let have: Vec<&str> = line.split_whitespace().collect();
    ["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]
        .into_iter()
        .filter(|f| have.contains(f))
        .map(String::from)
        .collect()
}

/// Peak resident set size of this process so far (Linux `VmHWM`), in MiB.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Useful FLOPs per token of one step: 2 per weight for each product with a frozen weight
/// (forward, plus the input gradient when training), 6 per trainable adapter weight (forward,
/// input and weight gradients), and the attention products `Q·Kᵀ` and `P·V` over the full
/// `seq × seq` square (as usually counted; the causal half is what actually runs).
pub fn flops_per_token(cfg: &ModelConfig, seq: usize, adapter_params: usize, training: bool) -> f64 {
    let (d, ff, hd) = (cfg.hidden_size as f64, cfg.intermediate_size as f64, cfg.head_dim as f64);
    let (q, kv) = (cfg.num_attention_heads as f64 * hd, cfg.num_key_value_heads as f64 * hd);
    let layers = cfg.num_hidden_layers as f64;
    let frozen = layers * (d * q + 2.0 * d * kv + q * d + 3.0 * d * ff) + cfg.vocab_size as f64 * d;
    let attention = layers * 4.0 * seq as f64 * q;
    if training {
        4.0 * frozen + 6.0 * adapter_params as f64 + 3.0 * attention
    } else {
        2.0 * frozen + 2.0 * adapter_params as f64 + attention
    }
}

/// The best f32 GEMM rate (GFLOP/s) this machine reaches through our GEMM wrapper on the
/// current thread pool, over a large square product and the workload's own MLP shape: the
/// ceiling MFU is measured against. Each shape's rate is the median of 9 runs: this machine's
/// single runs scatter by ±30%, and a lucky outlier is not a peak the workload could sustain.
pub fn gemm_peak_gflops() -> f64 {
    let mut best = 0f64;
    for (m, k, n) in [(1024, 1024, 1024), (1024, 576, 1536), (2048, 2048, 512)] {
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; n * k];
        let mut c = vec![0f32; m * n];
        let mut rates: Vec<f64> = (0..9)
            .map(|_| {
                let t0 = Instant::now();
                crate::kernels::gemm::matmul_nt(&mut c, &a, &b, m, k, n, false);
                2.0 * (m * k * n) as f64 / t0.elapsed().as_secs_f64() / 1e9
            })
            .collect();
        rates.sort_by(f64::total_cmp);
        best = best.max(rates[rates.len() / 2]);
    }
    best
}

fn targets_of_bench() -> [&'static str; 7] {
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
}

/// The bench's method `name` (a registry name, or `rslora`), set up as the workload compare.sh
/// gives PEFT: r = 16, α = 32, no dropout, on all seven projections.
pub fn create_method(name: &str) -> Result<Box<dyn Method>> {
    let spec = MethodSpec {
        adapter: if name == "rslora" { "lora".into() } else { name.to_string() },
        r: 16,
        alpha: 32.0,
        dropout: 0.0,
        target_modules: TargetModules::Names(targets_of_bench().map(String::from).to_vec()),
        use_rslora: name == "rslora",
        seed: 1234,
        learning_rate: 2e-4,
        options: Default::default(),
    };
    registry::create(&spec).map_err(|e| match e {
        Error::Config { detail, .. } => Error::flag("--method", format!("{detail} (or rslora, none)")),
        other => other,
    })
}

/// `rows` sequences of `t` random tokens, every position a target.
fn random_batch(rows: usize, t: usize, vocab: usize, seed: u64) -> Batch {
    let mut rng = SplitMix64::new(seed);
    let ids: Vec<u32> = (0..rows * t).map(|_| rng.below(vocab as u64) as u32).collect();
    // labels = inputs, shifted inside the loss: position j predicts token j + 1.
    let targets: Vec<i32> = (0..rows * t).map(|i| if i % t == t - 1 { IGNORE_INDEX } else { ids[i + 1] as i32 }).collect();
    Batch { input_ids: ids, targets, batch_size: rows, seq_len: t, n_targets: rows * (t - 1), lengths: vec![t; rows], ..Default::default() }
}

pub fn run(mut model: Llama, opts: &BenchOptions) -> Result<BenchReport> {
    let (b, t) = (opts.batch, opts.seq);
    let vocab = model.config.vocab_size;
    let (mut batch, objective): (Batch, Box<dyn crate::objectives::Objective>) = match opts.objective.as_str() {
        "sft" => (random_batch(b, t, vocab, 1234), Box::new(crate::objectives::Sft)),
        "dpo" if !opts.forward_only => {
            // The SFT batch's rows are the chosen sides; the rejected sides are fresh rows.
            let (chosen, rejected) = (random_batch(b, t, vocab, 1234), random_batch(b, t, vocab, 4321));
            let batch = Batch {
                input_ids: [chosen.input_ids.as_slice(), &rejected.input_ids].concat(),
                targets: [chosen.targets.as_slice(), &rejected.targets].concat(),
                batch_size: 2 * b,
                seq_len: t,
                n_targets: 2 * chosen.n_targets,
                lengths: vec![t; 2 * b],
                pairs: b,
                ..Default::default()
            };
            (batch, Box::new(crate::objectives::Dpo { beta: 0.1, label_smoothing: 0.0 }))
        }
        "dpo" => return Err(Error::flag("--objective", "dpo times training steps; drop --forward-only")),
        other => return Err(Error::flag("--objective", format!("`{other}`: expected sft or dpo"))),
    };

    // An offloaded run's matrices live in a scratch file, removed when the bench ends.
    let store = std::env::temp_dir().join(format!("ferrotune-bench-{}.f32", std::process::id()));
    struct RemoveOnDrop(std::path::PathBuf);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _store_guard = RemoveOnDrop(store.clone());
    let mut offload = None;
    if opts.zo_offload && (opts.method != "full" || opts.optimizer != "mezo" || opts.forward_only) {
        return Err(Error::flag("--zo-offload", "offloads full-weight MeZO: give it with --method full --optimizer mezo"));
    }
    let mut method: Option<Box<dyn Method>> = match opts.method.as_str() {
        "full" if opts.zo_offload => {
            let targets = TargetModules::Names(targets_of_bench().map(String::from).to_vec());
            let full = crate::methods::offloaded::OffloadedFull::attach(&mut model, targets, &store, None)?;
            let zo = crate::optim::zo::Mezo { seed: 0, eps: 1e-3, n_spsa: 1 };
            offload = Some(crate::train::zo_offload::ZoOffload::new(full.weights(), zo, 2)?);
            Some(Box::new(full))
        }
        "none" if opts.forward_only => None,
        "none" => return Err(Error::flag("--method", "`none` trains nothing: use it with --forward-only")),
        name => {
            let mut method = create_method(name)?;
            let calibration = vec![batch.clone(); method.init_batches()];
            method.prepare(&mut model, &calibration)?;
            method.attach(&mut model)?;
            method.set_total_steps(opts.warmup + opts.steps);
            Some(method)
        }
    };
    if batch.pairs > 0 {
        // Computed once before training, as the trainer caches them: not part of a step.
        batch.reference_logps = Some(crate::objectives::dpo::batch_logps(&model, &batch, true)?);
    }
    let units = objective.units(&batch);
    let mut params: Vec<Var> = method.as_ref().map_or(Vec::new(), |m| m.params().into_iter().map(|(_, v)| v).collect());
    let adapter_params: usize = method.as_ref().map_or(0, |m| m.num_params());
    // The method's own update rule (LoRA-Pro's differs), as the trainer uses it; MeZO has none.
    let mut opt = method.as_ref().filter(|_| opts.optimizer != "mezo").map(|m| m.optimizer(AdamWConfig::default()));
    let mut step_s = Vec::new();
    for step in 0..opts.warmup + opts.steps {
        let t0 = Instant::now();
        if opts.forward_only {
            let nll = model.nll(&batch.input_ids, Arc::new(batch.targets.clone()), b, t, &ForwardCtx::eval())?;
            let _ = nll.sum_all()?.to_scalar::<f32>()?;
        } else if let Some(engine) = offload.as_mut() {
            // The trainer's offloaded step: one sweep, both perturbed streams, the deferred update.
            let plan = crate::train::grads::StepPlan { seed: 0, step, total_steps: usize::MAX, checkpointing: false };
            engine.step(&model, std::slice::from_ref(&batch), units, &plan, objective.as_ref(), 2e-4, 0.0)?;
        } else if opts.optimizer == "mezo" {
            // The trainer's zeroth-order step: two forward-only passes and the update.
            let plan = crate::train::grads::StepPlan { seed: 0, step, total_steps: usize::MAX, checkpointing: opts.checkpointing };
            let zo = crate::optim::zo::Mezo { seed: 0, eps: 1e-3, n_spsa: 1 };
            let batches = std::slice::from_ref(&batch);
            zo.step(&params, step, 2e-4, 0.0, || crate::train::grads::step_loss(&model, batches, units, &plan, objective.as_ref()))?;
        } else {
            // The trainer's own step, so the bench times what `ferrotune train` runs.
            let plan = crate::train::grads::StepPlan { seed: 0, step, total_steps: usize::MAX, checkpointing: opts.checkpointing };
            let grads = step_gradients(&model, &params, std::slice::from_ref(&batch), units, &plan, objective.as_ref())?.grads;
            let (m, opt) = (method.as_mut().expect("training has a method"), opt.as_mut().expect("and an optimizer"));
            let mut grads = grads;
            m.grad_transform(&mut grads)?;
            opt.step(&params, &grads, 2e-4)?;
            m.on_step(step + 1, &mut model)?;
            // As the trainer: `on_step` may have replaced the tensors (a sparse mask change).
            params = m.params().into_iter().map(|(_, v)| v).collect();
        }
        if step >= opts.warmup {
            step_s.push(t0.elapsed().as_secs_f64());
        }
    }
    let mean = step_s.iter().sum::<f64>() / step_s.len().max(1) as f64;
    let rows = batch.batch_size;
    let tokens_per_s = (rows * t) as f64 / mean;
    let mezo = opts.optimizer == "mezo" && !opts.forward_only;
    let whole_matrix = WHOLE_MATRIX_METHODS.contains(&opts.method.as_str());
    let mut flops = match (mezo, whole_matrix) {
        // Two forwards; whole-matrix methods' trained matrices are the base's own products.
        (true, true) => 2.0 * flops_per_token(&model.config, t, 0, false),
        (true, false) => 2.0 * flops_per_token(&model.config, t, adapter_params, false),
        (false, _) => flops_per_token(&model.config, t, adapter_params, !opts.forward_only),
    };
    if whole_matrix && !opts.forward_only && !mezo {
        // Full fine-tuning's trainable matrices are the projections themselves, not additions
        // beside frozen ones: their forward and input-gradient products are in the 6 per
        // trainable weight already, so the frozen count's 4 per weight must not count them too.
        flops -= 4.0 * adapter_params as f64;
    }
    if SPARSE_METHODS.contains(&opts.method.as_str()) && !opts.forward_only && !mezo {
        // A trained entry costs its gradient only (2 per token); its forward and input-gradient
        // share are in the frozen products, which run on W0 + Δ.
        flops -= 4.0 * adapter_params as f64;
    }
    let peak = gemm_peak_gflops();
    Ok(BenchReport {
        tokens_per_s,
        mfu: tokens_per_s * flops / (peak * 1e9),
        flops_per_token: flops,
        gemm_peak_gflops: peak,
        method: opts.method.clone(),
        peak_rss_mib: peak_rss_mib(),
        memory_estimate_mib: None,
        step_s,
        checkpointing: opts.checkpointing,
        mode: if opts.forward_only { "forward" } else { "train" },
        dtype: opts.dtype.clone(),
        frozen_weights_mib: model.frozen_bytes() as f64 / (1024.0 * 1024.0),
        threads: rayon::current_num_threads(),
        cpu_features: cpu_features(),
        bf16_kernel: crate::kernels::bf16_gemm::kernel().name(),
        batch: b,
        seq: t,
        objective: opts.objective.clone(),
        optimizer: opts.optimizer.clone(),
        zo_offload: opts.zo_offload,
        rows,
    })
}

/// Methods that train whole base matrices (full fine-tuning and its selection rules).
const WHOLE_MATRIX_METHODS: &[&str] = &["full", "hft", "greentrainer", "lt_sft", "locft_bf"];

/// Methods that train entries of the base weights (see `methods::sparse`).
const SPARSE_METHODS: &[&str] = &["lift", "sara"];

/// What `bench --decode` measured: batched generation as `generate`, `eval --task` and GRPO's
/// rollouts run it.
#[derive(Debug, Serialize)]
pub struct DecodeReport {
    pub mode: &'static str,
    /// Sequences decoded together, each from its own random prompt of `prompt_tokens`.
    pub rows: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// Generated tokens (all rows) per second, prefill included.
    pub tokens_per_s: f64,
    /// Seconds of the prefill (every prompt once) and per decoding step (one token of every row).
    pub prefill_s: f64,
    pub step_ms: f64,
    pub peak_rss_mib: f64,
    pub dtype: String,
    pub threads: usize,
    pub cpu_features: Vec<String>,
}

/// Times [`crate::decode::generate_batch`]: `rows` random prompts of `prompt` tokens, `new`
/// greedy tokens each (no stop token, so every row runs to the end), after one untimed warm-up
/// generation of 2 tokens.
pub fn run_decode(model: &Llama, rows: usize, prompt: usize, new: usize, dtype: &str) -> Result<DecodeReport> {
    if rows == 0 || prompt == 0 || new == 0 {
        return Err(Error::flag("--decode", "needs at least one row (--batch), one prompt token (--seq) and one new token"));
    }
    let mut rng = SplitMix64::new(99);
    let prompts: Vec<Vec<u32>> = (0..rows).map(|_| (0..prompt).map(|_| rng.below(model.config.vocab_size as u64) as u32).collect()).collect();
    let greedy = |n| crate::decode::SamplingOptions { max_new_tokens: n, ..Default::default() };
    crate::decode::generate_batch(model, &prompts, 1, &greedy(2), &crate::decode::Stops::none(), &mut |_, _| {})?;
    let t0 = Instant::now();
    let mut first_token_at = None;
    let out = crate::decode::generate_batch(model, &prompts, 1, &greedy(new), &crate::decode::Stops::none(), &mut |_, _| {
        first_token_at.get_or_insert_with(|| t0.elapsed().as_secs_f64());
    })?;
    let total = t0.elapsed().as_secs_f64();
    let generated: usize = out.iter().map(|c| c.ids.len()).sum();
    let prefill_s = first_token_at.unwrap_or(total);
    Ok(DecodeReport {
        mode: "decode",
        rows,
        prompt_tokens: prompt,
        new_tokens: new,
        tokens_per_s: generated as f64 / total,
        prefill_s,
        step_ms: 1000.0 * (total - prefill_s) / (new.saturating_sub(1)).max(1) as f64,
        peak_rss_mib: peak_rss_mib(),
        dtype: dtype.to_string(),
        threads: rayon::current_num_threads(),
        cpu_features: cpu_features(),
    })
}
