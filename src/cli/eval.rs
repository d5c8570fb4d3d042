use crate::config::DatasetSpec;
use crate::data::EncodeOptions;
use crate::train::dataset::load_spec;
use crate::train::evaluate;
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
        eprintln!("note: {} examples have no target token and were skipped", data.stats.without_targets);
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
            eprintln!("{}: {done}/{total} examples generated", task.name);
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
    let r = evaluate(&session.model, &data.examples, batch_size, session.tokenizer.pad_id())?;
    if !r.loss.is_finite() {
        anyhow::bail!(
            "the loss over {} is {} ({} target tokens): the model{} produces non-finite logits",
            data_path.display(),
            r.loss,
            r.tokens,
            if adapter.is_some() { " with this adapter" } else { "" }
        );
    }
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
