//! The tokenizer layer: a `tokenizers::Tokenizer` plus what training needs around it (BOS/EOS,
//! padding id, chat template), loaded from a Hugging Face model directory or from a GGUF file's
//! llama.cpp metadata.

use super::template::ChatTemplate;
use crate::error::{Error, Result};
use crate::formats::gguf::GgufValue;
use serde_json::{json, Map, Value};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

/// A text tokenizer ready for training.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    /// The file the tokenizer was read from, for error messages.
    source: PathBuf,
    bos_token: Option<(String, u32)>,
    eos_token: Option<(String, u32)>,
    pad_id: u32,
    chat_template: Option<ChatTemplate>,
    /// The post-processor appends EOS when asked for special tokens.
    post_appends_eos: bool,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("pad_id", &self.pad_id)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// Runs a call into the `tokenizers` library, turning a panic into an error message. The
/// library panics instead of returning an error on some malformed `tokenizer.json` files
/// (found by `ferrotune::fuzz`: a decoder it cannot deserialize, a BPE model whose
/// `continuing_subword_prefix` is longer than a merged token), and a bad file must give a
/// message, not abort the program. (The panic hook still prints the library's message first.)
fn guard<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        format!("the tokenizers library failed on this tokenizer: {msg}")
    })
}

/// A special token as `tokenizer_config.json` writes it: `"<s>"` or `{"content": "<s>", ...}`.
fn config_token(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// The post-processor transformers builds from `add_bos_token` / `add_eos_token`
/// (`TokenizersBackend.update_post_processor`).
fn template_processing_json(
    bos: Option<&(String, u32)>,
    eos: Option<&(String, u32)>,
    add_bos: bool,
    add_eos: bool,
) -> Value {
    let add_bos = add_bos && bos.is_some();
    let add_eos = add_eos && eos.is_some();
    let special = |(t, _): &(String, u32), type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    for (type_id, id) in [(0u32, "A"), (1, "B")] {
        let part = if type_id == 0 { &mut single } else { &mut pair };
        if add_bos {
            part.push(special(bos.unwrap(), type_id));
        }
        part.push(seq(id, type_id));
        if add_eos {
            part.push(special(eos.unwrap(), type_id));
        }
    }
    let pair: Vec<Value> = single.iter().cloned().chain(pair).collect();
    let mut special_tokens = Map::new();
    for (flag, tok) in [(add_bos, bos), (add_eos, eos)] {
        if let (true, Some((t, id))) = (flag, tok) {
            special_tokens.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
        }
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special_tokens})
}

