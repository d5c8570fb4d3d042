//! Batched decoding: rows of different lengths decoded together give what one sequence at a
//! time, recomputed from scratch, gives.

mod common;

use common::*;
use ferrotune::decode::{generate_batch, SamplingOptions, Stops, TextPieces};
use ferrotune::methods::{Lora, LoraConfig, TargetModules};
use ferrotune::models::{load, ForwardCtx, KvCache, Llama, RowCache};

/// A tiny model with a non-zero LoRA on every linear layer, so the adapter path decodes too.
fn adapted_model(dir: &std::path::Path) -> (Llama, usize) {
    let spec = TinySpec { tied: false, qkv_bias: true, ..Default::default() };
    let vocab = write_tiny_hf(dir, &spec);
    let mut m = load::load_model(dir).unwrap();
    let cfg = LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, target_modules: TargetModules::AllLinear, use_rslora: false, ..Default::default() };
    let lora = Lora::attach(&mut m, cfg, 5).unwrap();
    let mut r = ferrotune::rng::SplitMix64::new(9);
    for s in &lora.sites {
        let v: Vec<f32> = (0..s.b.elem_count()).map(|_| 0.2 * (2.0 * r.next_f32() - 1.0)).collect();
        s.b.set(&candle_core::Tensor::from_vec(v, s.b.shape(), s.b.device()).unwrap()).unwrap();
    }
    (m, vocab)
}

fn greedy(max_new_tokens: usize) -> SamplingOptions {
    SamplingOptions { max_new_tokens, ..Default::default() }
}

