//! The machinery of sparse fine-tuning: masked AdamW against dense AdamW restricted to the
//! mask (also across a mask change), and the sparse diff artefact (round trip, application,
//! composition by addition), the masked sparse product, and the sparse methods: each keeps the
//! method contract, and after training the merged weights differ from the base in exactly the
//! entries the method changed, every other entry bit-identical.

mod common;

use candle_core::{Device, Tensor, Var};
use ferrotune::formats::sparse_diff::{SparseDiff, SparseTensor};
use ferrotune::optim::{AdamW, AdamWConfig, MaskedAdamW};
use ferrotune::rng::SplitMix64;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut r = SplitMix64::new(seed);
    (0..n).map(|_| 2.0 * r.next_f32() - 1.0).collect()
}

/// Dense AdamW (the PEFT-checked implementation) run on the whole matrix, restricted to the
/// mask by hand: gradient and moments zero outside it and the entries outside it put back after
/// every step. Masked AdamW must give the same weights bit for bit, and never touch the rest.
#[test]
fn masked_adamw_is_dense_adamw_restricted_to_the_mask() {
    let n = 200;
    let config = AdamWConfig { weight_decay: 0.1, ..Default::default() };
    let w0 = random(n, 1);
    let mask_a: Vec<u32> = (0..n as u32).filter(|i| i % 3 == 0).collect();
    let mask_b: Vec<u32> = (0..n as u32).filter(|i| i % 2 == 0).collect(); // shares i % 6 == 0 with A
    let mut masked_w = w0.clone();
    let mut masked = MaskedAdamW::new(config, vec![mask_a.clone()]).unwrap();
    let var = Var::from_tensor(&Tensor::from_vec(w0.clone(), n, &Device::Cpu).unwrap()).unwrap();
    let mut dense = AdamW::new(config, std::slice::from_ref(&var));
    let mut mask = mask_a.clone();
    for step in 0..6 {
        if step == 3 {
            masked.set_mask(0, mask_b.clone()).unwrap();
            // Joining entries start from zero moments; leaving ones forget theirs.
            for i in 0..n {
                if !mask_b.contains(&(i as u32)) || !mask.contains(&(i as u32)) {
                    dense.exp_avg[0][i] = 0.0;
                    dense.exp_avg_sq[0][i] = 0.0;
                }
            }
            mask = mask_b.clone();
        }
        let full_grad = random(n, 10 + step);
        let lr = 1e-2 * (1.0 + step as f64);
        let masked_grad: Vec<f32> = mask.iter().map(|&i| full_grad[i as usize]).collect();
        masked.step(&mut [masked_w.as_mut_slice()], &[masked_grad], lr).unwrap();
        let before: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        let dense_grad: Vec<f32> = (0..n).map(|i| if mask.contains(&(i as u32)) { full_grad[i] } else { 0.0 }).collect();
        dense.step(std::slice::from_ref(&var), &[dense_grad], lr).unwrap();
        let mut after: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        for i in 0..n {
            if !mask.contains(&(i as u32)) {
                after[i] = before[i];
                dense.exp_avg[0][i] = 0.0;
                dense.exp_avg_sq[0][i] = 0.0;
            }
        }
        var.set(&Tensor::from_vec(after.clone(), n, &Device::Cpu).unwrap()).unwrap();
        assert_eq!(masked_w, after, "step {step}: masked AdamW left dense AdamW restricted to the mask");
    }
    let touched: Vec<usize> = (0..n).filter(|&i| masked_w[i].to_bits() != w0[i].to_bits()).collect();
    assert!(touched.iter().all(|&i| mask_a.contains(&(i as u32)) || mask_b.contains(&(i as u32))), "an entry outside every mask changed");
    assert!(touched.len() > mask_a.len(), "the second mask trained too");
    assert_eq!(masked.state_bytes(), mask_b.len() * 12, "moments and indices for the masked entries only");
    // Bad input is refused before anything is written.
    assert!(masked.step(&mut [masked_w.as_mut_slice()], &[vec![0.0; 3]], 0.1).is_err());
    assert!(masked.set_mask(0, vec![4, 2]).is_err());
}

