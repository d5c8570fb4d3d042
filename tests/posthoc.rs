//! `ferrotune combine` (METHODS.md §6): task arithmetic, TIES and LiNeS give exactly the
//! formulas computed here independently, on hand-made vectors and on whole tiny models.

mod common;

use common::*;
use ferrotune::posthoc::merge;
use ferrotune::session::Session;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

#[test]
fn ties_on_hand_made_vectors_is_trim_elect_and_disjoint_mean() {
    let t1 = [1.0f32, -2.0, 0.5, 3.0];
    let t2 = [-1.5f32, 1.0, 0.2, 2.0];
    let t3 = [0.5f32, -0.5, -4.0, -1.0];
    // Keeping half of each: t1 → [0, −2, 0, 3], t2 → [−1.5, 0, 0, 2], t3 → [0, 0, −4, −1].
    assert_eq!(merge::trim(&t1, 0.5), vec![0.0, -2.0, 0.0, 3.0]);
    assert_eq!(merge::trim(&t3, 0.5), vec![0.0, 0.0, -4.0, -1.0]);
    // Sums −1.5, −2, −4, 4 elect −, −, −, +; each entry is the weighted mean of the inputs
    // that agree (zeros never do): with weights 1, 0.5, 2 →
    //   0.5·(−1.5) / 1, 1·(−2) / 1, 2·(−4) / 1, (1·3 + 0.5·2) / 2.
    let got = merge::ties(&[&t1, &t2, &t3], &[1.0, 0.5, 2.0], 0.5);
    assert_eq!(got, vec![-0.75, -2.0, -8.0, 2.0]);
    // Density 1 trims nothing; ties in magnitude keep the first ones.
    assert_eq!(merge::trim(&t2, 1.0), t2.to_vec());
    assert_eq!(merge::trim(&[1.0, -1.0, 1.0, 0.5], 0.5), vec![1.0, -1.0, 0.0, 0.0]);
    assert_eq!(merge::task_arithmetic(&[&t1, &t2], &[0.5, 2.0]), vec![-2.5, 1.0, 0.65, 5.5]);
}

type Weights = BTreeMap<String, Vec<f32>>;
/// The merged task vector of one tensor from its name and the two inputs' task vectors.
type PerTensor<'a> = &'a dyn Fn(&str, &[f32], &[f32]) -> Vec<f32>;

fn weights_of(path: &Path) -> Weights {
    let m = ferrotune::models::load::load_model(path).unwrap();
    m.named_weights().unwrap().into_iter().map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1().unwrap())).collect()
}

/// A fine-tune of the base at `base`: every tensor moved by seeded noise of scale `scale`.
fn write_fine_tune(base: &Path, out: &Path, seed: u64, scale: f32) {
    let mut s = Session::load(base, None).unwrap();
    let mut rng = ferrotune::rng::SplitMix64::new(seed);
    for (name, t) in s.model.named_weights().unwrap() {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let moved: Vec<f32> = v.iter().map(|x| x + scale * ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)).collect();
        s.model.set_named_weight(&name, &candle_core::Tensor::from_vec(moved, t.shape(), t.device()).unwrap()).unwrap();
    }
    ferrotune::export::merged::write_hf_dir(&s, out, ferrotune::formats::safetensors::SaveDType::F32).unwrap();
}