#[test]
fn a_decode_step_gives_the_full_forward_logits_for_rows_at_different_positions() {
    let dir = tempfile::tempdir().unwrap();
    let (m, vocab) = adapted_model(dir.path());
    let seqs = [ids(vocab, 4, 1), ids(vocab, 11, 2), ids(vocab, 7, 3)];
    let c = &m.config;
    let mut cache = RowCache::new(c.num_hidden_layers, seqs.len(), 16, c.num_key_value_heads * c.head_dim);
    // Prefill all but the last token of each row, then decode the last tokens together.
    for (r, s) in seqs.iter().enumerate() {
        let mut kv = KvCache::new(c.num_hidden_layers);
        m.logits(&s[..s.len() - 1], 1, s.len() - 1, Some(&mut kv), &ForwardCtx::eval()).unwrap();
        cache.fill_row(r, &kv).unwrap();
    }
    let last: Vec<u32> = seqs.iter().map(|s| *s.last().unwrap()).collect();
    let got: Vec<f32> = m.decode_step(&last, &mut cache, &ForwardCtx::eval()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(cache.lens(), &[4, 11, 7]);
    for (r, s) in seqs.iter().enumerate() {
        let full = logits(&m, s);
        let want = &full[(s.len() - 1) * vocab..];
        let d = max_abs_diff(&got[r * vocab..(r + 1) * vocab], want);
        assert!(d < 1e-5, "row {r}: decode step differs from the full forward by {d}");
    }
    // Dropping the middle row keeps the others' caches intact.
    cache.retain(&[true, false, true]);
    let next = [ids(vocab, 1, 8)[0], ids(vocab, 1, 9)[0]];
    let got: Vec<f32> = m.decode_step(&next, &mut cache, &ForwardCtx::eval()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    for (slot, (s, &n)) in [&seqs[0], &seqs[2]].into_iter().zip(&next).enumerate() {
        let mut longer = s.clone();
        longer.push(n);
        let full = logits(&m, &longer);
        let d = max_abs_diff(&got[slot * vocab..(slot + 1) * vocab], &full[s.len() * vocab..]);
        assert!(d < 1e-5, "after retain, slot {slot} differs by {d}");
    }
}

/// On weights in Q4_0/Q4_1/Q8_0/Q4_K/Q6_K blocks a decode step multiplies int8-quantized activations (as
/// llama.cpp decodes): its logits differ from the f32 forward's, within the activations'
/// quantization error; on other types it stays the f32 product.
#[test]
fn decoding_on_q4_and_q8_blocks_uses_int8_activations_within_their_error() {
    use ferrotune::formats::gguf::GgmlType;
    let int8 = std::env::var("FERROTUNE_DECODE_INT8").map_or(true, |v| v != "0");
    for (ty, quantized) in [(GgmlType::Q4_0, true), (GgmlType::Q4_1, true), (GgmlType::Q8_0, true), (GgmlType::Q4K, true), (GgmlType::Q6K, true), (GgmlType::Q5K, false)] {
        let dir = tempfile::tempdir().unwrap();
        let spec = TinySpec { hidden: 256, intermediate: 512, heads: 4, kv_heads: 2, ..Default::default() };
        write_tiny_gguf(&dir.path().join("m.gguf"), &spec, ty);
        let m = load::load_model(&dir.path().join("m.gguf")).unwrap();
        let (c, vocab) = (&m.config, m.config.vocab_size);
        let seq = ids(vocab, 9, 4);
        let mut kv = KvCache::new(c.num_hidden_layers);
        m.logits(&seq[..8], 1, 8, Some(&mut kv), &ForwardCtx::eval()).unwrap();
        let mut cache = RowCache::new(c.num_hidden_layers, 1, 16, c.num_key_value_heads * c.head_dim);
        cache.fill_row(0, &kv).unwrap();
        let got: Vec<f32> = m.decode_step(&seq[8..], &mut cache, &ForwardCtx::eval()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let want = &logits(&m, &seq)[8 * vocab..];
        let (d, size) = (max_abs_diff(&got, want), want.iter().fold(0f32, |a, v| a.max(v.abs())));
        eprintln!("{ty}: decode step vs f32 forward: largest difference {d:.2e} (largest logit {size:.2})");
        if quantized && int8 {
            assert!(d > 1e-6 && d < 0.03 * size, "{ty}: int8 decoding should differ from f32 a little, not {d} (logits up to {size})");
        } else {
            assert!(d < 1e-5, "{ty}: f32 decoding should equal the forward, differs by {d}");
        }
    }
}

#[test]
fn batched_greedy_generation_equals_one_sequence_at_a_time_from_scratch() {
    let dir = tempfile::tempdir().unwrap();
    let (m, vocab) = adapted_model(dir.path());
    let prompts = vec![ids(vocab, 3, 11), ids(vocab, 9, 12), ids(vocab, 5, 13)];
    let n_new = 6;
    // The reference: argmax of a full forward over the whole sequence, one token at a time.
    let expected: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let mut seq = p.clone();
            for _ in 0..n_new {
                let l = logits(&m, &seq);
                let last = &l[(seq.len() - 1) * vocab..];
                let id = last.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0;
                seq.push(id as u32);
            }
            seq[p.len()..].to_vec()
        })
        .collect();
    let mut seen = vec![Vec::new(); 6];
    let got = generate_batch(&m, &prompts, 2, &greedy(n_new), &Stops::none(), &mut |r, id| seen[r].push(id)).unwrap();
    for (p, want) in expected.iter().enumerate() {
        for s in 0..2 {
            let row = &got[2 * p + s];
            assert_eq!(&row.ids, want, "prompt {p}, sample {s}");
            assert_eq!(row.stop, None);
            assert_eq!(&seen[2 * p + s], want, "on_token saw every token of its row");
        }
    }
    // A stop token ends only the rows that produce it; the others run on unchanged.
    let stop = expected[1][2];
    let got = generate_batch(&m, &prompts, 1, &greedy(n_new), &Stops::tokens(vec![stop]), &mut |_, _| {}).unwrap();
    for (p, want) in expected.iter().enumerate() {
        let cut = want.iter().position(|&t| t == stop);
        let kept = &want[..cut.unwrap_or(want.len())];
        assert_eq!(got[p].ids, kept, "prompt {p}");
        assert_eq!(got[p].stop, cut.map(|_| stop));
    }
}

#[test]
fn a_sampled_row_does_not_depend_on_the_rows_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let (m, vocab) = adapted_model(dir.path());
    let a = ids(vocab, 4, 21);
    let b = ids(vocab, 8, 22);
    let opts = SamplingOptions { max_new_tokens: 8, temperature: 1.0, top_p: 0.9, seed: 3, ..Default::default() };
    let together = generate_batch(&m, &[a.clone(), b], 3, &opts, &Stops::none(), &mut |_, _| {}).unwrap();
    let alone = generate_batch(&m, &[a], 3, &opts, &Stops::none(), &mut |_, _| {}).unwrap();
    assert_eq!(&together[..3], &alone[..], "a prompt's samples change with the batch around them");
    // Its samples are draws, not copies of one another.
    assert!(together[0].ids != together[1].ids || together[1].ids != together[2].ids, "three samples at temperature 1 are identical");
}

