//! `ferrotune train`: the loop `micro-batches → loss → backward → clip → AdamW → schedule`,
//! with evaluation, metrics, checkpoints and bit-exact resume.
//!
//! The loss of an optimizer step is the objective's mean over *all* units (target tokens, or
//! DPO's pairs) of that step's micro-batches: each micro-batch contributes `sum / units(step)`,
//! so splitting a batch into micro-batches gives the same update.

use super::checkpoint::{self, TrainerState};
use super::eval::{evaluate_with, show_progress};
use super::grads::{step_gradients, step_loss, StepGradients, StepPlan};
use super::zo_offload::ZoOffload;
use crate::methods::offloaded::{self, OffloadedFull};
use super::memory::{check_run, MemoryEstimate};
use super::metrics::{MetricsLog, StepMetrics};
use super::progress::{Progress, StepShown};
use super::run_dir::{self, RunLock};
use super::interrupt;
use crate::config::TrainConfig;
use crate::data::batch::{epoch_order, make_batch, Batch};
use crate::data::EncodedExample;
use crate::error::{Error, Result};
use crate::methods::{registry, Method, MethodSpec};
use crate::objectives::{RolloutPlan, StepInfo, StepKind};
use crate::rng::SplitMix64;
use crate::models::{load, Llama};
use crate::optim::{clip_grad_norm, AdamWConfig, LrSchedule, Scheduler};
use candle_core::Var;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Continue the run in `output_dir` from its newest checkpoint (or start it, if it never
    /// reached one). Refused when the plan differs from the run's.
    pub resume: bool,
    /// Start again in an `output_dir` that holds an earlier run, removing that run's files.
    pub overwrite: bool,
    /// Train even when the memory estimate exceeds the available memory.
    pub force: bool,
}

#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub steps: usize,
    pub last_loss: Option<f64>,
    pub eval_before: Option<f64>,
    pub eval_after: Option<f64>,
    pub adapter_dir: PathBuf,
    pub tokens_per_s: f64,
    /// The peak memory estimated before loading (see `memory`).
    pub memory_estimate: Option<MemoryEstimate>,
}

/// Examples in a fixed, seed-determined order per epoch; sample `k` of the run is example
/// `order(k / n)[k % n]`, so the data position is one counter.
pub(super) struct Sampler {
    n: usize,
    seed: u64,
    shuffle: bool,
    epoch: u64,
    order: Vec<usize>,
}

impl Sampler {
    pub(super) fn new(n: usize, seed: u64, shuffle: bool) -> Self {
        Self { n, seed, shuffle, epoch: 0, order: epoch_order(n, seed, 0, shuffle) }
    }
    pub(super) fn index(&mut self, k: u64) -> usize {
        let epoch = k / self.n as u64;
        if epoch != self.epoch {
            self.epoch = epoch;
            self.order = epoch_order(self.n, self.seed, epoch, self.shuffle);
        }
        self.order[(k % self.n as u64) as usize]
    }
}

/// The run's own first `n` micro-batches, in its order (as PEFT's examples feed the trainer's
/// dataloader): what data-driven inits and RoSTE's calibration see.
fn first_batches(cfg: &TrainConfig, train: &[EncodedExample], n: usize, pad_id: u32) -> Vec<Batch> {
    let mut sampler = Sampler::new(train.len(), cfg.seed, cfg.shuffle);
    let mbs = cfg.micro_batch_size as u64;
    (0..n as u64)
        .map(|bi| {
            let examples: Vec<&EncodedExample> = (0..mbs).map(|k| &train[sampler.index(bi * mbs + k)]).collect();
            make_batch(&examples, pad_id)
        })
        .collect()
}

