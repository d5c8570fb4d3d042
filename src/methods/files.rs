//! Writing and reading an adapter folder's two files, shared by every method:
//! `adapter_model.safetensors` (f32 tensors) and `adapter_config.json`.

use super::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use crate::error::{Error, Result};
use crate::formats::safetensors::{self as st, SaveDType};
use candle_core::{Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

/// Writes `tensors` and `config` into `dir` (created if needed). `peft` adds the safetensors
/// metadata PEFT's files carry (`format = pt`).
pub fn write_adapter(dir: &Path, tensors: &[(String, Tensor)], config: &serde_json::Value, peft: bool) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let meta = peft.then(|| HashMap::from([("format".to_string(), "pt".to_string())]));
    st::save(&dir.join(ADAPTER_WEIGHTS), tensors, SaveDType::F32, meta)?;
    let text = serde_json::to_string_pretty(config).expect("JSON values always serialise");
    crate::io_util::write_atomic(&dir.join(ADAPTER_CONFIG), text.as_bytes())
}

/// The current values of named parameters, as [`write_adapter`] takes them.
pub fn param_tensors(params: Vec<(String, Var)>) -> Vec<(String, Tensor)> {
    params.into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect()
}

/// Refuses tensors left over after a method took the ones its sites need: they belong to sites
/// this model does not have (`what` says which kind).
pub fn refuse_leftovers(tensors: &HashMap<String, Tensor>, src: &Path, what: &str) -> Result<()> {
    match tensors.keys().min() {
        Some(extra) => Err(Error::format(src, format!("tensor `{extra}` does not belong to any {what} of this model"))),
        None => Ok(()),
    }
}

/// A method's `adapter_config.json`: its `settings` (an object) marked with the method and the
/// base model, as every non-PEFT method writes it.
pub fn method_config(method: &str, base_model: &str, mut settings: serde_json::Value) -> serde_json::Value {
    settings[super::METHOD_KEY] = method.into();
    settings["base_model_name_or_path"] = base_model.into();
    settings["ferrotune_version"] = env!("CARGO_PKG_VERSION").into();
    settings
}

/// Adds `fields` to the `adapter_config.json` another writer put in `dir` (a method built on
/// another's files records its own settings beside them).
pub fn amend_config(dir: &Path, fields: &[(&str, serde_json::Value)]) -> Result<()> {
    let path = dir.join(ADAPTER_CONFIG);
    let mut cfg: serde_json::Value = serde_json::from_str(&crate::io_util::read_to_string(&path)?).map_err(|e| Error::format(&path, e.to_string()))?;
    for (k, v) in fields {
        cfg[*k] = v.clone();
    }
    crate::io_util::write_atomic(&path, serde_json::to_string_pretty(&cfg).expect("JSON values always serialise").as_bytes())
}