/// `eval --task`'s scoring: an example whose reference is exactly what the model generates
/// greedily from its prompt scores 1, one with another reference 0; the prompt is the
/// example's tokens before its first target.
#[test]
fn task_scoring_compares_greedy_generations_with_references() {
    use ferrotune::data::EncodedExample;
    use ferrotune::objectives::reward::Reward;
    let dir = tempfile::tempdir().unwrap();
    let (m, vocab) = adapted_model(dir.path());
    let tok = load::load_tokenizer(dir.path()).unwrap();
    let prompts = [ids(vocab, 5, 31), ids(vocab, 7, 32)];
    let greedy_out = generate_batch(&m, &prompts, 1, &greedy(4), &Stops::of_model(&m, &tok), &mut |_, _| {}).unwrap();
    let example = |prompt: &[u32], completion: &[u32]| EncodedExample {
        input_ids: prompt.iter().chain(completion).copied().collect(),
        labels: prompt.iter().map(|_| -100).chain(completion.iter().map(|&t| t as i32)).collect(),
        ..Default::default()
    };
    let wrong: Vec<u32> = greedy_out[1].ids.iter().map(|&t| (t + 1) % vocab as u32).collect();
    let examples = vec![example(&prompts[0], &greedy_out[0].ids), example(&prompts[1], &wrong)];
    let mut batches = 0;
    let (score, predictions) = ferrotune::decode::task::score(&m, &tok, &examples, &Reward::Exact, 4, 1, &mut |_, _| batches += 1).unwrap();
    assert_eq!(batches, 2, "one progress report per batch");
    assert_eq!((score.correct, score.examples), (1, 2));
    assert!(predictions[0].correct && !predictions[1].correct);
    assert_eq!(predictions[0].completion, tok.decode(&greedy_out[0].ids, true).unwrap());
}

/// Three different tiny models of one vocabulary: a "large" base (3 layers), and a small base
/// (2 layers) with a LoRA fine-tune of it.
fn eft_models(dir: &std::path::Path) -> (Llama, Llama, Llama, usize) {
    let vocab = write_tiny_hf(&dir.join("large"), &TinySpec { layers: 3, seed: 31, ..Default::default() });
    write_tiny_hf(&dir.join("small"), &TinySpec { seed: 32, ..Default::default() });
    let large = load::load_model(&dir.join("large")).unwrap();
    let small = load::load_model(&dir.join("small")).unwrap();
    let mut tuned = load::load_model(&dir.join("small")).unwrap();
    let cfg = LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, target_modules: TargetModules::AllLinear, use_rslora: false, ..Default::default() };
    let lora = Lora::attach(&mut tuned, cfg, 5).unwrap();
    let mut r = ferrotune::rng::SplitMix64::new(33);
    for s in &lora.sites {
        let v: Vec<f32> = (0..s.b.elem_count()).map(|_| 0.5 * (2.0 * r.next_f32() - 1.0)).collect();
        s.b.set(&candle_core::Tensor::from_vec(v, s.b.shape(), s.b.device()).unwrap()).unwrap();
    }
    (large, small, tuned, vocab)
}

fn log_softmax_last(m: &Llama, seq: &[u32], vocab: usize) -> Vec<f64> {
    let l = logits(m, seq);
    let last: Vec<f64> = l[(seq.len() - 1) * vocab..].iter().map(|&x| x as f64).collect();
    let mx = last.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = mx + last.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
    last.iter().map(|x| x - lse).collect()
}