/// The plan's method on the model: read from the checkpoint being resumed or the
/// `init_adapter`, or created, prepared on the run's first micro-batches if it asks, and attached.
fn attach_method(cfg: &TrainConfig, model: &mut Llama, resume_dir: Option<&Path>, data: &super::dataset::Prepared, pad_id: u32) -> Result<Box<dyn Method>> {
    let from = resume_dir.or(cfg.init_adapter.as_deref());
    if let Some(dir) = from {
        let method = registry::load(model, dir)?;
        if method.name() != cfg.adapter {
            return Err(Error::config(
                "adapter",
                format!("is \"{}\", but {} holds a `{}` adapter; set adapter = \"{}\" to continue training it", cfg.adapter, dir.display(), method.name(), method.name()),
            ));
        }
        return Ok(method);
    }
    let mut method = registry::create(&MethodSpec::from_config(cfg))?;
    let t0 = Instant::now();
    let n = method.init_batches();
    let mut from = String::new();
    if n > 0 {
        let batches = first_batches(cfg, &data.train, n, pad_id);
        method.prepare(model, &batches)?;
        from = format!(" from {n} micro-batches ({} examples)", batches.iter().map(|b| b.batch_size).sum::<usize>());
    }
    method.attach(model)?;
    // Data-driven and decomposition inits take long enough to be worth reporting.
    let took = t0.elapsed().as_secs_f64();
    if n > 0 || took >= 1.0 {
        crate::note!("{}: initialised{from} in {took:.1} s", method.name());
    }
    Ok(method)
}

