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
    let ids = prompt_ids(tok, prompt, chat)?;
    if ids.is_empty() {
        return Err(Error::Model("the prompt encodes to no tokens".into()));
    }
    let mut stop: Vec<u32> = model.config.eos_token_ids.clone();
    stop.extend(tok.eos_id());
    let mut cache = KvCache::new(model.config.num_hidden_layers);
    let mut rng = SplitMix64::new(opts.seed);
    let mut out: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let mut next_input = ids;
    for _ in 0..opts.max_new_tokens {
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
