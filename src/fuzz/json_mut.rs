//! Structure-aware mutation of JSON, JSON Lines and TOML: parse the seed, change one node of
//! the tree (a value of the wrong type, a huge or negative number, a NaN-like string, deep
//! nesting, a dropped, renamed, unknown or duplicated key), serialize, and sometimes add
//! byte-level havoc on top so the parsers' own error paths are hit too.

use super::mutate::{below, havoc, one_in, pick};
use crate::rng::SplitMix64;
use serde_json::{json, Map, Value};

/// Keys the project's files use, so that a mutation can add a key some reader looks for.
const KEYS: [&str; 24] = [
    "model_type", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "num_hidden_layers", "vocab_size", "rope_scaling", "rope_type", "factor", "eos_token_id",
    "r", "lora_alpha", "target_modules", "messages", "role", "content", "text", "prompt",
    "completion", "chosen", "rejected", "chat_template", "type",
];

fn weird_value(rng: &mut SplitMix64) -> Value {
    match rng.below(16) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(-1),
        3 => json!(0),
        4 => json!(u64::MAX),
        5 => json!(i64::MIN),
        6 => json!(1e308),
        7 => json!(-0.5),
        8 => json!(*pick(rng, &["NaN", "Infinity", "-inf", "1e999", "0x10"])),
        9 => json!(""),
        10 => json!([]),
        11 => json!({}),
        12 if one_in(rng, 2) => json!(*pick(rng, &KEYS)),
        // safetensors dtypes, so a header mutation can retype a tensor.
        12 => json!(*pick(rng, &["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3"])),
        13 => json!(4294967296u64),
        14 => json!(2.5),
        _ => json!("\u{0}\u{FFFD}<|im_end|>{{ x }}{% if %}"),
    }
}

/// A random node of `v` (itself included), reached by a random walk from the root.
fn random_node<'a>(rng: &mut SplitMix64, v: &'a mut Value) -> &'a mut Value {
    let n = match &*v {
        Value::Array(a) => a.len(),
        Value::Object(o) => o.len(),
        _ => 0,
    };
    if n == 0 || one_in(rng, 3) {
        return v;
    }
    let i = below(rng, n);
    let child = match v {
        Value::Array(a) => &mut a[i],
        Value::Object(o) => o.values_mut().nth(i).expect("index below len"),
        _ => unreachable!("only containers have children"),
    };
    random_node(rng, child)
}

fn mutate_node(rng: &mut SplitMix64, node: &mut Value) {
    match rng.below(8) {
        0 | 1 => *node = weird_value(rng),
        2 => {
            // Deep nesting: shallow enough to parse sometimes, deep enough to hit limits.
            let depth = *pick(rng, &[3usize, 100, 127, 129, 1000]);
            let mut v = std::mem::take(node);
            for _ in 0..depth {
                // Built directly: `json!` would copy the whole subtree at every level.
                v = if one_in(rng, 2) {
                    Value::Array(vec![v])
                } else {
                    Value::Object(Map::from_iter([("k".to_string(), v)]))
                };
            }
            *node = v;
        }
        3 => match node {
            Value::Object(o) if !o.is_empty() => {
                let k = o.keys().nth(below(rng, o.len())).cloned().expect("index below len");
                o.remove(&k);
            }
            Value::Array(a) if !a.is_empty() => {
                a.remove(below(rng, a.len()));
            }
            _ => *node = weird_value(rng),
        },
        4 => match node {
            Value::Object(o) => {
                o.insert(pick(rng, &KEYS).to_string(), weird_value(rng));
            }
            Value::Array(a) => {
                let v = a.first().cloned().unwrap_or(Value::Null);
                for _ in 0..=below(rng, 3) {
                    a.push(if one_in(rng, 2) { v.clone() } else { weird_value(rng) });
                }
            }
            _ => *node = json!([node.clone()]),
        },
        5 => {
            if let Value::Number(n) = node {
                let f = n.as_f64().unwrap_or(0.0);
                *node = pick(rng, &[json!(-f), json!(f * 1e6), json!(f as i64 + 1), json!(f.trunc() + 0.5)]).clone();
            } else {
                *node = json!(rng.next_u64() >> rng.below(64));
            }
        }
        6 => {
            if let Value::String(s) = node {
                let mut b = s.clone().into_bytes();
                havoc(rng, &mut b, &[]);
                *s = String::from_utf8_lossy(&b).into_owned();
            } else {
                *node = json!(node.to_string());
            }
        }
        _ => {
            if let Value::Object(o) = node {
                // Rename a key (a typo a user could make).
                if let Some(k) = o.keys().nth(below(rng, o.len().max(1))).cloned() {
                    let v = o.remove(&k).unwrap_or(Value::Null);
                    o.insert(format!("{k}_"), v);
                }
            } else {
                *node = Value::Object(Map::new());
            }
        }
    }
}

