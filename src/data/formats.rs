//! Dataset formats: turning a JSON record into a typed training example.

use super::source::{json_kind, Record};
use crate::error::{Error, Result};
use serde::Serialize;
use serde_json::Value;

/// The shape of the records of a dataset, as named in the config (`type`/`format` of a dataset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DatasetFormat {
    /// Decide per record from its keys; see [`Example::from_record`].
    #[default]
    Auto,
    /// `{"text": ...}`: plain language modelling, every token is trained on.
    Text,
    /// `{"prompt": ..., "completion": ...}`: only the completion is trained on.
    Completion,
    /// `{"messages": [{"role": ..., "content": ...}, ...]}`: rendered with the model's chat
    /// template, only assistant turns are trained on.
    Chat,
    /// `{"instruction": ..., "input": ... (optional), "output": ...}`: the Stanford Alpaca prompt,
    /// only the output is trained on.
    Alpaca,
    /// `{"prompt": ..., "chosen": ..., "rejected": ...}`: a preference pair (DPO), as strings or
    /// as chat messages; see [`super::preference`].
    Preference,
}

impl DatasetFormat {
    /// Parses a config value: `auto`, `text`, `completion`, `chat` (or `messages`), `alpaca`
    /// (case-insensitive). `key` names the config key in the error.
    pub fn from_config(key: &str, value: &str) -> Result<Self> {
        Ok(match value.trim().to_ascii_lowercase().as_str() {
            "auto" => DatasetFormat::Auto,
            "text" => DatasetFormat::Text,
            "completion" => DatasetFormat::Completion,
            "chat" | "messages" => DatasetFormat::Chat,
            "alpaca" => DatasetFormat::Alpaca,
            "preference" | "dpo" => DatasetFormat::Preference,
            _ => {
                return Err(Error::config(
                    key,
                    format!(
                        "unknown dataset format `{value}` (expected one of: auto, text, \
                         completion, chat, messages, alpaca, preference)"
                    ),
                ))
            }
        })
    }

    /// [`DatasetFormat::from_config`] with the key `format`.
    pub fn parse(value: &str) -> Result<Self> {
        DatasetFormat::from_config("format", value)
    }

    pub fn name(self) -> &'static str {
        match self {
            DatasetFormat::Auto => "auto",
            DatasetFormat::Text => "text",
            DatasetFormat::Completion => "completion",
            DatasetFormat::Chat => "chat",
            DatasetFormat::Alpaca => "alpaca",
            DatasetFormat::Preference => "preference",
        }
    }
}

impl std::str::FromStr for DatasetFormat {
    type Err = Error;
    /// Like [`DatasetFormat::from_config`] with the key `format`.
    fn from_str(s: &str) -> Result<Self> {
        DatasetFormat::from_config("format", s)
    }
}

/// The roles a chat message may have.
pub const CHAT_ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// One training example, before tokenization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Example {
    Text(String),
    Completion { prompt: String, completion: String },
    Chat(Vec<Message>),
    Alpaca {
        instruction: String,
        input: String,
        output: String,
    },
    Preference(super::preference::PreferencePair),
}

impl Example {
    /// Reads an example from a record in the given format.
    ///
    /// With [`DatasetFormat::Auto`] the record's keys decide, first match wins:
    /// 1. `messages` → chat;
    /// 2. `prompt` and `completion` → completion;
    /// 3. `instruction` and `output` → Alpaca (`input` optional);
    /// 4. `question` and `answer` (GSM8K style) → completion with
    ///    `prompt = question + "\n"` and `completion = answer`;
    /// 5. `text` → text;
    /// 6. `chosen` and `rejected` → a preference pair (`prompt` required).
    ///
    /// Other keys are ignored. A missing or mistyped field, an empty message list, or a message
    /// role outside system/user/assistant/tool gives an [`Error::data`] naming the file, line and
    /// field (and the message index). A message `content` may be a string or an OpenAI-style list
    /// of parts (`[{"type": "text", "text": ...}]`, the text parts are concatenated).
    pub fn from_record(record: &Record, format: DatasetFormat) -> Result<Example> {
        let map = &record.value;
        let format = match format {
            DatasetFormat::Auto => {
                let has = |k: &str| map.contains_key(k);
                if has("messages") {
                    DatasetFormat::Chat
                } else if has("prompt") && has("completion") {
                    DatasetFormat::Completion
                } else if has("instruction") && has("output") {
                    DatasetFormat::Alpaca
                } else if has("question") && has("answer") {
                    return Ok(Example::Completion {
                        prompt: format!("{}\n", string_field(record, "question")?),
                        completion: string_field(record, "answer")?.to_string(),
                    });
                } else if has("text") {
                    DatasetFormat::Text
                } else if has("chosen") && has("rejected") {
                    DatasetFormat::Preference
                } else {
                    let mut keys: Vec<&str> = map.keys().map(|k| k.as_str()).collect();
                    keys.sort_unstable();
                    return Err(record.error(format!(
                        "cannot tell the dataset format from the keys [{}]; expected `messages`, \
                         `prompt`+`completion`, `instruction`+`output`, `question`+`answer`, \
                         `text` or `prompt`+`chosen`+`rejected` (or set the dataset's format explicitly)",
                        keys.join(", ")
                    )));
                }
            }
            f => f,
        };
        Ok(match format {
            DatasetFormat::Auto => unreachable!("resolved above"),
            DatasetFormat::Text => Example::Text(string_field(record, "text")?.to_string()),
            DatasetFormat::Completion => Example::Completion {
                prompt: string_field(record, "prompt")?.to_string(),
                completion: string_field(record, "completion")?.to_string(),
            },
            DatasetFormat::Alpaca => Example::Alpaca {
                instruction: string_field(record, "instruction")?.to_string(),
                input: match map.get("input") {
                    None | Some(Value::Null) => String::new(),
                    Some(_) => string_field(record, "input")?.to_string(),
                },
                output: string_field(record, "output")?.to_string(),
            },
            DatasetFormat::Chat if map.contains_key("messages") => Example::Chat(messages_field(record)?),
            // A prompt/response record asked for as chat: one user turn and the assistant's reply,
            // so an instruct model trains in the format it is prompted in (`generate --chat`).
            DatasetFormat::Chat => {
                let pair = [("prompt", "completion"), ("question", "answer"), ("instruction", "output")];
                let Some((q, a)) = pair.iter().find(|(q, a)| map.contains_key(*q) && map.contains_key(*a)) else {
                    return messages_field(record).map(Example::Chat);
                };
                let mut user = string_field(record, q)?.to_string();
                if *q == "instruction" {
                    if let Some(Value::String(input)) = map.get("input").filter(|i| !matches!(i, Value::String(s) if s.is_empty())) {
                        user = format!("{user}\n\n{input}");
                    }
                }
                Example::Chat(vec![Message::new("user", &user), Message::new("assistant", string_field(record, a)?)])
            }
            DatasetFormat::Preference => Example::Preference(super::preference::PreferencePair::from_record(record)?),
        })
    }

