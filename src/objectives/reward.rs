//! Verifiable rewards for online objectives (GRPO, SASR): a completion is scored against the
//! example's own reference completion (the demonstration the data holds), 1 for a match and 0
//! otherwise.
//! - `gsm8k`: the number after the last `####` of each, compared as numbers (`1,000` = `1000`
//!   = `1000.0`); a completion without `####` and a number scores 0;
//! - `exact`: the two texts equal after trimming whitespace;
//! - `contains`: the completion contains the reference (trimmed);
//! - `regex`: `grpo_reward_pattern` is searched in both; its first capture group (the whole
//!   match when it has none) must be found in both and be equal.

use super::ObjectiveSpec;
use crate::error::{Error, Result};
use regex::Regex;
use std::sync::LazyLock;

/// Why a reward could not be built: its name, or its pattern.
#[derive(Debug)]
pub enum RewardError {
    Name(String),
    Pattern(String),
}

#[derive(Debug, Clone)]
pub enum Reward {
    Gsm8k,
    Exact,
    Contains,
    Regex(Regex),
}

static NUMBER: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"-?[0-9][0-9,]*(?:\.[0-9]+)?|-?\.[0-9]+").expect("a valid pattern"));

/// The number after the last `####` of `text`.
pub fn gsm8k_answer(text: &str) -> Option<f64> {
    let tail = &text[text.rfind("####")? + 4..];
    let m = NUMBER.find(tail.trim_start())?;
    // Only a number that starts the answer counts (`#### 72`, not `#### about 72`).
    if m.start() != 0 {
        return None;
    }
    m.as_str().replace(',', "").parse().ok()
}

impl Reward {
    pub fn from_spec(spec: &ObjectiveSpec) -> Result<Self> {
        let keys = spec.keys();
        let pattern = keys.string("grpo_reward_pattern")?;
        let name = keys.choice_or("grpo_reward", &["gsm8k", "exact", "contains", "regex"])?;
        if name == "regex" && pattern.is_none() {
            return Err(Error::config("grpo_reward", "is \"regex\"; set grpo_reward_pattern too (e.g. \"answer: (\\\\w+)\")"));
        }
        Self::named(name, pattern.as_deref()).map_err(|e| match e {
            RewardError::Pattern(msg) => Error::config("grpo_reward_pattern", msg),
            RewardError::Name(msg) => Error::config("grpo_reward", msg),
        })
    }

    /// The reward called `name` (`gsm8k`, `exact`, `contains`, `regex`; `regex` with its
    /// pattern).
    pub fn named(name: &str, pattern: Option<&str>) -> std::result::Result<Self, RewardError> {
        match (name, pattern) {
            ("regex", Some(p)) => Regex::new(p).map(Reward::Regex).map_err(|e| RewardError::Pattern(format!("is not a valid regular expression: {e}"))),
            ("regex", None) => Err(RewardError::Name("is \"regex\"; give its pattern too (e.g. \"answer: (\\\\w+)\")".into())),
            (_, Some(_)) => Err(RewardError::Pattern("applies to the regex reward only".into())),
            ("gsm8k", None) => Ok(Reward::Gsm8k),
            ("exact", None) => Ok(Reward::Exact),
            ("contains", None) => Ok(Reward::Contains),
            (other, None) => Err(RewardError::Name(format!("`{other}`: expected gsm8k, exact, contains or regex"))),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Reward::Gsm8k => "gsm8k",
            Reward::Exact => "exact",
            Reward::Contains => "contains",
            Reward::Regex(_) => "regex",
        }
    }

    /// What the reward compares, taken from a reference completion; `None` when the reference
    /// itself has nothing to compare (no `#### answer`, no pattern match).
    pub fn key_of(&self, text: &str) -> Option<String> {
        match self {
            Reward::Gsm8k => gsm8k_answer(text).map(|v| v.to_string()),
            Reward::Exact | Reward::Contains => Some(text.trim().to_string()),
            Reward::Regex(re) => re.captures(text).map(|c| c.get(1).or_else(|| c.get(0)).map_or("", |m| m.as_str()).trim().to_string()),
        }
    }

    /// 1 when `completion` matches `reference`, else 0.
    pub fn score(&self, completion: &str, reference: &str) -> f64 {
        if let Reward::Contains = self {
            let want = reference.trim();
            return (!want.is_empty() && completion.contains(want)) as u8 as f64;
        }
        match (self.key_of(completion), self.key_of(reference)) {
            (Some(a), Some(b)) if a == b => 1.0,
            _ => 0.0,
        }
    }

    pub fn describe(&self) -> serde_json::Value {
        match self {
            Reward::Regex(re) => serde_json::json!({ "name": "regex", "pattern": re.as_str() }),
            other => serde_json::json!({ "name": other.name() }),
        }
    }
}
