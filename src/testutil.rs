//! Test fixtures shared by the crate's tests (not part of the public API).
#![doc(hidden)]

// ---------------------------------------------------------------------------------------------
// Tiny tokenizer (data pipeline)

use crate::error::{Error, Result};
use std::path::Path;

/// Special tokens of the tiny tokenizer, with ids 0, 1, 2 (as in SmolLM2).
pub const TINY_SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Merges of the tiny tokenizer, in rank order, written in GPT-2's byte alphabet (`Ġ` = space,
/// `Ċ` = newline).
const TINY_MERGES: [(&str, &str); 60] = [
    ("Ġ", "t"), ("Ġ", "a"), ("h", "e"), ("i", "n"), ("r", "e"), ("o", "n"), ("Ġt", "he"),
    ("e", "r"), ("Ġ", "s"), ("a", "t"), ("Ġ", "w"), ("Ġ", "o"), ("e", "n"), ("Ġ", "c"),
    ("i", "t"), ("i", "s"), ("a", "n"), ("o", "r"), ("e", "s"), ("Ġ", "b"), ("e", "d"),
    ("Ġ", "f"), ("in", "g"), ("Ġ", "p"), ("o", "u"), ("Ġa", "n"), ("a", "l"), ("a", "r"),
    ("Ġt", "o"), ("Ġ", "m"), ("Ġo", "f"), ("Ġ", "in"), ("Ġ", "d"), ("Ġ", "h"), ("Ġan", "d"),
    ("i", "c"), ("a", "s"), ("l", "e"), ("Ġt", "h"), ("i", "on"), ("o", "m"), ("l", "l"),
    ("en", "t"), ("Ġ", "n"), ("Ġ", "l"), ("s", "t"), ("Ġ", "re"), ("v", "e"), ("Ġ", "e"),
    ("r", "o"), ("l", "y"), ("Ġb", "e"), ("Ġ", "g"), ("Ġ", "T"), ("c", "t"), ("Ġ", "y"),
    ("Ġ", "u"), ("Ġ", "Ġ"), ("Ċ", "Ċ"), ("Ġ", "A"),
];

/// A small byte-level BPE `tokenizer.json`: ids 0–2 are the special tokens `<|endoftext|>`,
/// `<|im_start|>`, `<|im_end|>`; ids 3–258 the 256 bytes (in byte order, in GPT-2's byte
/// alphabet); ids 259–318 the 60 merges. GPT-2 pre-tokenization, no BOS/EOS added by the
/// post-processor. Deterministic (same string every call).
pub fn tiny_tokenizer_json() -> String {
    use serde_json::{json, Map, Value};
    let alphabet = crate::data::tokenize::byte_to_unicode();
    let mut vocab = Map::new();
    let mut next = 0u32;
    let mut push = |vocab: &mut Map<String, Value>, t: String| {
        assert!(!vocab.contains_key(&t), "duplicate tiny token {t:?}");
        vocab.insert(t, json!(next));
        next += 1;
    };
    for t in TINY_SPECIAL_TOKENS {
        push(&mut vocab, t.to_string());
    }
    for c in alphabet {
        push(&mut vocab, c.to_string());
    }
    let mut merges = Vec::new();
    for (a, b) in TINY_MERGES {
        assert!(vocab.contains_key(a) && vocab.contains_key(b), "tiny merge {a} {b}: unknown part");
        push(&mut vocab, format!("{a}{b}"));
        merges.push(json!([a, b]));
    }
    let added: Vec<Value> = TINY_SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(id, t)| {
            json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let tok = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    });
    serde_json::to_string_pretty(&tok).expect("serializing a JSON value cannot fail")
}

/// The tiny tokenizer's `tokenizer_config.json`: BOS `<|im_start|>`, EOS and padding
/// `<|im_end|>`, unknown `<|endoftext|>`, SmolLM2's chat template.
pub fn tiny_tokenizer_config_json() -> String {
    let cfg = serde_json::json!({
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "chat_template": crate::data::template::SMOLLM2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "model_max_length": 2048,
        "tokenizer_class": "GPT2Tokenizer"
    });
    serde_json::to_string_pretty(&cfg).expect("serializing a JSON value cannot fail")
}

/// Writes `tokenizer.json` and `tokenizer_config.json` of the tiny tokenizer into `dir`.
pub fn write_tiny_tokenizer(dir: &Path) -> Result<()> {
    for (name, text) in [
        ("tokenizer.json", tiny_tokenizer_json()),
        ("tokenizer_config.json", tiny_tokenizer_config_json()),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}
