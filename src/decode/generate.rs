//! Autoregressive generation with a KV cache: greedy by default, temperature and nucleus
//! (top-p) sampling on request.

use crate::data::TextTokenizer;
use crate::error::{Error, Result};
use crate::kernels;
use crate::models::{ForwardCtx, KvCache, Llama, RowCache};
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

/// Draws the next token from `logits` (raw logits or any score whose softmax is the wanted
/// distribution; `-inf` excludes a token): the argmax at temperature 0, else a sample from the
/// temperature-scaled softmax restricted to the smallest set of tokens whose probability
/// reaches `top_p`.
pub(crate) fn pick<T: Copy + Into<f64>>(logits: &[T], opts: &SamplingOptions, rng: &mut SplitMix64) -> u32 {
    let argmax = || logits.iter().enumerate().fold((0, f64::NEG_INFINITY), |b, (i, &v)| if v.into() > b.1 { (i, v.into()) } else { b }).0 as u32;
    if opts.temperature <= 0.0 {
        return argmax();
    }
    let m = logits.iter().map(|&l| l.into()).fold(f64::NEG_INFINITY, f64::max);
    let weight = |l: T| ((l.into() - m) / opts.temperature).exp();
    if opts.top_p >= 1.0 {
        // Every token stays a candidate: one pass, no sort.
        let total: f64 = logits.iter().map(|&l| weight(l)).sum();
        let mut u = rng.next_f32() as f64 * total;
        for (i, &l) in logits.iter().enumerate() {
            let p = weight(l);
            if u < p {
                return i as u32;
            }
            u -= p;
        }
        return argmax();
    }
    let mut probs: Vec<(usize, f64)> = logits.iter().enumerate().map(|(i, &l)| (i, weight(l))).collect();
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

/// One generated sequence.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Completion {
    /// The new tokens, without the stop token.
    pub ids: Vec<u32>,
    /// The stop token it ended with; `None` when it ran to `max_new_tokens` or the context.
    pub stop: Option<u32>,
}

