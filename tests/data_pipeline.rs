//! Dataset pipeline: formats, chat templates, tokenizer loading (HF dir and GGUF metadata),
//! label masks, truncation, batches and data order.

mod common;

use ferrotune::data::batch::{epoch_order, make_batch};
use ferrotune::data::encode::{alpaca_prompt, encode_example, render_for_inspection, EncodeOptions, EncodedExample};
use ferrotune::data::formats::{DatasetFormat, Example, Message};
use ferrotune::data::source::{parse_jsonl, read_jsonl, Record};
use ferrotune::data::template::{ChatTemplate, SMOLLM2_CHAT_TEMPLATE};
use ferrotune::data::tokenize::{tokenizer_json_from_gguf, TextTokenizer};
use ferrotune::data::{encode_records, IGNORE_INDEX};
use ferrotune::formats::gguf::{GgufFile, GgufValue};
use ferrotune::Error;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// helpers

fn tiny_tok() -> TextTokenizer {
    let dir = tempfile::tempdir().unwrap();
    ferrotune::testutil::write_tiny_tokenizer(dir.path()).unwrap();
    TextTokenizer::from_hf_dir(dir.path()).unwrap()
}

fn records(text: &str) -> Vec<Record> {
    parse_jsonl(Path::new("mem.jsonl"), text.as_bytes()).unwrap()
}

fn one(text: &str, format: DatasetFormat) -> ferrotune::Result<Example> {
    Example::from_record(&records(text)[0], format)
}

fn err_string<T: std::fmt::Debug>(r: ferrotune::Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

fn msg(role: &str, content: &str) -> Message {
    Message::new(role, content)
}

/// The ids that are targets, in order.
fn target_ids(ex: &EncodedExample) -> Vec<u32> {
    ex.input_ids
        .iter()
        .zip(&ex.labels)
        .filter(|(_, &l)| l != IGNORE_INDEX)
        .map(|(&id, &l)| {
            assert_eq!(l, id as i32, "a target label must equal its input id");
            id
        })
        .collect()
}

/// Target positions must form the given number of contiguous runs.
fn target_runs(ex: &EncodedExample) -> usize {
    let mut runs = 0;
    let mut prev = false;
    for &l in &ex.labels {
        let t = l != IGNORE_INDEX;
        if t && !prev {
            runs += 1;
        }
        prev = t;
    }
    runs
}

fn opts(train_on_inputs: bool, add_eos: bool, sequence_len: usize) -> EncodeOptions {
    EncodeOptions {
        train_on_inputs,
        add_eos,
        sequence_len,
    }
}

// ---------------------------------------------------------------------------------------------
// source + formats

#[test]
fn jsonl_reading_keeps_line_numbers_and_skips_blank_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.jsonl");
    std::fs::write(&path, "{\"text\": \"a\"}\n\n   \r\n{\"text\": \"b\"}\r\n").unwrap();
    let recs = read_jsonl(&path).unwrap();
    assert_eq!(recs.len(), 2);
    assert_eq!((recs[0].line, recs[1].line), (1, 4));
    assert_eq!(&*recs[1].path, path.as_path());
    assert_eq!(recs[1].value["text"], "b");
}

#[test]
fn malformed_json_line_names_path_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.jsonl");
    std::fs::write(&path, "{\"text\": \"ok\"}\n{\"text\": \"ok\"}\n{\"text\": oops}\n").unwrap();
    let e = read_jsonl(&path).unwrap_err();
    assert!(matches!(e, Error::Data { line: 3, .. }), "{e:?}");
    let s = e.to_string();
    assert!(s.starts_with(&format!("{}:3: invalid JSON: ", path.display())), "{s}");
}

#[test]
fn non_object_line_is_an_error() {
    let e = parse_jsonl(Path::new("x.jsonl"), b"{\"text\": \"a\"}\n[1, 2]\n").unwrap_err().to_string();
    assert_eq!(e, "x.jsonl:2: expected a JSON object (one record per line), found an array");
    let e = parse_jsonl(Path::new("x.jsonl"), b"\"just a string\"").unwrap_err().to_string();
    assert!(e.starts_with("x.jsonl:1: expected a JSON object"), "{e}");
    let e = err_string(read_jsonl(Path::new("/nonexistent/dir/file.jsonl")));
    assert!(e.starts_with("/nonexistent/dir/file.jsonl: "), "{e}");
}

