//! Chat templates: the Jinja templates Hugging Face tokenizers ship (`chat_template`), rendered
//! with minijinja the way `transformers`' `apply_chat_template` renders them.
//!
//! Compatibility with transformers' Jinja environment:
//! - `trim_blocks` and `lstrip_blocks` are on, a trailing newline of the template is dropped;
//! - variables: `messages` (list of `{role, content}`, keys in that order), `add_generation_prompt`,
//!   `bos_token`, `eos_token`;
//! - functions: `raise_exception(msg)` (fails the render with `msg`), `strftime_now(fmt)`
//!   (UTC; supports `%Y %y %m %d %e %B %b %A %a %H %M %S %j %%`);
//! - `tojson` behaves like Python's `json.dumps(x, ensure_ascii=False)`: `", "`/`": "` separators,
//!   `indent`, `separators`, `sort_keys` and `ensure_ascii` arguments;
//! - the Python methods templates call on values: strings `strip lstrip rstrip startswith endswith
//!   split rsplit splitlines upper lower title capitalize replace find count join isdigit isalpha
//!   isspace isalnum isupper islower`, dicts `items keys values get`: minijinja-contrib's
//!   `pycompat`, with the methods where it differs from Python written here ([`python_method`]);
//! - `{% break %}` / `{% continue %}` (jinja2's `loopcontrols` extension) through minijinja's
//!   `loop_controls` feature.
//!
//! `tojson` and `strftime_now` stay hand-written: minijinja's own `tojson` escapes `<`, `>`, `&`
//! and `'` for HTML and has no `separators`/`sort_keys`/`ensure_ascii`, and minijinja-contrib's
//! `datetime` feature offers `now()` with `time`-crate format descriptions, not strftime.
//!
//! Known limitation: dict literals written inside a template iterate in sorted key order
//! (minijinja without `preserve_order`); message dicts keep `role, content` order.

use super::formats::Message;
use crate::error::{Error, Result};
use minijinja::value::{Enumerator, Kwargs, Object, ObjectRepr, Value, ValueKind};
use minijinja::{Environment, ErrorKind, State};
use std::sync::Arc;

/// The chat template of SmolLM2-135M-Instruct (ChatML with a default system prompt).
pub const SMOLLM2_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

fn template_error(what: &str, e: minijinja::Error) -> Error {
    let mut detail = format!("{what}: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        detail.push_str(&format!(": {s}"));
        source = s.source();
    }
    Error::config("chat_template", detail)
}

impl ChatTemplate {
    /// Compiles `source`. `bos_token`/`eos_token` are the strings the template sees under those
    /// names (empty when the tokenizer has none). A syntax error is an [`Error::config`] for the
    /// key `chat_template`.
    pub fn new(source: &str, bos_token: String, eos_token: String) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_fuel(Some(RENDER_FUEL));
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.set_unknown_method_callback(python_method);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| template_error("cannot compile the chat template", e))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            bos_token,
            eos_token,
        })
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// Renders a conversation. With `add_generation_prompt` the template appends the header of a
    /// new assistant turn. Errors (including `raise_exception` from the template) are
    /// [`Error::config`] for the key `chat_template`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| template_error("chat template missing", e))?;
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| Value::from_object(MessageValue(m.clone())))
            .collect();
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        let mut out = CappedOutput(Vec::new());
        template
            .render_captured_to(ctx, &mut out)
            .map_err(|e| template_error("rendering the chat template failed", e))?;
        String::from_utf8(out.0).map_err(|_| Error::config("chat_template", "the rendered chat template is not valid UTF-8"))
    }
}

/// Instructions one render may execute. Real chat templates spend tens per message, so this is
/// far beyond any conversation, yet it stops a template that loops for hours (nested
/// `range(100000)` loops, found by `ferrotune::fuzz`) within about a second.
const RENDER_FUEL: u64 = 20_000_000;

/// The most text one render may produce. A training example is at most tens of thousands of
/// tokens; a template (from a downloaded `tokenizer_config.json`) that writes gigabytes, e.g.
/// a 100 MB string in a loop, gets an error instead of exhausting memory.
const MAX_RENDERED_BYTES: usize = 64 << 20;

/// The render target: a buffer that refuses to grow past [`MAX_RENDERED_BYTES`].
struct CappedOutput(Vec<u8>);

impl std::io::Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_RENDERED_BYTES {
            return Err(std::io::Error::other(format!(
                "the rendered chat template is longer than {} MiB",
                MAX_RENDERED_BYTES >> 20
            )));
        }
        let needed = self.0.len() + buf.len();
        if needed > self.0.capacity() {
            // Grow by doubling, but never past the cap: plain doubling would allocate up to
            // twice the cap at once (an 80 MB buffer for 40 MB of output, found by the fuzzer).
            let target = (2 * self.0.capacity()).clamp(needed, MAX_RENDERED_BYTES);
            self.0.reserve_exact(target - self.0.len());
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A message as the template sees it: a dict with `role` then `content`.
#[derive(Debug)]
struct MessageValue(Message);

impl Object for MessageValue {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(Value::from(self.0.role.as_str())),
            "content" => Some(Value::from(self.0.content.as_str())),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["role", "content"])
    }
}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

