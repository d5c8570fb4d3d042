//! Typed reads of the plan keys a component declares for itself (a method's `corda_method`, an
//! objective's `asft_lambda`, …), with errors that name the key.

use crate::error::{Error, Result};
use std::collections::BTreeMap;

pub struct PlanKeys<'a>(pub &'a BTreeMap<String, toml::Value>);

impl PlanKeys<'_> {
    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.0.get(key) {
            None => Ok(default),
            Some(toml::Value::Float(f)) if f.is_finite() => Ok(*f),
            Some(toml::Value::Integer(i)) => Ok(*i as f64),
            Some(v) => Err(Error::config(key, format!("is {v}; expected a number"))),
        }
    }

    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.0.get(key) {
            None => Ok(default),
            Some(toml::Value::Integer(i)) if *i >= 0 => Ok(*i as usize),
            Some(v) => Err(Error::config(key, format!("is {v}; expected a whole number ≥ 0"))),
        }
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.0.get(key) {
            None => Ok(default),
            Some(toml::Value::Boolean(b)) => Ok(*b),
            Some(v) => Err(Error::config(key, format!("is {v}; expected true or false"))),
        }
    }

    /// A string key restricted to `choices` (the first is the default).
    pub fn choice_or(&self, key: &str, choices: &[&'static str]) -> Result<&'static str> {
        let quoted = || choices.iter().map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(", ");
        match self.0.get(key) {
            None => Ok(choices[0]),
            Some(toml::Value::String(s)) => choices
                .iter()
                .find(|c| **c == s.as_str())
                .copied()
                .ok_or_else(|| Error::config(key, format!("`{s}`: expected one of {}", quoted()))),
            Some(v) => Err(Error::config(key, format!("is {v}; expected one of {}", quoted()))),
        }
    }

    /// A number key that must lie in `lo..=hi`.
    pub fn f64_in(&self, key: &str, default: f64, lo: f64, hi: f64) -> Result<f64> {
        let v = self.f64_or(key, default)?;
        if !(lo..=hi).contains(&v) {
            return Err(Error::config(key, format!("is {v}; expected a number in [{lo}, {hi}]")));
        }
        Ok(v)
    }

    /// A string key, if set.
    pub fn string(&self, key: &str) -> Result<Option<String>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(Error::config(key, format!("is {v}; expected a string"))),
        }
    }
}
