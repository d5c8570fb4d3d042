use crate::decode::{self, Combiner, Completion, SamplingOptions, TextPieces};
use crate::error::Error;
use crate::session::Session;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Models combined at decode time (METHODS.md §7); empty `tuned` means plain generation.
pub struct Combination {
    pub tuned: Vec<PathBuf>,
    pub small_base: Option<PathBuf>,
    pub beta: Vec<f64>,
    pub cge: bool,
    /// CGE's weight of the pre-trained log-probabilities (1 when not given).
    pub cge_gamma: Option<f64>,
    /// CGE's plausibility ratio (0.1 when not given).
    pub cge_alpha: Option<f64>,
}

/// What to continue: one prompt, printed as it comes, or a file of them, written to `out`.
pub enum Prompts {
    One(String),
    File { data: PathBuf, out: PathBuf, batch_size: usize },
}

pub fn run(model: &Path, adapter: Option<&Path>, prompts: &Prompts, chat: bool, n: usize, opts: &SamplingOptions, combo: &Combination) -> anyhow::Result<()> {
    opts.validate()?;
    check_flags(combo)?;
    if n == 0 {
        anyhow::bail!("--num-return-sequences must be at least 1");
    }
    if n > 1 && opts.temperature == 0.0 {
        anyhow::bail!("--num-return-sequences {n} with greedy decoding gives {n} copies of one completion; set --temperature above 0");
    }
    if !combo.tuned.is_empty() && !opts.stop_strings.is_empty() {
        anyhow::bail!("--stop is not available with --tuned: combined decoding ends at end-of-sequence tokens only");
    }
    let prompt = match prompts {
        Prompts::One(p) if n == 1 => p.as_str(),
        _ if !combo.tuned.is_empty() => anyhow::bail!("--tuned decodes one sequence from several models; give one --prompt and no --num-return-sequences"),
        Prompts::One(p) => return run_many(model, adapter, &[p.clone()], None, 1, chat, n, opts),
        Prompts::File { data, out, batch_size } => return run_many(model, adapter, &crate::cli::read_prompts(data)?, Some(out), *batch_size, chat, n, opts),
    };
    let session = Session::load(model, adapter)?;
    let mut stdout = std::io::stdout();
    let mut print = |piece: &str| {
        let _ = write!(stdout, "{piece}");
        let _ = stdout.flush();
    };
    if combo.tuned.is_empty() {
        let started = Instant::now();
        let ids = decode::generate(&session.model, &session.tokenizer, prompt, chat, opts, &mut print)?;
        println!();
        report_speed("generate", 1, ids.len(), started);
        return Ok(());
    }

    // The fine-tuning scale's base: EFT's --small-base (the large model itself when not given),
    // or for CGE the pre-trained model, --model.
    let small_base_path = combo.small_base.as_deref().unwrap_or(model);
    let small_base = if combo.cge || combo.small_base.is_none() { None } else { Some(load_checked(&session, small_base_path, None, "--small-base")?) };
    let tuned: Vec<Session> = combo
        .tuned
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let name = if combo.tuned.len() == 1 { "--tuned".to_string() } else { format!("--tuned {}", i + 1) };
            // An adapter folder is a fine-tune of the small base; anything else is a whole model.
            if t.join(crate::methods::ADAPTER_CONFIG).is_file() {
                load_checked(&session, small_base_path, Some(t), &name)
            } else {
                load_checked(&session, t, None, &name)
            }
        })
        .collect::<anyhow::Result<_>>()?;

    let combiner = if combo.cge {
        Combiner::cge(&tuned[0].model, &session.model, combo.cge_gamma.unwrap_or(1.0), combo.cge_alpha.unwrap_or(0.1))?
    } else {
        let betas: Vec<f64> = match combo.beta.as_slice() {
            [] => vec![1.0; tuned.len()],
            [b] => vec![*b; tuned.len()],
            many => many.to_vec(),
        };
        let pairs: Vec<_> = tuned.iter().zip(&betas).map(|(t, &b)| (&t.model, b)).collect();
        Combiner::eft(&session.model, small_base.as_ref().map_or(&session.model, |s| &s.model), &pairs)?
    };

    let ids = decode::prompt_ids(&session.tokenizer, prompt, chat)?;
    let context = combiner.parts().iter().map(|p| p.model.config.max_position_embeddings).min().unwrap_or(0);
    decode::note_room(ids.len(), context, opts.max_new_tokens);
    let mut stop = decode::stop_tokens(&session.model, &session.tokenizer);
    for t in &tuned {
        stop.extend(decode::stop_tokens(&t.model, &t.tokenizer));
    }
    let mut text = TextPieces::new(&session.tokenizer);
    let started = Instant::now();
    let done = decode::generate_combined(&combiner, &ids, opts, &stop, &mut |id| text.push(id, &mut print))?;
    text.finish(&mut print)?;
    println!();
    report_speed(if combo.cge { "CGE" } else { "EFT" }, combiner.parts().len(), done.ids.len(), started);
    Ok(())
}