pub fn train(cfg: &TrainConfig, opts: &TrainOptions) -> Result<TrainSummary> {
    crate::runtime::init_threads(cfg.threads);
    if opts.resume && opts.overwrite {
        return Err(Error::flag("--overwrite", "give --resume (continue the run) or --overwrite (start again), not both"));
    }
    let out = &cfg.output_dir;
    if out.exists() && !out.is_dir() {
        return Err(Error::config("output_dir", format!("{} is a file; output_dir must be a folder", out.display())));
    }
    let (_lock, takeover) = RunLock::acquire(out)?;
    if let Some(note) = takeover {
        crate::note!("{note}");
    }
    for p in run_dir::remove_leftovers(out)? {
        crate::note!("note: removed {}, left by an interrupted write", p.display());
    }
    let previous = run_dir::previous_run(out);
    if opts.overwrite && !previous.is_empty() {
        run_dir::remove_previous_run(out)?;
        crate::note!("--overwrite: removed the earlier run's {} from {}", previous.join(", "), out.display());
    } else if !opts.resume {
        run_dir::check_fresh_start(out, &previous)?;
    }

    let tok = load::load_tokenizer(&cfg.base_model)?;
    let mut data = super::dataset::prepare(cfg, &tok)?;
    let objective = crate::objectives::create(&cfg.objective_spec())?;
    super::preference::check_objective_data(cfg, objective.as_ref(), &data)?;
    let pad_id = tok.pad_id();
    let per_step = cfg.micro_batch_size * cfg.gradient_accumulation_steps;
    if let Some(plan) = objective.rollouts() {
        check_rollout_plan(cfg, plan, per_step, &data.train, &tok)?;
    }
    let n_train = data.train.len();
    let total_steps = match (cfg.max_steps, cfg.num_epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => ((e * n_train as f64) / per_step as f64).ceil().max(1.0) as usize,
        (None, None) => unreachable!("validated: one of max_steps/num_epochs is set"),
    };
    // Before the model is loaded: a run that cannot fit is refused here, not killed later.
    let (memory, _) = check_run(cfg, &data.train, &data.val, total_steps, opts.force)?;
    let with_memory = |s: TrainSummary| TrainSummary { memory_estimate: Some(memory), ..s };
    let mut model = load::load_model_with(&cfg.base_model, &cfg.load_options()?)?;
    check_data_fits(cfg, &model, &data)?;
    let identity = checkpoint::plan_identity(cfg);
    let fingerprint = checkpoint::data_fingerprint(&data.train, &data.val);
    let resume_dir = if opts.resume { resume_point(cfg, &identity, &fingerprint)? } else { None };

    // MeZO keeps no moments: its "optimizer state" is the step count (the directions are
    // regenerated from the run's seed and the step).
    let zeroth_order = (cfg.optimizer == "mezo").then(|| crate::optim::zo::Mezo { seed: cfg.seed, eps: cfg.zo_eps.unwrap_or(1e-3), n_spsa: cfg.zo_n_spsa.unwrap_or(1) });
    let (mut method, mut offload) = match (cfg.zo_offload, zeroth_order) {
        (true, Some(mezo)) => {
            let from = resume_dir.as_deref().or(cfg.init_adapter.as_deref());
            let full = OffloadedFull::attach(&mut model, cfg.target_modules(), &out.join(offloaded::STORE_FILE), from)?;
            let engine = ZoOffload::new(full.weights(), mezo, cfg.zo_window.unwrap_or(2))?;
            (Box::new(full) as Box<dyn Method>, Some(engine))
        }
        _ => (attach_method(cfg, &mut model, resume_dir.as_deref(), &data, pad_id)?, None),
    };
    let n = objective.init_batches();
    if n > 0 {
        objective.prepare_model(&mut model, &first_batches(cfg, &data.train, n, pad_id), resume_dir.as_deref())?;
    }
    if let (Some(init), true) = (&cfg.init_adapter, objective.uses_reference()) {
        crate::note!(
            "note: objective = \"{}\" compares with a reference model, the base with the method switched off, not the policy of init_adapter {} \
             (as TRL with a PEFT model and no ref_adapter_name). To anchor to that policy, merge it into the base first (`ferrotune merge`) and train a new adapter on the merged model",
            cfg.objective,
            init.display()
        );
    }
    if objective.needs_reference_logps() {
        super::preference::reference_logps(cfg, &model, &mut data, &fingerprint, pad_id)?;
    }
    let data = data;
    method.set_total_steps(total_steps);
    let adam = AdamWConfig { beta1: cfg.adam_beta1, beta2: cfg.adam_beta2, eps: cfg.adam_epsilon, weight_decay: cfg.weight_decay };
    let mut opt: Box<dyn crate::optim::Optimizer> = match &zeroth_order {
        Some(_) => Box::new(crate::optim::zo::MezoState::default()),
        None => method.optimizer(adam),
    };

    let mut state = TrainerState {
        step: 0,
        samples_seen: 0,
        seed: cfg.seed,
        total_steps,
        ferrotune_version: env!("CARGO_PKG_VERSION").into(),
        plan: Some(identity),
        data_fingerprint: Some(fingerprint.clone()),
        mix: Default::default(),
    };
    if let Some(dir) = &resume_dir {
        checkpoint::load_optimizer(dir, method.as_mut(), opt.as_mut())?;
        let saved = checkpoint::load_state(dir)?;
        if saved.seed != cfg.seed {
            return Err(Error::config("seed", format!("the checkpoint was trained with seed {}, the config says {}", saved.seed, cfg.seed)));
        }
        if saved.step > total_steps {
            return Err(Error::config(
                "max_steps",
                format!("--resume: {} is at step {}, past this plan's last step {total_steps}; the finished run's adapter is kept as it is", dir.display(), saved.step),
            ));
        }
        if saved.total_steps != total_steps {
            crate::note!(
                "note: this plan has {total_steps} steps where the run was started with {}; the learning-rate schedule is recomputed for {total_steps}",
                saved.total_steps
            );
        }
        if saved.step == total_steps {
            crate::note!("the run already finished at step {total_steps}; its final adapter is written again from {}", dir.display());
        } else {
            crate::note!("resuming from {} (step {} of {total_steps})", dir.display(), saved.step);
        }
        state.step = saved.step;
        state.samples_seen = saved.samples_seen;
        state.mix = saved.mix;
    }
    if cfg.warmup_steps >= total_steps {
        crate::warning!(
            "warmup_steps = {} is not below the run's {}: the learning rate never leaves warm-up (the first step trains at 0)",
            cfg.warmup_steps,
            plural(total_steps, "step")
        );
    }
    let sched = Scheduler {
        kind: LrSchedule::parse(&cfg.lr_scheduler)?,
        base_lr: cfg.learning_rate,
        warmup_steps: cfg.warmup_steps,
        total_steps,
    };
    write_run_json(cfg, &model, method.as_ref(), objective.as_ref(), &data, total_steps, &fingerprint, &memory)?;
    let metrics = MetricsLog::open(&out.join(run_dir::METRICS_FILE), resume_dir.as_ref().map(|_| state.step))?;
    let base_name = cfg.base_model_name.clone().unwrap_or_else(|| base_model_name(&cfg.base_model));

    let mut progress = Progress::new(total_steps, state.step);
    let (trainable, base) = (method.num_params(), model.parameter_count());
    crate::note!(
        "trainable params: {} || base params: {} || trainable%: {:.4}",
        thousands(trainable),
        thousands(base),
        100.0 * trainable as f64 / base.max(1) as f64
    );
    crate::note!(
        "training on {} ({} validation), {} of {}",
        plural(n_train, "example"),
        data.val.len(),
        plural(total_steps, "step"),
        plural(per_step, "example")
    );
    let eval_now = |model: &Llama| -> Result<Option<f64>> {
        if data.val.is_empty() {
            return Ok(None);
        }
        let scored = match objective.validation_score(model, &data.val, cfg.micro_batch_size, pad_id) {
            Some(r) => r.map(|v| {
                crate::console::note(&v.summary);
                v.loss
            }),
            None => evaluate_with(model, &data.val, cfg.micro_batch_size, pad_id, &mut show_progress("evaluating", data.val.len())).map(|r| r.loss),
        };
        let loss = match scored {
            // Ctrl-C during an evaluation: skip it; the loop's signal check then saves and stops.
            Err(Error::Interrupted { .. }) => return Ok(None),
            r => r?,
        };
        if !loss.is_finite() {
            return Err(Error::Training(format!("the validation loss is {loss}: the model produces non-finite logits on the validation examples")));
        }
        Ok(Some(loss))
    };
    let mut eval_before = None;
    if resume_dir.is_none() {
        eval_before = eval_now(&model)?;
        if let Some(l) = eval_before {
            show_eval(0, l, &format!("eval loss before training: {l:.4}"));
            metrics.append(&StepMetrics { step: 0, eval_loss: Some(l), ..Default::default() })?;
        }
    }

    if let Some(sig) = interrupt::requested() {
        progress.finish();
        return Err(interrupted(sig, &format!("stopped before step {} of {total_steps}, with nothing new to save", state.step + 1)));
    }
    let mut sampler = Sampler::new(n_train, cfg.seed, cfg.shuffle);
    let mut last_loss = None;
    let mut last_ckpt: Option<PathBuf> = resume_dir.clone();
    let (mut tok_total, mut time_total) = (0usize, 0f64);
    while state.step < total_steps {
        let t0 = Instant::now();
        // The run's seed, not a micro-batch's: the step choice is one draw per step.
        let at = StepInfo { step: state.step, total_steps, seed: cfg.seed };
        let kind = objective.step_kind(&at, &state.mix);
        // A rollout step takes one example (a prompt) per group of completions.
        let plan = objective.rollouts().filter(|_| kind == StepKind::Rollouts);
        let consumed = plan.map_or(per_step, |p| per_step / p.group_size);
        let examples: Vec<&EncodedExample> = (0..consumed as u64).map(|k| &data.train[sampler.index(state.samples_seen + k)]).collect();
        let (batches, rollouts) = match plan {
            Some(plan) => {
                // Rollouts sample from the current policy: an offloaded run's deferred update first.
                if let Some(e) = offload.as_mut() {
                    e.flush(&model)?;
                }
                let seed = SplitMix64::derive(cfg.seed, &[0x6011, state.step as u64]).next_u64();
                let mut r = super::rollout::sample(&model, &tok, &examples, plan, cfg.micro_batch_size, pad_id, seed)?;
                (std::mem::take(&mut r.batches), Some(r))
            }
            None => (examples.chunks(cfg.micro_batch_size).map(|c| make_batch(c, pad_id)).collect::<Vec<Batch>>(), None),
        };
        let units: usize = batches.iter().map(|b| objective.units(b)).sum();
        // Fetched every step: a method may replace its tensors in `on_step` (a sparse mask refresh).
        let params: Vec<Var> = method.params().into_iter().map(|(_, v)| v).collect();
        let n_tokens: usize = batches.iter().map(|b| b.lengths.iter().sum::<usize>()).sum();
        let plan = StepPlan { seed: cfg.seed, step: state.step, total_steps, checkpointing: cfg.gradient_checkpointing };
        let lr = sched.lr(state.step);
        let (loss, grad_norm, objective_metrics) = match &zeroth_order {
            Some(zo) => {
                // MeZO: two forward passes per direction and the update along each; no gradients.
                let (loss, projected) = match offload.as_mut() {
                    Some(engine) => {
                        let s = engine.step(&model, &batches, units, &plan, objective.as_ref(), lr, cfg.weight_decay)?;
                        (s.loss, s.projected_grad)
                    }
                    None => zo.step(&params, state.step, lr, cfg.weight_decay, || step_loss(&model, &batches, units, &plan, objective.as_ref()))?,
                };
                crate::failpoint::hit("step");
                if !loss.is_finite() {
                    return Err(nan_error(state.step + 1, "loss", loss, &last_ckpt));
                }
                (loss, None, [("zo_projected_grad".to_string(), projected)].into())
            }
            None => {
                let StepGradients { loss, mut grads, metrics: mut objective_metrics } = step_gradients(&model, &params, &batches, units, &plan, objective.as_ref())?;
                if let Some(r) = &rollouts {
                    r.record(&mut objective_metrics);
                }
                if objective.rollouts().is_some() {
                    objective_metrics.insert("rollout_step".into(), (kind == StepKind::Rollouts) as u8 as f64);
                }
                crate::failpoint::hit("step");
                if !loss.is_finite() {
                    return Err(nan_error(state.step + 1, "loss", loss, &last_ckpt));
                }
                let grad_norm = clip_grad_norm(&mut grads, cfg.max_grad_norm);
                if !grad_norm.is_finite() {
                    return Err(nan_error(state.step + 1, "gradient norm", grad_norm, &last_ckpt));
                }
                objective.after_step(&mut state.mix, &at, kind, grad_norm);
                if units > 0 {
                    method.grad_transform(&mut grads)?;
                    opt.step(&params, &grads, lr)?;
                }
                (loss, Some(grad_norm), objective_metrics)
            }
        };
        state.step += 1;
        method.on_step(state.step, &mut model)?;
        objective.on_step(&model, state.step, total_steps)?;
        state.samples_seen += consumed as u64;
        let dt = t0.elapsed().as_secs_f64();
        tok_total += n_tokens;
        time_total += dt;
        let tps = n_tokens as f64 / dt.max(1e-9);
        last_loss = Some(loss);
        let log = state.step.is_multiple_of(cfg.logging_steps.max(1)) || state.step == total_steps;
        progress.step(&StepShown { step: state.step, loss, lr, grad_norm, tokens_per_s: tps, step_s: dt }, log);
        let mut m = StepMetrics {
            step: state.step,
            loss: Some(loss),
            lr: Some(lr),
            grad_norm,
            tokens_per_s: Some(tps),
            step_s: Some(dt),
            epoch: Some(state.samples_seen as f64 / n_train as f64),
            objective: objective_metrics,
            ..Default::default()
        };
        let last = state.step == total_steps;
        // An offloaded run's last update is deferred to the next sweep: applied now where the
        // weights are read whole.
        let mut settle = |model: &Llama| offload.as_mut().map_or(Ok(()), |e| e.flush(model));
        if (cfg.eval_steps > 0 && state.step.is_multiple_of(cfg.eval_steps)) || last {
            settle(&model)?;
            m.eval_loss = eval_now(&model)?;
            if let Some(l) = m.eval_loss {
                show_eval(state.step, l, &format!("step {}: eval loss {l:.4}", state.step));
            }
        }
        metrics.append(&m)?;
        if m.eval_loss.is_some() || last || (cfg.save_steps > 0 && state.step.is_multiple_of(cfg.save_steps)) {
            // A picture of the run so far; not worth stopping the run for if it cannot be drawn.
            let title = format!("{} · {} · {}", base_name, cfg.adapter, cfg.objective);
            if let Err(e) = metrics.plot(&out.join(run_dir::LOSS_PLOT), &title) {
                crate::warning!("{} not drawn: {e}", run_dir::LOSS_PLOT);
            }
        }
        let signal = interrupt::requested();
        if (cfg.save_steps > 0 && state.step.is_multiple_of(cfg.save_steps)) || last || signal.is_some() {
            settle(&model)?;
            let dir = checkpoint::step_dir(out, state.step);
            checkpoint::save(&dir, method.as_ref(), opt.as_ref(), &state, &base_name, &|tmp| objective.save_extras(tmp))?;
            last_ckpt = Some(dir);
        }
        if let (Some(sig), false) = (signal, last) {
            progress.finish();
            let saved = last_ckpt.as_ref().map_or("no checkpoint".into(), |p| format!("checkpoint written to {}", p.display()));
            return Err(interrupted(sig, &format!("stopped after step {} of {total_steps}; {saved}", state.step)));
        }
        if last {
            let summary = finish(cfg, method.as_ref(), objective.as_ref(), &base_name, &progress, m.eval_loss, eval_before, last_loss, tok_total, time_total, state.step);
            if offload.is_some() && summary.is_ok() {
                // Scratch: the adapter and the checkpoints hold what it held.
                let _ = std::fs::remove_file(out.join(offloaded::STORE_FILE));
            }
            return summary.map(with_memory);
        }
    }
    // Resumed a run that had already finished: just (re)write the final adapter.
    finish(cfg, method.as_ref(), objective.as_ref(), &base_name, &progress, None, eval_before, last_loss, tok_total, time_total, state.step).map(with_memory)
}

