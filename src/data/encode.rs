//! Examples → token ids with a training-label mask.
//!
//! Each example is rendered to one string together with the byte ranges that are trained on
//! ("targets"), tokenized once with byte offsets, and a token is a target when the LAST byte of
//! its span lies inside a target range. (Not the first byte: a GPT-2-style token carries the
//! space before a word, so after the prompt `"The capital is "` the completion `"Paris"` is the
//! single token `" Paris"`, which starts in the prompt but must be trained on. With this rule
//! every byte of a completion is covered by target tokens.) A zero-width span `(p, p)` (a
//! byte-level token whose offsets were trimmed away) counts as covering byte `p - 1`.

use super::formats::{Example, Message};
use super::tokenize::TextTokenizer;
use crate::error::{Error, Result};

/// Label value of a position that is not trained on (the Hugging Face convention); the loss
/// kernel defines it, the pipeline writes it.
pub use crate::kernels::IGNORE_INDEX;

/// How examples become training sequences.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodeOptions {
    /// Train on every token, prompts and user turns included.
    pub train_on_inputs: bool,
    /// Append the EOS token after text, completion and Alpaca examples (a target). Chat examples
    /// never get an extra EOS: the template's end-of-turn marker, which is trained on, ends them.
    pub add_eos: bool,
    /// Keep at most this many tokens (the first ones).
    pub sequence_len: usize,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions {
            train_on_inputs: false,
            add_eos: true,
            sequence_len: 2048,
        }
    }
}

/// One tokenized example.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EncodedExample {
    pub input_ids: Vec<u32>,
    /// Per position: [`IGNORE_INDEX`] (`-100`) when not trained on, else `input_ids[i]`. Labels
    /// are not shifted; the loss (see `batch`) predicts position `i + 1` from position `i`.
    pub labels: Vec<i32>,
    /// Tokens were cut off at `sequence_len`.
    pub truncated: bool,
    /// Target tokens lost to that cut (of a preference pair: both sides').
    pub targets_cut: usize,
    /// A preference pair (DPO): this example is prompt + chosen, and this is prompt + rejected.
    pub rejected: Option<Box<EncodedExample>>,
    /// The reference model's log-probability of this sequence's targets, once computed (DPO
    /// computes it before training; see `objectives::dpo`).
    pub reference_logp: Option<f32>,
    /// A packed row (`sample_packing`): the lengths of the examples it holds, in order; empty
    /// for a single example (see `data::pack`).
    pub packed: Vec<usize>,
}

impl EncodedExample {
    /// The training sequences: this one, and for a preference pair the rejected one.
    pub fn sequences(&self) -> impl Iterator<Item = &EncodedExample> {
        std::iter::once(self).chain(self.rejected.as_deref())
    }

    /// Number of target (trained-on) tokens, over all its sequences.
    pub fn n_targets(&self) -> usize {
        self.sequences().map(|e| e.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()).sum()
    }

    /// Tokens over all its sequences.
    pub fn tokens(&self) -> usize {
        self.sequences().map(|e| e.input_ids.len()).sum()
    }

    /// The longest of its sequences.
    pub fn longest(&self) -> usize {
        self.sequences().map(|e| e.input_ids.len()).max().unwrap_or(0)
    }

    /// False when nothing is trained on (e.g. truncation cut the whole completion off); such
    /// examples contribute no loss and callers should count and report them. The first
    /// position's label never counts: no token precedes it to predict it from, so a one-token
    /// example (`{"text": ""}` plus EOS) trains on nothing.
    pub fn has_targets(&self) -> bool {
        self.sequences().all(|e| e.labels.iter().skip(1).any(|&l| l != IGNORE_INDEX))
    }

    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// The tokens before the first target: the prompt a completion of this example continues.
    pub fn prompt_ids(&self) -> &[u32] {
        let n = self.labels.iter().position(|&l| l != IGNORE_INDEX).unwrap_or(self.labels.len());
        &self.input_ids[..n]
    }

    /// The target tokens (the demonstrated completion).
    pub fn target_ids(&self) -> Vec<u32> {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).map(|&l| l as u32).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
}