#[test]
fn format_auto_detection() {
    let a = DatasetFormat::Auto;
    assert_eq!(one(r#"{"text": "hi"}"#, a).unwrap(), Example::Text("hi".into()));
    assert_eq!(
        one(r#"{"prompt": "p", "completion": "c", "text": "ignored"}"#, a).unwrap(),
        Example::Completion { prompt: "p".into(), completion: "c".into() }
    );
    assert_eq!(
        one(r#"{"instruction": "i", "output": "o"}"#, a).unwrap(),
        Example::Alpaca { instruction: "i".into(), input: "".into(), output: "o".into() }
    );
    assert_eq!(
        one(r#"{"instruction": "i", "input": "x", "output": "o"}"#, a).unwrap(),
        Example::Alpaca { instruction: "i".into(), input: "x".into(), output: "o".into() }
    );
    // GSM8K
    assert_eq!(
        one(r##"{"question": "1+1?", "answer": "2\n#### 2"}"##, a).unwrap(),
        Example::Completion { prompt: "1+1?\n".into(), completion: "2\n#### 2".into() }
    );
    assert_eq!(
        one(r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "text": "x"}"#, a)
            .unwrap(),
        Example::Chat(vec![msg("user", "q"), msg("assistant", "a")])
    );
    // OpenAI-style content parts
    assert_eq!(
        one(r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}"#, a)
            .unwrap(),
        Example::Chat(vec![msg("user", "ab")])
    );
    let e = err_string(one(r#"{"foo": 1, "bar": 2}"#, a));
    assert!(e.starts_with("mem.jsonl:1: cannot tell the dataset format from the keys [bar, foo]"), "{e}");
}

#[test]
fn format_config_strings() {
    assert_eq!(DatasetFormat::parse("auto").unwrap(), DatasetFormat::Auto);
    assert_eq!(DatasetFormat::parse("Text").unwrap(), DatasetFormat::Text);
    assert_eq!(DatasetFormat::parse("completion").unwrap(), DatasetFormat::Completion);
    assert_eq!(DatasetFormat::parse("chat").unwrap(), DatasetFormat::Chat);
    assert_eq!(DatasetFormat::parse("messages").unwrap(), DatasetFormat::Chat);
    assert_eq!(DatasetFormat::parse("alpaca").unwrap(), DatasetFormat::Alpaca);
    let e = DatasetFormat::from_config("datasets[0].format", "sharegpt").unwrap_err();
    assert!(matches!(e, Error::Config { .. }));
    assert!(e.to_string().starts_with("config key `datasets[0].format`: unknown dataset format `sharegpt`"), "{e}");
}

#[test]
fn missing_and_mistyped_fields() {
    let recs = records("\n{\"prompt\": \"p\"}\n{\"prompt\": \"p\", \"completion\": 3}\n{\"text\": null}\n");
    let e = Example::from_record(&recs[0], DatasetFormat::Completion).unwrap_err().to_string();
    assert_eq!(e, "mem.jsonl:2: field `completion` is missing (expected a string)");
    let e = Example::from_record(&recs[1], DatasetFormat::Auto).unwrap_err().to_string();
    assert_eq!(e, "mem.jsonl:3: field `completion` must be a string, found a number");
    let e = Example::from_record(&recs[2], DatasetFormat::Text).unwrap_err().to_string();
    assert_eq!(e, "mem.jsonl:4: field `text` must be a string, found null");
    // An explicit format ignores other keys.
    let e = err_string(one(r#"{"text": "t"}"#, DatasetFormat::Alpaca));
    assert_eq!(e, "mem.jsonl:1: field `instruction` is missing (expected a string)");
    let e = err_string(one(r#"{"messages": "hi"}"#, DatasetFormat::Chat));
    assert!(e.contains("field `messages` must be a list"), "{e}");
    let e = err_string(one(r#"{"messages": []}"#, DatasetFormat::Chat));
    assert_eq!(e, "mem.jsonl:1: field `messages` is an empty list");
}

#[test]
fn bad_roles_name_the_message_index() {
    let e = err_string(one(
        r#"{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}"#,
        DatasetFormat::Auto,
    ));
    assert_eq!(e, "mem.jsonl:1: messages[1]: role `bot` is not one of system, user, assistant, tool");
    let e = err_string(one(r#"{"messages": [{"role": "user"}]}"#, DatasetFormat::Auto));
    assert_eq!(e, "mem.jsonl:1: messages[0]: field `content` is missing (expected a string)");
    let e = err_string(one(r#"{"messages": [{"content": "x"}]}"#, DatasetFormat::Auto));
    assert_eq!(e, "mem.jsonl:1: messages[0]: field `role` is missing");
    for role in ["system", "user", "assistant", "tool"] {
        let text = format!(r#"{{"messages": [{{"role": "{role}", "content": "x"}}]}}"#);
        assert!(one(&text, DatasetFormat::Chat).is_ok(), "{role}");
    }
}

#[test]
fn shared_datasets_parse() {
    for (file, n_min) in [
        ("/work/shared/data/gsm8k/dev.jsonl", 500),
        ("/work/shared/data/instructions/self_instruct_seed_tasks.jsonl", 175),
    ] {
        let path = Path::new(file);
        if !path.exists() {
            common::skipped("shared datasets", &format!("{file} not present"));
            continue;
        }
        let recs = read_jsonl(path).unwrap();
        assert!(recs.len() >= n_min);
        for r in &recs {
            let ex = Example::from_record(r, DatasetFormat::Auto).unwrap();
            if file.contains("gsm8k") {
                assert!(matches!(ex, Example::Completion { .. }));
            } else {
                assert!(matches!(ex, Example::Alpaca { .. }));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// chat templates

const SMOL_SYSTEM: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";

#[test]
fn smollm2_template_renders_like_transformers() {
    let t = ChatTemplate::new(SMOLLM2_CHAT_TEMPLATE, "<|im_start|>".into(), "<|im_end|>".into()).unwrap();
    let conv = [msg("user", "Hi there"), msg("assistant", "Hello! How can I help?")];
    assert_eq!(
        t.render(&conv, false).unwrap(),
        format!("{SMOL_SYSTEM}<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n")
    );
    assert_eq!(
        t.render(&conv[..1], true).unwrap(),
        format!("{SMOL_SYSTEM}<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    );
    let with_system = [msg("system", "Be brief."), msg("user", "2+2?"), msg("assistant", "4")];
    assert_eq!(
        t.render(&with_system, false).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    );
    assert_eq!(
        t.render(&with_system, true).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn template_python_compat() {
    // trim_blocks / lstrip_blocks, bos/eos variables, Python string methods, dict methods,
    // tojson like json.dumps, raise_exception.
    let src = "{{ bos_token }}{% for m in messages %}\n    {% if m.content.strip().startswith('#') %}[{{ m['role'].upper() }}]{% endif %}\n{{ m.content.strip() | trim }}|{{ m.content.split(',') | length }}\n{% endfor %}{{ messages[0] | tojson }}{{ {'b': [1, 2.5, none, true]} | tojson(indent=2) }}{% for k, v in messages[0].items() %}{{ k }}={{ v }};{% endfor %}{{ eos_token }}";
    let t = ChatTemplate::new(src, "<s>".into(), "</s>".into()).unwrap();
    let out = t.render(&[msg("user", "  # a,b \n"), msg("assistant", "x\"é")], false).unwrap();
    let expected = "<s>[USER]# a,b|2\nx\"é|1\n{\"role\": \"user\", \"content\": \"  # a,b \\n\"}{\n  \"b\": [\n    1,\n    2.5,\n    null,\n    true\n  ]\n}role=user;content=  # a,b \n;</s>";
    assert_eq!(out, expected);

    let t = ChatTemplate::new(
        "{% for m in messages %}{% if m.role == 'user' and loop.index0 % 2 == 1 %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}{{ m.content }}{% endfor %}",
        String::new(),
        String::new(),
    )
    .unwrap();
    assert_eq!(t.render(&[msg("user", "a")], false).unwrap(), "a");
    let e = t.render(&[msg("user", "a"), msg("user", "b")], false).unwrap_err().to_string();
    assert!(e.contains("Conversation roles must alternate"), "{e}");
    let e = ChatTemplate::new("{% for %}", String::new(), String::new()).unwrap_err().to_string();
    assert!(e.starts_with("config key `chat_template`: cannot compile the chat template"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// tokenizer (tiny fixture)

#[test]
fn tiny_tokenizer_fixture_loads_and_round_trips() {
    assert_eq!(ferrotune::testutil::tiny_tokenizer_json(), ferrotune::testutil::tiny_tokenizer_json());
    let tok = tiny_tok();
    assert_eq!(tok.vocab_size(), 319);
    assert_eq!(tok.bos_token(), Some(&("<|im_start|>".to_string(), 1)));
    assert_eq!(tok.eos_id(), Some(2));
    assert_eq!(tok.pad_id(), 2);
    assert!(tok.chat_template().is_some());
    assert_eq!(tok.token_to_id("Ġthe"), Some(265));
    let text = "the cat sat on the mat.\n\n  Über 123 ✓ <|im_end|>";
    let ids = tok.encode(text, true).unwrap();
    assert_eq!(ids, tok.encode(text, false).unwrap(), "no BOS/EOS added");
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
    assert_eq!(*ids.last().unwrap(), 2, "special-token text becomes the special token");
    assert_eq!(tok.decode(&ids, true).unwrap(), "the cat sat on the mat.\n\n  Über 123 ✓ ");
    let (ids2, offsets) = tok.encode_with_offsets("a the", false).unwrap();
    assert_eq!(ids2, vec![100, 265]);
    assert_eq!(offsets, vec![(0, 1), (1, 5)], "byte offsets, the leading space included");
    let (_, offsets) = tok.encode_with_offsets("é<|im_end|>x", false).unwrap();
    assert_eq!(offsets, vec![(0, 2), (0, 2), (2, 12), (12, 13)], "two byte tokens for é");
}

#[test]
fn hf_dir_config_variants() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), ferrotune::testutil::tiny_tokenizer_json()).unwrap();
    // No config: no special tokens, no template.
    let tok = TextTokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id()), (None, None, 0));
    assert!(tok.chat_template().is_none());
    // Object-form tokens, list-form template, add_bos_token rebuilds the post-processor.
    let cfg = serde_json::json!({
        "bos_token": {"content": "<|endoftext|>", "lstrip": false},
        "eos_token": "<|im_end|>",
        "add_bos_token": true,
        "chat_template": [{"name": "tool_use", "template": "no"}, {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}"}]
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let tok = TextTokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!(tok.bos_id(), Some(0));
    assert_eq!(tok.pad_id(), 2, "padding falls back to EOS");
    let ids = tok.encode("the", true).unwrap();
    assert_eq!(ids[0], 0);
    assert_eq!(&ids[1..], tok.encode("the", false).unwrap().as_slice());
    assert_eq!(tok.chat_template().unwrap().render(&[msg("user", "x")], false).unwrap(), "<|endoftext|>x");
    // chat_template.jinja wins over the config.
    std::fs::write(dir.path().join("chat_template.jinja"), "J{{ messages | length }}\n").unwrap();
    let tok = TextTokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!(tok.chat_template().unwrap().render(&[msg("user", "x")], false).unwrap(), "J1");
    // Errors name the file.
    std::fs::write(dir.path().join("tokenizer_config.json"), "{\"eos_token\": \"<nope>\"}").unwrap();
    let e = TextTokenizer::from_hf_dir(dir.path()).unwrap_err().to_string();
    assert!(e.contains("tokenizer_config.json: eos_token `<nope>` is not in the vocabulary"), "{e}");
    std::fs::write(dir.path().join("tokenizer_config.json"), "{").unwrap();
    let e = TextTokenizer::from_hf_dir(dir.path()).unwrap_err().to_string();
    assert!(e.contains("tokenizer_config.json: invalid JSON"), "{e}");
    std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
    let e = TextTokenizer::from_hf_dir(dir.path()).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json: cannot load the tokenizer"), "{e}");
    let empty = tempfile::tempdir().unwrap();
    let e = TextTokenizer::from_hf_dir(empty.path()).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
}

#[test]
fn save_hf_files_round_trips() {
    let tok = tiny_tok();
    let dir = tempfile::tempdir().unwrap();
    tok.save_hf_files(dir.path()).unwrap();
    let back = TextTokenizer::from_hf_dir(dir.path()).unwrap();
    let text = "<|im_start|>user\nthe answer is 42<|im_end|>\n";
    assert_eq!(back.encode(text, true).unwrap(), tok.encode(text, true).unwrap());
    assert_eq!((back.bos_id(), back.eos_id(), back.pad_id()), (tok.bos_id(), tok.eos_id(), tok.pad_id()));
    assert_eq!(back.chat_template().unwrap().source(), SMOLLM2_CHAT_TEMPLATE);
}

// ---------------------------------------------------------------------------------------------
// GGUF metadata (tiny, hand-built)

fn tiny_gguf_metadata(add_bos: bool) -> HashMap<String, GgufValue> {
    let tj: serde_json::Value = serde_json::from_str(&ferrotune::testutil::tiny_tokenizer_json()).unwrap();
    let vocab = tj["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
    }
    let merges: Vec<GgufValue> = tj["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| GgufValue::String(format!("{} {}", m[0].as_str().unwrap(), m[1].as_str().unwrap())))
        .collect();
    let types: Vec<GgufValue> = (0..tokens.len()).map(|i| GgufValue::I32(if i < 3 { 3 } else { 1 })).collect();
    let mut m = HashMap::new();
    m.insert("tokenizer.ggml.model".into(), GgufValue::String("gpt2".into()));
    m.insert("tokenizer.ggml.pre".into(), GgufValue::String("default".into()));
    m.insert("tokenizer.ggml.tokens".into(), GgufValue::Array(tokens.into_iter().map(GgufValue::String).collect()));
    m.insert("tokenizer.ggml.token_type".into(), GgufValue::Array(types));
    m.insert("tokenizer.ggml.merges".into(), GgufValue::Array(merges));
    m.insert("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(1));
    m.insert("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(2));
    m.insert("tokenizer.ggml.padding_token_id".into(), GgufValue::U32(2));
    m.insert("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(add_bos));
    m.insert("tokenizer.chat_template".into(), GgufValue::String(SMOLLM2_CHAT_TEMPLATE.into()));
    m
}

#[test]
fn gguf_metadata_tokenizer_matches_tiny_hf() {
    let meta = tiny_gguf_metadata(false);
    let get = |k: &str| meta.get(k);
    let g = TextTokenizer::from_gguf_metadata(Path::new("tiny.gguf"), &get).unwrap();
    let hf = tiny_tok();
    for text in ["the cat", "  Über\n\n123", "<|im_start|>user\nhi<|im_end|>\n", ""] {
        assert_eq!(g.encode(text, true).unwrap(), hf.encode(text, true).unwrap(), "{text:?}");
    }
    assert_eq!((g.bos_id(), g.eos_id(), g.pad_id()), (Some(1), Some(2), 2));
    assert_eq!(g.chat_template().unwrap().source(), SMOLLM2_CHAT_TEMPLATE);
    // add_bos_token puts BOS in front, as transformers' post-processor does.
    let meta = tiny_gguf_metadata(true);
    let get = |k: &str| meta.get(k);
    let g = TextTokenizer::from_gguf_metadata(Path::new("tiny.gguf"), &get).unwrap();
    assert_eq!(g.encode(" the", true).unwrap(), vec![1, 265]);
    assert_eq!(g.encode(" the", false).unwrap(), vec![265]);
    // Unsupported / broken metadata.
    let mut meta = tiny_gguf_metadata(false);
    meta.insert("tokenizer.ggml.model".into(), GgufValue::String("llama".into()));
    let get = |k: &str| meta.get(k);
    let e = TextTokenizer::from_gguf_metadata(Path::new("m.gguf"), &get).unwrap_err().to_string();
    assert!(e.starts_with("m.gguf: tokenizer model `llama` not supported yet"), "{e}");
    let mut meta = tiny_gguf_metadata(false);
    meta.insert("tokenizer.ggml.tokens".into(), GgufValue::U32(3));
    let get = |k: &str| meta.get(k);
    let e = TextTokenizer::from_gguf_metadata(Path::new("m.gguf"), &get).unwrap_err().to_string();
    assert_eq!(e, "m.gguf: metadata `tokenizer.ggml.tokens` must be an array of strings");
    let empty: HashMap<String, GgufValue> = HashMap::new();
    let get = |k: &str| empty.get(k);
    let e = TextTokenizer::from_gguf_metadata(Path::new("m.gguf"), &get).unwrap_err().to_string();
    assert!(e.contains("no tokenizer"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// labels

#[test]
fn completion_labels_cover_exactly_the_completion_and_eos() {
    let tok = tiny_tok();
    let ex = Example::Completion { prompt: "Q: what is the answer?\nA:".into(), completion: " the answer is 42.".into() };
    let enc = encode_example(&tok, &ex, &opts(false, true, 512)).unwrap();
    assert_eq!(tok.decode(&enc.input_ids, false).unwrap(), "Q: what is the answer?\nA: the answer is 42.<|im_end|>");
    let t = target_ids(&enc);
    assert_eq!(tok.decode(&t, false).unwrap(), " the answer is 42.<|im_end|>");
    assert_eq!(target_runs(&enc), 1);
    assert_eq!(*enc.input_ids.last().unwrap(), 2);
    assert!(!enc.truncated && enc.has_targets());
    // The targets are a suffix: the first target is right after the prompt's tokens.
    let prompt_ids = tok.encode("Q: what is the answer?\nA:", false).unwrap();
    assert_eq!(&enc.input_ids[..prompt_ids.len()], prompt_ids.as_slice());
    assert!(enc.labels[..prompt_ids.len()].iter().all(|&l| l == IGNORE_INDEX));
    // No EOS
    let enc = encode_example(&tok, &ex, &opts(false, false, 512)).unwrap();
    assert_eq!(tok.decode(&target_ids(&enc), false).unwrap(), " the answer is 42.");
    // train_on_inputs: all targets
    let enc = encode_example(&tok, &ex, &opts(true, true, 512)).unwrap();
    assert_eq!(enc.n_targets(), enc.input_ids.len());
    assert_eq!(target_ids(&enc), enc.input_ids);
}

#[test]
fn completion_after_a_prompt_ending_in_a_space() {
    // The prompt ends with a space: the completion's first word becomes one token " the" that
    // starts in the prompt. It is still a target (its last byte is in the completion), so the
    // completion is covered completely.
    let tok = tiny_tok();
    let ex = Example::Completion { prompt: "Q: is it".into(), completion: " the end".into() };
    let ex2 = Example::Completion { prompt: "Q: is it ".into(), completion: "the end".into() };
    let a = encode_example(&tok, &ex, &opts(false, false, 512)).unwrap();
    let b = encode_example(&tok, &ex2, &opts(false, false, 512)).unwrap();
    assert_eq!(a, b);
    assert!(a.input_ids.contains(&265), "\" the\" is one token");
    assert_eq!(tok.decode(&target_ids(&a), false).unwrap(), " the end");
}

#[test]
fn text_and_alpaca_labels() {
    let tok = tiny_tok();
    let enc = encode_example(&tok, &Example::Text("all of it".into()), &opts(false, true, 512)).unwrap();
    assert_eq!(target_ids(&enc), enc.input_ids);
    assert_eq!(tok.decode(&enc.input_ids, false).unwrap(), "all of it<|im_end|>");

    let ex = Example::Alpaca { instruction: "Add.".into(), input: "2 and 3".into(), output: "5".into() };
    let enc = encode_example(&tok, &ex, &opts(false, true, 512)).unwrap();
    let full = tok.decode(&enc.input_ids, false).unwrap();
    assert_eq!(full, format!("{}5<|im_end|>", alpaca_prompt("Add.", "2 and 3")));
    assert!(full.starts_with("Below is an instruction that describes a task, paired with an input"));
    assert!(full.contains("### Input:\n2 and 3\n\n### Response:\n5"));
    assert_eq!(tok.decode(&target_ids(&enc), false).unwrap(), "5<|im_end|>");
    let ex = Example::Alpaca { instruction: "Say hi.".into(), input: "".into(), output: "hi".into() };
    let enc = encode_example(&tok, &ex, &opts(false, true, 512)).unwrap();
    let full = tok.decode(&enc.input_ids, false).unwrap();
    assert!(full.starts_with("Below is an instruction that describes a task. Write"));
    assert!(!full.contains("### Input:"));
    assert_eq!(tok.decode(&target_ids(&enc), false).unwrap(), "hi<|im_end|>");
}

#[test]
fn chat_labels_cover_assistant_turns_and_end_markers() {
    let tok = tiny_tok();
    let conv = vec![
        msg("system", "You are terse."),
        msg("user", "What is the capital of France?"),
        msg("assistant", "Paris."),
        msg("user", "And of Italy?"),
        msg("assistant", "Rome, of course."),
    ];
    let enc = encode_example(&tok, &Example::Chat(conv.clone()), &opts(false, true, 512)).unwrap();
    let rendered = tok.chat_template().unwrap().render(&conv, false).unwrap();
    assert_eq!(tok.decode(&enc.input_ids, false).unwrap(), rendered, "no EOS appended to chat");
    assert_eq!(enc.input_ids, tok.encode(&rendered, false).unwrap());
    // Special tokens in the rendered text are single special ids.
    assert_eq!(enc.input_ids[0], 1);
    assert_eq!(enc.input_ids.iter().filter(|&&i| i == 2).count(), 5);
    assert_eq!(target_runs(&enc), 2);
    assert_eq!(tok.decode(&target_ids(&enc), false).unwrap(), "Paris.<|im_end|>Rome, of course.<|im_end|>");
    // Each run decodes to one assistant message plus its end marker.
    let mut runs: Vec<String> = Vec::new();
    let mut cur: Vec<u32> = Vec::new();
    for (&id, &l) in enc.input_ids.iter().zip(&enc.labels) {
        if l != IGNORE_INDEX {
            cur.push(id);
        } else if !cur.is_empty() {
            runs.push(tok.decode(&cur, false).unwrap());
            cur.clear();
        }
    }
    assert!(cur.is_empty(), "the trailing newline after the last <|im_end|> is not a target");
    assert_eq!(runs, vec!["Paris.<|im_end|>", "Rome, of course.<|im_end|>"]);

    // Default system prompt (not written before an assistant-first conversation's prefix).
    let conv2 = vec![msg("user", "hi"), msg("assistant", "hello there")];
    let enc = encode_example(&tok, &Example::Chat(conv2), &opts(false, true, 512)).unwrap();
    assert!(tok.decode(&enc.input_ids, false).unwrap().starts_with(SMOL_SYSTEM));
    assert_eq!(tok.decode(&target_ids(&enc), false).unwrap(), "hello there<|im_end|>");

    // train_on_inputs
    let enc = encode_example(&tok, &Example::Chat(conv), &opts(true, true, 512)).unwrap();
    assert_eq!(enc.n_targets(), enc.len());

    // A conversation with no assistant turn has no targets.
    let enc = encode_example(&tok, &Example::Chat(vec![msg("user", "hi")]), &opts(false, true, 512)).unwrap();
    assert!(!enc.has_targets());
}

#[test]
fn chat_without_template_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), ferrotune::testutil::tiny_tokenizer_json()).unwrap();
    let tok = TextTokenizer::from_hf_dir(dir.path()).unwrap();
    let e = encode_example(&tok, &Example::Chat(vec![msg("user", "a")]), &EncodeOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("chat examples need a chat template"), "{e}");
}

#[test]
fn truncation_keeps_the_first_tokens_and_flags_empty_targets() {
    let tok = tiny_tok();
    let ex = Example::Completion { prompt: "the prompt is long enough here".into(), completion: " and the end".into() };
    let full = encode_example(&tok, &ex, &opts(false, true, 512)).unwrap();
    let n_prompt = full.labels.iter().take_while(|&&l| l == IGNORE_INDEX).count();
    assert!(n_prompt > 4);
    let cut = encode_example(&tok, &ex, &opts(false, true, n_prompt + 2)).unwrap();
    assert!(cut.truncated);
    assert_eq!(cut.input_ids, full.input_ids[..n_prompt + 2]);
    assert_eq!(cut.labels, full.labels[..n_prompt + 2]);
    assert_eq!(cut.n_targets(), 2);
    // The targets the cut removed are counted (the run's start-up note reports them).
    assert_eq!(cut.targets_cut, full.n_targets() - 2);
    let none = encode_example(&tok, &ex, &opts(false, true, n_prompt)).unwrap();
    assert!(none.truncated && !none.has_targets() && none.n_targets() == 0);
    assert_eq!(none.targets_cut, full.n_targets());
    let exact = encode_example(&tok, &ex, &opts(false, true, full.len())).unwrap();
    assert!(!exact.truncated && exact.targets_cut == 0);

    // encode_records drops (and counts) the examples with no targets, and puts errors on lines.
    let recs = records(
        "{\"prompt\": \"the prompt is long enough here\", \"completion\": \" and the end\"}\n{\"text\": \"short\"}\n",
    );
    let ds = encode_records(&recs, DatasetFormat::Auto, &tok, &opts(false, true, n_prompt)).unwrap();
    assert_eq!((ds.stats.records, ds.stats.examples, ds.stats.without_targets, ds.stats.truncated), (2, 1, 1, 1));
    let recs = records("{\"text\": \"a\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}\n");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), ferrotune::testutil::tiny_tokenizer_json()).unwrap();
    let no_template = TextTokenizer::from_hf_dir(dir.path()).unwrap();
    let e = encode_records(&recs, DatasetFormat::Auto, &no_template, &EncodeOptions::default()).unwrap_err().to_string();
    assert!(e.starts_with("mem.jsonl:2: "), "{e}");
}

#[test]
fn inspection_marks_non_targets() {
    let tok = tiny_tok();
    let ex = Example::Completion { prompt: "Q: 1+1?\nA:".into(), completion: " 2".into() };
    let enc = encode_example(&tok, &ex, &opts(false, true, 512)).unwrap();
    let s = render_for_inspection(&tok, &enc).unwrap();
    let n = enc.len();
    // " 2" is two tokens here (no merge for it), plus EOS.
    assert_eq!(enc.n_targets(), 3);
    assert_eq!(s, format!("[[Q: 1+1?\nA:]] 2<|im_end|>\n-- {n} tokens, 3 targets ({:.1}%)", 300.0 / n as f64));
    let cut = encode_example(&tok, &ex, &opts(false, true, 3)).unwrap();
    assert!(render_for_inspection(&tok, &cut).unwrap().ends_with("-- 3 tokens, 0 targets (0.0%), truncated"));
}

// ---------------------------------------------------------------------------------------------
// batches and order

#[test]
fn batch_shifts_and_pads() {
    let a = EncodedExample { input_ids: vec![10, 11, 12, 13], labels: vec![-100, -100, 12, 13], truncated: false, targets_cut: 0, rejected: None, reference_logp: None, packed: Vec::new() };
    let b = EncodedExample { input_ids: vec![20, 21], labels: vec![20, 21], truncated: false, targets_cut: 0, rejected: None, reference_logp: None, packed: Vec::new() };
    let batch = make_batch(&[&a, &b], 0);
    assert_eq!((batch.batch_size, batch.seq_len), (2, 4));
    assert_eq!(batch.input_ids, vec![10, 11, 12, 13, 20, 21, 0, 0]);
    assert_eq!(batch.targets, vec![-100, 12, 13, -100, 21, -100, -100, -100]);
    assert_eq!(batch.n_targets, 3);
    assert_eq!(batch.lengths, vec![4, 2]);
    let batch = make_batch(&[&b], 7);
    assert_eq!((batch.input_ids, batch.targets, batch.n_targets), (vec![20, 21], vec![21, -100], 1));
    let empty = make_batch(&[], 0);
    assert_eq!((empty.batch_size, empty.seq_len, empty.n_targets), (0, 0, 0));
}

#[test]
fn epoch_order_is_a_deterministic_permutation() {
    for n in [0usize, 1, 2, 7, 100, 1000] {
        let o = epoch_order(n, 42, 3, true);
        let mut sorted = o.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "n={n}");
        assert_eq!(o, epoch_order(n, 42, 3, true));
    }
    assert_eq!(epoch_order(10, 1, 0, false), (0..10).collect::<Vec<_>>());
    let a = epoch_order(100, 1, 0, true);
    assert_ne!(a, (0..100).collect::<Vec<_>>());
    assert_ne!(a, epoch_order(100, 1, 1, true), "epochs differ");
    assert_ne!(a, epoch_order(100, 2, 0, true), "seeds differ");
    // Pinned: the order must not change across versions or machines.
    assert_eq!(epoch_order(10, 0, 0, true), PINNED_ORDER_10_0_0);
    // Each position is roughly uniform over many seeds.
    let mut counts = [0usize; 5];
    for seed in 0..5000 {
        counts[epoch_order(5, seed, 0, true)[0]] += 1;
    }
    assert!(counts.iter().all(|&c| (850..1150).contains(&c)), "{counts:?}");
}

const PINNED_ORDER_10_0_0: [usize; 10] = [0, 2, 8, 6, 1, 9, 7, 3, 5, 4];

// ---------------------------------------------------------------------------------------------
// SmolLM2 GGUF ↔ transformers parity (needs the peers' files)

const HF_DIR: &str = ".peers/smollm2-135m-hf";
/// The PEFT reference run's texts with transformers' ids for them.
const REFERENCE: &str = "tests/fixtures/peft-reference/reference.json";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

const PARITY_STRINGS: &[&str] = &[
    "Hello world",
    " Hello world",
    "  two leading spaces",
    "trailing spaces   ",
    "tabs\tand\nnewlines\r\n\n\nthree",
    "1234567890 3.14159 1,000,000 2024-06-01",
    "x = 42; y=x*2 // done",
    "def f(a, b):\n    return a + b\n",
    "Ünïcödé façade naïve café",
    "日本語のテキストと中文文本",
    "emoji 🤗🚀 and ✓ marks",
    "I'm we're they've it'll she'd DON'T",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after eos",
    "almost special <|im_start and |im_end|>",
    "<repo_name>ferrotune<file_sep>src/lib.rs",
    "\u{a0}non-breaking\u{2003}em space",
    "",
    " ",
    "\n",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct?x=1&y=2",
    "Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her friends every day with four. <<16-3-4=9>>",
];

#[test]
fn smollm2_gguf_tokenizer_matches_transformers() {
    let root = root();
    let hf_dir = root.join(HF_DIR);
    let (Some(gguf), true) = (common::smollm2_gguf(), hf_dir.join("tokenizer.json").exists()) else {
        common::skipped("smollm2_gguf_tokenizer_matches_transformers", &format!("the SmolLM2 GGUF or {HF_DIR}/tokenizer.json missing (scripts/make-hf-copy.sh makes both)"));
        return;
    };
    let file = GgufFile::open(&gguf).unwrap();
    let get = |k: &str| file.get(k);

    // Structure of the generated tokenizer.json vs the one transformers wrote.
    let ours = tokenizer_json_from_gguf(&gguf, &get).unwrap();
    let theirs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf_dir.join("tokenizer.json")).unwrap()).unwrap();
    for key in ["normalizer", "pre_tokenizer", "post_processor", "decoder", "added_tokens", "truncation", "padding"] {
        assert_eq!(ours[key], theirs[key], "tokenizer.json `{key}` differs");
    }
    for key in ["type", "dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk", "byte_fallback", "ignore_merges", "vocab"] {
        assert_eq!(ours["model"][key], theirs["model"][key], "tokenizer.json model `{key}` differs");
    }
    let merges = |v: &serde_json::Value| -> Vec<String> {
        v["model"]["merges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| match m {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Array(p) => format!("{} {}", p[0].as_str().unwrap(), p[1].as_str().unwrap()),
                _ => panic!("bad merge"),
            })
            .collect()
    };
    assert_eq!(merges(&ours), merges(&theirs), "merges differ");

    // Behaviour.
    let g = TextTokenizer::from_gguf_metadata(&gguf, &get).unwrap();
    let hf = TextTokenizer::from_hf_dir(&hf_dir).unwrap();
    assert_eq!(g.vocab_size(), 49152);
    assert_eq!(g.vocab_size(), hf.vocab_size());
    assert_eq!(g.bos_token(), hf.bos_token());
    assert_eq!(g.eos_token(), hf.eos_token());
    assert_eq!(g.pad_id(), hf.pad_id());
    assert_eq!((g.bos_id(), g.eos_id(), g.pad_id()), (Some(1), Some(2), 2));
    assert!(PARITY_STRINGS.len() >= 20);
    for &text in PARITY_STRINGS {
        for special in [true, false] {
            let a = g.encode(text, special).unwrap();
            assert_eq!(a, hf.encode(text, special).unwrap(), "{text:?} (add_special_tokens={special})");
            assert_eq!(g.encode_with_offsets(text, special).unwrap(), hf.encode_with_offsets(text, special).unwrap());
            assert_eq!(g.decode(&a, false).unwrap(), hf.decode(&a, false).unwrap());
            assert_eq!(g.decode(&a, true).unwrap(), hf.decode(&a, true).unwrap());
        }
        assert_eq!(g.decode(&g.encode(text, true).unwrap(), false).unwrap(), text, "round trip {text:?}");
    }
    // Ids transformers itself produced (python `tokenizer(text).input_ids`).
    for (text, ids) in TRANSFORMERS_IDS {
        assert_eq!(g.encode(text, true).unwrap(), ids.to_vec(), "{text:?}");
    }
    // The benchmark's reference texts.
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root.join(REFERENCE)).unwrap()).unwrap();
    for (t, i) in [("train_text", "train_ids"), ("eval_text", "eval_ids")] {
        let ids: Vec<u32> = r[i].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(g.encode(r[t].as_str().unwrap(), true).unwrap(), ids, "{t}");
    }
    // Chat template from the GGUF = transformers' chat_template.jinja.
    let conv = [msg("user", "What is 2+2?"), msg("assistant", "4")];
    assert_eq!(
        g.chat_template().unwrap().render(&conv, false).unwrap(),
        hf.chat_template().unwrap().render(&conv, false).unwrap()
    );
    let enc = encode_example(&g, &Example::Chat(conv.to_vec()), &EncodeOptions::default()).unwrap();
    assert_eq!(g.decode(&target_ids(&enc), false).unwrap(), "4<|im_end|>");
}

/// `AutoTokenizer.from_pretrained(".peers/smollm2-135m-hf")(text).input_ids` (transformers 5.24).
const TRANSFORMERS_IDS: &[(&str, &[u32])] = &[
    ("Hello world", &[19556, 905]),
    ("  two leading spaces", &[216, 827, 2899, 5600]),
    ("tabs\tand\nnewlines\r\n\n\nthree", &[100, 7366, 197, 397, 198, 2241, 5110, 201, 1116, 198, 16347]),
    ("1234567890 3.14159 1,000,000 2024-06-01", &[33, 34, 35, 36, 37, 38, 39, 40, 41, 32, 216, 35, 30, 33, 36, 33, 37, 41, 216, 33, 28, 32, 32, 32, 28, 32, 32, 32, 216, 34, 32, 34, 36, 29, 32, 38, 29, 32, 33]),
    ("Ünïcödé façade naïve café", &[142, 246, 94, 25972, 83, 7466, 84, 2756, 40852, 15486, 46494, 37366]),
    ("日本語のテキストと中文文本", &[23274, 115, 40993, 179, 120, 248, 26453, 11100, 224, 10391, 251, 10391, 134, 11100, 226, 7365, 118, 28589, 29184, 29184, 40993]),
    ("emoji 🤗🚀 and ✓ marks", &[391, 33777, 15107, 114, 241, 10813, 244, 218, 284, 4636, 246, 237, 8029]),
    ("I'm we're they've it'll she'd DON'T", &[57, 5248, 392, 2316, 502, 3543, 357, 3060, 1041, 6737, 422, 2154, 23, 68]),
    ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", &[1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198]),
    ("almost special <|im_start and |im_end|>", &[27423, 1767, 2067, 108, 306, 79, 3738, 284, 2504, 306, 79, 486, 108, 46]),
    ("\u{a0}non-breaking\u{2003}em space", &[15442, 9033, 29, 11194, 321, 221, 391, 1898]),
    (" ", &[216]),
    ("", &[]),
];

/// `type = "chat"` on prompt/response records makes a user turn and the assistant's reply, the
/// same example as the explicit messages (what the quickstart trains an instruct model on).
#[test]
fn pair_records_read_as_chat_are_one_user_and_one_assistant_turn() {
    let explicit = one(r#"{"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}"#, DatasetFormat::Chat).unwrap();
    for rec in [r#"{"question": "What is 2+2?", "answer": "4"}"#, r#"{"prompt": "What is 2+2?", "completion": "4"}"#, r#"{"instruction": "What is 2+2?", "input": "", "output": "4"}"#] {
        assert_eq!(one(rec, DatasetFormat::Chat).unwrap(), explicit, "{rec}");
    }
    let with_input = one(r#"{"instruction": "Add.", "input": "2 and 2", "output": "4"}"#, DatasetFormat::Chat).unwrap();
    let want = one(r#"{"messages": [{"role": "user", "content": "Add.\n\n2 and 2"}, {"role": "assistant", "content": "4"}]}"#, DatasetFormat::Chat).unwrap();
    assert_eq!(with_input, want);
    // Auto still reads question/answer as a completion.
    assert!(matches!(one(r#"{"question": "q", "answer": "a"}"#, DatasetFormat::Auto).unwrap(), Example::Completion { .. }));
}