/// An evaluation's loss: `line` for a person, an `eval` record under `--json-logs`.
fn show_eval(step: usize, loss: f64, line: &str) {
    crate::console::record("eval", serde_json::json!({ "step": step, "eval_loss": loss }), Some(line));
}

#[allow(clippy::too_many_arguments)]
fn finish(
    cfg: &TrainConfig,
    method: &dyn Method,
    objective: &dyn crate::objectives::Objective,
    base_name: &str,
    progress: &Progress,
    eval_after: Option<f64>,
    eval_before: Option<f64>,
    last_loss: Option<f64>,
    tok_total: usize,
    time_total: f64,
    steps: usize,
) -> Result<TrainSummary> {
    progress.finish();
    let adapter_dir = cfg.output_dir.join(run_dir::ADAPTER_DIR);
    crate::io_util::write_files_into(&adapter_dir, |tmp| {
        method.save(tmp, base_name)?;
        objective.save_extras(tmp)?;
        crate::failpoint::hit("adapter");
        Ok(())
    })?;
    Ok(TrainSummary {
        steps,
        last_loss,
        eval_before,
        eval_after,
        adapter_dir,
        tokens_per_s: tok_total as f64 / time_total.max(1e-9),
        memory_estimate: None,
    })
}

/// A step of an online objective trains on whole groups of completions, of prompts whose
/// references the reward can read.
fn check_rollout_plan(cfg: &TrainConfig, plan: &RolloutPlan, per_step: usize, train: &[EncodedExample], tok: &crate::data::TextTokenizer) -> Result<()> {
    if !per_step.is_multiple_of(plan.group_size) {
        return Err(Error::config(
            "micro_batch_size",
            format!(
                "× gradient_accumulation_steps = {per_step} completions per step, which is not a multiple of grpo_group_size = {}: a step trains on whole groups (TRL's rule for num_generations)",
                plan.group_size
            ),
        ));
    }
    let unreadable = super::rollout::check_examples(train, plan, tok, cfg.train_on_inputs)?;
    if unreadable > 0 {
        crate::warning!(
            "{unreadable} of {} training examples have a reference completion the `{}` reward cannot read; their completions always score 0",
            train.len(),
            plan.reward.name()
        );
    }
    Ok(())
}

