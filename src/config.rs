//! The run plan: a TOML file of axolotl-like keys, overridden by `--set key=value`, validated
//! with every default resolved before anything heavy happens.

use crate::error::{Error, Result};
use crate::methods::TargetModules;
use serde::{Deserialize, Serialize};
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
    #[serde(default = "d_lora_r")]
    pub lora_r: usize,
    #[serde(default = "d_lora_alpha")]
    pub lora_alpha: f64,
    #[serde(default = "d_lora_dropout")]
    pub lora_dropout: f32,
    #[serde(default = "d_targets")]
    pub lora_target_modules: TargetSpec,
    #[serde(default)]
    pub use_rslora: bool,
    /// Continue training this PEFT adapter instead of initialising a new one.
    #[serde(default)]
    pub init_adapter: Option<PathBuf>,
    #[serde(default = "d_seq")]
    pub sequence_len: usize,
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
    #[serde(default = "d_true")]
    pub shuffle: bool,
    pub output_dir: PathBuf,
    /// Worker threads (0 = all cores).
    #[serde(default)]
    pub threads: usize,
}

fn d_adapter() -> String {
    "lora".into()
}
fn d_lora_r() -> usize {
    8
}
fn d_lora_alpha() -> f64 {
    16.0
}
fn d_lora_dropout() -> f32 {
    0.0
}
fn d_targets() -> TargetSpec {
    TargetSpec::Many(["q_proj", "k_proj", "v_proj", "o_proj"].map(String::from).to_vec())
}
fn d_seq() -> usize {
    512
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
        for o in overrides {
            let (key, value) = o
                .split_once('=')
                .ok_or_else(|| Error::config(o.as_str(), "--set expects key=value"))?;
            let key = key.trim();
            if key.is_empty() {
                return Err(Error::config(o.as_str(), "--set expects key=value (the key is empty)"));
            }
            let value = parse_value(value.trim());
            table.insert(key.to_string(), value);
        }
        // Deserialized from text (the file with the overrides merged in) rather than from the
        // table: a value of the wrong type then comes with a span, which names its key (the
        // table route says only "invalid type: sequence, expected f64").
        let merged = toml::to_string(&table).map_err(|e| Error::format(path, format!("cannot merge the --set overrides: {e}")))?;
        let mut cfg: TrainConfig = toml::from_str(&merged).map_err(|e| plan_error(path, &merged, &e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve_paths(base);
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() && !p.exists() && base.join(&*p).exists() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.base_model);
        self.datasets.iter_mut().for_each(|d| fix(&mut d.path));
        if let Some(v) = self.val_set.as_mut() {
            fix(&mut v.path);
        }
        if let Some(a) = self.init_adapter.as_mut() {
            fix(a);
        }
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
        if self.adapter != "lora" {
            return Err(Error::config("adapter", format!("`{}` is not supported yet (supported: lora)", self.adapter)));
        }
        if self.datasets.is_empty() {
            return Err(Error::config("datasets", "at least one dataset is needed"));
        }
        pos("sequence_len", self.sequence_len)?;
        pos("micro_batch_size", self.micro_batch_size)?;
        pos("gradient_accumulation_steps", self.gradient_accumulation_steps)?;
        pos("lora_r", self.lora_r)?;
        if self.num_epochs.is_none() && self.max_steps.is_none() {
            return Err(Error::config("num_epochs", "set num_epochs or max_steps"));
        }
        if self.num_epochs.is_some_and(|e| !(e > 0.0)) {
            return Err(Error::config("num_epochs", "must be positive"));
        }
        if !(self.learning_rate > 0.0) {
            return Err(Error::config("learning_rate", "must be positive"));
        }
        if self.val_set.is_some() && self.val_size.is_some() {
            return Err(Error::config("val_size", "give val_set or val_size, not both"));
        }
        if self.val_size.is_some_and(|v| !(v > 0.0)) {
            return Err(Error::config("val_size", "must be positive (a share < 1 or a count)"));
        }
        crate::optim::LrSchedule::parse(&self.lr_scheduler)?;
        self.load_options()?;
        for d in self.datasets.iter().chain(self.val_set.iter()) {
            crate::data::DatasetFormat::from_config("datasets.type", &d.format)?;
        }
        Ok(())
    }

    pub fn target_modules(&self) -> TargetModules {
        self.lora_target_modules.resolve()
    }
}

/// A deserialization error of the merged plan, quoting the line of the offending key (the
/// merged text's line numbers would not match the user's file, so they are not given).
fn plan_error(path: &Path, merged: &str, e: &toml::de::Error) -> Error {
    let line = e.span().and_then(|span| {
        let start = merged.get(..span.start)?.rfind('\n').map_or(0, |i| i + 1);
        merged[start..].lines().next()
    });
    match line {
        Some(l) if !l.trim().is_empty() => Error::format(path, format!("{} (in `{}`)", e.message(), l.trim())),
        _ => Error::format(path, e.message().to_string()),
    }
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
