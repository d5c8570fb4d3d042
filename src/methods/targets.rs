//! Which sites a method touches, in PEFT's `target_modules` semantics.

use crate::error::{Error, Result};
use crate::models::{Linear, Llama, SiteHook, SiteInfo};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    /// Every linear site except the LM head (PEFT's `"all-linear"`).
    AllLinear,
    /// Module names; a site matches when its full name equals an entry or ends with
    /// `.<entry>` (PEFT's rule for a list).
    Names(Vec<String>),
}

impl TargetModules {
    pub fn matches(&self, site: &str) -> bool {
        match self {
            Self::AllLinear => true,
            Self::Names(names) => names.iter().any(|n| site == n || site.ends_with(&format!(".{n}"))),
        }
    }

    /// The matching sites; an entry that matches nothing is an error (a typo would otherwise
    /// silently train less than the user asked for).
    pub fn select<'a>(&self, sites: &'a [SiteInfo], key: &str) -> Result<Vec<&'a SiteInfo>> {
        if let Self::Names(names) = self {
            if names.is_empty() {
                return Err(Error::config(key, "the list of target modules is empty"));
            }
            for n in names {
                if !sites.iter().any(|s| Self::Names(vec![n.clone()]).matches(&s.name)) {
                    let mut kinds: Vec<&str> = sites.iter().map(|s| s.short_name()).collect();
                    kinds.sort();
                    kinds.dedup();
                    return Err(Error::config(
                        key,
                        format!("`{n}` matches no module of this model (its linear modules: {})", kinds.join(", ")),
                    ));
                }
            }
        }
        Ok(sites.iter().filter(|s| self.matches(&s.name)).collect())
    }

    /// The `target_modules` value PEFT writes: `"all-linear"` or the sorted names.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Self::AllLinear => serde_json::Value::from("all-linear"),
            Self::Names(n) => {
                let mut n = n.clone();
                n.sort();
                n.dedup();
                serde_json::Value::from(n)
            }
        }
    }

    pub fn from_json(v: &serde_json::Value, key: &str) -> Result<Self> {
        match v {
            serde_json::Value::String(s) if s == "all-linear" => Ok(Self::AllLinear),
            serde_json::Value::String(s) => Ok(Self::Names(vec![s.clone()])),
            serde_json::Value::Array(a) => a
                .iter()
                .map(|x| x.as_str().map(str::to_string).ok_or_else(|| Error::config(key, "expected a list of module names")))
                .collect::<Result<Vec<_>>>()
                .map(Self::Names),
            _ => Err(Error::config(key, "expected \"all-linear\" or a list of module names")),
        }
    }
}

impl TargetModules {
    /// Full names of the linear sites of `model` this selects (errors as [`TargetModules::select`]).
    pub fn site_names(&self, model: &Llama) -> Result<Vec<String>> {
        Ok(self.select(&model.sites(), "lora_target_modules")?.into_iter().map(|s| s.name.clone()).collect())
    }
}

/// Puts a hook from `make(index among all linear sites, site)` on every linear site `targets`
/// selects, refusing a site that already carries a method; returns the hooks in site order.
pub fn hook_targets<H: SiteHook + 'static>(
    model: &mut Llama,
    targets: &TargetModules,
    mut make: impl FnMut(usize, &Linear) -> Result<Arc<H>>,
) -> Result<Vec<Arc<H>>> {
    let chosen = targets.site_names(model)?;
    let mut hooks = Vec::new();
    for (i, lin) in model.linears_mut().enumerate() {
        if !chosen.contains(&lin.name) {
            continue;
        }
        if lin.hook.is_some() {
            return Err(Error::Model(format!("module `{}` already has a method attached", lin.name)));
        }
        let hook = make(i, lin)?;
        lin.hook = Some(hook.clone());
        hooks.push(hook);
    }
    Ok(hooks)
}