    /// The format this example is in (never `Auto`).
    pub fn format(&self) -> DatasetFormat {
        match self {
            Example::Text(_) => DatasetFormat::Text,
            Example::Completion { .. } => DatasetFormat::Completion,
            Example::Chat(_) => DatasetFormat::Chat,
            Example::Alpaca { .. } => DatasetFormat::Alpaca,
            Example::Preference(_) => DatasetFormat::Preference,
        }
    }
}

pub(crate) fn string_field<'a>(record: &'a Record, key: &str) -> Result<&'a str> {
    match record.value.get(key) {
        None => Err(record.error(format!(
            "field `{key}` is missing (expected a string)"
        ))),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(record.error(format!(
            "field `{key}` must be a string, found {}",
            json_kind(other)
        ))),
    }
}

fn messages_field(record: &Record) -> Result<Vec<Message>> {
    message_list(record, "messages")
}

/// The list of `{"role", "content"}` objects in field `key`.
pub(crate) fn message_list(record: &Record, key: &str) -> Result<Vec<Message>> {
    let list = match record.value.get(key) {
        None => {
            return Err(record.error(
                format!("field `{key}` is missing (expected a list of {{\"role\", \"content\"}} objects)"),
            ))
        }
        Some(Value::Array(list)) => list,
        Some(other) => {
            return Err(record.error(format!(
                "field `{key}` must be a list of {{\"role\", \"content\"}} objects, found {}",
                json_kind(other)
            )))
        }
    };
    if list.is_empty() {
        return Err(record.error(format!("field `{key}` is an empty list")));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let obj = m.as_object().ok_or_else(|| {
            record.error(format!(
                "{key}[{i}] must be an object with `role` and `content`, found {}",
                json_kind(m)
            ))
        })?;
        let role = match obj.get("role") {
            Some(Value::String(r)) => r.as_str(),
            None => return Err(record.error(format!("{key}[{i}]: field `role` is missing"))),
            Some(other) => {
                return Err(record.error(format!(
                    "{key}[{i}]: field `role` must be a string, found {}",
                    json_kind(other)
                )))
            }
        };
        if !CHAT_ROLES.contains(&role) {
            return Err(record.error(format!(
                "{key}[{i}]: role `{role}` is not one of system, user, assistant, tool"
            )));
        }
        let content = match obj.get("content") {
            Some(Value::String(c)) => c.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    let t = part
                        .as_object()
                        .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
                        .and_then(|p| p.get("text"))
                        .and_then(Value::as_str)
                        .ok_or_else(|| {
                            record.error(format!(
                                "{key}[{i}].content[{j}]: only {{\"type\": \"text\", \"text\": \
                                 ...}} parts are supported"
                            ))
                        })?;
                    text.push_str(t);
                }
                text
            }
            None => {
                return Err(record.error(format!(
                    "{key}[{i}]: field `content` is missing (expected a string)"
                )))
            }
            Some(other) => {
                return Err(record.error(format!(
                    "{key}[{i}]: field `content` must be a string, found {}",
                    json_kind(other)
                )))
            }
        };
        out.push(Message {
            role: role.to_string(),
            content,
        });
    }
    Ok(out)
}
