//! The one place that maps names to methods: the plan's `adapter = "<name>"` to a constructor,
//! and an adapter folder's `adapter_config.json` to the loader of the method that wrote it.

use super::{adaptformer, dora, eva, flora, full, graft, greentrainer, hft, lift, locft, lora, lt_sft, lora_pro, residual, sara, snella, spt, ssf, triadaptlora, Method, MethodSpec, ADAPTER_CONFIG, METHOD_KEY};
use crate::error::{Error, Result};
use crate::models::Llama;
use std::collections::BTreeMap;
use std::path::Path;

/// A method as the registry knows it.
pub struct Entry {
    /// The config name.
    pub name: &'static str,
    /// One line for `--help`-like listings and the README.
    pub summary: &'static str,
    /// The method's own plan keys (beyond the shared `lora_*` keys).
    pub keys: &'static [&'static str],
    /// Builds the method, unattached, from the plan; checks its keys' values.
    pub create: fn(&MethodSpec) -> Result<Box<dyn Method>>,
    /// Reads an adapter folder this method wrote (its parsed `adapter_config.json` given) and
    /// attaches it to the model.
    pub load: fn(&mut Llama, &Path, &serde_json::Value) -> Result<Box<dyn Method>>,
    /// Whether an adapter folder without a [`METHOD_KEY`] (one PEFT wrote) is this method's.
    pub claims_peft: fn(&serde_json::Value) -> bool,
}

/// `claims_peft` for methods PEFT has no layout for.
pub fn not_peft(_: &serde_json::Value) -> bool {
    false
}

/// Every method, in the order listings show them. A PEFT folder goes to the first entry that
/// claims it, so the more specific claims (DoRA's `use_dora`) must not be shadowed: LoRA's
/// claim excludes them.
const ENTRIES: &[&Entry] = &[&lora::LORA, &dora::DORA, &residual::PISSA, &residual::OLORA, &residual::CORDA, &eva::EVA, &lora_pro::LORA_PRO, &flora::FLORA, &triadaptlora::TRIADAPTLORA, &ssf::SSF, &adaptformer::ADAPTFORMER, &adaptformer::MOSA, &full::FULL, &hft::HFT, &lift::LIFT, &sara::SARA, &lt_sft::LT_SFT, &greentrainer::GREENTRAINER, &spt::SPT, &locft::LOCFT_BF, &snella::SNELLA, &graft::GRAFT];

pub fn entries() -> &'static [&'static Entry] {
    ENTRIES
}

pub fn names() -> Vec<&'static str> {
    ENTRIES.iter().map(|e| e.name).collect()
}

fn entry(name: &str) -> Result<&'static Entry> {
    ENTRIES
        .iter()
        .copied()
        .find(|e| e.name == name)
        .ok_or_else(|| Error::config("adapter", format!("`{name}` is not a method ferrotune knows (known: {})", names().join(", "))))
}

/// Whether some method declares `key` as one of its plan keys.
pub fn is_method_key(key: &str) -> bool {
    ENTRIES.iter().any(|e| e.keys.contains(&key))
}

/// Checks the plan's method: a known name, only its own keys, and values it accepts.
pub fn validate(spec: &MethodSpec) -> Result<()> {
    let e = entry(&spec.adapter)?;
    check_keys(e, &spec.options)?;
    (e.create)(spec).map(drop)
}

fn check_keys(e: &Entry, options: &BTreeMap<String, toml::Value>) -> Result<()> {
    for key in options.keys() {
        if e.keys.contains(&key.as_str()) {
            continue;
        }
        let owners: Vec<&str> = ENTRIES.iter().filter(|o| o.keys.contains(&key.as_str())).map(|o| o.name).collect();
        let detail = if owners.is_empty() {
            "unknown field".to_string()
        } else {
            format!("applies to adapter = {}, and this plan has adapter = \"{}\"", owners.join(" or "), e.name)
        };
        return Err(Error::config(key.as_str(), detail));
    }
    Ok(())
}

/// The plan's method, built and not yet attached.
pub fn create(spec: &MethodSpec) -> Result<Box<dyn Method>> {
    let e = entry(&spec.adapter)?;
    check_keys(e, &spec.options)?;
    (e.create)(spec)
}

/// Which method wrote the adapter folder whose parsed config is `cfg` (read from `path`).
pub fn method_of(cfg: &serde_json::Value, path: &Path) -> Result<&'static str> {
    if let Some(name) = cfg.get(METHOD_KEY) {
        let name = name.as_str().ok_or_else(|| Error::format(path, format!("field `{METHOD_KEY}`: expected a method name")))?;
        return entry(name).map(|e| e.name).map_err(|_| {
            Error::format(path, format!("field `{METHOD_KEY}`: `{name}` is not a method this ferrotune knows (known: {}); was it written by a newer version?", names().join(", ")))
        });
    }
    // A specific claim (EVA's `init_lora_weights`, DoRA's `use_dora`) beats LoRA's generic one.
    let claims: Vec<&str> = ENTRIES.iter().filter(|e| (e.claims_peft)(cfg)).map(|e| e.name).collect();
    claims.iter().copied().find(|&n| n != "lora").or(claims.first().copied()).ok_or_else(|| {
        let peft_type = cfg.get("peft_type").and_then(|v| v.as_str()).unwrap_or("(none)");
        Error::format(path, format!("field `peft_type`: `{peft_type}` is not an adapter type ferrotune reads (it reads LoRA-family PEFT adapters and its own methods: {})", names().join(", ")))
    })
}

/// Reads the adapter folder `dir` and attaches it to `model`, whichever method wrote it.
pub fn load(model: &mut Llama, dir: &Path) -> Result<Box<dyn Method>> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = crate::io_util::read_to_string(&path)?;
    let cfg: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::format(&path, format!("invalid JSON: {e}")))?;
    if !cfg.is_object() {
        return Err(Error::format(&path, "expected a JSON object"));
    }
    let e = entry(method_of(&cfg, &path)?)?;
    (e.load)(model, dir, &cfg)
}