fn invalid(msg: impl Into<String>) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::InvalidOperation, msg.into())
}

// ---------------------------------------------------------------------------------------------
// tojson, Python style

fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent: Option<String> = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.kind() {
            ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
            ValueKind::Number => {
                let n = v.as_i64().ok_or_else(|| invalid("tojson: indent must be an integer"))?;
                Some(" ".repeat(n.max(0) as usize))
            }
            _ => return Err(invalid("tojson: indent must be an integer or a string")),
        },
    };
    let separators: Option<Value> = kwargs.get("separators")?;
    let (item_sep, key_sep) = match separators {
        Some(s) if !s.is_none() && !s.is_undefined() => {
            let parts: Vec<Value> = s.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] => (
                    a.as_str().unwrap_or(",").to_string(),
                    b.as_str().unwrap_or(":").to_string(),
                ),
                _ => return Err(invalid("tojson: separators must be a pair of strings")),
            }
        }
        _ => (
            if indent.is_some() { ",".to_string() } else { ", ".to_string() },
            ": ".to_string(),
        ),
    };
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let opts = JsonOpts {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(value, &opts, 0, &mut out)?;
    Ok(Value::from(out))
}

struct JsonOpts {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn write_json_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{:04x}", unit));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn python_float(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity".into() } else { "-Infinity".into() }
    } else if f == f.trunc() && f.abs() < 1e16 {
        format!("{f:.1}")
    } else {
        let s = format!("{f:?}");
        // Rust writes 1e20 as "1e20"; Python as "1e+20".
        match s.find('e') {
            Some(i) if !s[i + 1..].starts_with('-') => format!("{}e+{}", &s[..i], &s[i + 1..]),
            _ => s,
        }
    }
}

fn newline_indent(opts: &JsonOpts, level: usize, out: &mut String) {
    if let Some(ind) = &opts.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(ind);
        }
    }
}

fn write_json(
    value: &Value,
    opts: &JsonOpts,
    level: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if value.is_integer() {
                out.push_str(&value.to_string());
            } else {
                let f = f64::try_from(value.clone())?;
                out.push_str(&python_float(f));
            }
        }
        ValueKind::String => write_json_str(value.as_str().unwrap_or_default(), opts.ensure_ascii, out),
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if opts.sort_keys {
                keys.sort_by_key(|a| a.to_string());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline_indent(opts, level + 1, out);
                let key = match k.as_str() {
                    Some(s) => s.to_string(),
                    None => k.to_string(),
                };
                write_json_str(&key, opts.ensure_ascii, out);
                out.push_str(&opts.key_sep);
                write_json(&value.get_item(k)?, opts, level + 1, out)?;
            }
            newline_indent(opts, level, out);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline_indent(opts, level + 1, out);
                write_json(item, opts, level + 1, out)?;
            }
            newline_indent(opts, level, out);
            out.push(']');
        }
        _ => return Err(invalid(format!("tojson: cannot serialize a {}", value.kind()))),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Python methods

fn arg_str<'a>(args: &'a [Value], i: usize, method: &str) -> std::result::Result<Option<&'a str>, minijinja::Error> {
    match args.get(i) {
        None => Ok(None),
        Some(v) if v.is_none() || v.is_undefined() => Ok(None),
        Some(v) => v
            .as_str()
            .map(Some)
            .ok_or_else(|| invalid(format!("{method}(): argument {} must be a string", i + 1))),
    }
}

fn arg_int(args: &[Value], i: usize, method: &str) -> std::result::Result<Option<i64>, minijinja::Error> {
    match args.get(i) {
        None => Ok(None),
        Some(v) if v.is_none() || v.is_undefined() => Ok(None),
        Some(v) => v
            .as_i64()
            .map(Some)
            .ok_or_else(|| invalid(format!("{method}(): argument {} must be an integer", i + 1))),
    }
}

fn no_more_args(args: &[Value], n: usize, method: &str) -> std::result::Result<(), minijinja::Error> {
    if args.len() > n {
        Err(invalid(format!("{method}() takes at most {n} argument(s)")))
    } else {
        Ok(())
    }
}

