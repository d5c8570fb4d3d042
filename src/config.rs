//! The run plan: a TOML file of axolotl-like keys, overridden by `--set key=value`, validated
//! with every default resolved before anything heavy happens.

use crate::error::{Error, Result};
use crate::methods::TargetModules;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    pub path: PathBuf,
    /// `auto` (detect from the fields), `text`, `completion`, `chat`, `alpaca`.
    #[serde(default = "default_format", rename = "type")]
    pub format: String,
}

fn default_format() -> String {
    "auto".into()
}

/// `lora_target_modules`: a list of names or the string `"all-linear"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TargetSpec {
    One(String),
    Many(Vec<String>),
}

impl TargetSpec {
    pub fn resolve(&self) -> TargetModules {
        match self {
            TargetSpec::One(s) if s == "all-linear" => TargetModules::AllLinear,
            TargetSpec::One(s) => TargetModules::Names(vec![s.clone()]),
            TargetSpec::Many(v) => TargetModules::Names(v.clone()),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// HF model directory or `.gguf` file.
    pub base_model: PathBuf,
    pub datasets: Vec<DatasetSpec>,
    /// A separate validation file …
    #[serde(default)]
    pub val_set: Option<DatasetSpec>,
    /// … or a share (< 1) or count (≥ 1) of the training examples held out for validation.
    #[serde(default)]
    pub val_size: Option<f64>,
    #[serde(default = "d_adapter")]
    pub adapter: String,
    /// The training objective (`sft`, `dft`, `asft`, …); its own keys go to `objective_options`.
    #[serde(default = "d_objective")]
    pub objective: String,
    #[serde(default = "d_lora_r")]
    pub lora_r: usize,
    #[serde(default = "d_lora_alpha")]
    pub lora_alpha: f64,
    #[serde(default = "d_lora_dropout")]
    pub lora_dropout: f64,
    #[serde(default = "d_targets")]
    pub lora_target_modules: TargetSpec,
    #[serde(default)]
    pub use_rslora: bool,
    /// Continue training this PEFT adapter instead of initialising a new one.
    #[serde(default)]
    pub init_adapter: Option<PathBuf>,
    #[serde(default = "d_seq")]
    pub sequence_len: usize,
    /// Pack several short training examples into each row of up to `sequence_len` tokens
    /// (best-fit decreasing; each example keeps its own positions and attention). Micro-batches
    /// then count packed rows. Validation examples stay one per row.
    #[serde(default, skip_serializing_if = "is_false")]
    pub sample_packing: bool,
    #[serde(default = "one")]
    pub micro_batch_size: usize,
    #[serde(default = "one")]
    pub gradient_accumulation_steps: usize,
    #[serde(default)]
    pub num_epochs: Option<f64>,
    #[serde(default)]
    pub max_steps: Option<usize>,
    #[serde(default = "d_lr")]
    pub learning_rate: f64,
    #[serde(default = "d_sched")]
    pub lr_scheduler: String,
    #[serde(default)]
    pub warmup_steps: usize,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "d_beta1")]
    pub adam_beta1: f64,
    #[serde(default = "d_beta2")]
    pub adam_beta2: f64,
    #[serde(default = "d_eps")]
    pub adam_epsilon: f64,
    /// Clip the global gradient norm to this; 0 disables clipping.
    #[serde(default = "one_f")]
    pub max_grad_norm: f64,
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// `adamw`, or `mezo`: zeroth-order MeZO-SGD, two forward passes per step along a seeded
    /// random direction, no gradients and no optimizer moments (METHODS.md §4.1).
    #[serde(default = "d_optimizer", skip_serializing_if = "is_adamw")]
    pub optimizer: String,
    /// MeZO's perturbation size ε (default 1e-3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zo_eps: Option<f64>,
    /// MeZO's directions per step, their estimates averaged (n-SPSA; default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zo_n_spsa: Option<usize>,
    /// ZO2-style offloading (`adapter = "full"` with MeZO): the trained matrices live in a file
    /// in the output folder and stream through memory a window of blocks at a time.
    #[serde(default, skip_serializing_if = "is_false")]
    pub zo_offload: bool,
    /// With `zo_offload`: blocks in memory at once, the computing one and those read ahead
    /// (default 2; 1 reads each block when its turn comes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zo_window: Option<usize>,
    /// Evaluate every N steps (and at the end); 0 = only at the end.
    #[serde(default)]
    pub eval_steps: usize,
    /// Checkpoint every N steps (and at the end); 0 = only at the end.
    #[serde(default)]
    pub save_steps: usize,
    #[serde(default = "one")]
    pub logging_steps: usize,
    /// Compute the loss on prompt/user tokens too.
    #[serde(default)]
    pub train_on_inputs: bool,
    /// Recompute each block's activations in the backward instead of keeping them (activation
    /// memory no longer grows with depth; about one extra forward of compute).
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// GGUF base: keep the linear/embedding matrices in their quantized blocks (dequantized
    /// tile by tile inside the kernels) instead of dequantizing them to f32 at load.
    #[serde(default = "d_true")]
    pub load_quantized: bool,
    /// Storage of the f32 base matrices: `f32`, or `bf16` (half the memory; f32 accumulation;
    /// adapters and optimizer state stay f32).
    #[serde(default = "d_base_dtype")]
    pub base_dtype: String,
    /// Append the EOS token (as a target) to text, completion and alpaca examples.
    #[serde(default = "d_true")]
    pub add_eos: bool,
    /// What the adapter records as its base (`base_model_name_or_path`): a hub-style name or an
    /// absolute path for those who load it elsewhere (default: `base_model` as written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model_name: Option<String>,
    #[serde(default = "d_true")]
    pub shuffle: bool,
    pub output_dir: PathBuf,
    /// Worker threads (0 = all cores).
    #[serde(default)]
    pub threads: usize,
    /// The keys the chosen method declares for itself (`corda_method`, …). Written at the top
    /// level of the TOML like every other key; gathered here by [`TrainConfig::load`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub method_options: BTreeMap<String, toml::Value>,
    /// The keys the chosen objective declares (`asft_lambda`, …), gathered the same way.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub objective_options: BTreeMap<String, toml::Value>,
}