/// Serializes, sometimes repeating the first key of the top-level object (serde_json keeps the
/// last duplicate; a reader must not care either way).
fn serialize(rng: &mut SplitMix64, v: &Value) -> String {
    let compact = serde_json::to_string(v).expect("serializing a JSON value cannot fail");
    // Pretty-printing deep nesting is quadratic (a 3000-deep value indents to megabytes, which
    // only slows the run down), so it is kept for documents where it stays small.
    let pretty = one_in(rng, 3).then(|| serde_json::to_string_pretty(v).expect("serializing a JSON value cannot fail"));
    let text = match pretty {
        Some(p) if p.len() <= 8 * compact.len() + 4096 => p,
        _ => compact,
    };
    if let (Value::Object(o), true) = (v, one_in(rng, 10)) {
        if let Some((k, _)) = o.iter().next() {
            let dup = format!("{{{}: {},", json!(k), weird_value(rng));
            return text.replacen('{', &dup, 1).replacen(",}", "}", 1);
        }
    }
    text
}

/// One mutated JSON document.
pub fn mutate_json(rng: &mut SplitMix64, seed: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    let mut out = match serde_json::from_slice::<Value>(seed) {
        Ok(mut v) if !one_in(rng, 6) => {
            for _ in 0..=rng.below(3) {
                let node = random_node(rng, &mut v);
                mutate_node(rng, node);
            }
            serialize(rng, &v).into_bytes()
        }
        _ => seed.to_vec(),
    };
    if one_in(rng, 4) || out == seed {
        havoc(rng, &mut out, others);
    }
    out
}

/// One mutated JSON Lines file: one line mutated as JSON, or lines dropped, duplicated,
/// blanked, given `\r`, a BOM or invalid UTF-8.
pub fn mutate_jsonl(rng: &mut SplitMix64, seed: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    let mut lines: Vec<Vec<u8>> = seed.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
    for _ in 0..=rng.below(2) {
        let i = below(rng, lines.len());
        match rng.below(8) {
            0..=3 => lines[i] = mutate_json(rng, &lines[i], &[]),
            4 => {
                let l = lines[i].clone();
                lines.insert(i, l);
            }
            5 if lines.len() > 1 => drop(lines.remove(i)),
            6 => {
                let tails: [&[u8]; 4] = [b"\r", b" ", b"\xff", b"\t\r"];
                let tail = *pick(rng, &tails);
                lines[i].extend_from_slice(tail)
            }
            _ => lines.insert(i, pick(rng, &[&b""[..], b"   ", b"\xEF\xBB\xBF{}", b"[]", b"null"]).to_vec()),
        }
    }
    let mut out = lines.join(&b'\n');
    if one_in(rng, 5) {
        havoc(rng, &mut out, others);
    }
    out
}