/// Python methods on values: minijinja-contrib's `pycompat` callback (strings `strip lstrip
/// rstrip startswith endswith upper lower capitalize replace splitlines …`, dicts `items keys
/// values get`), except for the string methods [`kept_string_method`] handles, where contrib's
/// result differs from Python's and so from what transformers renders.
fn python_method(
    state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    if let Some(s) = value.as_str() {
        if let Some(v) = kept_string_method(s, method, args) {
            return v;
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// The string methods written here because minijinja-contrib 2.24 differs from Python:
/// - `split`/`rsplit`: contrib has no `rsplit`; both share Python's rules (whitespace runs when
///   no separator is given, `maxsplit` from the left or right, an empty separator is an error);
/// - `find`/`count`: contrib returns byte offsets where Python counts characters, and its
///   `count('')` never terminates (Python: `len + 1`);
/// - `join`: contrib prints non-string items, Python raises;
/// - `title`: contrib capitalizes only after punctuation or whitespace (`"1st"`), Python after
///   any uncased character (`"1St"`);
/// - `is*`: contrib is true for `""` and wants every character cased (`"A1".isupper()` is
///   false there), Python is false for `""` and looks at the cased characters only.
///
/// `None` hands the method on to contrib.
fn kept_string_method(s: &str, method: &str, args: &[Value]) -> Option<std::result::Result<Value, minijinja::Error>> {
    let v = match method {
        "split" | "rsplit" => split(s, method, args),
        "find" => (|| {
            no_more_args(args, 1, method)?;
            let sub = arg_str(args, 0, method)?.ok_or_else(|| invalid("find() needs an argument"))?;
            Ok(Value::from(match s.find(sub) {
                Some(b) => s[..b].chars().count() as i64,
                None => -1,
            }))
        })(),
        "count" => (|| {
            no_more_args(args, 1, method)?;
            let sub = arg_str(args, 0, method)?.ok_or_else(|| invalid("count() needs an argument"))?;
            Ok(Value::from(if sub.is_empty() {
                s.chars().count() as i64 + 1
            } else {
                s.matches(sub).count() as i64
            }))
        })(),
        "join" => (|| {
            no_more_args(args, 1, method)?;
            let items = args.first().ok_or_else(|| invalid("join() needs an argument"))?;
            let parts: Vec<String> = items
                .try_iter()?
                .map(|v| v.as_str().map(str::to_string).ok_or_else(|| invalid("join(): expected strings")))
                .collect::<std::result::Result<_, _>>()?;
            Ok(Value::from(parts.join(s)))
        })(),
        "title" => {
            let mut out = String::with_capacity(s.len());
            let mut prev_cased = false;
            for c in s.chars() {
                if prev_cased {
                    out.extend(c.to_lowercase());
                } else {
                    out.extend(c.to_uppercase());
                }
                prev_cased = c.is_alphabetic();
            }
            Ok(Value::from(out))
        }
        "isdigit" => Ok(Value::from(!s.is_empty() && s.chars().all(|c| c.is_numeric()))),
        "isalpha" => Ok(Value::from(!s.is_empty() && s.chars().all(char::is_alphabetic))),
        "isalnum" => Ok(Value::from(!s.is_empty() && s.chars().all(char::is_alphanumeric))),
        "isspace" => Ok(Value::from(!s.is_empty() && s.chars().all(char::is_whitespace))),
        "isupper" => Ok(Value::from(s.chars().any(char::is_uppercase) && !s.chars().any(char::is_lowercase))),
        "islower" => Ok(Value::from(s.chars().any(char::is_lowercase) && !s.chars().any(char::is_uppercase))),
        _ => return None,
    };
    Some(v)
}

/// Python's `str.split(sep=None, maxsplit=-1)` and `str.rsplit(...)`.
fn split(s: &str, method: &str, args: &[Value]) -> std::result::Result<Value, minijinja::Error> {
    no_more_args(args, 2, method)?;
    let sep = arg_str(args, 0, method)?;
    let maxsplit = arg_int(args, 1, method)?.filter(|&n| n >= 0).map(|n| n as usize);
    let parts: Vec<Value> = match (sep, maxsplit, method) {
        (Some(""), _, _) => return Err(invalid(format!("{method}(): empty separator"))),
        (Some(sep), None, _) => s.split(sep).map(Value::from).collect(),
        (Some(sep), Some(n), "split") => s.splitn(n + 1, sep).map(Value::from).collect(),
        (Some(sep), Some(n), _) => {
            let mut v: Vec<Value> = s.rsplitn(n + 1, sep).map(Value::from).collect();
            v.reverse();
            v
        }
        (None, None, _) => s.split_whitespace().map(Value::from).collect(),
        (None, Some(n), "split") => {
            let mut out = Vec::new();
            let mut rest = s.trim_start();
            while !rest.is_empty() {
                if out.len() == n {
                    out.push(Value::from(rest));
                    break;
                }
                let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                out.push(Value::from(&rest[..end]));
                rest = rest[end..].trim_start();
            }
            out
        }
        (None, Some(n), _) => {
            let mut out = Vec::new();
            let mut rest = s.trim_end();
            while !rest.is_empty() {
                if out.len() == n {
                    out.push(Value::from(rest));
                    break;
                }
                let start = rest.rfind(char::is_whitespace).map(|i| i + rest[i..].chars().next().map_or(1, char::len_utf8)).unwrap_or(0);
                out.push(Value::from(&rest[start..]));
                rest = rest[..start].trim_end();
            }
            out.reverse();
            out
        }
    };
    Ok(Value::from(parts))
}

// ---------------------------------------------------------------------------------------------
// strftime_now

fn strftime_now(format: String) -> std::result::Result<Value, minijinja::Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(Value::from(strftime_utc(&format, secs)?))
}

/// Civil date (year, month 1-12, day 1-31) of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Days since 1970-01-01 of a civil date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn strftime_utc(format: &str, secs: i64) -> std::result::Result<String, minijinja::Error> {
    const MONTHS: [&str; 12] = [
        "January", "February", "March", "April", "May", "June", "July", "August", "September",
        "October", "November", "December",
    ];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let doy = days - days_from_civil(y, 1, 1) + 1;
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:>2}")),
            Some('B') => out.push_str(MONTHS[m as usize - 1]),
            Some('b') => out.push_str(&MONTHS[m as usize - 1][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('H') => out.push_str(&format!("{:02}", sod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", sod % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", sod % 60)),
            Some('j') => out.push_str(&format!("{doy:03}")),
            Some('%') => out.push('%'),
            Some(other) => return Err(invalid(format!("strftime_now: unsupported directive %{other}"))),
            None => out.push('%'),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_known_dates() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        let t = 1_722_000_309;
        assert_eq!(strftime_utc("%d %b %Y %H:%M:%S %A %j", t).unwrap(), "26 Jul 2024 13:25:09 Friday 208");
        assert_eq!(strftime_utc("%Y-%m-%d", 0).unwrap(), "1970-01-01");
    }

    fn render(src: &str) -> String {
        let t = ChatTemplate::new(src, String::new(), String::new()).unwrap();
        t.render(&[Message::new("user", "héllo wörld")], false).unwrap()
    }

    /// The methods kept by hand give Python's results where minijinja-contrib's do not.
    #[test]
    fn kept_methods_match_python() {
        assert_eq!(render("{{ '1st place'.title() }}"), "1St Place");
        assert_eq!(render("{{ 'ab'.count('') }}|{{ 'aaa'.count('a') }}"), "3|3");
        assert_eq!(render("{{ messages[0].content.find('w') }}"), "6");
        assert_eq!(render("{{ ''.isdigit() }}{{ ''.isspace() }}{{ 'A1'.isupper() }}{{ 'a1'.islower() }}"), "FalseFalseTrueTrue");
        assert_eq!(render("{{ 'a,b,c'.rsplit(',', 1) }}{{ ' a  b '.split() }}"), r#"["a,b", "c"]["a", "b"]"#);
        let t = ChatTemplate::new("{{ '-'.join([1, 2]) }}", String::new(), String::new()).unwrap();
        assert!(t.render(&[], false).is_err(), "Python's join refuses non-strings");
    }

    /// The methods taken from minijinja-contrib, and loop controls.
    #[test]
    fn contrib_methods_and_loop_controls() {
        assert_eq!(render("{{ '  x  '.strip() }}|{{ 'xxaxx'.lstrip('x') }}|{{ 'Ab'.upper() }}{{ 'Ab'.lower() }}"), "x|axx|ABab");
        assert_eq!(render("{{ 'abc'.startswith(('x', 'a')) }}{{ 'abc'.endswith('bc') }}{{ 'aXa'.replace('a', 'b', 1) }}"), "TrueTruebXa");
        assert_eq!(render("{{ 'hELLO'.capitalize() }}{{ 'a\nb'.splitlines() }}"), r#"Hello["a", "b"]"#);
        assert_eq!(render("{% for k, v in messages[0].items() %}{{ k }}={{ v }};{% endfor %}{{ messages[0].get('x', 'd') }}"), "role=user;content=héllo wörld;d");
        assert_eq!(render("{% for i in [1, 2, 3] %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}"), "1");
        assert_eq!(render("{{ messages[0].keys() | length }}{{ messages[0].values() | list | length }}{{ messages[0].items() | length }}"), "222");
        assert_eq!(render("{{ messages[0].keys() | list }}"), r#"["role", "content"]"#);
    }

    #[test]
    fn python_floats() {
        assert_eq!(python_float(1.0), "1.0");
        assert_eq!(python_float(0.5), "0.5");
        assert_eq!(python_float(1e20), "1e+20");
    }
}