/// Tokens per second since `started` (after loading), prefill included, on stderr.
fn report_speed(what: &str, models: usize, tokens: usize, started: Instant) {
    let secs = started.elapsed().as_secs_f64();
    let models = if models == 1 { "1 model".to_string() } else { format!("{models} models") };
    crate::note!("{what}: {models}, {tokens} tokens in {secs:.2} s ({:.2} tokens/s, prompt prefill included)", tokens as f64 / secs.max(1e-9));
}

/// Loads one of the combined models and checks that it shares the main model's tokenizer.
fn load_checked(main: &Session, path: &Path, adapter: Option<&Path>, name: &str) -> anyhow::Result<Session> {
    let s = Session::load(path, adapter).map_err(|e| anyhow::anyhow!("{name} {}: {e}", adapter.unwrap_or(path).display()))?;
    decode::check_same_tokenizer(("--model", &main.tokenizer), (name, &s.tokenizer))?;
    Ok(s)
}

fn check_flags(c: &Combination) -> Result<(), Error> {
    if !c.cge {
        for (set, flag) in [(c.cge_gamma.is_some(), "--cge-gamma"), (c.cge_alpha.is_some(), "--cge-alpha")] {
            if set {
                return Err(Error::flag(flag, "is a setting of CGE; add --cge (and --tuned)"));
            }
        }
    }
    if c.tuned.is_empty() {
        for (set, flag) in [(c.small_base.is_some(), "--small-base"), (c.cge, "--cge"), (!c.beta.is_empty(), "--beta")] {
            if set {
                return Err(Error::flag(flag, "combines models at decode time; give the fine-tuned model(s) with --tuned"));
            }
        }
        return Ok(());
    }
    if c.cge {
        if c.tuned.len() != 1 {
            return Err(Error::flag("--tuned", format!("CGE contrasts one fine-tuned model with --model; {} were given", c.tuned.len())));
        }
        for (set, flag) in [(c.small_base.is_some(), "--small-base"), (!c.beta.is_empty(), "--beta")] {
            if set {
                return Err(Error::flag(flag, "belongs to EFT; CGE's settings are --cge-gamma and --cge-alpha"));
            }
        }
    } else if !(c.beta.is_empty() || c.beta.len() == 1 || c.beta.len() == c.tuned.len()) {
        return Err(Error::flag(
            "--beta",
            format!("{} values for {} --tuned models; give one β for all, or one per --tuned, in order", c.beta.len(), c.tuned.len()),
        ));
    }
    Ok(())
}

/// Completions of many prompts (or several of one), decoded `batch_size` prompts at a time with
/// `n` samples each: to `out` as JSONL, or printed when there is no file.
#[allow(clippy::too_many_arguments)]
fn run_many(model: &Path, adapter: Option<&Path>, prompts: &[String], out: Option<&PathBuf>, batch_size: usize, chat: bool, n: usize, opts: &SamplingOptions) -> anyhow::Result<()> {
    if prompts.is_empty() {
        anyhow::bail!("no prompt to continue");
    }
    if batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    if let Some(out) = out {
        // A results file is the command's own output, replaced when run again (never a folder).
        crate::io_util::check_output_path(out, crate::io_util::OutputKind::File, true)?;
    }
    let session = Session::load(model, adapter)?;
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| decode::prompt_ids(&session.tokenizer, p, chat)).collect::<crate::error::Result<_>>()?;
    let stop = decode::Stops::of_model(&session.model, &session.tokenizer);
    let started = Instant::now();
    let (mut lines, mut printed, mut tokens) = (String::new(), Vec::new(), 0);
    for (c, chunk) in ids.chunks(batch_size).enumerate() {
        // Each chunk's rows draw from streams of their own: the seed moves with the chunk.
        let chunk_opts = SamplingOptions { seed: opts.seed.wrapping_add(c as u64), ..opts.clone() };
        let done: Vec<Completion> = decode::generate_batch(&session.model, chunk, n, &chunk_opts, &stop, &mut |_, _| {})?;
        for (r, comp) in done.iter().enumerate() {
            let p = c * batch_size + r / n;
            let text = comp.text(&session.tokenizer, opts)?;
            tokens += comp.ids.len();
            let record = serde_json::json!({ "prompt": prompts[p], "sample": r % n, "completion": text, "tokens": comp.ids.len(), "stopped": comp.stopped() });
            lines.push_str(&(record.to_string() + "\n"));
            printed.push((p, r % n, text));
        }
        crate::note!("generate: {}/{} prompts", (c * batch_size + chunk.len()).min(prompts.len()), prompts.len());
    }
    match out {
        Some(out) => {
            crate::io_util::write_atomic(out, lines.as_bytes())?;
            crate::note!("{} completions written to {}", printed.len(), out.display());
        }
        None => {
            for (p, s, text) in printed {
                println!("--- prompt {} sample {}\n{text}", p + 1, s + 1);
            }
        }
    }
    report_speed("generate", 1, tokens, started);
    Ok(())
}
