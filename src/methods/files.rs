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