/// Says what truncation did to the data, and refuses examples the model's positions cannot hold
/// before any work is done (RoPE is tabulated up to the context length).
fn check_data_fits(cfg: &TrainConfig, model: &Llama, data: &super::dataset::Prepared) -> Result<()> {
    let train_examples = data.train_examples();
    let total = train_examples + data.val.len() + data.skipped;
    if data.skipped > 0 {
        crate::warning!(
            "{} of {total} examples were dropped: no target token left after truncation to sequence_len = {} (or none to begin with)",
            data.skipped, cfg.sequence_len
        );
    }
    // Per split, with the target tokens the cut removed (an answer's last line may be among them).
    let ((train_cut, train_lost), (val_cut, val_lost)) = (data.train_cut, super::dataset::truncation(&data.val));
    if train_cut + val_cut > 0 {
        let mut parts = vec![format!("{train_cut} of {train_examples} training examples ({train_lost} target tokens lost)")];
        if !data.val.is_empty() {
            parts.push(format!("{val_cut} of {} validation examples ({val_lost} lost)", data.val.len()));
        }
        crate::note!("note: cut at sequence_len = {}: {}", cfg.sequence_len, parts.join(", "));
    }
    if let Some(p) = data.packing {
        crate::note!(
            "sample_packing: {} examples in {} rows of up to {} tokens ({:.0}% filled); micro_batch_size counts rows",
            p.examples,
            p.rows,
            p.capacity,
            100.0 * p.fill()
        );
    }
    let context = model.config.max_position_embeddings;
    let longest = data.train.iter().chain(&data.val).map(|e| e.longest()).max().unwrap_or(0);
    if longest > context {
        return Err(Error::config(
            "sequence_len",
            format!(
                "is {}, and examples reach {longest} tokens, past the model's context of {context} (max_position_embeddings / GGUF context_length); set sequence_len to at most {context}",
                cfg.sequence_len
            ),
        ));
    }
    Ok(())
}

