use crate::config::DatasetSpec;
use crate::data::EncodeOptions;
use crate::train::dataset::load_spec;
use crate::train::eval::{evaluate_with, show_progress};
use crate::objectives::reward::{Reward, RewardError};
use std::path::{Path, PathBuf};

/// `--task` and its options.
pub struct TaskArgs {
    pub name: String,
    pub pattern: Option<String>,
    pub max_new_tokens: usize,
    pub predictions: Option<PathBuf>,
}

impl TaskArgs {
    fn reward(&self) -> anyhow::Result<Reward> {
        let name = if self.name == "exact-match" { "exact" } else { self.name.as_str() };
        Reward::named(name, self.pattern.as_deref()).map_err(|e| match e {
            RewardError::Name(m) if name == "regex" => anyhow::anyhow!("--task regex: {m} with --pattern"),
            RewardError::Name(_) => anyhow::anyhow!("--task {}: expected gsm8k, exact-match, contains or regex", self.name),
            RewardError::Pattern(m) => anyhow::anyhow!("--pattern: {m}"),
        })
    }
}

/// What `eval` was asked besides the model and the data.
pub struct EvalOptions<'a> {
    pub format: &'a str,
    pub sequence_len: usize,
    pub batch_size: usize,
    pub objective: &'a str,
    pub dpo_beta: f64,
    pub task: Option<&'a TaskArgs>,
    pub limit: Option<usize>,
    pub fake_quant: bool,
}

pub fn run(model: &Path, adapter: Option<&Path>, data: &Path, o: &EvalOptions) -> anyhow::Result<()> {
    let EvalOptions { format, sequence_len, batch_size, objective, dpo_beta, task, limit, fake_quant } = *o;
    let data_path = data;
    if sequence_len == 0 || batch_size == 0 {
        anyhow::bail!("--sequence-len and --batch-size must be at least 1");
    }
    let reward = task.map(TaskArgs::reward).transpose()?;
    if task.is_some() && objective != "sft" {
        anyhow::bail!("--task scores generations; it does not combine with --objective {objective}");
    }
    let dpo = match objective {
        "sft" => None,
        "dpo" => {
            let spec = crate::objectives::ObjectiveSpec { name: "dpo".into(), options: [("dpo_beta".to_string(), toml::Value::Float(dpo_beta))].into_iter().collect() };
            Some(crate::objectives::Dpo::from_spec(&spec).map_err(|e| anyhow::anyhow!("--dpo-beta {dpo_beta}: {e}"))?)
        }
        other => anyhow::bail!("--objective {other}: expected sft or dpo"),
    };
    let mut session = crate::session::Session::load(model, adapter)?;
    if fake_quant {
        let plan_dir = adapter.unwrap_or(model);
        let plan = crate::models::qat::read_plan(plan_dir)?
            .ok_or_else(|| anyhow::anyhow!("--fake-quant: {} has no {} (written by a run with objective = \"roste\")", plan_dir.display(), crate::models::qat::PLAN_FILE))?;
        crate::models::qat::attach(&mut session.model, &plan)?;
    }
    let spec = DatasetSpec { path: data.to_path_buf(), format: format.to_string() };
    // `tokenizer(text)` semantics: nothing appended beyond what the tokenizer itself adds.
    let opts = EncodeOptions { train_on_inputs: false, add_eos: false, sequence_len };
    let mut data = load_spec(&spec, &session.tokenizer, &opts)?;
    if let Some(n) = limit {
        data.examples.truncate(n);
    }
    if data.stats.without_targets > 0 {
        crate::note!("note: {} examples have no target token and were skipped", data.stats.without_targets);
    }
    if data.examples.is_empty() {
        anyhow::bail!(
            "{}: no example has a target token to score ({} records; {} without a target after truncation to --sequence-len {sequence_len})",
            data_path.display(),
            data.stats.records,
            data.stats.without_targets
        );
    }
    let pairs = data.examples.iter().filter(|e| e.rejected.is_some()).count();
    if let (Some(task), Some(reward)) = (task, &reward) {
        if pairs > 0 {
            anyhow::bail!("{}: holds preference pairs; --task scores prompts with one reference completion each", data_path.display());
        }
        let (score, predictions) = crate::decode::task::score(&session.model, &session.tokenizer, &data.examples, reward, task.max_new_tokens, batch_size, &mut |done, total| {
            crate::note!("{}: {done}/{total} examples generated", task.name);
        })?;
        if let Some(path) = &task.predictions {
            let lines: String = predictions.iter().map(|p| serde_json::to_string(p).expect("serialisable") + "\n").collect();
            crate::io_util::write_atomic(path, lines.as_bytes())?;
        }
        println!("{}", serde_json::to_string(&score)?);
        return Ok(());
    }
    if let Some(dpo) = &dpo {
        if pairs < data.examples.len() {
            anyhow::bail!("{}: --objective dpo scores preference pairs ({{\"prompt\", \"chosen\", \"rejected\"}}); {} of {} records are not pairs", data_path.display(), data.examples.len() - pairs, data.examples.len());
        }
        let mut examples = data.examples;
        let pad = session.tokenizer.pad_id();
        crate::objectives::dpo::compute_reference_logps(&session.model, &mut examples, batch_size, pad, |_, _| {})?;
        let s = crate::objectives::dpo::score(&session.model, &examples, batch_size, pad, dpo)?;
        println!("{}", serde_json::json!({ "loss": s.loss, "reward_accuracy": s.reward_accuracy, "reward_margin": s.reward_margin, "pairs": s.pairs }));
        return Ok(());
    }
    if pairs > 0 {
        anyhow::bail!("{}: holds preference pairs; score them with --objective dpo", data_path.display());
    }
    let r = evaluate_with(&session.model, &data.examples, batch_size, session.tokenizer.pad_id(), &mut show_progress("eval", data.examples.len()))?;
    if !r.loss.is_finite() {
        anyhow::bail!(
            "the loss over {} is {} ({} target tokens): the model{} produces non-finite logits",
            data_path.display(),
            r.loss,
            r.tokens,
            if adapter.is_some() { " with this adapter" } else { "" }
        );
    }
    // What was scored and how, beside the loss: plain `eval` is `tokenizer(text)` semantics, which
    // a run's own evaluation (EOS appended, its sequence_len) is not; `--run` reproduces that one.
    println!(
        "{}",
        serde_json::json!({
            "loss": r.loss,
            "tokens": r.tokens,
            "perplexity": r.perplexity,
            "examples": data.examples.len(),
            "add_eos": opts.add_eos,
            "sequence_len": sequence_len,
            "truncated": data.stats.truncated,
        })
    );
    Ok(())
}

