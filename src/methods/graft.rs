//! The artefact of skill localization by grafting (`ferrotune combine --method graft`,
//! [`crate::posthoc::graft`]): a sparse diff holding the task vector at the grafted entries,
//! the same file as the sparse methods' adapters. This entry reads it back for `eval`,
//! `generate`, `merge` and `export`; grafting is found, not trained, so `train` refuses it.

use super::registry::Entry;
use super::sparse::SparseSites;
use super::{Method, MethodSpec, METHOD_KEY};
use crate::error::{Error, Result};
use crate::models::Llama;
use candle_core::Var;
use std::path::Path;

pub const GRAFT: Entry = Entry {
    name: "graft",
    summary: "a grafted region of a fine-tune (θ0 + γ⊙τ, a sparse diff), made by `ferrotune combine --method graft`; read back, not trained",
    keys: &[],
    create,
    load,
    claims_peft: super::registry::not_peft,
};

fn create(_: &MethodSpec) -> Result<Box<dyn Method>> {
    Err(Error::config(
        "adapter",
        "`graft` is found from a finished fine-tune, not trained: run `ferrotune combine --method graft --model BASE --inputs FINE_TUNE --data TASK.jsonl`",
    ))
}

fn load(model: &mut Llama, dir: &Path, cfg: &serde_json::Value) -> Result<Box<dyn Method>> {
    Ok(Box::new(Grafted { sites: SparseSites::load(model, dir)?, settings: cfg.get("graft").cloned().unwrap_or(serde_json::Value::Null) }))
}

/// The config an adapter folder of a graft carries: how it was found, for the record.
pub fn config(base_model: &str, settings: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        METHOD_KEY: "graft",
        "base_model_name_or_path": base_model,
        "graft": settings,
        "ferrotune_version": env!("CARGO_PKG_VERSION"),
    })
}

pub struct Grafted {
    sites: SparseSites,
    settings: serde_json::Value,
}

impl Method for Grafted {
    fn name(&self) -> &'static str {
        "graft"
    }

    fn attach(&mut self, _model: &mut Llama) -> Result<()> {
        Err(Error::Model("a graft is read from its folder, not attached afresh".into()))
    }

    fn params(&self) -> Vec<(String, Var)> {
        self.sites.params()
    }

    fn sites(&self) -> Vec<String> {
        self.sites.names()
    }

    fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        self.sites.save(dir, &config(base_model, self.settings.clone()))
    }

    fn merge(&self, model: &mut Llama) -> Result<()> {
        self.sites.merge(model)
    }

    fn mergeable(&self) -> bool {
        true
    }

    fn describe(&self) -> serde_json::Value {
        let mut d = self.sites.describe();
        d["graft"] = self.settings.clone();
        d
    }
}