fn argmax(v: &[f64]) -> u32 {
    v.iter().enumerate().fold((0, f64::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0 as u32
}

/// Greedy decoding by the formula, recomputed from full forwards of every model at every step.
fn greedy_by_formula(prompt: &[u32], n: usize, score: &dyn Fn(&[u32]) -> Vec<f64>) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    for _ in 0..n {
        seq.push(argmax(&score(&seq)));
    }
    seq[prompt.len()..].to_vec()
}

/// METHODS.md §7.1's check: with β = 0, or with the tuned model equal to the small base, EFT
/// decodes exactly the large base's greedy tokens.
#[test]
fn eft_without_a_fine_tuning_change_decodes_as_the_large_base() {
    use ferrotune::decode::{generate_combined, Combiner};
    let dir = tempfile::tempdir().unwrap();
    let (large, small, tuned, vocab) = eft_models(dir.path());
    let n = 12;
    for (p, prompt) in [ids(vocab, 3, 41), ids(vocab, 8, 42)].iter().enumerate() {
        let want = generate_batch(&large, &[prompt.clone()], 1, &greedy(n), &Stops::none(), &mut |_, _| {}).unwrap().remove(0).ids;
        let beta_zero = Combiner::eft(&large, &small, &[(&tuned, 0.0)]).unwrap();
        let got = generate_combined(&beta_zero, prompt, &greedy(n), &[], &mut |_| {}).unwrap();
        assert_eq!(got.ids, want, "prompt {p}: β = 0");
        let same_small = Combiner::eft(&large, &small, &[(&small, 1.0)]).unwrap();
        let got = generate_combined(&same_small, prompt, &greedy(n), &[], &mut |_| {}).unwrap();
        assert_eq!(got.ids, want, "prompt {p}: tuned = small base");
    }
}

/// EFT and CGE draw from their formulas: greedy decoding equals the argmax of the score
/// computed here from each model's full forward at every step (no caches), and the
/// combination does change the tokens.
#[test]
fn eft_and_cge_decode_by_their_formulas() {
    use ferrotune::decode::{generate_combined, Combiner};
    let dir = tempfile::tempdir().unwrap();
    let (large, small, tuned, vocab) = eft_models(dir.path());
    let prompt = ids(vocab, 5, 43);
    let n = 12;
    let plain = generate_batch(&large, &[prompt.clone()], 1, &greedy(n), &Stops::none(), &mut |_, _| {}).unwrap().remove(0).ids;

    // Up-scaling with two fine-tunes (the LoRA one and, as a second "fine-tune", the large
    // model itself) at β = 1.5 and −0.7.
    let eft = Combiner::eft(&large, &small, &[(&tuned, 1.5), (&large, -0.7)]).unwrap();
    let got = generate_combined(&eft, &prompt, &greedy(n), &[], &mut |_| {}).unwrap();
    let want = greedy_by_formula(&prompt, n, &|seq| {
        let (p, t, l, b) = (log_softmax_last(&large, seq, vocab), log_softmax_last(&tuned, seq, vocab), log_softmax_last(&large, seq, vocab), log_softmax_last(&small, seq, vocab));
        (0..vocab).map(|v| p[v] + 1.5 * (t[v] - b[v]) - 0.7 * (l[v] - b[v])).collect()
    });
    assert_eq!(got.ids, want, "EFT");
    assert_ne!(got.ids, plain, "EFT changed nothing: the test would not see a wrong formula");

    let (gamma, alpha) = (0.8, 0.05);
    let cge = Combiner::cge(&tuned, &small, gamma, alpha).unwrap();
    let got = generate_combined(&cge, &prompt, &greedy(n), &[], &mut |_| {}).unwrap();
    let want = greedy_by_formula(&prompt, n, &|seq| {
        let (t, b) = (log_softmax_last(&tuned, seq, vocab), log_softmax_last(&small, seq, vocab));
        let best = t.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (0..vocab).map(|v| if t[v].exp() >= alpha * best.exp() { t[v] - gamma * b[v] } else { f64::NEG_INFINITY }).collect()
    });
    assert_eq!(got.ids, want, "CGE");
    let tuned_alone = generate_batch(&tuned, &[prompt.clone()], 1, &greedy(n), &Stops::none(), &mut |_, _| {}).unwrap().remove(0).ids;
    assert_ne!(got.ids, tuned_alone, "CGE decoded as the fine-tuned model alone");
}

/// Sampled combined decoding repeats at a fixed seed and ends at a stop token.
#[test]
fn eft_sampling_is_reproducible_and_stops_at_a_stop_token() {
    use ferrotune::decode::{generate_combined, Combiner};
    let dir = tempfile::tempdir().unwrap();
    let (large, small, tuned, vocab) = eft_models(dir.path());
    let prompt = ids(vocab, 4, 44);
    let opts = SamplingOptions { max_new_tokens: 10, temperature: 0.8, top_p: 0.95, seed: 5, ..Default::default() };
    let eft = Combiner::eft(&large, &small, &[(&tuned, 1.0)]).unwrap();
    let a = generate_combined(&eft, &prompt, &opts, &[], &mut |_| {}).unwrap();
    let b = generate_combined(&eft, &prompt, &opts, &[], &mut |_| {}).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.ids.len(), 10);
    let stop = a.ids[4];
    let cut = a.ids.iter().position(|&t| t == stop).unwrap();
    let c = generate_combined(&eft, &prompt, &opts, &[stop], &mut |_| {}).unwrap();
    assert_eq!((c.ids.as_slice(), c.stop), (&a.ids[..cut], Some(stop)));
}