fn d_adapter() -> String {
    "lora".into()
}
fn d_objective() -> String {
    "sft".into()
}
fn d_lora_r() -> usize {
    8
}
fn d_lora_alpha() -> f64 {
    16.0
}
fn d_lora_dropout() -> f64 {
    0.0
}
fn d_targets() -> TargetSpec {
    TargetSpec::Many(["q_proj", "k_proj", "v_proj", "o_proj"].map(String::from).to_vec())
}
fn d_seq() -> usize {
    512
}
fn d_optimizer() -> String {
    "adamw".into()
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_adamw(s: &str) -> bool {
    s == "adamw"
}

fn one() -> usize {
    1
}
fn one_f() -> f64 {
    1.0
}
fn d_lr() -> f64 {
    2e-4
}
fn d_sched() -> String {
    "cosine".into()
}
fn d_beta1() -> f64 {
    0.9
}
fn d_beta2() -> f64 {
    0.999
}
fn d_eps() -> f64 {
    1e-8
}
fn d_seed() -> u64 {
    42
}
fn d_base_dtype() -> String {
    "f32".into()
}

fn d_true() -> bool {
    true
}

impl TrainConfig {
    /// Reads `path`, applies `key=value` overrides (values parsed as TOML, else taken as
    /// strings), resolves relative paths against the config's folder, and validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = crate::io_util::read_to_string(path)?;
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| Error::format(path, format!("invalid TOML: {e}")))?;
        // Which keys came from `--set`, so that a bad value is blamed on the flag, not the file.
        let mut set_by_flag: Vec<(String, &str)> = Vec::new();
        for o in overrides {
            let (key, value) = o
                .split_once('=')
                .ok_or_else(|| Error::config(o.as_str(), format!("--set {o}: expected KEY=VALUE")))?;
            let key = key.trim();
            if key.is_empty() {
                return Err(Error::config(o.as_str(), format!("--set {o}: the key before `=` is empty")));
            }
            table.insert(key.to_string(), parse_value(value.trim()));
            set_by_flag.retain(|(k, _)| k != key);
            set_by_flag.push((key.to_string(), o.as_str()));
        }
        // Method and objective keys are known to those, not to this struct: set them aside.
        set_aside(&mut table, "method_options", crate::methods::registry::is_method_key);
        set_aside(&mut table, "objective_options", crate::objectives::is_objective_key);
        let mut cfg: TrainConfig = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| blame_key(path, &text, &set_by_flag, e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve_paths(base);
        cfg.validate().map_err(|e| match e {
            Error::Config { key, detail } => match set_by_flag.iter().find(|(k, _)| *k == key) {
                Some((_, flag)) => Error::Config { detail: format!("--set {flag}: {detail}"), key },
                None => Error::Config { detail: format!("{detail} (in {})", path.display()), key },
            },
            other => other,
        })?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        for p in self.file_paths_mut() {
            if p.is_relative() && !p.exists() && base.join(&*p).exists() {
                *p = base.join(&*p);
            }
        }
    }

    /// Every file path the plan names: base model, datasets, validation set, initial adapter.
    pub fn file_paths_mut(&mut self) -> impl Iterator<Item = &mut PathBuf> {
        std::iter::once(&mut self.base_model)
            .chain(self.datasets.iter_mut().map(|d| &mut d.path))
            .chain(self.val_set.iter_mut().map(|v| &mut v.path))
            .chain(self.init_adapter.iter_mut())
    }

    /// How to hold the base model's frozen weights.
    pub fn load_options(&self) -> Result<crate::models::load::LoadOptions> {
        let bf16 = match self.base_dtype.as_str() {
            "f32" => false,
            "bf16" => true,
            other => return Err(Error::config("base_dtype", format!("`{other}`: expected \"f32\" or \"bf16\""))),
        };
        Ok(crate::models::load::LoadOptions { keep_quantized: self.load_quantized, bf16 })
    }

    pub fn validate(&self) -> Result<()> {
        let pos = |k: &str, v: usize| if v == 0 { Err(Error::config(k, "must be at least 1")) } else { Ok(()) };
        if self.datasets.is_empty() {
            return Err(Error::config("datasets", "at least one dataset is needed"));
        }
        pos("sequence_len", self.sequence_len)?;
        pos("micro_batch_size", self.micro_batch_size)?;
        pos("gradient_accumulation_steps", self.gradient_accumulation_steps)?;
        pos("lora_r", self.lora_r)?;
        let in_range = |key: &str, v: f64, ok: bool, expected: &str| {
            if v.is_finite() && ok {
                Ok(())
            } else {
                Err(Error::config(key, format!("is {v}; expected {expected}")))
            }
        };
        in_range("learning_rate", self.learning_rate, self.learning_rate > 0.0, "a positive number such as 2e-4")?;
        in_range("lora_alpha", self.lora_alpha, self.lora_alpha > 0.0, "a positive number (0 scales the adapter to nothing: training would change nothing)")?;
        let dropout = self.lora_dropout;
        in_range("lora_dropout", dropout, (0.0..1.0).contains(&dropout), "a probability in [0, 1)")?;
        in_range("adam_beta1", self.adam_beta1, (0.0..1.0).contains(&self.adam_beta1), "a number in [0, 1) such as 0.9")?;
        in_range("adam_beta2", self.adam_beta2, (0.0..1.0).contains(&self.adam_beta2), "a number in [0, 1) such as 0.999")?;
        in_range("adam_epsilon", self.adam_epsilon, self.adam_epsilon > 0.0, "a small positive number such as 1e-8 (0 divides by zero where a moment is 0)")?;
        in_range("weight_decay", self.weight_decay, self.weight_decay >= 0.0, "0 or a positive number such as 0.01")?;
        in_range("max_grad_norm", self.max_grad_norm, self.max_grad_norm >= 0.0, "a positive number, or 0 to disable clipping")?;
        if !["adamw", "mezo"].contains(&self.optimizer.as_str()) {
            return Err(Error::config("optimizer", format!("is \"{}\"; expected \"adamw\" or \"mezo\" (zeroth-order)", self.optimizer)));
        }
        if let Some(e) = self.zo_eps {
            in_range("zo_eps", e, e > 0.0 && e.is_finite(), "a small positive perturbation such as 1e-3")?;
        }
        if self.zo_n_spsa == Some(0) {
            return Err(Error::config("zo_n_spsa", "must be at least 1"));
        }
        if self.optimizer != "mezo" && (self.zo_eps.is_some() || self.zo_n_spsa.is_some()) {
            let key = if self.zo_eps.is_some() { "zo_eps" } else { "zo_n_spsa" };
            return Err(Error::config(key, "is a setting of optimizer = \"mezo\", and this plan uses adamw"));
        }
        if self.zo_offload {
            if self.optimizer != "mezo" {
                return Err(Error::config("zo_offload", "streams the weights of a zeroth-order run: set optimizer = \"mezo\""));
            }
            if self.adapter != "full" {
                return Err(Error::config(
                    "zo_offload",
                    format!("offloads full fine-tuning's weights: set adapter = \"full\" (this plan has \"{}\", whose parameters are small enough to stay in memory)", self.adapter),
                ));
            }
            if self.zo_n_spsa.unwrap_or(1) > 1 {
                return Err(Error::config("zo_n_spsa", "is above 1, and zo_offload runs one direction per step (as ZO2 does)"));
            }
        }
        if self.zo_window == Some(0) {
            return Err(Error::config("zo_window", "must be at least 1 block"));
        }
        if self.zo_window.is_some() && !self.zo_offload {
            return Err(Error::config("zo_window", "is a setting of zo_offload = true"));
        }
        if let Some(e) = self.num_epochs {
            in_range("num_epochs", e, e > 0.0, "a positive number of epochs")?;
        }
        if let Some(v) = self.val_size {
            in_range("val_size", v, v > 0.0, "a share below 1 or a positive count of examples")?;
        }
        if self.max_steps == Some(0) {
            return Err(Error::config("max_steps", "is 0; expected at least 1 step (or leave it out and set num_epochs)"));
        }
        if self.num_epochs.is_none() && self.max_steps.is_none() {
            return Err(Error::config("num_epochs", "set num_epochs or max_steps"));
        }
        if self.val_set.is_some() && self.val_size.is_some() {
            return Err(Error::config("val_size", "give val_set or val_size, not both"));
        }
        crate::optim::LrSchedule::parse(&self.lr_scheduler)?;
        self.load_options()?;
        for d in self.datasets.iter().chain(self.val_set.iter()) {
            crate::data::DatasetFormat::from_config("datasets.type", &d.format)?;
        }
        crate::methods::registry::validate(&crate::methods::MethodSpec::from_config(self))?;
        let objective = crate::objectives::create(&self.objective_spec())?;
        if self.sample_packing && !objective.packs() {
            return Err(Error::config(
                "sample_packing",
                format!("packs examples into shared rows, and objective \"{}\" needs one example per row; use it with sft, dft, asft, masked_thought or roste", objective.name()),
            ));
        }
        Ok(())
    }

    pub fn objective_spec(&self) -> crate::objectives::ObjectiveSpec {
        crate::objectives::ObjectiveSpec { name: self.objective.clone(), options: self.objective_options.clone() }
    }

    pub fn target_modules(&self) -> TargetModules {
        self.lora_target_modules.resolve()
    }
}