/// The Stanford Alpaca prompt for an instruction (and optional input).
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        format!(
            "Below is an instruction that describes a task. Write a response that appropriately \
             completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        )
    } else {
        format!(
            "Below is an instruction that describes a task, paired with an input that provides \
             further context. Write a response that appropriately completes the request.\n\n\
             ### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        )
    }
}

/// An example rendered to text, with the byte ranges to train on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedExample {
    pub text: String,
    pub targets: Vec<(usize, usize)>,
    /// Run the tokenizer's post-processor (BOS etc.). Off for chat, whose template writes any BOS.
    pub add_special_tokens: bool,
    /// An EOS token may be appended (text, completion and Alpaca examples).
    pub eos_allowed: bool,
}

/// Renders an example to text and target byte ranges (see [`encode_example`]).
pub fn render_example(tok: &TextTokenizer, example: &Example) -> Result<RenderedExample> {
    let plain = |prompt: String, answer: &str| {
        let start = prompt.len();
        let mut text = prompt;
        text.push_str(answer);
        let end = text.len();
        RenderedExample {
            text,
            targets: vec![(start, end)],
            add_special_tokens: true,
            eos_allowed: true,
        }
    };
    Ok(match example {
        Example::Text(t) => plain(String::new(), t),
        Example::Completion { prompt, completion } => plain(prompt.clone(), completion),
        Example::Alpaca {
            instruction,
            input,
            output,
        } => plain(alpaca_prompt(instruction, input), output),
        Example::Chat(messages) => render_chat(tok, messages)?,
        Example::Preference(_) => return Err(Error::Model("a preference pair renders as two sequences; encode it with `encode_example`".into())),
    })
}

fn render_chat(tok: &TextTokenizer, messages: &[Message]) -> Result<RenderedExample> {
    let template = tok.chat_template().ok_or_else(|| {
        Error::config(
            "chat_template",
            format!(
                "chat examples need a chat template, and the tokenizer from {} has none (set \
                 `chat_template` in the config)",
                tok.source().display()
            ),
        )
    })?;
    let full = template.render(messages, false)?;
    let eos = tok.eos_token().map(|t| t.0.as_str()).filter(|s| !s.is_empty());
    let mut targets = Vec::new();
    let mut cursor = 0usize;
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = template.render(&messages[..i], true);
        let through = template.render(&messages[..=i], false);
        let range = match (before, through) {
            (Ok(b), Ok(t))
                if b.len() >= cursor && b.len() <= t.len() && full.starts_with(&b) && full.starts_with(&t) =>
            {
                let end = b.len() + t[b.len()..].trim_end().len();
                (b.len(), end)
            }
            _ => {
                // The prefix renders are not prefixes of the whole conversation (e.g. a default
                // system prompt only written before the first message): find the content itself.
                let content = m.content.as_str();
                let start = if content.is_empty() {
                    None
                } else {
                    full[cursor..].find(content).map(|p| p + cursor)
                };
                let start = start.ok_or_else(|| {
                    Error::config(
                        "chat_template",
                        format!("cannot locate assistant message {i} in the rendered conversation"),
                    )
                })?;
                let mut end = start + content.len();
                if let Some(eos) = eos {
                    if full[end..].starts_with(eos) {
                        end += eos.len();
                    }
                }
                (start, end)
            }
        };
        if range.1 > range.0 {
            targets.push(range);
        }
        cursor = cursor.max(range.1);
    }
    Ok(RenderedExample {
        text: full,
        targets,
        add_special_tokens: false,
        eos_allowed: false,
    })
}