/// Samples `per_prompt` completions of every prompt, all decoded together in one batch: each
/// prompt is prefilled once and its cache copied to its rows, then every step runs one token
/// of every unfinished row through the model ([`Llama::decode_step`]). Rows stop at a `stop`
/// token, after `max_new_tokens`, or at the model's context; finished rows leave the batch.
/// Row `p·per_prompt + s` (sample `s` of prompt `p`) draws from its own random stream, so its
/// tokens do not depend on the other rows. `on_token(row, id)` sees every kept token as it is
/// chosen. Returns the completions in row order.
pub fn generate_batch(
    model: &Llama,
    prompts: &[Vec<u32>],
    per_prompt: usize,
    opts: &SamplingOptions,
    stop: &[u32],
    on_token: &mut dyn FnMut(usize, u32),
) -> Result<Vec<Completion>> {
    opts.validate()?;
    let context = model.config.max_position_embeddings;
    let rows = prompts.len() * per_prompt;
    let mut out = vec![Completion::default(); rows];
    // Tokens each row may add: its prompt's room in the context, at most max_new_tokens.
    let mut limit = Vec::with_capacity(rows);
    for (p, ids) in prompts.iter().enumerate() {
        if ids.is_empty() {
            return Err(Error::Model(format!("prompt {p} encodes to no tokens")));
        }
        if ids.len() > context {
            return Err(Error::Model(format!(
                "prompt {p} is {} tokens long, past the model's context of {context} tokens (max_position_embeddings / GGUF context_length); shorten it",
                ids.len()
            )));
        }
        limit.extend(std::iter::repeat_n(opts.max_new_tokens.min(context - ids.len()), per_prompt));
    }
    let cap = prompts.iter().zip(limit.iter().step_by(per_prompt.max(1))).map(|(ids, &n)| ids.len() + n).max().unwrap_or(0);
    let c = &model.config;
    let mut cache = RowCache::new(c.num_hidden_layers, rows, cap, c.num_key_value_heads * c.head_dim);
    let mut rngs: Vec<SplitMix64> = (0..rows).map(|r| SplitMix64::derive(opts.seed, &[0x6e6, r as u64])).collect();
    let ctx = ForwardCtx::eval();
    // Takes row `r`'s next token from its logits; whether the row goes on.
    let mut accept = |r: usize, logits: &[f32], rngs: &mut [SplitMix64], out: &mut [Completion]| -> bool {
        if out[r].ids.len() >= limit[r] {
            return false;
        }
        let id = pick(logits, opts, &mut rngs[r]);
        if stop.contains(&id) {
            out[r].stop = Some(id);
            return false;
        }
        out[r].ids.push(id);
        on_token(r, id);
        out[r].ids.len() < limit[r]
    };
    let mut active = Vec::with_capacity(rows);
    for (p, ids) in prompts.iter().enumerate() {
        let mut prefill = KvCache::new(c.num_hidden_layers);
        let h = model.hidden(ids, 1, ids.len(), Some(&mut prefill), &ctx)?;
        let last: Vec<f32> = kernels::lm_head_logits(&h.narrow(0, ids.len() - 1, 1)?, model.head_weight())?.flatten_all()?.to_vec1()?;
        for s in 0..per_prompt {
            let r = p * per_prompt + s;
            cache.fill_row(r, &prefill)?;
            active.push(accept(r, &last, &mut rngs, &mut out));
        }
    }
    let mut live: Vec<usize> = (0..rows).collect();
    loop {
        cache.retain(&active);
        live = live.iter().zip(&active).filter(|(_, &a)| a).map(|(&r, _)| r).collect();
        if live.is_empty() {
            return Ok(out);
        }
        if let Some(signal) = crate::train::interrupt::requested() {
            return Err(Error::Interrupted { signal, detail: "generation interrupted".into() });
        }
        let next: Vec<u32> = live.iter().map(|&r| *out[r].ids.last().expect("a live row has a token")).collect();
        let logits: Vec<f32> = model.decode_step(&next, &mut cache, &ctx)?.flatten_all()?.to_vec1()?;
        let vocab = logits.len() / live.len();
        active = live.iter().enumerate().map(|(slot, &r)| accept(r, &logits[slot * vocab..(slot + 1) * vocab], &mut rngs, &mut out)).collect();
    }
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
    note_room(ids.len(), model.config.max_position_embeddings, opts.max_new_tokens);
    let mut text = TextPieces::new(tok);
    let done = generate_batch(model, &[ids], 1, opts, &stop_tokens(model, tok), &mut |_, id| text.push(id, on_text))?;
    text.finish()?;
    Ok(done.into_iter().next().map(|c| c.ids).unwrap_or_default())
}

/// Says when the context cuts a generation short of `max_new_tokens`.
pub fn note_room(prompt_len: usize, context: usize, max_new_tokens: usize) {
    let room = context.saturating_sub(prompt_len);
    if prompt_len <= context && max_new_tokens > room {
        crate::note!(
            "note: the prompt ({prompt_len} tokens) leaves room for {room} new tokens in the model's context of {context}; generation stops there (asked for {max_new_tokens})"
        );
    }
}

/// Turns generated ids into text as they come, handing on only whole characters: a
/// multi-byte character may span several tokens.
pub struct TextPieces<'a> {
    tok: &'a TextTokenizer,
    so_far: Vec<u32>,
    printed: usize,
    failed: Option<Error>,
}

impl<'a> TextPieces<'a> {
    pub fn new(tok: &'a TextTokenizer) -> Self {
        Self { tok, so_far: Vec::new(), printed: 0, failed: None }
    }

    pub fn push(&mut self, id: u32, on_text: &mut dyn FnMut(&str)) {
        self.so_far.push(id);
        match self.tok.decode(&self.so_far, true) {
            Ok(text) if !text.ends_with('\u{FFFD}') && text.len() > self.printed => {
                on_text(&text[self.printed..]);
                self.printed = text.len();
            }
            Ok(_) => {}
            Err(e) => self.failed = self.failed.take().or(Some(e)),
        }
    }

    /// The first decoding error, if any.
    pub fn finish(self) -> Result<()> {
        self.failed.map_or(Ok(()), Err)
    }
}

/// The tokens that end a generation: the model's EOS ids and the tokenizer's.
pub fn stop_tokens(model: &Llama, tok: &TextTokenizer) -> Vec<u32> {
    let mut stop: Vec<u32> = model.config.eos_token_ids.clone();
    stop.extend(tok.eos_id());
    stop
}