#[test]
fn sparse_diffs_round_trip_apply_and_compose_by_addition() {
    let shape = [4, 5];
    let base = random(20, 3);
    let mut tuned_a = base.clone();
    let mut tuned_b = base.clone();
    for i in [1, 7, 8, 19] {
        tuned_a[i] += 0.25 * i as f32;
    }
    for i in [0, 7, 12] {
        tuned_b[i] -= 0.5;
    }
    let a = SparseDiff { tensors: [("w".to_string(), SparseTensor::between(&shape, &base, &tuned_a))].into() };
    let b = SparseDiff { tensors: [("w".to_string(), SparseTensor::between(&shape, &base, &tuned_b)), ("v".to_string(), SparseTensor { shape: vec![2], indices: vec![1], values: vec![3.0] })].into() };
    assert_eq!(a.entries(), 4);
    assert_eq!(a.tensors["w"].indices, vec![1, 7, 8, 19]);
    // Applying a diff gives back the tuned weights (up to the rounding of θ − θ0 + θ0).
    let mut applied = base.clone();
    a.tensors["w"].apply(&mut applied).unwrap();
    assert!(applied.iter().zip(&tuned_a).all(|(x, y)| (x - y).abs() <= 1e-6 * y.abs().max(1.0)));
    assert!((0..20).filter(|i| ![1, 7, 8, 19].contains(i)).all(|i| applied[i].to_bits() == base[i].to_bits()), "entries outside the diff are untouched");
    // Round trip through the file.
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("diff.safetensors");
    b.save(&path).unwrap();
    assert_eq!(SparseDiff::load(&path).unwrap(), b);
    // Composition: the sum applies as both applied one after the other.
    let ab = a.add(&b).unwrap();
    assert_eq!(ab.tensors["w"].indices, vec![0, 1, 7, 8, 12, 19]);
    let (mut once, mut twice) = (base.clone(), base.clone());
    ab.tensors["w"].apply(&mut once).unwrap();
    a.tensors["w"].apply(&mut twice).unwrap();
    b.tensors["w"].apply(&mut twice).unwrap();
    assert!(once.iter().zip(&twice).all(|(x, y)| (x - y).abs() <= 1e-6));
    assert_eq!(ab.tensors["v"], b.tensors["v"]);
    // Damaged files are refused, naming the tensor.
    std::fs::write(&path, b"not safetensors").unwrap();
    assert!(SparseDiff::load(&path).is_err());
    let bad = SparseDiff { tensors: [("w".to_string(), SparseTensor { shape: vec![2], indices: vec![5], values: vec![1.0] })].into() };
    bad.save(&path).unwrap();
    let err = SparseDiff::load(&path).unwrap_err().to_string();
    assert!(err.contains("`w`") && err.contains("below 2"), "{err}");
    assert!(SparseTensor { shape: vec![3], ..Default::default() }.apply(&mut [0.0; 2]).is_err());
}

