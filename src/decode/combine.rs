//! Decoding from a combination of several models' next-token distributions (METHODS.md §7):
//! every model reads the same tokens with its own KV cache, and the token is drawn from
//! `softmax(score)`, where the score is a weighted sum of the models' log-probabilities.
//!
//! - **EFT** (§7.1): `log π_base^P + Σ_i β_i (log π_ft,i^F − log π_base^F)`. Up-scaling puts the
//!   large base at P and a small base/tuned pair at F; down-scaling the reverse; several tuned
//!   models with their own β interpolate behaviours.
//! - **CGE** (§7.2): `log π_ft − γ log π_pre` over the tokens the fine-tuned model finds
//!   plausible, `π_ft(v) ≥ α · max π_ft`. The paper's exact formula is not in METHODS.md
//!   (flagged unconfirmed there); the restriction is contrastive decoding's plausibility
//!   constraint (Li et al. 2023), without which a pure difference of log-probabilities favours
//!   tokens both models find absurd.
//!
//! Temperature and top-p apply to the combined distribution, not to any one model's.

use super::generate::{pick, prefill_logits, Completion, SamplingOptions};
use crate::data::TextTokenizer;
use crate::error::{Error, Result};
use crate::models::{ForwardCtx, KvCache, Llama, RowCache};
use crate::rng::SplitMix64;

/// One model's share of the score: `weight · log π_model`.
pub struct Part<'a> {
    pub model: &'a Llama,
    pub weight: f64,
    /// What the model is called in errors ("--model", "--tuned 2", …).
    pub name: String,
}

/// A weighted sum of log-probabilities, optionally restricted to one part's plausible tokens.
pub struct Combiner<'a> {
    parts: Vec<Part<'a>>,
    /// `(part, α)`: only tokens with `π_part(v) ≥ α · max π_part` may be drawn.
    plausible: Option<(usize, f64)>,
}

impl<'a> Combiner<'a> {
    /// EFT: `large` at the pre-training scale; `small_base` and each `(tuned, β)` at the
    /// fine-tuning scale. The small base enters with weight `−Σβ`.
    pub fn eft(large: &'a Llama, small_base: &'a Llama, tuned: &[(&'a Llama, f64)]) -> Result<Self> {
        if tuned.is_empty() {
            return Err(Error::flag("--tuned", "EFT needs at least one fine-tuned model"));
        }
        let mut parts = vec![Part { model: large, weight: 1.0, name: "--model".into() }];
        for (i, &(model, beta)) in tuned.iter().enumerate() {
            if !beta.is_finite() {
                return Err(Error::flag("--beta", format!("is {beta}; expected a finite number (1 emulates the fine-tune at the large scale)")));
            }
            parts.push(Part { model, weight: beta, name: format!("--tuned {}", i + 1) });
        }
        let beta_sum: f64 = tuned.iter().map(|t| t.1).sum();
        parts.push(Part { model: small_base, weight: -beta_sum, name: "--small-base".into() });
        Self::new(parts, None)
    }

    /// CGE: `log π_tuned − γ log π_pre` over the tokens with `π_tuned(v) ≥ α · max π_tuned`.
    pub fn cge(tuned: &'a Llama, pre: &'a Llama, gamma: f64, alpha: f64) -> Result<Self> {
        if !(gamma.is_finite() && gamma >= 0.0) {
            return Err(Error::flag(
                "--cge-gamma",
                format!("is {gamma}; expected a number ≥ 0 (the weight of the pre-trained model's log-probabilities, 1 by default)"),
            ));
        }
        if !(alpha > 0.0 && alpha <= 1.0) {
            return Err(Error::flag("--cge-alpha", format!("is {alpha}; expected a probability ratio in (0, 1], such as 0.1")));
        }
        let parts = vec![Part { model: tuned, weight: 1.0, name: "--tuned".into() }, Part { model: pre, weight: -gamma, name: "--model".into() }];
        Self::new(parts, Some((0, alpha)))
    }

    fn new(parts: Vec<Part<'a>>, plausible: Option<(usize, f64)>) -> Result<Self> {
        let vocab = parts[0].model.config.vocab_size;
        for p in &parts[1..] {
            if p.model.config.vocab_size != vocab {
                return Err(Error::Model(format!(
                    "{} has {} output tokens and {} has {vocab}; models combined at decode time must share one vocabulary",
                    p.name, p.model.config.vocab_size, parts[0].name
                )));
            }
        }
        Ok(Self { parts, plausible })
    }

    pub fn parts(&self) -> &[Part<'a>] {
        &self.parts
    }

    /// The combined score of every token from each part's logits (in part order).
    pub fn score(&self, logits: &[&[f32]]) -> Vec<f64> {
        let mut score = vec![0.0f64; logits[0].len()];
        for (part, l) in self.parts.iter().zip(logits) {
            let lse = log_sum_exp(l);
            for (s, &x) in score.iter_mut().zip(l.iter()) {
                *s += part.weight * (x as f64 - lse);
            }
        }
        if let Some((i, alpha)) = self.plausible {
            // π(v) ≥ α·max π  ⇔  logit(v) ≥ max logit + ln α.
            let l = logits[i];
            let floor = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64 + alpha.ln();
            for (s, &x) in score.iter_mut().zip(l.iter()) {
                if (x as f64) < floor {
                    *s = f64::NEG_INFINITY;
                }
            }
        }
        score
    }
}

fn log_sum_exp(l: &[f32]) -> f64 {
    let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    m + l.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
}

/// Refuses to combine models whose tokenizers differ: the same id must mean the same text in
/// every model, or the sum of log-probabilities mixes unrelated tokens.
pub fn check_same_tokenizer(first: (&str, &TextTokenizer), other: (&str, &TextTokenizer)) -> Result<()> {
    let (a, b) = (first.1.inner().get_vocab(true), other.1.inner().get_vocab(true));
    if a == b {
        return Ok(());
    }
    let mut differing: Vec<(&String, &u32)> = a.iter().filter(|(t, id)| b.get(*t) != Some(id)).collect();
    differing.sort_by_key(|(_, id)| **id);
    let example = match differing.first() {
        Some((t, id)) => match b.get(*t) {
            Some(other_id) => format!("token {t:?} is id {id} in {} and id {other_id} in {}", first.0, other.0),
            None => format!("token {t:?} (id {id} in {}) is missing from {}", first.0, other.0),
        },
        None => format!("{} has {} tokens {} lacks", other.0, b.len() - a.len(), first.0),
    };
    Err(Error::Model(format!(
        "{} and {} have different tokenizers ({} and {} tokens; {example}); decode-time combination needs models of one family that share a tokenizer",
        first.0,
        other.0,
        a.len(),
        b.len()
    )))
}

/// One model's view of the sequence: its own cache, fed every chosen token.
struct Stream<'a> {
    model: &'a Llama,
    cache: RowCache,
}

impl<'a> Stream<'a> {
    fn prefill(model: &'a Llama, ids: &[u32], cap: usize, ctx: &ForwardCtx) -> Result<(Self, Vec<f32>)> {
        let c = &model.config;
        let mut kv = KvCache::new(c.num_hidden_layers);
        let last = prefill_logits(model, ids, &mut kv, ctx)?;
        let mut cache = RowCache::new(c.num_hidden_layers, 1, cap, c.num_key_value_heads * c.head_dim);
        cache.fill_row(0, &kv)?;
        Ok((Self { model, cache }, last))
    }