/// Moves the top-level keys `owns` recognises into the sub-table `into`.
fn set_aside(table: &mut toml::Table, into: &str, owns: fn(&str) -> bool) {
    let keys: Vec<String> = table.keys().filter(|k| owns(k)).cloned().collect();
    let mut moved = toml::Table::new();
    for k in keys {
        if let Some(v) = table.remove(&k) {
            moved.insert(k, v);
        }
    }
    if !moved.is_empty() {
        table.insert(into.into(), toml::Value::Table(moved));
    }
}

/// A type error while reading the plan, as a message naming the key and where its value came
/// from: `--set KEY=VALUE`, or the config file and the key's line in it.
fn blame_key(path: &Path, text: &str, set_by_flag: &[(String, &str)], e: serde_path_to_error::Error<toml::de::Error>) -> Error {
    let key_path = e.path().to_string();
    let message = plain_types(e.inner().message());
    // serde reports a missing or unknown key at the enclosing table; name the key itself.
    let named = |prefix: &str| message.strip_prefix(prefix).and_then(|m| m.split('`').next()).map(str::to_string);
    let key = named("unknown field `").or_else(|| named("missing field `")).map_or(key_path.clone(), |k| {
        if key_path == "." || key_path.is_empty() {
            k
        } else {
            format!("{key_path}.{k}")
        }
    });
    let top = key.split(['.', '[']).next().unwrap_or(&key).to_string();
    if let Some((_, flag)) = set_by_flag.iter().find(|(k, _)| *k == top) {
        return Error::config(top, format!("--set {flag}: {message}"));
    }
    let line = text
        .lines()
        .position(|l| l.trim_start().strip_prefix(top.as_str()).is_some_and(|rest| rest.trim_start().starts_with('=')))
        .map(|i| format!(" (line {})", i + 1))
        .unwrap_or_default();
    Error::format(path, format!("key `{key}`{line}: {message}"))
}

/// serde's type names as a user would say them.
fn plain_types(message: &str) -> String {
    [("expected f64", "expected a number"), ("expected f32", "expected a number"), ("expected usize", "expected a whole number ≥ 0"), ("expected u64", "expected a whole number ≥ 0"), ("expected a boolean", "expected true or false")]
        .iter()
        .fold(message.to_string(), |m, (from, to)| m.replace(from, to))
}

/// A `--set` value: TOML syntax when it parses (numbers, booleans, arrays, quoted strings),
/// otherwise the raw text as a string (so paths need no quoting).
fn parse_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}
