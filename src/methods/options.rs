//! What a method reads from the run plan: the keys LoRA-family methods share (`lora_r`,
//! `lora_alpha`, …) and the method's own keys (`corda_method`, `eva_rho`, …), which each method
//! declares in its registry entry and parses here, with errors that name the key.

use super::{LoraConfig, TargetModules};
use crate::error::Result;
use crate::plan_keys::PlanKeys;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq)]
pub struct MethodSpec {
    /// The config name (`adapter = "<name>"`).
    pub adapter: String,
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub target_modules: TargetModules,
    pub use_rslora: bool,
    /// Drives every random initialisation.
    pub seed: u64,
    /// The run's peak learning rate (GreenTrainer's importance probe takes one step at it).
    pub learning_rate: f64,
    /// The method's own keys, as written in the plan.
    pub options: BTreeMap<String, toml::Value>,
}

impl MethodSpec {
    pub fn from_config(cfg: &crate::config::TrainConfig) -> Self {
        Self {
            adapter: cfg.adapter.clone(),
            r: cfg.lora_r,
            alpha: cfg.lora_alpha,
            dropout: cfg.lora_dropout as f32,
            target_modules: cfg.target_modules(),
            use_rslora: cfg.use_rslora,
            seed: cfg.seed,
            learning_rate: cfg.learning_rate,
            options: cfg.method_options.clone(),
        }
    }

    /// LoRA's settings from the shared keys.
    pub fn lora_config(&self) -> LoraConfig {
        LoraConfig {
            r: self.r,
            alpha: self.alpha,
            dropout: self.dropout,
            target_modules: self.target_modules.clone(),
            use_rslora: self.use_rslora,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
        }
    }

    fn keys(&self) -> PlanKeys<'_> {
        PlanKeys(&self.options)
    }

    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        self.keys().f64_or(key, default)
    }

    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        self.keys().usize_or(key, default)
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        self.keys().bool_or(key, default)
    }

    /// A string key restricted to `choices` (the first is the default).
    pub fn choice_or(&self, key: &str, choices: &[&'static str]) -> Result<&'static str> {
        self.keys().choice_or(key, choices)
    }
}