/// Where `--resume` continues from: the newest checkpoint, if the run in `output_dir` is the
/// one this plan describes (checked against the checkpoint, or `run.json` before the first).
fn resume_point(cfg: &TrainConfig, identity: &serde_json::Value, fingerprint: &str) -> Result<Option<PathBuf>> {
    let out = &cfg.output_dir;
    let check_data = |recorded: Option<&str>, what: &Path| match recorded {
        Some(r) if r != fingerprint => Err(Error::config(
            "datasets",
            format!(
                "--resume: the training examples differ from those of the run in {} (a dataset file changed, or a key that shapes the examples); \
                 resuming would continue on other data. Restore the data, or start a new run with --overwrite or another output_dir",
                what.display()
            ),
        )),
        _ => Ok(()),
    };
    if let Some(dir) = checkpoint::latest(out) {
        let state = checkpoint::load_state(&dir)?;
        match &state.plan {
            Some(plan) => checkpoint::check_same_plan(plan, identity, &dir)?,
            None => crate::note!("note: {} predates recorded plans; only its seed is checked against this plan", dir.display()),
        }
        check_data(state.data_fingerprint.as_deref(), &dir)?;
        return Ok(Some(dir));
    }
    let run_json = out.join(run_dir::RUN_FILE);
    if run_json.is_file() {
        let run: serde_json::Value = serde_json::from_str(&crate::io_util::read_to_string(&run_json)?)
            .map_err(|e| Error::format(&run_json, format!("not valid JSON: {e}")))?;
        let plan: TrainConfig = serde_json::from_value(run["plan"].clone())
            .map_err(|e| Error::format(&run_json, format!("field `plan`: {e}")))?;
        checkpoint::check_same_plan(&checkpoint::plan_identity(&plan), identity, &run_json)?;
        check_data(run["resolved"]["data_fingerprint"].as_str(), &run_json)?;
        crate::note!("--resume: the run in {} wrote no checkpoint yet; starting it from step 0", out.display());
    } else {
        crate::note!("--resume: nothing to resume in {}; starting a new run", out.display());
    }
    Ok(None)
}

