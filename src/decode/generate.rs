//! Autoregressive generation with a KV cache: greedy by default, temperature and nucleus
//! (top-p) sampling on request.

use crate::data::TextTokenizer;
use crate::error::{Error, Result};
use crate::models::{ForwardCtx, KvCache, Llama};
use crate::rng::SplitMix64;

#[derive(Debug, Clone)]
pub struct SamplingOptions {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
}

impl SamplingOptions {
    /// Refuses values that would silently sample garbage or fall back to another mode.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::flag("--temperature", format!("is {}; expected 0 (greedy) or a positive number such as 0.7", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::flag("--top-p", format!("is {}; expected a probability in (0, 1], such as 0.9 (1 keeps every token)", self.top_p)));
        }
        if self.top_p < 1.0 && self.temperature == 0.0 {
            return Err(Error::flag("--top-p", "applies to sampling only; set --temperature above 0 too (with temperature 0 decoding is greedy)"));
        }
        Ok(())
    }
}

/// The token ids a prompt starts from: raw text as `tokenizer(text)` gives it, or the chat
/// template applied to one user message with the assistant turn opened.
pub fn prompt_ids(tok: &TextTokenizer, prompt: &str, chat: bool) -> Result<Vec<u32>> {
    if chat {
        let template = tok
            .chat_template()
            .ok_or_else(|| Error::Model("--chat: this model's tokenizer has no chat template".into()))?;
        let msgs = [crate::data::Message::new("user", prompt)];
        let text = template.render(&msgs, true)?;
        tok.encode(&text, false)
    } else {
        tok.encode(prompt, true)
    }
}

fn pick(logits: &[f32], opts: &SamplingOptions, rng: &mut SplitMix64) -> u32 {
    let argmax = || logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as u32;
    if opts.temperature <= 0.0 {
        return argmax();
    }
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(usize, f64)> = logits.iter().enumerate().map(|(i, &l)| (i, ((l as f64 - m) / opts.temperature).exp())).collect();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = probs.iter().map(|p| p.1).sum();
    let mut kept = Vec::new();
    let mut cum = 0.0;
    for (i, p) in probs {
        kept.push((i, p));
        cum += p / total;
        if cum >= opts.top_p {
            break;
        }
    }
    let kept_total: f64 = kept.iter().map(|p| p.1).sum();
    let mut u = rng.next_f32() as f64 * kept_total;
    for &(i, p) in &kept {
        if u < p {
            return i as u32;
        }
        u -= p;
    }
    kept.last().map_or_else(argmax, |p| p.0 as u32)
}

/// Generates up to `max_new_tokens`, calling `on_text` with each newly decoded piece of text;
/// stops at an end-of-sequence token. Returns the generated ids.
pub fn generate(
    model: &Llama,
    tok: &TextTokenizer,
    prompt: &str,
    chat: bool,
    opts: &SamplingOptions,
    on_text: &mut dyn FnMut(&str),
) -> Result<Vec<u32>> {
    opts.validate()?;
    let ids = prompt_ids(tok, prompt, chat)?;
    if ids.is_empty() {
        return Err(Error::Model("the prompt encodes to no tokens".into()));
    }
    let context = model.config.max_position_embeddings;
    if ids.len() > context {
        return Err(Error::Model(format!(
            "the prompt is {} tokens long, past the model's context of {context} tokens (max_position_embeddings / GGUF context_length); shorten it",
            ids.len()
        )));
    }
    let room = context - ids.len();
    if opts.max_new_tokens > room {
        eprintln!(
            "note: the prompt ({} tokens) leaves room for {room} new tokens in the model's context of {context}; generation stops there (asked for {})",
            ids.len(),
            opts.max_new_tokens
        );
    }
    let mut stop: Vec<u32> = model.config.eos_token_ids.clone();
    stop.extend(tok.eos_id());
    let mut cache = KvCache::new(model.config.num_hidden_layers);
    let mut rng = SplitMix64::new(opts.seed);
    let mut out: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let mut next_input = ids;
    for _ in 0..opts.max_new_tokens.min(room) {
        let t = next_input.len();
        let logits = model.logits(&next_input, 1, t, Some(&mut cache), &ForwardCtx::eval())?;
        let last: Vec<f32> = logits.get(t - 1)?.to_vec1()?;
        let id = pick(&last, opts, &mut rng);
        if stop.contains(&id) {
            break;
        }
        out.push(id);
        let text = tok.decode(&out, true)?;
        // Print only whole characters: a multi-byte character may span several tokens.
        if !text.ends_with('\u{FFFD}') && text.len() > printed {
            on_text(&text[printed..]);
            printed = text.len();
        }
        next_input = vec![id];
    }
    Ok(out)
}