impl TextTokenizer {
    /// Loads a Hugging Face tokenizer directory: `tokenizer.json` (required) and, when present,
    /// `tokenizer_config.json` (`bos_token`, `eos_token`, `pad_token` as a string or a
    /// `{"content": ...}` object; `add_bos_token` / `add_eos_token`; `chat_template` as a string
    /// or a list of `{name, template}` where `default` is used). A `chat_template.jinja` file
    /// (what transformers 5 writes) takes precedence over the config's template; a
    /// `chat_template.json` (`{"chat_template": ...}`) is the last resort.
    ///
    /// As transformers does, when the config states `add_bos_token` or `add_eos_token`, the
    /// post-processor is replaced by one that adds exactly those tokens.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let text = crate::io_util::read_to_string(&tok_path)?;
        let cfg_path = dir.join("tokenizer_config.json");
        let config = if cfg_path.is_file() {
            let t = crate::io_util::read_to_string(&cfg_path)?;
            match serde_json::from_str::<Value>(&t) {
                Ok(Value::Object(m)) => Some(m),
                Ok(_) => return Err(Error::format(&cfg_path, "expected a JSON object")),
                Err(e) => return Err(Error::format(&cfg_path, format!("invalid JSON: {e}"))),
            }
        } else {
            None
        };
        let jinja_path = dir.join("chat_template.jinja");
        let json_tpl_path = dir.join("chat_template.json");
        let template = if jinja_path.is_file() {
            Some((crate::io_util::read_to_string(&jinja_path)?, jinja_path))
        } else if let Some(t) = config.as_ref().map(|c| config_chat_template(c, &cfg_path)).transpose()?.flatten() {
            Some((t, cfg_path.clone()))
        } else if json_tpl_path.is_file() {
            let t = crate::io_util::read_to_string(&json_tpl_path)?;
            let v: Value = serde_json::from_str(&t)
                .map_err(|e| Error::format(&json_tpl_path, format!("invalid JSON: {e}")))?;
            match v.get("chat_template") {
                Some(Value::String(s)) => Some((s.clone(), json_tpl_path)),
                _ => return Err(Error::format(&json_tpl_path, "no `chat_template` string")),
            }
        } else {
            None
        };
        Self::from_json_parts(&text, &tok_path, config.as_ref(), &cfg_path, template)
    }

    /// Builds a tokenizer from the text of a `tokenizer.json` and an optional parsed
    /// `tokenizer_config.json`. `tok_path`/`cfg_path` are only used in errors;
    /// `template` is the chat template source and the file it came from.
    pub fn from_json_parts(
        tokenizer_json: &str,
        tok_path: &Path,
        config: Option<&Map<String, Value>>,
        cfg_path: &Path,
        template: Option<(String, PathBuf)>,
    ) -> Result<Self> {
        let mut inner: tokenizers::Tokenizer = guard(|| tokenizer_json.parse::<tokenizers::Tokenizer>())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|e| Error::format(tok_path, format!("cannot load the tokenizer: {e}")))?;
        let lookup = |inner: &tokenizers::Tokenizer, key: &str| -> Result<Option<(String, u32)>> {
            match config.and_then(|c| config_token(c.get(key))) {
                None => Ok(None),
                Some(t) => match inner.token_to_id(&t) {
                    Some(id) => Ok(Some((t, id))),
                    None => Err(Error::format(
                        cfg_path,
                        format!("{key} `{t}` is not in the vocabulary of {}", tok_path.display()),
                    )),
                },
            }
        };
        let bos_token = lookup(&inner, "bos_token")?;
        let eos_token = lookup(&inner, "eos_token")?;
        let pad = lookup(&inner, "pad_token")?;
        if let Some(c) = config {
            if c.contains_key("add_bos_token") || c.contains_key("add_eos_token") {
                let flag = |k: &str| c.get(k).and_then(Value::as_bool).unwrap_or(false);
                let pp = template_processing_json(
                    bos_token.as_ref(),
                    eos_token.as_ref(),
                    flag("add_bos_token"),
                    flag("add_eos_token"),
                );
                let pp: tokenizers::processors::PostProcessorWrapper = serde_json::from_value(pp)
                    .map_err(|e| Error::format(cfg_path, format!("cannot build the post-processor: {e}")))?;
                inner.with_post_processor(Some(pp));
            }
        }
        let chat_template = match template {
            None => None,
            Some((src, path)) => Some(
                ChatTemplate::new(
                    &src,
                    bos_token.as_ref().map(|t| t.0.clone()).unwrap_or_default(),
                    eos_token.as_ref().map(|t| t.0.clone()).unwrap_or_default(),
                )
                .map_err(|e| Error::format(path, e.to_string()))?,
            ),
        };
        let pad_id = pad.map(|p| p.1).or(eos_token.as_ref().map(|e| e.1)).unwrap_or(0);
        Self::from_parts(inner, tok_path.to_path_buf(), bos_token, eos_token, pad_id, chat_template)
    }

    /// Assembles a tokenizer from its parts.
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        source: PathBuf,
        bos_token: Option<(String, u32)>,
        eos_token: Option<(String, u32)>,
        pad_id: u32,
        chat_template: Option<ChatTemplate>,
    ) -> Result<Self> {
        let mut tok = TextTokenizer {
            inner,
            source,
            bos_token,
            eos_token,
            pad_id,
            chat_template,
            post_appends_eos: false,
        };
        if let Some(eos) = tok.eos_id() {
            let enc = tok.encode_raw("a", true)?;
            let n = enc.get_ids().len();
            tok.post_appends_eos =
                n > 0 && enc.get_ids()[n - 1] == eos && enc.get_sequence_ids()[n - 1].is_none();
        }
        Ok(tok)
    }

    /// Builds the tokenizer a GGUF file describes, from its llama.cpp metadata (`get` looks a key
    /// up; `path` is only used in errors). See [`tokenizer_json_from_gguf`] for what is built.
    pub fn from_gguf_metadata<'a>(
        path: &Path,
        get: &'a dyn Fn(&str) -> Option<&'a GgufValue>,
    ) -> Result<Self> {
        let built = build_gguf_tokenizer(path, get)?;
        let text = serde_json::to_string(&built.json)
            .map_err(|e| Error::format(path, format!("cannot serialize the tokenizer: {e}")))?;
        let inner: tokenizers::Tokenizer = guard(|| text.parse::<tokenizers::Tokenizer>())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|e| Error::format(path, format!("cannot build the tokenizer from the GGUF metadata: {e}")))?;
        let chat_template = match &built.chat_template {
            None => None,
            Some(src) => Some(
                ChatTemplate::new(
                    src,
                    built.bos.as_ref().map(|t| t.0.clone()).unwrap_or_default(),
                    built.eos.as_ref().map(|t| t.0.clone()).unwrap_or_default(),
                )
                .map_err(|e| Error::format(path, format!("metadata `tokenizer.chat_template`: {e}")))?,
            ),
        };
        let pad_id = built
            .pad
            .as_ref()
            .map(|p| p.1)
            .or(built.eos.as_ref().map(|e| e.1))
            .unwrap_or(0);
        Self::from_parts(inner, path.to_path_buf(), built.bos, built.eos, pad_id, chat_template)
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        Error::format(&self.source, format!("tokenizer: {e}"))
    }

    pub(crate) fn encode_raw(&self, text: &str, add_special_tokens: bool) -> Result<tokenizers::Encoding> {
        guard(|| self.inner.encode(text, add_special_tokens))
            .map_err(|e| self.err(e))?
            .map_err(|e| self.err(e))
    }

    /// Token ids of `text`. With `add_special_tokens` the post-processor runs (what HF's
    /// `tokenizer(text).input_ids` gives, e.g. a BOS for Llama-style tokenizers). Special-token
    /// strings inside `text` (like `<|im_end|>`) become their special tokens.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self.encode_raw(text, add_special_tokens)?.get_ids().to_vec())
    }

    /// Like [`encode`](Self::encode), with each token's byte span `[start, end)` in `text`.
    /// A GPT-2-style token's span includes the space it starts with (`" Paris"`), unless the
    /// tokenizer's post-processor is `ByteLevel` with `trim_offsets`; a character split over
    /// several byte tokens gives each of them the character's span; tokens added by the
    /// post-processor have the span `(0, 0)`.
    #[allow(clippy::type_complexity)]
    pub fn encode_with_offsets(&self, text: &str, add_special_tokens: bool) -> Result<(Vec<u32>, Vec<(usize, usize)>)> {
        let enc = self.encode_raw(text, add_special_tokens)?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Text of `ids`; `skip_special` drops special tokens.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        guard(|| self.inner.decode(ids, skip_special))
            .map_err(|e| self.err(e))?
            .map_err(|e| self.err(e))
    }

    /// Number of ids, added tokens included (the embedding needs at least this many rows).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_token.as_ref().map(|t| t.1)
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token.as_ref().map(|t| t.1)
    }

    pub fn bos_token(&self) -> Option<&(String, u32)> {
        self.bos_token.as_ref()
    }

    pub fn eos_token(&self) -> Option<&(String, u32)> {
        self.eos_token.as_ref()
    }

    /// The id padding uses: `pad_token`, else EOS, else 0.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Replaces (or removes) the chat template, e.g. with one given in the training config.
    pub fn set_chat_template(&mut self, template: Option<ChatTemplate>) {
        self.chat_template = template;
    }

    /// True when `encode(text, true)` already ends with EOS.
    pub fn post_processor_appends_eos(&self) -> bool {
        self.post_appends_eos
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The file the tokenizer came from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` (BOS/EOS/padding tokens, the chat
    /// template) into `dir`, so that transformers (and [`from_hf_dir`](Self::from_hf_dir)) load
    /// the same tokenizer, e.g. for a model exported from a GGUF.
    pub fn save_hf_files(&self, dir: &Path) -> Result<()> {
        let tok_path = dir.join("tokenizer.json");
        let text = self
            .inner
            .to_string(true)
            .map_err(|e| Error::format(&tok_path, format!("cannot serialize the tokenizer: {e}")))?;
        crate::io_util::write_atomic(&tok_path, text.as_bytes())?;
        let mut cfg = Map::new();
        if let Some((t, _)) = &self.bos_token {
            cfg.insert("bos_token".into(), json!(t));
        }
        if let Some((t, _)) = &self.eos_token {
            cfg.insert("eos_token".into(), json!(t));
        }
        if let Some(t) = self.inner.id_to_token(self.pad_id) {
            cfg.insert("pad_token".into(), json!(t));
        }
        if let Some(ct) = &self.chat_template {
            cfg.insert("chat_template".into(), json!(ct.source()));
        }
        cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
        cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        let cfg_path = dir.join("tokenizer_config.json");
        let text = serde_json::to_string_pretty(&Value::Object(cfg)).expect("a JSON value serializes");
        crate::io_util::write_atomic(&cfg_path, text.as_bytes())
    }
}

fn config_chat_template(config: &Map<String, Value>, cfg_path: &Path) -> Result<Option<String>> {
    match config.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            for item in list {
                if item.get("name").and_then(Value::as_str) == Some("default") {
                    return match item.get("template") {
                        Some(Value::String(s)) => Ok(Some(s.clone())),
                        _ => Err(Error::format(cfg_path, "chat_template `default` has no `template` string")),
                    };
                }
            }
            Err(Error::format(cfg_path, "chat_template is a list without a template named `default`"))
        }
        Some(_) => Err(Error::format(cfg_path, "chat_template must be a string or a list of {name, template}")),
    }
}

// ---------------------------------------------------------------------------------------------
// GGUF → tokenizer.json

/// GPT-2's reversible byte → printable-character map (`bytes_to_unicode`).
pub fn byte_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (b'!' as u32..=b'~' as u32).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            let c = char::from_u32(256 + n).unwrap();
            n += 1;
            c
        };
    }
    table
}

struct GgufTokenizer {
    json: Value,
    bos: Option<(String, u32)>,
    eos: Option<(String, u32)>,
    pad: Option<(String, u32)>,
    chat_template: Option<String>,
}

struct Meta<'p, 'a> {
    path: &'p Path,
    get: &'a dyn Fn(&str) -> Option<&'a GgufValue>,
}

fn gguf_int(v: &GgufValue) -> Option<i64> {
    Some(match v {
        GgufValue::U8(x) => *x as i64,
        GgufValue::I8(x) => *x as i64,
        GgufValue::U16(x) => *x as i64,
        GgufValue::I16(x) => *x as i64,
        GgufValue::U32(x) => *x as i64,
        GgufValue::I32(x) => *x as i64,
        GgufValue::U64(x) => i64::try_from(*x).ok()?,
        GgufValue::I64(x) => *x,
        _ => return None,
    })
}

impl<'a> Meta<'_, 'a> {
    fn bad(&self, key: &str, expected: &str) -> Error {
        Error::format(self.path, format!("metadata `{key}` must be {expected}"))
    }
    fn str(&self, key: &str) -> Result<Option<&'a str>> {
        match (self.get)(key) {
            None => Ok(None),
            Some(GgufValue::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.bad(key, "a string")),
        }
    }
    fn id(&self, key: &str) -> Result<Option<u32>> {
        match (self.get)(key) {
            None => Ok(None),
            Some(v) => match gguf_int(v) {
                Some(x) if (0..=u32::MAX as i64).contains(&x) => Ok(Some(x as u32)),
                _ => Err(self.bad(key, "a non-negative integer")),
            },
        }
    }
    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match (self.get)(key) {
            None => Ok(None),
            Some(GgufValue::Bool(b)) => Ok(Some(*b)),
            Some(v) => match gguf_int(v) {
                Some(x) => Ok(Some(x != 0)),
                None => Err(self.bad(key, "a boolean")),
            },
        }
    }
    fn strs(&self, key: &str) -> Result<Option<Vec<&'a str>>> {
        match (self.get)(key) {
            None => Ok(None),
            Some(GgufValue::Array(items)) => items
                .iter()
                .map(|v| match v {
                    GgufValue::String(s) => Ok(s.as_str()),
                    _ => Err(self.bad(key, "an array of strings")),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(_) => Err(self.bad(key, "an array of strings")),
        }
    }
    fn ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        match (self.get)(key) {
            None => Ok(None),
            Some(GgufValue::Array(items)) => items
                .iter()
                .map(|v| gguf_int(v).ok_or_else(|| self.bad(key, "an array of integers")))
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(_) => Err(self.bad(key, "an array of integers")),
        }
    }
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split regex transformers uses for a `tokenizer.ggml.pre` value, if it overrides GPT-2's.
fn pre_tokenizer_split(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2"
        | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3_SPLIT,
        "tekken" => TEKKEN_SPLIT,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2_SPLIT,
        "qwen35" => QWEN35_SPLIT,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O_SPLIT,
        _ => return None,
    })
}

/// The `tokenizer.json` (as a JSON value) that transformers 5 derives from a GGUF's llama.cpp
/// tokenizer metadata. Only `tokenizer.ggml.model = "gpt2"` (byte-level BPE) is supported:
/// - model: BPE over `tokenizer.ggml.tokens` (a token not written in GPT-2's byte alphabet is
///   re-spelled byte by byte) and `tokenizer.ggml.merges`, no unk token, no byte fallback;
/// - pre-tokenizer: GPT-2's `ByteLevel`, or for known `tokenizer.ggml.pre` values
///   (llama3, qwen2, gpt-4o, ...) a `Split` on that model's regex followed by `ByteLevel`;
/// - added tokens: token type 3 (control) as special tokens (skipping ones not written in the
///   byte alphabet), type 4 (user-defined) as normal added tokens, then the BOS/EOS/unknown/padding
///   tokens as special tokens when not yet added;
/// - post-processor: `TemplateProcessing` adding BOS/EOS as `tokenizer.ggml.add_bos_token` /
///   `add_eos_token` say (default: neither); decoder: `ByteLevel`; no normalizer.
pub fn tokenizer_json_from_gguf<'a>(
    path: &Path,
    get: &'a dyn Fn(&str) -> Option<&'a GgufValue>,
) -> Result<Value> {
    Ok(build_gguf_tokenizer(path, get)?.json)
}

fn build_gguf_tokenizer<'a>(
    path: &Path,
    get: &'a dyn Fn(&str) -> Option<&'a GgufValue>,
) -> Result<GgufTokenizer> {
    let meta = Meta { path, get };
    let model = meta.str("tokenizer.ggml.model")?.ok_or_else(|| {
        Error::format(path, "the GGUF has no tokenizer (metadata `tokenizer.ggml.model` is missing)")
    })?;
    match model {
        "gpt2" => {}
        other => {
            return Err(Error::format(
                path,
                format!("tokenizer model `{other}` not supported yet (only `gpt2`, byte-level BPE)"),
            ))
        }
    }
    let tokens = meta
        .strs("tokenizer.ggml.tokens")?
        .ok_or_else(|| Error::format(path, "metadata `tokenizer.ggml.tokens` is missing"))?;
    let merges = meta.strs("tokenizer.ggml.merges")?.ok_or_else(|| {
        Error::format(path, "metadata `tokenizer.ggml.merges` is missing (needed for a `gpt2` tokenizer)")
    })?;
    let token_types = meta.ints("tokenizer.ggml.token_type")?;
    if let Some(tt) = &token_types {
        if tt.len() != tokens.len() {
            return Err(Error::format(
                path,
                format!(
                    "metadata `tokenizer.ggml.token_type` has {} entries for {} tokens",
                    tt.len(),
                    tokens.len()
                ),
            ));
        }
    }

    let spelling = byte_to_unicode();
    let alphabet: HashSet<char> = spelling.iter().copied().collect();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        let key = if in_alphabet(t) {
            t.to_string()
        } else {
            t.bytes().map(|b| spelling[b as usize]).collect()
        };
        vocab.insert(key, json!(i));
    }
    let vocab_id = |t: &str| vocab.get(t).and_then(Value::as_u64).map(|x| x as u32);

    let mut merge_pairs = Vec::with_capacity(merges.len());
    for (i, m) in merges.iter().enumerate() {
        let parts: Vec<&str> = m.split(' ').collect();
        if parts.len() != 2 {
            return Err(Error::format(
                path,
                format!("metadata `tokenizer.ggml.merges`[{i}] = {m:?} is not two tokens separated by one space"),
            ));
        }
        merge_pairs.push(json!([parts[0], parts[1]]));
    }

    // Added tokens, in the order transformers adds them; ids come from the vocabulary, else new.
    let mut added: Vec<(u32, String, bool)> = Vec::new(); // (id, content, special)
    let mut added_ids: HashMap<String, u32> = HashMap::new();
    let mut next_new = vocab.len() as u32;
    let mut add = |content: &str, special: bool, added: &mut Vec<(u32, String, bool)>| -> u32 {
        if let Some(&id) = added_ids.get(content) {
            return id;
        }
        let id = match vocab_id(content) {
            Some(id) => id,
            None => {
                let max_added = added.iter().map(|a| a.0 + 1).max().unwrap_or(0);
                let id = next_new.max(max_added);
                next_new = id + 1;
                id
            }
        };
        added_ids.insert(content.to_string(), id);
        added.push((id, content.to_string(), special));
        id
    };
    if let Some(tt) = &token_types {
        for (t, &ty) in tokens.iter().zip(tt) {
            if ty == 3 && in_alphabet(t) {
                add(t, true, &mut added);
            }
        }
        for (t, &ty) in tokens.iter().zip(tt) {
            if ty == 4 && (vocab.contains_key(*t) || added.iter().any(|a| a.1 == *t)) {
                add(t, false, &mut added);
            }
        }
    }
    let named = |key: &str| -> Result<Option<&str>> {
        match meta.id(key)? {
            None => Ok(None),
            Some(id) => tokens
                .get(id as usize)
                .map(|t| Some(*t))
                .ok_or_else(|| Error::format(path, format!("metadata `{key}` = {id} is past the {} tokens", tokens.len()))),
        }
    };
    let bos_t = named("tokenizer.ggml.bos_token_id")?;
    let eos_t = named("tokenizer.ggml.eos_token_id")?;
    let unk_t = named("tokenizer.ggml.unknown_token_id")?;
    let pad_t = named("tokenizer.ggml.padding_token_id")?;
    let mut named_ids: [Option<(String, u32)>; 4] = Default::default();
    for (slot, t) in named_ids.iter_mut().zip([bos_t, eos_t, unk_t, pad_t]) {
        if let Some(t) = t {
            let id = add(t, true, &mut added);
            *slot = Some((t.to_string(), id));
        }
    }
    let [bos, eos, _unk, pad] = named_ids;
    added.sort_by_key(|a| a.0);
    let mut seen = BTreeSet::new();
    let added_json: Vec<Value> = added
        .iter()
        .filter(|a| seen.insert(a.0))
        .map(|(id, content, special)| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": special})
        })
        .collect();

    let byte_level = |use_regex: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
    };
    let pre_tokenizer = match meta.str("tokenizer.ggml.pre")?.and_then(pre_tokenizer_split) {
        Some(regex) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            byte_level(false)
        ]}),
        None => byte_level(true),
    };
    let add_bos = meta.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
    let add_eos = meta.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let post_processor = template_processing_json(bos.as_ref(), eos.as_ref(), add_bos, add_eos);

    let json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_json,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": Value::Object(vocab),
            "merges": merge_pairs,
        }
    });
    let chat_template = meta.str("tokenizer.chat_template")?.map(str::to_string);
    Ok(GgufTokenizer {
        json,
        bos,
        eos,
        pad,
        chat_template,
    })
}