fn interrupted(sig: i32, what: &str) -> Error {
    let detail = format!("{}: {what}. Continue with `ferrotune train CONFIG --resume`", interrupt::signal_name(sig));
    Error::Interrupted { signal: sig, detail }
}

fn nan_error(step: usize, what: &str, value: f64, last_ckpt: &Option<PathBuf>) -> Error {
    let kept = match last_ckpt {
        Some(p) => format!("the last good checkpoint is {}", p.display()),
        None => "no checkpoint had been written yet".into(),
    };
    Error::Training(format!(
        "step {step}: the {what} is {value}; training stopped and nothing from this step was saved ({kept}). \
         Usual causes: a learning rate too high for this model, or no max_grad_norm."
    ))
}

/// The base model's name as PEFT records it (`base_model_name_or_path`).
pub fn base_model_name(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[allow(clippy::too_many_arguments)]
fn write_run_json(
    cfg: &TrainConfig,
    model: &Llama,
    method: &dyn Method,
    objective: &dyn crate::objectives::Objective,
    data: &super::dataset::Prepared,
    total_steps: usize,
    data_fingerprint: &str,
    memory: &MemoryEstimate,
) -> Result<()> {
    let c = &model.config;
    let run = serde_json::json!({
        "plan": cfg,
        "resolved": {
            "total_steps": total_steps,
            "examples_per_step": cfg.micro_batch_size * cfg.gradient_accumulation_steps,
            "train_examples": data.train_examples(),
            "packed_rows": data.packing.map(|p| p.rows),
            "val_examples": data.val.len(),
            "skipped_examples": data.skipped,
            "truncated_examples": data.truncated,
            "data_fingerprint": data_fingerprint,
            "method": { "name": method.name(), "details": method.describe() },
            "objective": objective.describe(),
            "trainable_params": method.num_params(),
            "adapted_modules": method.sites().len(),
            "threads": rayon::current_num_threads(),
            "memory_estimate_mib": memory.total_mib(),
            "memory_estimate": memory.to_json(),
        },
        "model": {
            "model_type": c.model_type, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
            "vocab_size": c.vocab_size, "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
        },
        "versions": { "ferrotune": env!("CARGO_PKG_VERSION"), "candle-core": "0.11" },
    });
    let path = cfg.output_dir.join(run_dir::RUN_FILE);
    crate::io_util::write_atomic(&path, serde_json::to_string_pretty(&run).expect("serialisable").as_bytes())
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// `1 step`, `2 steps`.
pub fn plural(n: usize, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_read_as_people_write_them() {
        assert_eq!(super::thousands(4884480), "4,884,480");
        assert_eq!(super::thousands(999), "999");
        assert_eq!(super::thousands(1000), "1,000");
        assert_eq!(super::thousands(0), "0");
        assert_eq!(super::plural(1, "step"), "1 step");
        assert_eq!(super::plural(15, "step"), "15 steps");
    }
}
