//! Preference pairs for DPO: `{"prompt", "chosen", "rejected"}`, each either a string or a list
//! of chat messages, tokenized as TRL 1.16's `DPOTrainer` does.
//!
//! - Strings: no chat template. The EOS token is appended to each response; `prompt`,
//!   `prompt + chosen + EOS` and `prompt + rejected + EOS` are tokenized without special tokens,
//!   and the prompt is their common prefix (a response whose first token merges with the end of
//!   the prompt moves that token into the response), the responses the rest.
//! - Messages: `prompt` is rendered with the chat template and the generation prompt, each
//!   response as the conversation `prompt + response`; the split is the same common prefix, and
//!   no EOS is added (the template's end-of-turn marker ends the response and is trained on).
//!
//! The pair becomes two training sequences, prompt + chosen and prompt + rejected, with labels on
//! the response tokens only; both are cut at `sequence_len` (their ends), and a pair whose
//! responses lose every token is dropped like an example without targets.

use super::encode::{EncodedExample, EncodeOptions, IGNORE_INDEX};
use super::formats::{message_list, string_field, Message};
use super::source::{json_kind, Record};
use super::tokenize::TextTokenizer;
use crate::error::{Error, Result};
use serde_json::Value;

/// One side of a pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Turns {
    Text(String),
    Messages(Vec<Message>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferencePair {
    pub prompt: Turns,
    pub chosen: Turns,
    pub rejected: Turns,
}

impl PreferencePair {
    pub fn from_record(record: &Record) -> Result<Self> {
        let side = |key: &str| -> Result<Turns> {
            match record.value.get(key) {
                Some(Value::Array(_)) => Ok(Turns::Messages(message_list(record, key)?)),
                Some(Value::String(_)) => Ok(Turns::Text(string_field(record, key)?.to_string())),
                None => Err(record.error(format!("field `{key}` is missing (a preference pair needs `prompt`, `chosen` and `rejected`)"))),
                Some(other) => Err(record.error(format!("field `{key}` must be a string or a list of chat messages, found {}", json_kind(other)))),
            }
        };
        let pair = PreferencePair { prompt: side("prompt")?, chosen: side("chosen")?, rejected: side("rejected")? };
        let chat = [&pair.prompt, &pair.chosen, &pair.rejected].iter().filter(|t| matches!(t, Turns::Messages(_))).count();
        if chat != 0 && chat != 3 {
            return Err(record.error("`prompt`, `chosen` and `rejected` must all be strings or all be chat messages"));
        }
        Ok(pair)
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Tokenizes a pair (see the module documentation): the chosen sequence as the example, the
/// rejected one in its [`EncodedExample::rejected`].
pub fn encode_pair(tok: &TextTokenizer, pair: &PreferencePair, opts: &EncodeOptions) -> Result<EncodedExample> {
    let (prompt, chosen, rejected) = match (&pair.prompt, &pair.chosen, &pair.rejected) {
        (Turns::Text(p), Turns::Text(c), Turns::Text(r)) => {
            let eos = tok.eos_id().ok_or_else(|| Error::config("base_model", "preference pairs need an EOS token to end each response, and the tokenizer has none"))?;
            let with_eos = |text: &str| -> Result<Vec<u32>> {
                let mut ids = tok.encode(text, false)?;
                ids.push(eos);
                Ok(ids)
            };
            (tok.encode(p, false)?, with_eos(&format!("{p}{c}"))?, with_eos(&format!("{p}{r}"))?)
        }
        (Turns::Messages(p), Turns::Messages(c), Turns::Messages(r)) => {
            let template = tok.chat_template().ok_or_else(|| Error::config("chat_template", "chat-message preference pairs need a chat template, and the tokenizer has none"))?;
            let conversation = |response: &[Message]| -> Result<Vec<u32>> {
                let all: Vec<Message> = p.iter().chain(response).cloned().collect();
                tok.encode(&template.render(&all, false)?, false)
            };
            (tok.encode(&template.render(p, true)?, false)?, conversation(c)?, conversation(r)?)
        }
        _ => return Err(Error::Model("a preference pair mixes strings and chat messages".into())),
    };
    let split = common_prefix(&prompt, &chosen).min(common_prefix(&prompt, &rejected));
    let sequence = |ids: Vec<u32>| {
        let truncated = ids.len() > opts.sequence_len;
        let targets_cut = ids.len().saturating_sub(opts.sequence_len.max(split));
        let ids: Vec<u32> = ids.into_iter().take(opts.sequence_len).collect();
        let labels = ids.iter().enumerate().map(|(i, &t)| if i < split { IGNORE_INDEX } else { t as i32 }).collect();
        EncodedExample { input_ids: ids, labels, truncated, targets_cut, rejected: None, reference_logp: None, packed: Vec::new() }
    };
    let rejected = sequence(rejected);
    let mut chosen = sequence(chosen);
    chosen.truncated |= rejected.truncated;
    chosen.targets_cut += rejected.targets_cut;
    chosen.rejected = Some(Box::new(rejected));
    Ok(chosen)
}