    fn step(&mut self, id: u32, ctx: &ForwardCtx) -> Result<Vec<f32>> {
        Ok(self.model.decode_step(&[id], &mut self.cache, ctx)?.flatten_all()?.to_vec1()?)
    }
}

/// Continues `prompt` by drawing each token from the combined distribution. Stops at a `stop`
/// token, after `max_new_tokens`, or at the shortest context among the models. `on_token`
/// sees every kept token as it is chosen.
pub fn generate_combined(combiner: &Combiner, prompt: &[u32], opts: &SamplingOptions, stop: &[u32], on_token: &mut dyn FnMut(u32)) -> Result<Completion> {
    opts.validate()?;
    if prompt.is_empty() {
        return Err(Error::Model("the prompt encodes to no tokens".into()));
    }
    let context = combiner.parts.iter().map(|p| p.model.config.max_position_embeddings).min().unwrap_or(0);
    if prompt.len() > context {
        return Err(Error::Model(format!(
            "the prompt is {} tokens long, past the shortest context of the combined models ({context} tokens); shorten it",
            prompt.len()
        )));
    }
    let limit = opts.max_new_tokens.min(context - prompt.len());
    let ctx = ForwardCtx::eval();
    let mut streams = Vec::with_capacity(combiner.parts.len());
    let mut logits = Vec::with_capacity(combiner.parts.len());
    for part in &combiner.parts {
        let (s, l) = Stream::prefill(part.model, prompt, prompt.len() + limit, &ctx)?;
        streams.push(s);
        logits.push(l);
    }
    let mut rng = SplitMix64::derive(opts.seed, &[0xef7]);
    let mut out = Completion::default();
    while out.ids.len() < limit {
        let views: Vec<&[f32]> = logits.iter().map(|l| l.as_slice()).collect();
        let id = pick(&combiner.score(&views), opts, &mut rng);
        if stop.contains(&id) {
            out.stop = Some(id);
            break;
        }
        out.ids.push(id);
        on_token(id);
        if out.ids.len() == limit {
            break;
        }
        if let Some(signal) = crate::train::interrupt::requested() {
            return Err(Error::Interrupted { signal, detail: "generation interrupted".into() });
        }
        for (s, l) in streams.iter_mut().zip(logits.iter_mut()) {
            *l = s.step(id, &ctx)?;
        }
    }
    Ok(out)
}
