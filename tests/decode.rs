//! Batched decoding: rows of different lengths decoded together give what one sequence at a
//! time, recomputed from scratch, gives.

mod common;

use common::*;
use ferrotune::decode::{generate_batch, SamplingOptions};
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
    SamplingOptions { max_new_tokens, temperature: 0.0, top_p: 1.0, seed: 0 }
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
    let got = generate_batch(&m, &prompts, 2, &greedy(n_new), &[], &mut |r, id| seen[r].push(id)).unwrap();
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
    let got = generate_batch(&m, &prompts, 1, &greedy(n_new), &[stop], &mut |_, _| {}).unwrap();
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
    let opts = SamplingOptions { max_new_tokens: 8, temperature: 1.0, top_p: 0.9, seed: 3 };
    let together = generate_batch(&m, &[a.clone(), b], 3, &opts, &[], &mut |_, _| {}).unwrap();
    let alone = generate_batch(&m, &[a], 3, &opts, &[], &mut |_, _| {}).unwrap();
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
    let greedy_out = generate_batch(&m, &prompts, 1, &greedy(4), &ferrotune::decode::stop_tokens(&m, &tok), &mut |_, _| {}).unwrap();
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
