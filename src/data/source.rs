//! Reading dataset files: JSON Lines, one object per line, every record keeping the file and the
//! (1-based) line it came from so that any later error can point at it.

use crate::error::{Error, Result};
use std::path::Path;
use std::sync::Arc;

/// One dataset record: a JSON object and where it was read from.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The file the record came from (shared by every record of that file).
    pub path: Arc<Path>,
    /// 1-based line number in `path`.
    pub line: usize,
    /// The record's fields.
    pub value: serde_json::Map<String, serde_json::Value>,
}

impl Record {
    /// An [`Error::data`] pointing at this record.
    pub fn error(&self, detail: impl Into<String>) -> Error {
        Error::data(&*self.path, self.line, detail)
    }
}

/// Reads a JSON Lines file. Blank lines (only whitespace) are skipped but still counted, so line
/// numbers in errors match what an editor shows. A UTF-8 byte-order mark at the start of the file
/// is ignored, and so is a `\r` before each `\n`.
///
/// Errors: the file cannot be read ([`Error::io`]); a line is not valid UTF-8, not valid JSON
/// (`invalid JSON: <parser message>`), or valid JSON that is not an object ([`Error::data`] with
/// the path and line).
pub fn read_jsonl(path: &Path) -> Result<Vec<Record>> {
    let bytes = crate::io_util::read(path)?;
    parse_jsonl(path, &bytes)
}

/// Like [`read_jsonl`] for bytes already in memory; `path` is only used in records and errors.
pub fn parse_jsonl(path: &Path, bytes: &[u8]) -> Result<Vec<Record>> {
    let shared: Arc<Path> = Arc::from(path);
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut records = Vec::new();
    for (index, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = index + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let text = std::str::from_utf8(raw).map_err(|e| {
            Error::data(
                path,
                line,
                format!("invalid UTF-8 at byte {} of the line", e.valid_up_to() + 1),
            )
        })?;
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::data(path, line, format!("invalid JSON: {e}")))?;
        match value {
            serde_json::Value::Object(map) => records.push(Record {
                path: shared.clone(),
                line,
                value: map,
            }),
            other => {
                return Err(Error::data(
                    path,
                    line,
                    format!(
                        "expected a JSON object (one record per line), found {}",
                        json_kind(&other)
                    ),
                ))
            }
        }
    }
    Ok(records)
}

/// "a string", "an array", ... for error messages.
pub(crate) fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}
