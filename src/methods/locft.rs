//! LocFT-BF (`METHODS.md` §3.7), fine-tuning done right for model editing, as a preset: the
//! whole weight of one located module trains, with the ordinary breadth-first loop (epochs of
//! mini-batches over every edit, which is what `ferrotune train` does) rather than each edit
//! optimised to convergence in turn.
//!
//! The location is `locft_module` (default `mlp.down_proj`) of layer `locft_layer`. The
//! official configs tune `model.layers.22.mlp.down_proj` of Llama-3-8B (32 layers) and layer 6
//! of Qwen2.5-7B (28 layers), found by the paper's location sweep; the default here is the
//! Llama-family one scaled to the model's depth, `round(22/32 · L)` (layer 21 of SmolLM2's 30).
//! Sweep `locft_layer` on a dev set for another family. The official recipe around it: lr 5e-4,
//! loss on the new target only (`train_on_inputs = false`), EOS appended, batches of 100,
//! 25 epochs; its early stop below a loss of 1e-2 is left to `max_steps`/`num_epochs`.

use super::full::Selected;
use super::registry::Entry;
use super::{Method, MethodSpec};
use crate::error::{Error, Result};
use crate::models::{Llama, SiteInfo};
use std::path::Path;

pub const LOCFT_BF: Entry = Entry {
    name: "locft_bf",
    summary: "LocFT-BF: the whole weight of one located module trains (default the MLP down projection at 22/32 of the depth), breadth-first",
    keys: &["locft_layer", "locft_module"],
    create,
    load,
    claims_peft: super::registry::not_peft,
};

fn create(spec: &MethodSpec) -> Result<Box<dyn Method>> {
    let layer = match spec.options.get("locft_layer") {
        Some(_) => serde_json::json!(spec.usize_or("locft_layer", 0)?),
        None => serde_json::Value::Null,
    };
    let module = match spec.options.get("locft_module") {
        Some(toml::Value::String(s)) if !s.is_empty() => s.clone(),
        Some(other) => return Err(Error::config("locft_module", format!("is {other}; expected a module path inside a layer, such as \"mlp.down_proj\""))),
        None => "mlp.down_proj".into(),
    };
    Ok(Box::new(Selected::new("locft_bf", rule, serde_json::json!({ "locft_layer": layer, "locft_module": module }))))
}

fn load(model: &mut Llama, dir: &Path, cfg: &serde_json::Value) -> Result<Box<dyn Method>> {
    Ok(Box::new(Selected::load(model, dir, cfg, "locft_bf", rule)?))
}

/// The default layer for a model of `layers` layers: the official Llama-3-8B location (22 of
/// 32) at the same relative depth.
pub fn default_layer(layers: usize) -> usize {
    ((22.0 / 32.0 * layers as f64).round() as usize).min(layers.saturating_sub(1))
}

fn rule(sites: &[SiteInfo], settings: &serde_json::Value) -> Result<Vec<String>> {
    let layers = sites.iter().filter_map(|s| s.name.strip_prefix("model.layers.")?.split('.').next()?.parse::<usize>().ok()).max().map_or(0, |l| l + 1);
    let layer = settings["locft_layer"].as_u64().map_or_else(|| default_layer(layers), |l| l as usize);
    let module = settings["locft_module"].as_str().unwrap_or("mlp.down_proj");
    if layer >= layers {
        return Err(Error::config("locft_layer", format!("is {layer}, and the model has {layers} layers (0 to {})", layers.saturating_sub(1))));
    }
    let name = format!("model.layers.{layer}.{module}");
    if !sites.iter().any(|s| s.name == name) {
        return Err(Error::config("locft_module", format!("`{module}` is not a linear module of layer {layer} (expected e.g. mlp.down_proj, mlp.up_proj, self_attn.o_proj)")));
    }
    Ok(vec![name])
}