/// Tokenizes an example and marks what is trained on:
/// - text: everything; completion: the completion; Alpaca: the output (after the standard Alpaca
///   prompt); with `add_eos`, an EOS token after them, also a target (not added twice when the
///   text already ends with EOS or the tokenizer's post-processor appends it);
/// - chat: rendered with the tokenizer's chat template (an error if it has none), without the
///   post-processor's special tokens (as `apply_chat_template` does); each assistant message's
///   content and what the template writes after it up to the next whitespace-only tail (the
///   end-of-turn marker, e.g. `<|im_end|>`, but not the newline after it) are targets. The content
///   starts where rendering the messages before it with `add_generation_prompt` ends and ends
///   where rendering through it ends.
/// - `train_on_inputs`: every token is a target.
///
/// Special-token strings inside the text are tokenized as the special tokens. The result is
/// truncated to `sequence_len` tokens (the first ones kept); check
/// [`EncodedExample::has_targets`] afterwards.
pub fn encode_example(tok: &TextTokenizer, example: &Example, opts: &EncodeOptions) -> Result<EncodedExample> {
    if let Example::Preference(pair) = example {
        return super::preference::encode_pair(tok, pair, opts);
    }
    let r = render_example(tok, example)?;
    let enc = tok.encode_raw(&r.text, r.add_special_tokens)?;
    let ids = enc.get_ids();
    let offsets = enc.get_offsets();
    let seq_ids = enc.get_sequence_ids();
    let in_target = |pos: usize| r.targets.iter().any(|&(s, e)| pos >= s && pos < e);

    let mut input_ids = Vec::with_capacity(ids.len() + 1);
    let mut labels = Vec::with_capacity(ids.len() + 1);
    let mut last_seq_target = false;
    let mut seen_seq = false;
    for i in 0..ids.len() {
        let target = if opts.train_on_inputs {
            true
        } else if seq_ids[i].is_none() {
            // Added by the post-processor: BOS-like before the text is not a target, EOS-like
            // after it is when the text's last token is.
            seen_seq && last_seq_target
        } else {
            let (s, e) = offsets[i];
            let pos = if e > s { e - 1 } else { s.saturating_sub(1) };
            let t = in_target(pos);
            seen_seq = true;
            last_seq_target = t;
            t
        };
        input_ids.push(ids[i]);
        labels.push(if target { ids[i] as i32 } else { IGNORE_INDEX });
    }
    if opts.add_eos && r.eos_allowed && !tok.post_processor_appends_eos() {
        if let Some(eos) = tok.eos_id() {
            if input_ids.last() != Some(&eos) {
                input_ids.push(eos);
                labels.push(eos as i32);
            }
        }
    }
    let truncated = input_ids.len() > opts.sequence_len;
    let mut targets_cut = 0;
    if truncated {
        targets_cut = labels[opts.sequence_len..].iter().filter(|&&l| l != IGNORE_INDEX).count();
        input_ids.truncate(opts.sequence_len);
        labels.truncate(opts.sequence_len);
    }
    Ok(EncodedExample {
        input_ids,
        labels,
        truncated,
        targets_cut,
        ..Default::default()
    })
}

/// Text of an encoded example for `ferrotune inspect-data`: the decoded tokens (special tokens
/// shown), with every run of tokens that is NOT trained on wrapped in `[[` … `]]`, followed by a
/// summary line `-- N tokens, T targets (P%)[, truncated]`. Runs are decoded separately, so a
/// character split across a run boundary shows as U+FFFD.
pub fn render_for_inspection(tok: &TextTokenizer, ex: &EncodedExample) -> Result<String> {
    let mut out = String::new();
    let mut i = 0;
    let n = ex.input_ids.len();
    while i < n {
        let target = ex.labels.get(i).is_some_and(|&l| l != IGNORE_INDEX);
        let mut j = i + 1;
        while j < n && ex.labels.get(j).is_some_and(|&l| l != IGNORE_INDEX) == target {
            j += 1;
        }
        let text = tok.decode(&ex.input_ids[i..j], false)?;
        if target {
            out.push_str(&text);
        } else {
            out.push_str("[[");
            out.push_str(&text);
            out.push_str("]]");
        }
        i = j;
    }
    let t = ex.n_targets();
    let pct = if n == 0 { 0.0 } else { 100.0 * t as f64 / n as f64 };
    out.push_str(&format!(
        "\n-- {n} tokens, {t} targets ({pct:.1}%){}",
        if ex.truncated { ", truncated" } else { "" }
    ));
    Ok(out)
}