/// `eval --run DIR`: the run's validation set, encoded and scored as the run scored it, with the
/// run's adapter (or `adapter`, or none with `base_only`). The run's own figure is printed beside.
pub fn run_as_trained(dir: &Path, adapter: Option<&Path>, base_only: bool) -> anyhow::Result<()> {
    use crate::train::run_dir::RUN_FILE;
    let run_path = dir.join(RUN_FILE);
    let text = crate::io_util::read_to_string(&run_path).map_err(|e| anyhow::anyhow!("--run {}: {e} (is it a training run's output_dir?)", dir.display()))?;
    let run: serde_json::Value = serde_json::from_str(&text).map_err(|e| crate::Error::format(&run_path, format!("not valid JSON: {e}")))?;
    let cfg: crate::config::TrainConfig =
        serde_json::from_value(run["plan"].clone()).map_err(|e| crate::Error::format(&run_path, format!("field `plan`: {e}")))?;
    let adapter_dir = match (base_only, adapter) {
        (true, Some(_)) => anyhow::bail!("--base-only scores the base without an adapter; drop --adapter"),
        (true, None) => None,
        (false, Some(a)) => Some(a.to_path_buf()),
        (false, None) => {
            let a = dir.join("adapter");
            if !a.join(crate::methods::ADAPTER_CONFIG).is_file() {
                anyhow::bail!("--run {}: no finished adapter in {} (a run still going, or stopped early?); pass a checkpoint's folder with --adapter", dir.display(), a.display());
            }
            Some(a)
        }
    };
    let session = crate::session::Session::load(&cfg.base_model, adapter_dir.as_deref())
        .map_err(|e| anyhow::anyhow!("{e} (the run's base_model as its plan gives it; run from the folder it was trained from)"))?;
    let data = crate::train::dataset::prepare(&cfg, &session.tokenizer)?;
    if data.val.is_empty() {
        anyhow::bail!("--run {}: the run has no validation set (neither val_set nor val_size in its plan); score a file with --model and --data", dir.display());
    }
    let objective = crate::objectives::create(&cfg.objective_spec())?;
    let pad = session.tokenizer.pad_id();
    let loss = match objective.validation_score(&session.model, &data.val, cfg.micro_batch_size, pad) {
        Some(score) => score?.loss,
        None => evaluate_with(&session.model, &data.val, cfg.micro_batch_size, pad, &mut show_progress("eval", data.val.len()))?.loss,
    };
    let reported = reported_eval(&dir.join(crate::train::run_dir::METRICS_FILE), base_only);
    if let Some(r) = reported {
        crate::note!("eval loss {loss:.6}; the run reported {r:.6} {}", if base_only { "before training" } else { "at its end" });
    }
    println!(
        "{}",
        serde_json::json!({
            "loss": loss,
            "examples": data.val.len(),
            "adapter": adapter_dir.map(|a| a.display().to_string()),
            "add_eos": cfg.add_eos,
            "sequence_len": cfg.sequence_len,
            "batch_size": cfg.micro_batch_size,
            "objective": objective.name(),
            "reported": reported,
        })
    );
    Ok(())
}

/// The eval loss the run logged in its metrics file: its first (before training, step 0) or
/// its last.
fn reported_eval(metrics: &Path, first: bool) -> Option<f64> {
    let text = std::fs::read_to_string(metrics).ok()?;
    let mut evals = text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).filter_map(|v| v.get("eval_loss").and_then(|x| x.as_f64()));
    if first {
        evals.next()
    } else {
        evals.last()
    }
}