/// Top-k sampling with k = 1 is greedy decoding whatever the seed and temperature; with a
/// larger k the samples vary.
#[test]
fn top_k_of_one_decodes_greedily() {
    let dir = tempfile::tempdir().unwrap();
    let (m, vocab) = adapted_model(dir.path());
    let prompts = [ids(vocab, 5, 41), ids(vocab, 9, 42)];
    let want = generate_batch(&m, &prompts, 1, &greedy(8), &Stops::none(), &mut |_, _| {}).unwrap();
    for seed in [1, 2, 3] {
        let opts = SamplingOptions { max_new_tokens: 8, temperature: 1.5, top_k: 1, seed, ..Default::default() };
        let got = generate_batch(&m, &prompts, 2, &opts, &Stops::none(), &mut |_, _| {}).unwrap();
        for (r, c) in got.iter().enumerate() {
            assert_eq!(c.ids, want[r / 2].ids, "seed {seed}, row {r}: top_k = 1 left the greedy path");
        }
    }
    let opts = SamplingOptions { max_new_tokens: 8, temperature: 1.5, top_k: 20, seed: 4, ..Default::default() };
    let got = generate_batch(&m, &prompts[..1], 3, &opts, &Stops::none(), &mut |_, _| {}).unwrap();
    assert!(got.iter().any(|c| c.ids != want[0].ids), "top_k = 20 at temperature 1.5 gave only the greedy completion");
}

/// A stop string ends a row once its text holds it: the completion is the unstopped one up to
/// the token that completed the string, its text cut before the string, and the streamed text
/// (held back while it could still begin a stop string) is that same text.
#[test]
fn a_stop_string_ends_a_row_and_is_cut_from_its_text() {
    let dir = tempfile::tempdir().unwrap();
    let (m, vocab) = adapted_model(dir.path());
    let tok = load::load_tokenizer(dir.path()).unwrap();
    let prompts = [ids(vocab, 6, 51), ids(vocab, 4, 52)];
    let n = 12;
    let free = generate_batch(&m, &prompts, 1, &greedy(n), &Stops::tokens(vec![]), &mut |_, _| {}).unwrap();
    let text = tok.decode(&free[0].ids, true).unwrap();
    // A stop string from the middle of row 0's text: its characters 3 to 6 (or fewer when short).
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 5, "the tiny model's 12 tokens decode to {:?}, too short for the test", text);
    let stop: String = chars[3..6.min(chars.len())].iter().collect();
    let at = text.find(&stop).unwrap();
    let opts = SamplingOptions { max_new_tokens: n, stop_strings: vec!["never in this text \u{1F600}".into(), stop.clone()], ..Default::default() };
    let got = generate_batch(&m, &prompts, 1, &opts, &Stops::of_model(&m, &tok), &mut |_, _| {}).unwrap();
    let c = &got[0];
    assert_eq!(c.stop_string, Some(1));
    assert!(c.stopped());
    // The row ends at the first token whose text holds the string.
    let first = (1..=free[0].ids.len()).find(|&k| tok.decode(&free[0].ids[..k], true).unwrap().contains(&stop)).unwrap();
    assert_eq!(c.ids, free[0].ids[..first]);
    assert_eq!(c.text(&tok, &opts).unwrap(), text[..at]);
    // Row 1 runs on as before unless its own text holds the string.
    let text1 = tok.decode(&free[1].ids, true).unwrap();
    if !text1.contains(&stop) {
        assert_eq!(got[1].ids, free[1].ids);
        assert_eq!(got[1].stop_string, None);
    }
    // Streaming hands on exactly the cut text.
    let mut streamed = String::new();
    let mut pieces = TextPieces::new(&tok).holding_back(&opts.stop_strings);
    for &id in &free[0].ids {
        pieces.push(id, &mut |p| streamed.push_str(p));
    }
    pieces.finish(&mut |p| streamed.push_str(p)).unwrap();
    assert_eq!(streamed, text[..at]);
    // Without stop strings the stream is the whole text.
    let mut whole = String::new();
    let mut pieces = TextPieces::new(&tok);
    for &id in &free[0].ids {
        pieces.push(id, &mut |p| whole.push_str(p));
    }
    pieces.finish(&mut |p| whole.push_str(p)).unwrap();
    assert_eq!(whole, text);
    // Stop strings without a tokenizer to read the text are refused, not ignored.
    let err = generate_batch(&m, &prompts, 1, &opts, &Stops::tokens(vec![]), &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("tokenizer"), "{err}");
}
