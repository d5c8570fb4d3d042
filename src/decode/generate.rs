//! Autoregressive generation with a KV cache: greedy by default, temperature, top-k and
//! nucleus (top-p) sampling on request; rows end at a stop token or a stop string.

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
    /// Draw only from the `top_k` most probable tokens (0 = all), before `top_p` is applied
    /// to what is left (transformers' order).
    pub top_k: usize,
    /// A row ends when its text comes to contain one of these; its text is cut before it
    /// ([`Completion::text`]).
    pub stop_strings: Vec<String>,
    pub seed: u64,
}

impl Default for SamplingOptions {
    /// Greedy, 128 new tokens, no stop string.
    fn default() -> Self {
        Self { max_new_tokens: 128, temperature: 0.0, top_p: 1.0, top_k: 0, stop_strings: Vec::new(), seed: 0 }
    }
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
        if self.top_k > 0 && self.temperature == 0.0 {
            return Err(Error::flag("--top-k", "applies to sampling only; set --temperature above 0 too (with temperature 0 decoding is greedy)"));
        }
        if self.stop_strings.iter().any(String::is_empty) {
            return Err(Error::flag("--stop", "an empty stop string would end every completion at once; give the text that should end one, such as \"\\n\\n\""));
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
/// temperature-scaled softmax restricted to the `top_k` most probable tokens (all with 0), then
/// to the smallest set of those whose probability (renormalised over them) reaches `top_p`.
pub(crate) fn pick<T: Copy + Into<f64>>(logits: &[T], opts: &SamplingOptions, rng: &mut SplitMix64) -> u32 {
    let argmax = || logits.iter().enumerate().fold((0, f64::NEG_INFINITY), |b, (i, &v)| if v.into() > b.1 { (i, v.into()) } else { b }).0 as u32;
    if opts.temperature <= 0.0 {
        return argmax();
    }
    let m = logits.iter().map(|&l| l.into()).fold(f64::NEG_INFINITY, f64::max);
    let weight = |l: T| ((l.into() - m) / opts.temperature).exp();
    if opts.top_p >= 1.0 && (opts.top_k == 0 || opts.top_k >= logits.len()) {
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
    if opts.top_k > 0 && opts.top_k < probs.len() {
        // Only the k largest need sorting.
        probs.select_nth_unstable_by(opts.top_k - 1, |a, b| b.1.total_cmp(&a.1));
        probs.truncate(opts.top_k);
    }
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
    /// The new tokens, without the stop token; with the tokens that spelled a stop string.
    pub ids: Vec<u32>,
    /// The stop token it ended with; `None` when it ran to `max_new_tokens` or the context.
    pub stop: Option<u32>,
    /// Which of the options' `stop_strings` ended it, if one did.
    pub stop_string: Option<usize>,
}

impl Completion {
    /// Whether a stop token or a stop string ended it (rather than the token limit).
    pub fn stopped(&self) -> bool {
        self.stop.is_some() || self.stop_string.is_some()
    }

    /// Its text: the tokens decoded, cut before the stop string that ended it (before the
    /// earliest, where its last token completed two).
    pub fn text(&self, tok: &TextTokenizer, opts: &SamplingOptions) -> Result<String> {
        let mut text = tok.decode(&self.ids, true)?;
        if self.stop_string.is_some() {
            if let Some(at) = opts.stop_strings.iter().filter_map(|s| text.find(s.as_str())).min() {
                text.truncate(at);
            }
        }
        Ok(text)
    }
}

/// What ends a row besides its token limit: any of `tokens`, and (with a tokenizer to read
/// the rows' text) the sampling options' stop strings.
pub struct Stops<'a> {
    pub tokens: Vec<u32>,
    pub tokenizer: Option<&'a TextTokenizer>,
}

impl<'a> Stops<'a> {
    /// Only the token limit.
    pub fn none() -> Self {
        Self { tokens: Vec::new(), tokenizer: None }
    }

    /// These tokens; no stop strings.
    pub fn tokens(tokens: Vec<u32>) -> Self {
        Self { tokens, tokenizer: None }
    }

    /// The model's end-of-sequence tokens ([`stop_tokens`]) and the stop strings, read with `tok`.
    pub fn of_model(model: &Llama, tok: &'a TextTokenizer) -> Self {
        Self { tokens: stop_tokens(model, tok), tokenizer: Some(tok) }
    }
}

/// Finds a stop string in one row's text as it grows, searching only where a new match can
/// start.
struct StopStringScan {
    /// Bytes of the row's text already searched up to the last possible match start.
    searched: usize,
}

impl StopStringScan {
    /// Index of the first stop string in `text` that was not there before.
    fn find(&mut self, text: &str, strings: &[String]) -> Option<usize> {
        let longest = strings.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.searched.min(text.len());
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = strings.iter().position(|s| text[from..].contains(s.as_str()));
        self.searched = text.len().saturating_sub(longest);
        hit
    }
}

/// Samples `per_prompt` completions of every prompt, all decoded together in one batch: each
/// prompt is prefilled once and its cache copied to its rows, then every step runs one token
/// of every unfinished row through the model ([`Llama::decode_step`]). Rows stop at a `stop`
/// token, when their text comes to hold one of `opts.stop_strings` (read with
/// `stop.tokenizer`), after `max_new_tokens`, or at the model's context; finished rows leave
/// the batch.
/// Row `p·per_prompt + s` (sample `s` of prompt `p`) draws from its own random stream, so its
/// tokens do not depend on the other rows. `on_token(row, id)` sees every kept token as it is
/// chosen. Returns the completions in row order.
pub fn generate_batch(
    model: &Llama,
    prompts: &[Vec<u32>],
    per_prompt: usize,
    opts: &SamplingOptions,
    stop: &Stops,
    on_token: &mut dyn FnMut(usize, u32),
) -> Result<Vec<Completion>> {
    opts.validate()?;
    let text_of = match (opts.stop_strings.is_empty(), stop.tokenizer) {
        (true, _) => None,
        (false, Some(tok)) => Some(tok),
        (false, None) => return Err(Error::Model("stop strings need the tokenizer to read the completions' text; none was given".into())),
    };
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
    let mut scans: Vec<StopStringScan> = (0..rows).map(|_| StopStringScan { searched: 0 }).collect();
    // Takes row `r`'s next token from its logits; whether the row goes on.
    let mut accept = |r: usize, logits: &[f32], rngs: &mut [SplitMix64], out: &mut [Completion]| -> Result<bool> {
        if out[r].ids.len() >= limit[r] {
            return Ok(false);
        }
        let id = pick(logits, opts, &mut rngs[r]);
        if stop.tokens.contains(&id) {
            out[r].stop = Some(id);
            return Ok(false);
        }
        out[r].ids.push(id);
        on_token(r, id);
        if let Some(tok) = text_of {
            if let Some(i) = scans[r].find(&tok.decode(&out[r].ids, true)?, &opts.stop_strings) {
                out[r].stop_string = Some(i);
                return Ok(false);
            }
        }
        Ok(out[r].ids.len() < limit[r])
    };
    let mut active = Vec::with_capacity(rows);
    for (p, ids) in prompts.iter().enumerate() {
        let mut prefill = KvCache::new(c.num_hidden_layers);
        let last = prefill_logits(model, ids, &mut prefill, &ctx)?;
        for s in 0..per_prompt {
            let r = p * per_prompt + s;
            cache.fill_row(r, &prefill)?;
            active.push(accept(r, &last, &mut rngs, &mut out)?);
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
        active = live.iter().enumerate().map(|(slot, &r)| accept(r, &logits[slot * vocab..(slot + 1) * vocab], &mut rngs, &mut out)).collect::<Result<_>>()?;
    }
}

/// Runs the prompt `ids` as one forward into `kv`; the logits of its last position.
pub(super) fn prefill_logits(model: &Llama, ids: &[u32], kv: &mut KvCache, ctx: &ForwardCtx) -> Result<Vec<f32>> {
    // On a pool worker, as `Llama::decode_step` (see `on_pool`).
    crate::runtime::on_pool(|| {
        let h = model.hidden(ids, 1, ids.len(), Some(kv), ctx)?;
        Ok(kernels::lm_head_logits(&h.narrow(0, ids.len() - 1, 1)?, model.head_weight())?.flatten_all()?.to_vec1()?)
    })
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
    let mut text = TextPieces::new(tok).holding_back(&opts.stop_strings);
    let done = generate_batch(model, &[ids], 1, opts, &Stops::of_model(model, tok), &mut |_, id| text.push(id, on_text))?;
    text.finish(on_text)?;
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
/// multi-byte character may span several tokens. With stop strings it holds back the text
/// that could still turn out to be the start of one, and hands on nothing from a stop
/// string on.
pub struct TextPieces<'a> {
    tok: &'a TextTokenizer,
    so_far: Vec<u32>,
    printed: usize,
    stops: &'a [String],
    stopped: bool,
    failed: Option<Error>,
}

impl<'a> TextPieces<'a> {
    pub fn new(tok: &'a TextTokenizer) -> Self {
        Self { tok, so_far: Vec::new(), printed: 0, stops: &[], stopped: false, failed: None }
    }

    /// Cuts the text before the first of `stops`, and holds back what might begin one.
    pub fn holding_back(self, stops: &'a [String]) -> Self {
        Self { stops, ..self }
    }

    pub fn push(&mut self, id: u32, on_text: &mut dyn FnMut(&str)) {
        self.so_far.push(id);
        match self.tok.decode(&self.so_far, true) {
            Ok(text) if !text.ends_with('\u{FFFD}') => self.hand_on(&text, false, on_text),
            Ok(_) => {}
            Err(e) => self.failed = self.failed.take().or(Some(e)),
        }
    }

    /// Hands on `text` from where it stopped: up to a stop string, else (unless `all`) up to
    /// where a stop string could still begin.
    fn hand_on(&mut self, text: &str, all: bool, on_text: &mut dyn FnMut(&str)) {
        if self.stopped {
            return;
        }
        let cut = self.stops.iter().filter_map(|s| text.find(s.as_str())).min();
        let mut end = match cut {
            Some(at) => at,
            None if all => text.len(),
            None => text.len().saturating_sub(self.stops.iter().map(|s| s.len().saturating_sub(1)).max().unwrap_or(0)),
        };
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        if end > self.printed {
            on_text(&text[self.printed..end]);
            self.printed = end;
        }
        self.stopped = cut.is_some();
    }

    /// Hands on what was held back; the first decoding error, if any.
    pub fn finish(mut self, on_text: &mut dyn FnMut(&str)) -> Result<()> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let text = self.tok.decode(&self.so_far, true)?;
        self.hand_on(&text, true, on_text);
        Ok(())
    }
}

/// The tokens that end a generation: the model's EOS ids and the tokenizer's.
pub fn stop_tokens(model: &Llama, tok: &TextTokenizer) -> Vec<u32> {
    let mut stop: Vec<u32> = model.config.eos_token_ids.clone();
    stop.extend(tok.eos_id());
    stop
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Top-k keeps the k most probable tokens, then top-p the smallest prefix of those whose
    /// probability renormalised over the k reaches p: every draw lies in that set, and every
    /// member of it is drawn.
    #[test]
    fn top_k_then_top_p_draws_from_exactly_their_set() {
        let mut rng = SplitMix64::new(17);
        let logits: Vec<f32> = (0..50).map(|_| 4.0 * rng.next_f32()).collect();
        let opts = SamplingOptions { temperature: 0.7, top_k: 6, top_p: 0.6, ..Default::default() };
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let w: Vec<f64> = order[..6].iter().map(|&i| ((logits[i] - logits[order[0]]) as f64 / 0.7).exp()).collect();
        let total: f64 = w.iter().sum();
        let mut cum = 0.0;
        let size = w.iter().position(|p| {
            cum += p / total;
            cum >= 0.6
        });
        let set: Vec<u32> = order[..size.unwrap() + 1].iter().map(|&i| i as u32).collect();
        assert!(set.len() > 1 && set.len() < 6, "the test wants a set cut by both: {set:?}");
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3000 {
            let id = pick(&logits, &opts, &mut rng);
            assert!(set.contains(&id), "drew {id}, outside {set:?}");
            seen.insert(id);
        }
        assert_eq!(seen.len(), set.len(), "some of {set:?} were never drawn");
        // Top-k alone: the k most probable, all of them drawn.
        let opts = SamplingOptions { temperature: 2.0, top_k: 3, ..Default::default() };
        let seen: std::collections::HashSet<u32> = (0..3000).map(|_| pick(&logits, &opts, &mut rng)).collect();
        let want: std::collections::HashSet<u32> = order[..3].iter().map(|&i| i as u32).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn sampling_flags_that_would_be_ignored_are_refused() {
        for opts in [
            SamplingOptions { top_k: 5, ..Default::default() },
            SamplingOptions { temperature: 1.0, stop_strings: vec![String::new()], ..Default::default() },
        ] {
            assert!(opts.validate().is_err(), "{opts:?}");
        }
    }
}