fn combine(dir: &Path, args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_ferrotune")).arg("combine").args(args).current_dir(dir).output().unwrap();
    (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn assert_close(got: &Weights, want: &Weights, what: &str) {
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{what}");
    for (k, w) in want {
        let d = got[k].iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(d <= 1e-6, "{what}: {k} differs by {d}");
    }
}

#[test]
fn combine_applies_the_formulas_to_whole_models() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    write_tiny_hf(&dir.join("base"), &TinySpec { layers: 3, ..TinySpec::default() });
    write_fine_tune(&dir.join("base"), &dir.join("ft1"), 1, 0.02);
    write_fine_tune(&dir.join("base"), &dir.join("ft2"), 2, 0.03);
    let (b, f1, f2) = (weights_of(&dir.join("base")), weights_of(&dir.join("ft1")), weights_of(&dir.join("ft2")));
    let tau = |f: &Weights, k: &str| -> Vec<f32> { f[k].iter().zip(&b[k]).map(|(x, y)| x - y).collect() };
    let expect = |per_tensor: PerTensor| -> Weights {
        b.keys().map(|k| (k.clone(), b[k].iter().zip(per_tensor(k, &tau(&f1, k), &tau(&f2, k))).map(|(x, t)| x + t).collect())).collect()
    };

    // Task arithmetic: θ0 + 0.7·τ1 + 0.4·τ2.
    let (ok, err) = combine(
        dir,
        &["--model", "base", "--inputs", "ft1,ft2", "--weights", "0.7,0.4", "--method", "task_arithmetic", "--format", "merged-safetensors", "--out", "ta"],
    );
    assert!(ok, "{err}");
    let want = expect(&|_, a, c| a.iter().zip(c).map(|(x, y)| 0.7 * x + 0.4 * y).collect());
    assert_close(&weights_of(&dir.join("ta")), &want, "task arithmetic");

    // TIES with density 0.3: the plain loop, tensor by tensor.
    let (ok, err) =
        combine(dir, &["--model", "base", "--inputs", "ft1,ft2", "--method", "ties", "--density", "0.3", "--format", "merged-safetensors", "--out", "ties"]);
    assert!(ok, "{err}");
    let want = expect(&|_, a, c| {
        let keep = |v: &[f32]| -> Vec<f32> {
            let k = (0.3 * v.len() as f64) as usize;
            let mut m: Vec<f32> = v.iter().map(|x| x.abs()).collect();
            m.sort_by(|x, y| y.total_cmp(x));
            let th = if k == 0 { f32::INFINITY } else { m[k - 1] };
            v.iter().map(|&x| if x.abs() >= th { x } else { 0.0 }).collect()
        };
        let (a, c) = (keep(a), keep(c));
        a.iter()
            .zip(&c)
            .map(|(&x, &y)| {
                let s = if x + y >= 0.0 { 1.0 } else { -1.0 };
                let agree: Vec<f32> = [x, y].into_iter().filter(|v| *v != 0.0 && v.signum() == s).collect();
                agree.iter().sum::<f32>() / (agree.len().max(1) as f32)
            })
            .collect()
    });
    assert_close(&weights_of(&dir.join("ties")), &want, "TIES");

    // LiNeS, one fine-tune: block l of L = 3 scaled by λ + (1 − λ)·l/2, the rest by λ.
    let (ok, err) =
        combine(dir, &["--model", "base", "--inputs", "ft1", "--method", "lines", "--lambda", "0.2", "--format", "merged-safetensors", "--out", "lines1"]);
    assert!(ok, "{err}");
    let got = weights_of(&dir.join("lines1"));
    for (k, g) in &got {
        let f = match ferrotune::models::block_index(k) {
            Some(l) => 0.2 + 0.8 * l as f32 / 2.0,
            None => 0.2,
        };
        let want: Vec<f32> = b[k].iter().zip(tau(&f1, k)).map(|(x, t)| x + f * t).collect();
        let dmax = g.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(dmax <= 1e-6, "LiNeS λ: {k} differs by {dmax}");
    }
    // … several: α = ‖τ1 + τ2‖₁ / (2·‖τ_MTL‖₁) = 1/2 over task arithmetic (weights 1), β given.
    let (ok, err) =
        combine(dir, &["--model", "base", "--inputs", "ft1,ft2", "--method", "lines", "--beta", "0.6", "--format", "merged-safetensors", "--out", "lines2"]);
    assert!(ok, "{err}");
    assert!(err.contains("α = 0.500000") && err.contains("β = 0.600000"), "{err}");
    let want = expect(&|k, a, c| {
        let f = 0.5 + ferrotune::models::block_index(k).map_or(0.0, |l| 0.6 * l as f32 / 2.0);
        a.iter().zip(c).map(|(x, y)| f * (x + y)).collect()
    });
    assert_close(&weights_of(&dir.join("lines2")), &want, "LiNeS multi-task");

    // Wrong settings are refused by flag, before anything is written.
    for (args, flag) in [
        (vec!["--inputs", "ft1,ft2", "--method", "lines", "--lambda", "0.5"], "--beta"),
        (vec!["--inputs", "ft1", "--method", "ties", "--lambda", "0.5"], "--lambda"),
        (vec!["--inputs", "ft1,ft2", "--weights", "1", "--method", "task_arithmetic"], "--weights"),
        (vec!["--inputs", "ft1", "--method", "ties", "--density", "1.5"], "--density"),
        (vec!["--inputs", "ft1", "--method", "average"], "--method"),
    ] {
        let mut a = vec!["--model", "base"];
        a.extend(args);
        a.extend(["--format", "merged-safetensors", "--out", "refused"]);
        let (ok, err) = combine(dir, &a);
        assert!(!ok && err.contains(flag) && !err.contains("panicked"), "{a:?}: {err}");
        assert!(!dir.join("refused").exists());
    }
    // A model of another shape is not a fine-tune of this base.
    write_tiny_hf(&dir.join("other"), &TinySpec { hidden: 48, layers: 3, ..TinySpec::default() });
    let (ok, err) = combine(dir, &["--model", "base", "--inputs", "ft1,other", "--method", "task_arithmetic", "--format", "merged-safetensors", "--out", "x"]);
    assert!(!ok && err.contains("other") && err.contains("shape"), "{err}");
}

/// An adapter is a fine-tune too: combined alone with weight 1 it is its own merged export.
#[test]
fn an_adapter_input_is_folded_into_the_base_first() {
    use common::contract::{plan, Promise};
    let d = tempfile::tempdir().unwrap();
    let cfg = plan(d.path(), &Promise { adapter: "lora", extra: "", mergeable: true, peft: true, gguf_lora: true, identity_at_init: true }, 2);
    ferrotune::train::train(&cfg, &Default::default()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(["export", "--model", "model", "--adapter", "out/adapter", "--format", "merged-safetensors", "--out", "merged"])
        .current_dir(d.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let (ok, err) = combine(
        d.path(),
        &["--model", "model", "--inputs", "out/adapter", "--method", "task_arithmetic", "--format", "merged-gguf", "--quant", "f32", "--out", "c.gguf"],
    );
    assert!(ok, "{err}");
    let (merged, combined) = (weights_of(&d.path().join("merged")), weights_of(&d.path().join("c.gguf")));
    assert_close(&combined, &merged, "one adapter, weight 1");
    let base = weights_of(&d.path().join("model"));
    assert!(combined.iter().any(|(k, v)| v != &base[k]), "the adapter changed something");

    // Task arithmetic of LoRA adapters as one PEFT adapter (ranks stacked) is the merged
    // combination exactly; other rules cannot be one.
    for (format, out) in [("peft", "cat"), ("merged-safetensors", "cat-merged")] {
        let args = [
            "--model",
            "model",
            "--inputs",
            "out/adapter,out/adapter",
            "--weights",
            "0.7,-0.4",
            "--method",
            "task_arithmetic",
            "--format",
            format,
            "--out",
            out,
        ];
        let (ok, err) = combine(d.path(), &args);
        assert!(ok, "{format}: {err}");
    }
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.path().join("cat/adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["r"].as_u64(), cfg["lora_alpha"].as_u64()), (Some(8), Some(8)), "two r = 4 adapters stacked, scaling 1");
    let mut s = Session::load(&d.path().join("model"), Some(&d.path().join("cat"))).unwrap();
    s.merge_adapter().unwrap();
    let from_peft: Weights = s.model.named_weights().unwrap().into_iter().map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1().unwrap())).collect();
    let want = weights_of(&d.path().join("cat-merged"));
    for (k, w) in &want {
        let dmax = from_peft[k].iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(dmax <= 1e-5, "{k}: the stacked adapter differs from the merged combination by {dmax}");
    }
    let (ok, err) = combine(d.path(), &["--model", "model", "--inputs", "out/adapter", "--method", "ties", "--format", "peft", "--out", "refused"]);
    assert!(!ok && err.contains("task_arithmetic"), "{err}");

    // Intruder mitigation with λ = 1 scales nothing: every module's B·A comes back (refactored
    // by SVD), even with every examined vector counted as an intruder.
    let (ok, err) = combine(
        d.path(),
        &[
            "--model",
            "model",
            "--inputs",
            "out/adapter",
            "--method",
            "intruders",
            "--threshold-epsilon",
            "1",
            "--mitigation-lambda",
            "1",
            "--format",
            "peft",
            "--out",
            "same",
        ],
    );
    assert!(ok, "{err}");
    let load = |dir: &str| ferrotune::methods::lora::read_peft_tensors(&d.path().join(dir)).unwrap().0;
    let (before, after) = (load("out/adapter"), load("same"));
    let products = |t: &std::collections::HashMap<String, candle_core::Tensor>| -> Vec<Vec<f32>> {
        let mut keys: Vec<&String> = t.keys().filter(|k| k.ends_with("lora_A.weight")).collect();
        keys.sort();
        keys.iter().map(|k| t[&k.replace("lora_A", "lora_B")].matmul(&t[*k]).unwrap().flatten_all().unwrap().to_vec1().unwrap()).collect()
    };
    let (p0, p1) = (products(&before), products(&after));
    assert_eq!(p0.len(), p1.len());
    let worst = p0.iter().zip(&p1).flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs())).fold(0f32, f32::max);
    assert!(worst < 1e-5, "λ = 1 changed B·A by {worst}");
    assert!(Session::load(&d.path().join("model"), Some(&d.path().join("same"))).is_ok(), "the rewritten adapter loads");
    // … and is refused for several inputs, for what is not a LoRA adapter, and with others' settings.
    for (args, needle) in [
        (vec!["--inputs", "out/adapter,out/adapter"], "one"),
        (vec!["--inputs", "merged"], "adapter"),
        (vec!["--inputs", "out/adapter", "--weights", "1"], "--weights"),
    ] {
        let mut a = vec!["--model", "model", "--method", "intruders", "--format", "peft", "--out", "refused"];
        a.extend(args);
        let (ok, err) = combine(d.path(), &a);
        assert!(!ok && err.contains(needle) && !err.contains("panicked"), "{a:?}: {err}");
    }
    let (ok, err) = combine(
        d.path(),
        &["--model", "model", "--inputs", "out/adapter", "--method", "ties", "--top-k", "3", "--format", "merged-safetensors", "--out", "refused"],
    );
    assert!(!ok && err.contains("--top-k"), "{err}");
}