/// `x·(W0 + Δ)ᵀ` with the sparse op equals the dense product with `Δ` scattered into a full
/// matrix, and so do its gradients: the input's, and the trained entries' (the dense weight
/// gradient read at those entries). Frozen entries of `Δ` count in the product but get no
/// gradient; the base is both f32 and quantized, and both the GEMM and the few-rows path run.
#[test]
fn sparse_linear_matches_the_dense_product_and_its_gradients() {
    use ferrotune::kernels::{sparse_linear, FrozenWeight, SparseChange};
    use std::sync::Arc;
    let (out, inp) = (40, 64);
    let w0 = random(out * inp, 5);
    let flat: Vec<u32> = (0..(out * inp) as u32).filter(|i| i % 7 == 3 || i % 11 == 0).collect();
    let frozen_delta: Vec<f32> = random(flat.len(), 6).iter().map(|v| 0.1 * v).collect();
    let trained: Vec<u32> = (0..flat.len() as u32).filter(|p| p % 2 == 0).collect();
    let q8 = {
        let bytes = ferrotune::formats::gguf::quants::quantize(ferrotune::formats::gguf::GgmlType::Q8_0, &w0).unwrap();
        FrozenWeight::from_blocks(ferrotune::formats::gguf::GgmlType::Q8_0, bytes, out, inp).unwrap()
    };
    for base in [FrozenWeight::from_f32(w0.clone(), out, inp).unwrap(), q8] {
        let w0f = base.to_f32_vec();
        let theta0: Vec<f32> = trained.iter().map(|&p| w0f[flat[p as usize] as usize]).collect();
        let theta: Vec<f32> = theta0.iter().zip(random(trained.len(), 8)).map(|(t, r)| t + 0.2 * r).collect();
        let change = Arc::new(SparseChange::new(out, inp, &flat, frozen_delta.clone(), trained.clone(), theta0.clone()));
        // The dense weight W0 + Δ.
        let mut dense = w0f.clone();
        for (p, (&f, &d)) in flat.iter().zip(&frozen_delta).enumerate() {
            dense[f as usize] += match trained.binary_search(&(p as u32)) {
                Ok(j) => theta[j] - theta0[j],
                Err(_) => d,
            };
        }
        for rows in [5, 70] {
            let x = Var::from_tensor(&Tensor::from_vec(random(rows * inp, 9), (rows, inp), &Device::Cpu).unwrap()).unwrap();
            let th = Var::from_tensor(&Tensor::from_vec(theta.clone(), theta.len(), &Device::Cpu).unwrap()).unwrap();
            let wd = Var::from_tensor(&Tensor::from_vec(dense.clone(), (out, inp), &Device::Cpu).unwrap()).unwrap();
            let probe = Tensor::from_vec(random(rows * out, 10), (rows, out), &Device::Cpu).unwrap();
            let y = sparse_linear(x.as_tensor(), &base, &change, th.as_tensor()).unwrap();
            let y_ref = x.as_tensor().matmul(&wd.as_tensor().t().unwrap()).unwrap();
            let close = |a: &Tensor, b: &Tensor, what: &str| {
                let (a, b): (Vec<f32>, Vec<f32>) = (a.flatten_all().unwrap().to_vec1().unwrap(), b.flatten_all().unwrap().to_vec1().unwrap());
                let err = a.iter().zip(&b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
                assert!(err < 1e-4, "{what} ({} base, {rows} rows): off by {err}", base.dtype_name());
            };
            close(&y, &y_ref, "output");
            let g = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g_ref = (y_ref * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            close(g.get(x.as_tensor()).unwrap(), g_ref.get(x.as_tensor()).unwrap(), "input gradient");
            let dense_grad: Vec<f32> = g_ref.get(wd.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let want: Vec<f32> = trained.iter().map(|&p| dense_grad[flat[p as usize] as usize]).collect();
            close(g.get(th.as_tensor()).unwrap(), &Tensor::new(want, &Device::Cpu).unwrap(), "trained entries' gradient");
        }
    }
}

#[test]
fn lift_keeps_the_contract_across_a_mask_refresh() {
    use common::contract::{check_method, Promise};
    // A refresh at step 2 of 4: the resumed half starts from the checkpoint written right after
    // it, so resume is checked across a mask change (moments re-mapped, masks restored).
    let d = tempfile::tempdir().unwrap();
    check_method(d.path(), &Promise { adapter: "lift", extra: "lift_mask_interval = 2", mergeable: true, peft: false, gguf_lora: false, identity_at_init: true });
}

/// Trains `adapter` on a tiny GGUF model (Q8_0 projections) and returns the base's and the
/// merged model's weights, and `run.json`.
fn train_and_merge(dir: &std::path::Path, adapter: &str, extra: &[&str]) -> (Vec<(String, Vec<f32>)>, Vec<(String, Vec<f32>)>, serde_json::Value) {
    use common::contract::{plan, Promise};
    let p = Promise { adapter: "lora", extra: "", mergeable: true, peft: false, gguf_lora: false, identity_at_init: true };
    plan(dir, &p, 3);
    common::write_tiny_gguf(&dir.join("model.gguf"), &common::TinySpec::default(), ferrotune::formats::gguf::GgmlType::Q8_0);
    let mut overrides: Vec<String> = vec![format!("adapter=\"{adapter}\""), "base_model=\"model.gguf\"".into()];
    overrides.extend(extra.iter().map(|s| s.to_string()));
    let cfg = ferrotune::config::TrainConfig::load(&dir.join("run.toml"), &overrides).unwrap();
    ferrotune::train::train(&cfg, &Default::default()).unwrap();
    let flat = |m: &ferrotune::models::Llama| -> Vec<(String, Vec<f32>)> {
        m.named_weights().unwrap().into_iter().map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1().unwrap())).collect()
    };
    let base = flat(&ferrotune::models::load::load_model(&dir.join("model.gguf")).unwrap());
    let mut session = ferrotune::session::Session::load(&dir.join("model.gguf"), Some(&dir.join("out/adapter"))).unwrap();
    session.merge_adapter().unwrap();
    let run = serde_json::from_str(&std::fs::read_to_string(dir.join("out/run.json")).unwrap()).unwrap();
    (base, flat(&session.model), run)
}

/// The defining property of a sparse method: the merged weights differ from the base in
/// exactly the entries its diff holds (the entries it trained, counted), every other entry of
/// every tensor bit-identical; and each trained matrix's count is what the method promised.
fn check_exact_entries(adapter: &str, extra: &[&str], per_matrix: impl Fn(&[usize], &[f32]) -> Option<usize>) -> usize {
    let d = tempfile::tempdir().unwrap();
    let (base, merged, run) = train_and_merge(d.path(), adapter, extra);
    let diff = SparseDiff::load(&d.path().join("out/adapter/adapter_model.safetensors")).unwrap();
    let (mut changed_total, mut promised) = (0, Some(0));
    for ((name, b), (name2, m)) in base.iter().zip(&merged) {
        assert_eq!(name, name2);
        let changed: Vec<u64> = (0..b.len() as u64).filter(|&i| b[i as usize].to_bits() != m[i as usize].to_bits()).collect();
        match diff.tensors.get(name) {
            Some(t) => {
                assert_eq!(changed, t.indices, "{adapter}: {name}: the entries that changed are not the diff's entries");
                let k = per_matrix(&t.shape, b);
                if let Some(k) = k {
                    assert_eq!(changed.len(), k, "{adapter}: {name}: {} entries changed, the method trains {k}", changed.len());
                }
                promised = promised.zip(k).map(|(a, b)| a + b);
                changed_total += changed.len();
            }
            None => assert!(changed.is_empty(), "{adapter}: {name} is not trained, and {} of its entries changed", changed.len()),
        }
    }
    assert!(changed_total > 0);
    if let Some(promised) = promised {
        // (Where masks change, run.json, written at the start, cannot know the union.)
        assert_eq!(run["resolved"]["method"]["details"]["trained_entries"].as_u64().unwrap() as usize, promised, "run.json counts the trained entries");
        assert_eq!(promised, changed_total);
    }
    changed_total
}

#[test]
fn lift_changes_exactly_its_principal_entries_on_a_quantized_base() {
    // No refresh: each matrix changes in exactly its budget of (m + n)·r_L entries.
    check_exact_entries("lift", &["lift_mask_interval=0"], |shape, _| Some(ferrotune::methods::lift::budget(shape[0], shape[1], 4)));
    // With refreshes the changed entries are the union of the masks.
    check_exact_entries("lift", &["lift_mask_interval=1", "lift_rank=2"], |_, _| None);
}

#[test]
fn lt_sft_keeps_the_contract_across_its_phase_switch() {
    use common::contract::{check_method, Promise};
    // Phase 2 starts after step 2, so the resumed half starts from the first sparse checkpoint.
    let d = tempfile::tempdir().unwrap();
    check_method(d.path(), &Promise { adapter: "lt_sft", extra: "lt_sft_phase1_steps = 2", mergeable: true, peft: false, gguf_lora: false, identity_at_init: true });
}

/// LT-SFT's result: after phase 1 moved every entry, the weights went back to θ0 and only the
/// K chosen entries trained on, so the merged model differs from the base in exactly K
/// entries over all matrices (K = a rank-4 LoRA's count here).
#[test]
fn lt_sft_changes_exactly_k_entries_after_the_reset() {
    let shapes = [(32, 32), (16, 32), (16, 32), (32, 32), (64, 32), (64, 32), (32, 64)];
    let k: usize = 2 * shapes.iter().map(|&(m, n)| ferrotune::methods::lift::budget(m, n, 4)).sum::<usize>();
    let changed = check_exact_entries("lt_sft", &["lt_sft_phase1_steps=1"], |_, _| None);
    assert_eq!(changed, k, "entries changed after phase 2");
    let changed = check_exact_entries("lt_sft", &["lt_sft_phase1_steps=1", "lt_sft_entries=100", "lt_sft_l1=0"], |_, _| None);
    assert_eq!(changed, 100);
}

#[test]
fn sara_keeps_the_contract_across_its_progressive_step() {
    use common::contract::{check_method, Promise};
    // The tiny model's weights are larger than real ones: τ = 0.05 selects about a tenth.
    let d = tempfile::tempdir().unwrap();
    check_method(d.path(), &Promise { adapter: "sara", extra: "sara_threshold = 0.05\nsara_progressive_step = 2", mergeable: true, peft: false, gguf_lora: false, identity_at_init: true });
}

#[test]
fn sara_changes_exactly_its_small_entries_on_a_quantized_base() {
    // The entries below τ in the (dequantized) base, in every trained matrix; the progressive
    // step freezes some of them, but all trained before it.
    check_exact_entries("sara", &["sara_threshold=0.05", "sara_progressive_step=2"], |_, w0| Some(w0.iter().filter(|v| v.abs() < 0.05).count()));
}

/// SaRA's rank penalty: its subgradient at the trained entries is the derivative of the
/// nuclear norm of the matrix holding them (central differences on a full-rank matrix).
#[test]
fn sara_rank_penalty_is_the_nuclear_norm_gradient() {
    let (rows, cols) = (7, 10);
    let mask: Vec<u32> = (0..(rows * cols) as u32).filter(|i| i % 3 != 1).collect();
    let theta = random(mask.len(), 21);
    let lambda = 0.5;
    let sub = ferrotune::methods::sara::nuclear_subgradient(rows, cols, &mask, &theta, lambda).unwrap();
    let nuclear = |t: &[f32]| -> f64 {
        let mut p = vec![0f32; rows * cols];
        mask.iter().zip(t).for_each(|(&i, &v)| p[i as usize] = v);
        ferrotune::linalg::svd(&ferrotune::linalg::from_rows(rows, cols, &p)).unwrap().s.iter().sum()
    };
    for j in [0, 5, 17, mask.len() - 1] {
        let h = 1e-3f32;
        let (mut up, mut down) = (theta.clone(), theta.clone());
        up[j] += h;
        down[j] -= h;
        let fd = lambda * (nuclear(&up) - nuclear(&down)) / (2.0 * h as f64);
        assert!((fd - sub[j] as f64).abs() < 2e-3, "entry {j}: subgradient {} vs finite difference {fd}", sub[j]);
    }
}

/// SPT's allocation on a hand-made sensitivity map: the τ most sensitive entries over all
/// matrices; a matrix holding at least r(m + n)/α of them gets a LoRA, one holding fewer trains
/// just those, one holding none stays frozen.
#[test]
fn spt_allocation_follows_its_rule() {
    use ferrotune::methods::spt::{allocate, Allocation};
    let shapes = [(4, 6), (4, 6), (2, 3)];
    // Matrix 0: six entries of 9.0; matrix 1: three of 5.0; matrix 2: small everywhere.
    let mut s: Vec<Vec<f32>> = shapes.iter().map(|&(m, n)| vec![0.1; m * n]).collect();
    for i in [0, 3, 7, 8, 20, 23] {
        s[0][i] = 9.0;
    }
    for i in [2, 11, 17] {
        s[1][i] = 5.0;
    }
    // r = 1, α = 2: N_struct/α = 5 for the 4×6 matrices.
    let a = allocate(&s, &shapes, 9, 1, 2.0);
    assert_eq!(a, vec![Allocation::Structured, Allocation::Unstructured(vec![2, 11, 17]), Allocation::Frozen]);
    // A larger α lowers the bar: matrix 1's three entries now buy it a LoRA (3 ≥ 10/4).
    assert_eq!(allocate(&s, &shapes, 9, 1, 4.0)[1], Allocation::Structured);
    // A smaller budget reaches only matrix 0, which then holds too few for a LoRA.
    assert_eq!(allocate(&s, &shapes, 4, 1, 2.0), vec![Allocation::Unstructured(vec![0, 3, 7, 8]), Allocation::Frozen, Allocation::Frozen]);
}

#[test]
fn spt_keeps_the_contract_with_both_kinds_of_tuning() {
    use common::contract::{check_method, Promise};
    let d = tempfile::tempdir().unwrap();
    // α = 1.5 puts the LoRA bar at r(m + n)/1.5: the most sensitive matrices reach it.
    let out = check_method(d.path(), &Promise { adapter: "spt", extra: "spt_batches = 2\nspt_alpha = 1.5", mergeable: true, peft: false, gguf_lora: false, identity_at_init: false });
    let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    let details = &run["resolved"]["method"]["details"];
    assert!(!details["structured"].as_array().unwrap().is_empty() && details["sites"].as_u64().unwrap() > 0, "both kinds were allocated: {details}");
}

/// The defining property on the real model (SmolLM2-135M, Q4_1 blocks): after LIFT and SaRA
/// train, the merged weights differ from the base in exactly the entries of their diffs (LIFT:
/// exactly (m+n)·r_L per matrix), every other entry of all 272 tensors bit-identical.
#[test]
fn sparse_methods_change_exactly_their_entries_of_the_real_model() {
    let Some(gguf) = common::smollm2_gguf() else {
        common::skipped("sparse_methods_change_exactly_their_entries_of_the_real_model", "SmolLM2 GGUF not found (set FERROTUNE_SMOLLM2_GGUF or run .ci/run / the quickstart to fetch it)");
        return;
    };
    let flat = |m: &ferrotune::models::Llama| -> Vec<(String, Vec<f32>)> { m.named_weights().unwrap().into_iter().map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1().unwrap())).collect() };
    let model = ferrotune::models::load::load_model(&gguf).unwrap();
    // (The count PEFT and transformers report for SmolLM2-135M: the tied head counted once.)
    assert_eq!(model.parameter_count(), 134_515_008);
    let base = flat(&model);
    drop(model);
    for (adapter, extra) in [("lift", "lift_mask_interval = 0"), ("sara", "")] {
        let d = tempfile::tempdir().unwrap();
        let text = serde_json::json!({ "text": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. #### 72" }).to_string();
        std::fs::write(d.path().join("train.jsonl"), text + "\n").unwrap();
        let cfg = format!(
            "base_model = {gguf:?}\ndatasets = [{{ path = \"train.jsonl\", type = \"text\" }}]\nadapter = \"{adapter}\"\n{extra}\nlora_r = 4\nlora_target_modules = [\"q_proj\", \"down_proj\"]\nsequence_len = 64\nmicro_batch_size = 1\nmax_steps = 2\nlearning_rate = 1e-3\nsave_steps = 0\noutput_dir = {:?}\n",
            d.path().join("out")
        );
        std::fs::write(d.path().join("run.toml"), cfg).unwrap();
        let cfg = ferrotune::config::TrainConfig::load(&d.path().join("run.toml"), &[]).unwrap();
        ferrotune::train::train(&cfg, &Default::default()).unwrap();
        let adapter_dir = d.path().join("out/adapter");
        let diff = SparseDiff::load(&adapter_dir.join("adapter_model.safetensors")).unwrap();
        let mut session = ferrotune::session::Session::load(&gguf, Some(&adapter_dir)).unwrap();
        session.merge_adapter().unwrap();
        let merged = flat(&session.model);
        assert_eq!(base.len(), merged.len());
        let mut trained = 0;
        for ((name, b), (name2, m)) in base.iter().zip(&merged) {
            assert_eq!(name, name2);
            let changed: Vec<u64> = (0..b.len() as u64).filter(|&i| b[i as usize].to_bits() != m[i as usize].to_bits()).collect();
            match diff.tensors.get(name) {
                Some(t) => {
                    assert_eq!(changed, t.indices, "{adapter}: {name}: the changed entries are not the diff's");
                    if adapter == "lift" {
                        assert_eq!(changed.len(), ferrotune::methods::lift::budget(t.shape[0], t.shape[1], 4), "{adapter}: {name}");
                    }
                    trained += 1;
                }
                None => assert!(changed.is_empty(), "{adapter}: {name} is not trained, and {} of its entries changed", changed.len()),
            }
        }
        assert_eq!(trained, 60, "{adapter}: q_proj and down_proj of 30 layers");
    }
}