fn weird_toml(rng: &mut SplitMix64) -> toml::Value {
    use toml::Value as T;
    match rng.below(12) {
        0 => T::Integer(-1),
        1 => T::Integer(0),
        2 => T::Integer(i64::MAX),
        3 => T::Float(f64::NAN),
        4 => T::Float(f64::INFINITY),
        5 => T::Float(-0.0),
        6 => T::String(String::new()),
        7 => T::Boolean(true),
        8 => T::Array(vec![]),
        9 => T::Table(toml::Table::new()),
        10 => T::String("../../nonexistent\u{0}".into()),
        _ => T::Float(1e300),
    }
}

/// Keys of the run plan plus a few it does not know.
const PLAN_KEYS: [&str; 16] = [
    "base_model", "datasets", "val_set", "val_size", "lora_r", "lora_alpha", "lora_dropout",
    "lora_target_modules", "sequence_len", "micro_batch_size", "num_epochs", "max_steps",
    "learning_rate", "lr_scheduler", "base_dtype", "unknown_key",
];

/// Separates the TOML text from the `--set` overrides in a run-plan fuzz input (one per line).
pub const SETS_MARKER: &str = "\n#--set\n";

/// One mutated run plan: the TOML (tree- or byte-mutated) plus zero or more `--set` lines.
pub fn mutate_plan(rng: &mut SplitMix64, seed: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    let text = String::from_utf8_lossy(seed);
    let (toml_text, _) = text.split_once(SETS_MARKER).unwrap_or((&text, ""));
    let mut out = match toml::from_str::<toml::Table>(toml_text) {
        Ok(mut t) if !one_in(rng, 5) => {
            for _ in 0..=rng.below(2) {
                let key = pick(rng, &PLAN_KEYS).to_string();
                match rng.below(4) {
                    0 => drop(t.remove(&key)),
                    1 => {
                        let depth = *pick(rng, &[2usize, 50, 500]);
                        let mut v = weird_toml(rng);
                        for _ in 0..depth {
                            v = toml::Value::Array(vec![v]);
                        }
                        t.insert(key, v);
                    }
                    _ => drop(t.insert(key, weird_toml(rng))),
                }
            }
            toml::to_string(&t).unwrap_or_default().into_bytes()
        }
        _ => toml_text.as_bytes().to_vec(),
    };
    if one_in(rng, 4) {
        havoc(rng, &mut out, others);
    }
    out.extend_from_slice(SETS_MARKER.as_bytes());
    for _ in 0..below(rng, 3) {
        let key = *pick(rng, &PLAN_KEYS);
        let value = *pick(
            rng,
            &["-1", "0", "99999999999999999999999", "nan", "inf", "[]", "{ a = 1 }", "\"x\"", "=", "", "1e999", "[1, [2]]", "true"],
        );
        let line = match rng.below(6) {
            0 => value.to_string(),
            1 => format!("={value}"),
            _ => format!("{key}={value}"),
        };
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out
}

/// One mutated safetensors file: its JSON header mutated as JSON (dtypes, shapes and data
/// offsets get wrong types and out-of-range values) and re-framed, or the 8-byte header
/// length overwritten, or byte havoc.
pub fn mutate_safetensors(rng: &mut SplitMix64, seed: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    let header_len = seed
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
        .filter(|&n| n <= seed.len() - 8);
    let Some(n) = header_len else {
        let mut out = seed.to_vec();
        havoc(rng, &mut out, others);
        return out;
    };
    let (header, data) = seed[8..].split_at(n);
    let mut out;
    match rng.below(6) {
        0 => {
            out = seed.to_vec();
            let v = super::mutate::interesting(rng, seed.len());
            super::mutate::put_le(&mut out, 0, 8, v);
        }
        1 => {
            out = seed.to_vec();
            havoc(rng, &mut out, others);
        }
        _ => {
            let header = mutate_json(rng, header, &[]);
            out = (header.len() as u64).to_le_bytes().to_vec();
            out.extend_from_slice(&header);
            out.extend_from_slice(data);
        }
    }
    out
}