/// Intruder mitigation against PEFT 0.21's `reduce_intruder_dimension` on the real SmolLM2
/// (`tests/fixtures/peft-reference/methods/intruders*`): the same dimensions are detected in
/// every module, and every module's new `B·A` is PEFT's within 1e-4. Runs when the GGUF is
/// present (`.ci/run` fetches it).
#[test]
fn intruder_mitigation_matches_peft() {
    let Some(gguf) = smollm2_gguf() else {
        common::skipped("intruder_mitigation_matches_peft", "SmolLM2 GGUF not found (set FERROTUNE_SMOLLM2_GGUF or run .ci/run / the quickstart to fetch it)");
        return;
    };
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft-reference/methods");
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures.join("intruders.json")).unwrap()).unwrap();
    let per_module = reference["results"]["per_module"].as_object().unwrap();
    let input = fixtures.join("intruders/input");
    let r = ferrotune::posthoc::reduce_intruders(&gguf, &input, &Default::default()).unwrap();
    assert_eq!(r.modules.len(), per_module.len());
    let (mut with, mut worst_cos) = (0, 0f64);
    for (site, _, m) in &r.modules {
        let want = &per_module[site.as_str()];
        let idx: Vec<usize> = want["intruder_indices"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(m.intruders, idx, "{site}: intruders");
        with += !idx.is_empty() as usize;
        for (got, want) in m.max_abs_cos.iter().zip(want["top_k_max_abs_cos"].as_array().unwrap()) {
            // PEFT's SVDs are f32 and these are f64: close singular values make the vectors, and
            // so the cosines, move by ~1e-4 between the two.
            worst_cos = worst_cos.max((got - want.as_f64().unwrap()).abs());
        }
    }
    assert_eq!(
        with,
        reference["results"]["intruders_total"].as_u64().map(|_| reference["results"]["modules_with_intruders"].as_array().unwrap().len()).unwrap()
    );
    assert!(with > 0, "the reference adapter has intruders to find");
    assert!(worst_cos < 1e-3, "max |cos| differs from PEFT's by {worst_cos}");
    // The rewritten adapter, through the CLI, against PEFT's: products B·A (the factors are
    // defined up to the signs of singular vectors).
    let d = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(["combine", "--model"])
        .arg(&gguf)
        .arg("--inputs")
        .arg(&input)
        .args(["--method", "intruders", "--format", "peft", "--out"])
        .arg(d.path().join("mitigated"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let load = |dir: &Path| ferrotune::methods::lora::read_peft_tensors(dir).unwrap().0;
    let (got, want) = (load(&d.path().join("mitigated")), load(&fixtures.join("intruders/mitigated")));
    assert_eq!(got.len(), want.len());
    let mut worst = 0f32;
    for site in per_module.keys() {
        let product = |t: &std::collections::HashMap<String, candle_core::Tensor>| {
            let (a, b) = (&t[&ferrotune::methods::lora::peft_key(site, 'A')], &t[&ferrotune::methods::lora::peft_key(site, 'B')]);
            b.matmul(a).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let d = product(&got).iter().zip(product(&want)).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        worst = worst.max(d);
    }
    // `analyze intruders` measures the same: PEFT's intruder count of every module at ε = 0.5.
    let o = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(["analyze", "intruders", "--model"])
        .arg(&gguf)
        .arg("--adapter")
        .arg(&input)
        .arg("--out")
        .arg(d.path().join("analysis"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.path().join("analysis/intruders.json")).unwrap()).unwrap();
    assert_eq!(report["modules_changed"].as_u64(), Some(per_module.len() as u64));
    for (site, want) in per_module {
        assert_eq!(report["modules"][site]["intruders"]["0.5"].as_u64(), Some(want["intruder_indices"].as_array().unwrap().len() as u64), "{site}");
    }
    eprintln!("intruders: {with} modules; largest |max cos − PEFT's| = {worst_cos:.2e}, |B·A − PEFT's B·A| = {worst:.2e}");
    assert!(worst < 1e-4, "B·A differs from PEFT's by {worst}");
}

/// Grafting's score gradient (METHODS.md §6.2), `(1 − 2γ0) ⊙ (∇_θL ⊙ τ) ⊙ σ'(S − b)`, is the
/// derivative of the relaxed model's loss: a central difference along a random direction of
/// the scores agrees. The scores sit around b, where σ' is large, so every entry counts.
#[test]
fn graft_score_gradient_matches_finite_differences() {
    use ferrotune::posthoc::graft::{Graft, GraftSettings};
    let d = tempfile::tempdir().unwrap();
    write_tiny_hf(&d.path().join("base"), &TinySpec::default());
    write_fine_tune(&d.path().join("base"), &d.path().join("ft"), 3, 0.2);
    let mut base = ferrotune::models::load::load_model(&d.path().join("base")).unwrap();
    let ft = ferrotune::models::load::load_model(&d.path().join("ft")).unwrap();
    let settings = GraftSettings { sparsity: 0.05, ..Default::default() };
    let mut g = Graft::attach(&mut base, &ft, settings).unwrap();
    let mut rng = ferrotune::rng::SplitMix64::new(11);
    for s in &mut g.sites {
        s.scores.iter_mut().for_each(|x| *x = 10.0 + 4.0 * (rng.next_f32() - 0.5));
    }
    let dir: Vec<Vec<f32>> = g.sites.iter().map(|s| s.scores.iter().map(|_| if rng.next_u64() & 1 == 0 { 1.0 } else { -1.0 }).collect()).collect();
    let tok = ferrotune::models::load::load_tokenizer(&d.path().join("base")).unwrap();
    let ex = |text: &str| {
        let ids = tok.encode(text, true).unwrap();
        ferrotune::data::EncodedExample { labels: ids.iter().map(|&t| t as i32).collect(), input_ids: ids, ..Default::default() }
    };
    let examples = [ex("the cat sat on the mat"), ex("a graft of a few entries")];
    let refs: Vec<_> = examples.iter().collect();
    let (_, grads) = g.score_gradients(&base, &refs, tok.pad_id()).unwrap();
    let analytic: f64 = grads.iter().zip(&dir).flat_map(|(g, d)| g.iter().zip(d).map(|(a, b)| (*a * *b) as f64)).sum();
    let h = 0.05f32;
    let mut loss_at = |sign: f32| {
        for (s, d) in g.sites.iter_mut().zip(&dir) {
            s.scores.iter_mut().zip(d).for_each(|(x, d)| *x += sign * h * d);
        }
        let l = g.score_gradients(&base, &refs, tok.pad_id()).unwrap().0;
        for (s, d) in g.sites.iter_mut().zip(&dir) {
            s.scores.iter_mut().zip(d).for_each(|(x, d)| *x -= sign * h * d);
        }
        l
    };
    let numeric = (loss_at(1.0) - loss_at(-1.0)) / (2.0 * h as f64);
    assert!(analytic.abs() > 1e-3, "the directional derivative is too small to test: {analytic}");
    assert!((analytic - numeric).abs() < 0.02 * analytic.abs(), "∇S·d = {analytic}, finite difference {numeric}");
}

/// The base patch is the top s·N entries of |τ|; `combine --method graft` writes a sparse diff
/// that changes only the mask's entries, each to θ0 + τ; `eval` reads it as an adapter and
/// gives the merged output's loss; and on the fine-tune's own data the graft recovers part of
/// the fine-tune's gain.
#[test]
fn a_graft_moves_only_its_entries_and_recovers_part_of_the_gain() {
    use common::contract::{plan, Promise};
    use ferrotune::posthoc::graft::{Graft, GraftSettings};
    let d = tempfile::tempdir().unwrap();
    let cfg = plan(d.path(), &Promise { adapter: "lora", extra: "", mergeable: true, peft: true, gguf_lora: true, identity_at_init: true }, 8);
    ferrotune::train::train(&cfg, &Default::default()).unwrap();
    let dir = d.path();

    // The base patch, against a plain sort of |τ|.
    let mut base = ferrotune::models::load::load_model(&dir.join("model")).unwrap();
    let ft = ferrotune::posthoc::merged_adapter(&dir.join("model"), &dir.join("out/adapter")).unwrap();
    let g = Graft::attach(&mut base, &ft, GraftSettings { sparsity: 0.01, ..Default::default() }).unwrap();
    let mut all: Vec<f32> = g.sites.iter().flat_map(|s| s.tau.iter().map(|t| t.abs())).collect();
    all.sort_by(|a, b| b.total_cmp(a));
    let k = (0.01 * all.len() as f64).round() as usize;
    let chosen: Vec<f32> = g.sites.iter().flat_map(|s| s.tau.iter().zip(&s.gamma0).filter(|(_, &g)| g).map(|(t, _)| t.abs())).collect();
    assert_eq!(chosen.len(), k);
    assert!(chosen.iter().all(|&c| c >= all[k - 1]) && all[k] <= all[k - 1]);
    assert_eq!(g.masks().iter().map(Vec::len).sum::<usize>(), k, "the relaxed mask starts at the base patch");

    let (ok, err) = combine(dir, &["--model", "model", "--inputs", "out/adapter", "--method", "graft", "--data", "train.jsonl", "--sparsity", "0.01", "--graft-epochs", "3", "--graft-lr", "1e9", "--format", "sparse", "--out", "graft"]);
    assert!(ok, "{err}");
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("graft/adapter_config.json")).unwrap()).unwrap();
    let rec = &cfg["graft"];
    let (l0, lft, lg) = (rec["loss_base"].as_f64().unwrap(), rec["loss_finetuned"].as_f64().unwrap(), rec["loss_grafted"].as_f64().unwrap());
    assert!(lft < l0 && lg < l0, "base {l0}, fine-tuned {lft}, grafted {lg}: the graft recovers none of the gain");
    assert_eq!(rec["history"].as_array().unwrap().len(), 4, "epoch 0 (the base patch) and three epochs");

    // Entries outside the mask are θ0 bit for bit; inside, θ0 + τ.
    let (ok, err) = combine(dir, &["--model", "model", "--inputs", "out/adapter", "--method", "graft", "--data", "train.jsonl", "--sparsity", "0.01", "--graft-epochs", "3", "--graft-lr", "1e9", "--format", "merged-safetensors", "--out", "grafted"]);
    assert!(ok, "{err}");
    let (w0, wg, wft) = (weights_of(&dir.join("model")), weights_of(&dir.join("grafted")), {
        let m = ft;
        m.named_weights().unwrap().into_iter().map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect::<Weights>()
    });
    let diff = ferrotune::formats::sparse_diff::SparseDiff::load(&dir.join("graft/adapter_model.safetensors")).unwrap();
    let mut moved = 0;
    for (name, base_v) in &w0 {
        let mask: std::collections::HashSet<u64> = diff.tensors.get(name).map(|t| t.indices.iter().copied().collect()).unwrap_or_default();
        for (i, (&b, &g)) in base_v.iter().zip(&wg[name]).enumerate() {
            if mask.contains(&(i as u64)) {
                assert!((g - wft[name][i]).abs() <= 1e-6 * wft[name][i].abs().max(1.0), "{name}[{i}]: grafted {g}, fine-tuned {}", wft[name][i]);
                moved += 1;
            } else {
                assert_eq!(g.to_bits(), b.to_bits(), "{name}[{i}] is outside the mask but moved");
            }
        }
    }
    assert_eq!(moved, rec["entries"].as_u64().unwrap() as usize);
    // The sparse adapter and the merged model score the same.
    let eval = |args: &[&str]| -> f64 {
        let o = Command::new(env!("CARGO_BIN_EXE_ferrotune")).arg("eval").args(args).current_dir(dir).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let j: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
        j["loss"].as_f64().unwrap()
    };
    let (a, m) = (eval(&["--model", "model", "--adapter", "graft", "--data", "val.jsonl"]), eval(&["--model", "grafted", "--data", "val.jsonl"]));
    assert!((a - m).abs() < 1e-5, "sparse graft {a} vs merged {m}");
    // A graft is found, not trained; its flags belong to it.
    let (ok, err) = combine(dir, &["--model", "model", "--inputs", "out/adapter", "--method", "ties", "--sparsity", "0.1", "--format", "merged-safetensors", "--out", "x"]);
    assert!(!ok && err.contains("--sparsity is a setting of --method graft"), "{err}");
}
