//! Every method of the registry through the same contract checks (`common::contract`), plus
//! each method's defining property in its own test.

mod common;

use common::contract::{check_method, Promise};

#[test]
fn lora_keeps_the_contract() {
    let d = tempfile::tempdir().unwrap();
    check_method(d.path(), &Promise { adapter: "lora", extra: "", mergeable: true, peft: true, gguf_lora: true, identity_at_init: true });
}

#[test]
fn rslora_keeps_the_contract() {
    let d = tempfile::tempdir().unwrap();
    check_method(d.path(), &Promise { adapter: "lora", extra: "use_rslora = true", mergeable: true, peft: true, gguf_lora: true, identity_at_init: true });
}

#[test]
fn unknown_methods_and_foreign_keys_are_refused_by_name() {
    let d = tempfile::tempdir().unwrap();
    let p = Promise { adapter: "lora", extra: "", mergeable: true, peft: true, gguf_lora: true, identity_at_init: true };
    common::contract::plan(d.path(), &p, 1);
    let load = |set: &[&str]| {
        let set: Vec<String> = set.iter().map(|s| s.to_string()).collect();
        ferrotune::config::TrainConfig::load(&d.path().join("run.toml"), &set).err().map(|e| e.to_string()).unwrap_or_default()
    };
    let e = load(&["adapter=qlora9"]);
    assert!(e.contains("`qlora9` is not a method") && e.contains("lora"), "{e}");
    let e = load(&["lora_rank=4"]);
    assert!(e.contains("lora_rank") && e.contains("unknown field"), "{e}");
}

#[test]
fn ssf_keeps_the_contract() {
    let d = tempfile::tempdir().unwrap();
    check_method(d.path(), &Promise { adapter: "ssf", extra: "", mergeable: true, peft: false, gguf_lora: false, identity_at_init: true });
}

#[test]
fn adaptformer_keeps_the_contract() {
    let d = tempfile::tempdir().unwrap();
    check_method(
        d.path(),
        &Promise { adapter: "adaptformer", extra: "adapter_bottleneck = 8\nadapter_scale = 0.5", mergeable: false, peft: false, gguf_lora: false, identity_at_init: true },
    );
}

/// SSF's merge is exact: the merged site computes `γ ⊙ (W0·x + b) + β` with its own weight and
/// bias, on a Qwen2-style model whose q/k/v already have biases (folded: `γ ⊙ b + β`) and whose
/// other sites gain one.
#[test]
fn ssf_merges_into_weight_and_bias() {
    use common::*;
    use ferrotune::methods::{registry, TargetModules};
    let d = tempfile::tempdir().unwrap();
    write_tiny_hf(d.path(), &TinySpec { qkv_bias: true, ..Default::default() });
    let mut m = ferrotune::models::load::load_model(d.path()).unwrap();
    let spec = common::method_spec("ssf", 1, 1.0, TargetModules::Names(vec!["q_proj".into(), "v_proj".into(), "up_proj".into()]), 11, [("ssf_init".to_string(), toml::Value::String("normal".into()))].into_iter().collect());
    let mut ssf = registry::create(&spec).unwrap();
    ssf.attach(&mut m).unwrap();
    let probe = ids(64, 10, 5);
    let base = logits(&ferrotune::models::load::load_model(d.path()).unwrap(), &probe);
    let unmerged = logits(&m, &probe);
    assert!(max_abs_diff(&base, &unmerged) > 1e-4, "the official N(1, 0.02²) init changes the output");
    ssf.merge(&mut m).unwrap();
    assert!(m.linears().all(|l| l.hook.is_none()));
    let up = m.linears().find(|l| l.name.ends_with("0.mlp.up_proj")).unwrap();
    assert!(up.bias.is_some(), "up_proj gained a bias");
    assert!(max_abs_diff(&logits(&m, &probe), &unmerged) < 1e-4);
    // A Qwen2 MLP cannot hold a bias: the merged model is refused by name, not written wrong.
    let err = ferrotune::export::merged::bias_layout(&m).unwrap_err().to_string();
    assert!(err.contains("mlp.up_proj") && err.contains("qwen2"), "{err}");
}

/// AdaptFormer's branch gradient w.r.t. its down/up weights matches central finite differences.
#[test]
fn adaptformer_gradients_match_finite_differences() {
    use common::*;
    use ferrotune::methods::{registry, TargetModules};
    let d = tempfile::tempdir().unwrap();
    write_tiny_hf(d.path(), &TinySpec::default());
    let mut m = ferrotune::models::load::load_model(d.path()).unwrap();
    let spec = common::method_spec("adaptformer", 1, 1.0, TargetModules::AllLinear, 2, [("adapter_bottleneck".to_string(), toml::Value::Integer(4))].into_iter().collect());
    let mut af = registry::create(&spec).unwrap();
    af.attach(&mut m).unwrap();
    let params = af.params();
    // Move W_up off zero so that every parameter has a gradient.
    for (k, v) in &params {
        if k.ends_with("up.weight") {
            let n = v.elem_count();
            let vals: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.02).collect();
            v.set(&candle_core::Tensor::from_vec(vals, v.shape(), v.device()).unwrap()).unwrap();
        }
    }
    gradients_match_finite_differences(&m, &params, |k| k.contains("layers.1") && k.ends_with("weight"));
}

#[test]
fn lora_pro_keeps_the_contract() {
    let d = tempfile::tempdir().unwrap();
    check_method(d.path(), &Promise { adapter: "lora_pro", extra: "", mergeable: true, peft: true, gguf_lora: true, identity_at_init: true });
}

/// A seeded `rows × cols` matrix with entries in [-1, 1).
fn random_mat(rows: usize, cols: usize, seed: u64) -> ferrotune::linalg::Mat {
    let mut r = ferrotune::rng::SplitMix64::new(seed);
    ferrotune::linalg::Mat::from_fn(rows, cols, |_, _| 2.0 * r.next_f32() as f64 - 1.0)
}

/// LoRA-Pro's defining property: on a random site, the equivalent gradient of the adjusted
/// pair, `s·B·g̃_A + s·g̃_B·A`, is the Frobenius projection of the full gradient `G` onto
/// `{B·X + Y·A}` (found here by an explicit least-squares solve over all X, Y), whatever X;
/// and the Sylvester X satisfies its equation.
#[test]
fn lora_pro_equivalent_gradient_is_the_projection_of_the_full_gradient() {
    use ferrotune::linalg::{svd, Mat};
    use ferrotune::methods::lora_pro::{adjusted_grads, solve_sylvester};
    let (m, n, r, s) = (7, 6, 2, 2.0);
    let a = random_mat(r, n, 1);
    let b = random_mat(m, r, 2);
    let g = random_mat(m, n, 3);
    let (ga, gb) = ((b.transpose() * &g) * s, (&g * a.transpose()) * s);

    // Least squares over vec(X) (r·n values) and vec(Y) (m·r values): B·X + Y·A ≈ G.
    let unknowns = r * n + m * r;
    let mut design = Mat::zeros(m * n, unknowns);
    for i in 0..m {
        for j in 0..n {
            let row = i * n + j;
            for k in 0..r {
                design[(row, k * n + j)] += b[(i, k)]; // (B·X)_ij = Σ_k B_ik X_kj
                design[(row, r * n + i * r + k)] += a[(k, j)]; // (Y·A)_ij = Σ_k Y_ik A_kj
            }
        }
    }
    let target = Mat::from_fn(m * n, 1, |row, _| g[(row / n, row % n)]);
    let d = svd(&design).unwrap();
    let tol = d.s[0] * 1e-10;
    let sinv = Mat::from_fn(d.s.len(), d.s.len(), |i, j| if i == j && d.s[i] > tol { 1.0 / d.s[i] } else { 0.0 });
    let sol = d.vt.transpose() * sinv * d.u.transpose() * &target;
    let fitted = &design * sol;
    let projection = Mat::from_fn(m, n, |i, j| fitted[(i * n + j, 0)]);

    for sylvester in [false, true] {
        let (ta, tb) = adjusted_grads(&a, &b, &ga, &gb, s, sylvester).unwrap();
        let equivalent = (&b * &ta + &tb * &a) * s;
        let err = (&equivalent - &projection).abs().max();
        assert!(err < 1e-6, "sylvester={sylvester}: equivalent gradient off the projection by {err}");
    }
    // The raw LoRA pair's equivalent gradient is not the projection (the test can fail).
    let raw = (&b * &ga + &gb * &a) * s;
    assert!((&raw - &projection).abs().max() > 1e-2);

    // The Sylvester solution satisfies P·X + X·Q = C.
    let p = b.transpose() * &b;
    let q = &a * a.transpose();
    let c = random_mat(r, r, 4);
    let x = solve_sylvester(&p, &q, &c);
    assert!((&p * &x + &x * &q - &c).abs().max() < 1e-9);
}

#[test]
fn flora_keeps_the_contract() {
    let d = tempfile::tempdir().unwrap();
    check_method(d.path(), &Promise { adapter: "flora", extra: "", mergeable: true, peft: false, gguf_lora: true, identity_at_init: true });
}

/// The N-mode Tucker product against the explicit sum on a 3-mode example.
#[test]
fn flora_tucker_product_matches_the_explicit_sum() {
    use ferrotune::methods::flora::tucker_product;
    let (r, n) = ([2usize, 3, 2], [4usize, 2, 3]);
    let mut rng = ferrotune::rng::SplitMix64::new(8);
    let mut v = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.next_f32() - 0.5).collect() };
    let core = v(r.iter().product());
    let u: Vec<Vec<f32>> = (0..3).map(|i| v(n[i] * r[i])).collect();
    let got = tucker_product(&core, &r, &[(&u[0], n[0]), (&u[1], n[1]), (&u[2], n[2])]);
    for a in 0..n[0] {
        for b in 0..n[1] {
            for c in 0..n[2] {
                let mut want = 0f32;
                for i in 0..r[0] {
                    for j in 0..r[1] {
                        for k in 0..r[2] {
                            want += core[(i * r[1] + j) * r[2] + k] * u[0][a * r[0] + i] * u[1][b * r[1] + j] * u[2][c * r[2] + k];
                        }
                    }
                }
                let g = got[(a * n[1] + b) * n[2] + c];
                assert!((g - want).abs() < 1e-6, "[{a},{b},{c}]: {g} vs {want}");
            }
        }
    }
}

/// Backprop through a method's parameters (those `pick` selects) against central finite
/// differences of the loss, at three entries each.
fn gradients_match_finite_differences(m: &ferrotune::models::Llama, params: &[(String, candle_core::Var)], pick: impl Fn(&str) -> bool) {
    use ferrotune::models::ForwardCtx;
    let probe = common::ids(64, 6, 9);
    let targets: std::sync::Arc<Vec<i32>> = std::sync::Arc::new(probe[1..].iter().map(|&t| t as i32).chain([-100]).collect());
    let loss = |train: bool| m.nll(&probe, targets.clone(), 1, probe.len(), &ForwardCtx { train, ..ForwardCtx::eval() }).unwrap().sum_all().unwrap();
    let grads = loss(true).backward().unwrap();
    let mut checked = 0;
    for (k, v) in params.iter().filter(|(k, _)| pick(k)) {
        let g: Vec<f32> = grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let base: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for i in [0, base.len() / 2, base.len() - 1] {
            let at = |delta: f32| {
                let mut w = base.clone();
                w[i] += delta;
                v.set(&candle_core::Tensor::from_vec(w, v.shape(), v.device()).unwrap()).unwrap();
                loss(false).to_scalar::<f32>().unwrap() as f64
            };
            let h = 1e-2;
            let fd = (at(h) - at(-h)) / (2.0 * h as f64);
            v.set(&candle_core::Tensor::from_vec(base.clone(), v.shape(), v.device()).unwrap()).unwrap();
            assert!((fd - g[i] as f64).abs() < 2e-2 * (1.0 + fd.abs()), "{k}[{i}]: backprop {} vs finite difference {fd}", g[i]);
            checked += 1;
        }
    }
    assert!(checked > 0, "no parameter was checked");
}

/// FLoRA's factors and core get the gradients finite differences give.
#[test]
fn flora_gradients_match_finite_differences() {
    use common::*;
    use ferrotune::methods::{registry, TargetModules};
    let d = tempfile::tempdir().unwrap();
    write_tiny_hf(d.path(), &TinySpec::default());
    let mut m = ferrotune::models::load::load_model(d.path()).unwrap();
    let spec = common::method_spec("flora", 3, 6.0, TargetModules::Names(vec!["o_proj".into(), "up_proj".into()]), 4, Default::default());
    let mut f = registry::create(&spec).unwrap();
    f.attach(&mut m).unwrap();
    let params = f.params();
    // A non-zero core, so that the factors have gradients too.
    for (k, v) in params.iter().filter(|(k, _)| k.ends_with("core")) {
        let vals: Vec<f32> = (0..v.elem_count()).map(|i| ((i * 5 % 7) as f32 - 3.0) * 0.3).collect();
        v.set(&candle_core::Tensor::from_vec(vals, v.shape(), v.device()).unwrap()).unwrap();
        assert!(k.contains("flora_core"));
    }
    gradients_match_finite_differences(&m, &params, |k| k.contains("layers.1"));
}

#[test]
fn triadaptlora_keeps_the_contract() {
    let d = tempfile::tempdir().unwrap();
    // Growth at every step, so the resume check (from step 2 of 4) crosses growth events.
    check_method(
        d.path(),
        &Promise { adapter: "triadaptlora", extra: "tri_interval = 1\ntri_r_max = 4", mergeable: true, peft: true, gguf_lora: true, identity_at_init: true },
    );
}

/// Ranks grow as §2.5's schedule says: at step t, the k = ⌊(R_target − R_now)·t/T⌋ matrices
/// of highest importance (change of ‖C‖_F/#blocks) grow by one increment, within the budget.
#[test]
fn triadaptlora_ranks_grow_by_the_schedule() {
    use common::*;
    use ferrotune::methods::triadaptlora::TriAdaptLora;
    use ferrotune::methods::{registry, TargetModules};
    let d = tempfile::tempdir().unwrap();
    write_tiny_hf(d.path(), &TinySpec::default());
    let mut m = ferrotune::models::load::load_model(d.path()).unwrap();
    let opts = [("tri_interval", 1), ("tri_r_max", 8), ("tri_increment", 2), ("tri_orth_reg", 0)];
    let spec = common::method_spec("triadaptlora", 4, 8.0, TargetModules::AllLinear, 1, opts.iter().map(|(k, v)| (k.to_string(), toml::Value::Integer(*v))).collect());
    let mut tri = registry::create(&spec).unwrap();
    tri.attach(&mut m).unwrap();
    let total = 4;
    tri.set_total_steps(total);
    let n_sites = tri.sites().len();
    let budget = 4 * n_sites;
    let ranks = |tri: &dyn ferrotune::methods::Method| -> Vec<usize> {
        tri.describe()["ranks"].as_object().unwrap().values().map(|v| v.as_u64().unwrap() as usize).collect()
    };
    assert!(ranks(tri.as_ref()).iter().all(|&r| r == 1), "every matrix starts at tri_r_init = 1");
    for step in 1..=total {
        // Distinct importances: scale each site's L by a different factor.
        for (i, (k, v)) in tri.params().iter().enumerate().filter(|(_, (k, _))| k.ends_with("tri_L")) {
            let f = 1.0 + (i * 7 % 13) as f64 * 0.1 + step as f64;
            v.set(&(v.as_tensor() * f).unwrap()).unwrap();
            assert!(k.contains("tri_L"));
        }
        let before = ranks(tri.as_ref());
        let now: usize = before.iter().sum();
        tri.on_step(step, &mut m).unwrap();
        let after = ranks(tri.as_ref());
        let grown: Vec<usize> = (0..n_sites).filter(|&i| after[i] > before[i]).collect();
        let k = if now >= budget { 0 } else { TriAdaptLora::growth_count(budget - now, step, 0, total, false).min(n_sites) };
        assert_eq!(grown.len(), k, "step {step}: {k} matrices should grow, {} did", grown.len());
        assert!(grown.iter().all(|&i| after[i] == (before[i] + 2).min(8)), "step {step}: each grows by one increment");
        assert!(after.iter().sum::<usize>() <= budget);
    }
    assert_eq!(ranks(tri.as_ref()).iter().sum::<usize>(), budget, "the budget r_ref × matrices is reached");
    let c = TriAdaptLora::growth_count(10, 3, 1, 5, true);
    assert_eq!(c, (0.5f64 * 10f64.ln()).exp().floor() as usize, "non-linear mode");
}

#[test]
fn dora_keeps_the_contract() {
    let d = tempfile::tempdir().unwrap();
    check_method(d.path(), &Promise { adapter: "dora", extra: "lora_dropout = 0.1", mergeable: true, peft: true, gguf_lora: false, identity_at_init: true });
}

/// DoRA's magnitude gets the gradient finite differences give (the norm does not depend on it).
#[test]
fn dora_magnitude_gradient_matches_finite_differences() {
    use common::*;
    use ferrotune::methods::{registry, TargetModules};
    let d = tempfile::tempdir().unwrap();
    write_tiny_hf(d.path(), &TinySpec::default());
    let mut m = ferrotune::models::load::load_model(d.path()).unwrap();
    let spec = common::method_spec("dora", 2, 4.0, TargetModules::Names(vec!["v_proj".into(), "down_proj".into()]), 4, Default::default());
    let mut dora = registry::create(&spec).unwrap();
    dora.attach(&mut m).unwrap();
    let params = dora.params();
    gradients_match_finite_differences(&m, &params, |k| k.ends_with("lora_magnitude_vector"));
}

#[test]
fn pissa_keeps_the_contract() {
    let d = tempfile::tempdir().unwrap();
    check_method(d.path(), &Promise { adapter: "pissa", extra: "", mergeable: true, peft: true, gguf_lora: true, identity_at_init: true });
}

#[test]
fn olora_keeps_the_contract() {
    let d = tempfile::tempdir().unwrap();
    check_method(d.path(), &Promise { adapter: "olora", extra: "", mergeable: true, peft: true, gguf_lora: true, identity_at_init: true });
}

#[test]
fn corda_keeps_the_contract() {
    // Its init needs the prepare pass, which the contract's bare attach does not run; the
    // identity at step 0 is checked with real batches in `residual_inits_leave_the_model_unchanged`.
    for mode in ["ipm", "kpm"] {
        let d = tempfile::tempdir().unwrap();
        let extra: &'static str = if mode == "ipm" { "corda_method = \"ipm\"\ninit_batches = 3" } else { "corda_method = \"kpm\"\ninit_batches = 3" };
        check_method(d.path(), &Promise { adapter: "corda", extra, mergeable: true, peft: true, gguf_lora: true, identity_at_init: false });
    }
}

/// PiSSA, OLoRA and CorDA move part of each weight into the adapter: at step 0 the residual
/// base plus `s·B·A` is the original weight to f32 rounding, so the model's output is unchanged;
/// PiSSA's A rows are W's top right-singular directions.
#[test]
fn residual_inits_leave_the_model_unchanged() {
    use common::*;
    use ferrotune::linalg;
    use ferrotune::methods::{registry, TargetModules};
    let d = tempfile::tempdir().unwrap();
    write_tiny_hf(d.path(), &TinySpec::default());
    let original = ferrotune::models::load::load_model(d.path()).unwrap();
    let probe = ids(64, 12, 3);
    let base_logits = logits(&original, &probe);
    let batches: Vec<ferrotune::data::Batch> = (0..3)
        .map(|i| {
            let x = ids(64, 10, 20 + i);
            ferrotune::data::Batch { input_ids: x.clone(), targets: vec![-100; 10], batch_size: 1, seq_len: 10, n_targets: 0, lengths: vec![10], ..Default::default() }
        })
        .collect();
    for (adapter, opts) in [("pissa", vec![]), ("olora", vec![]), ("corda", vec![("corda_method", "ipm")]), ("corda", vec![("corda_method", "kpm")])] {
        let mut m = ferrotune::models::load::load_model(d.path()).unwrap();
        let options = opts.iter().map(|(k, v)| (k.to_string(), toml::Value::String(v.to_string()))).collect();
        let spec = common::method_spec(adapter, 3, 6.0, TargetModules::AllLinear, 0, options);
        let mut method = registry::create(&spec).unwrap();
        let n = method.init_batches().min(batches.len());
        method.prepare(&mut m, &batches[..n]).unwrap();
        method.attach(&mut m).unwrap();
        let pairs = method.params();
        for (lin, orig) in m.linears().zip(original.linears()) {
            let i = pairs.iter().position(|(k, _)| k.contains(&format!("{}.lora_A", lin.name))).unwrap();
            let (a, b) = (pairs[i].1.as_detached_tensor(), pairs[i + 1].1.as_detached_tensor());
            let rebuilt = (lin.weight.to_tensor().unwrap() + (b.matmul(&a).unwrap() * 2.0).unwrap()).unwrap();
            let w0 = orig.weight.to_tensor().unwrap();
            let diff = (&rebuilt - &w0).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-5, "{adapter} {}: residual + s·B·A is off the original weight by {diff}", lin.name);
            let moved = (&lin.weight.to_tensor().unwrap() - &w0).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(moved > 1e-3, "{adapter} {}: the base was not replaced by a residual", lin.name);
            if adapter == "pissa" {
                let svd = linalg::svd(&linalg::from_tensor(&w0).unwrap()).unwrap();
                let am = linalg::from_tensor(&a).unwrap();
                for k in 0..3 {
                    let row = am.row(k);
                    let cos = (row * svd.vt.row(k).transpose())[(0, 0)] / row.norm();
                    assert!((cos.abs() - 1.0).abs() < 1e-4, "pissa {}: A row {k} is not the {k}-th right-singular vector (|cos| {cos})", lin.name);
                }
            }
        }
        let diff = max_abs_diff(&logits(&m, &probe), &base_logits);
        assert!(diff < 1e-4, "{adapter}: the model's output moved by {diff} at step 0");
    }
}

#[test]
fn eva_keeps_the_contract() {
    // The identity at step 0 (B = 0) needs the prepare pass; see the test below.
    let d = tempfile::tempdir().unwrap();
    check_method(d.path(), &Promise { adapter: "eva", extra: "init_batches = 3", mergeable: true, peft: true, gguf_lora: true, identity_at_init: false });
}

/// EVA's initial A rows are the top right-singular vectors of the site's (centred) inputs:
/// checked against a direct SVD of the stacked inputs of layer 0's q_proj, padding left out;
/// B = 0, so the model is unchanged; the rank budget is kept; and the result is the same
/// bit for bit on one recording worker or three.
#[test]
fn eva_components_are_the_top_singular_vectors_of_the_inputs() {
    use common::*;
    use ferrotune::linalg::{self, Mat};
    use ferrotune::methods::{registry, TargetModules};
    let d = tempfile::tempdir().unwrap();
    write_tiny_hf(d.path(), &TinySpec::default());
    let mut m = ferrotune::models::load::load_model(d.path()).unwrap();
    let probe = ids(64, 12, 3);
    let base = logits(&m, &probe);
    let (t, rows) = (16, 2);
    let batches: Vec<ferrotune::data::Batch> = (0..3)
        .map(|i| ferrotune::data::Batch { input_ids: ids(64, rows * t, 40 + i), targets: vec![-100; rows * t], batch_size: rows, seq_len: t, n_targets: 0, lengths: vec![t, t - 5], ..Default::default() })
        .collect();
    // ρ = 1: every site keeps r = 2 components (the redistribution is tested below).
    let opts = [
        ("eva_use_label_mask", toml::Value::Boolean(false)),
        ("eva_max_passes", toml::Value::Integer(1)),
        ("init_batches", toml::Value::Integer(3)),
        ("eva_rho", toml::Value::Float(1.0)),
    ];
    let spec = common::method_spec("eva", 2, 4.0, TargetModules::Names(vec!["q_proj".into(), "o_proj".into()]), 0, opts.iter().map(|(k, v)| (k.to_string(), v.clone())).collect());
    let prepared_on = |threads: usize, m: &mut ferrotune::models::Llama| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let mut eva = registry::create(&spec).unwrap();
        pool.install(|| eva.prepare(m, &batches)).unwrap();
        eva.attach(m).unwrap();
        eva
    };
    let eva = prepared_on(3, &mut m);
    let mut m1 = ferrotune::models::load::load_model(d.path()).unwrap();
    let one_worker = prepared_on(1, &mut m1);
    for ((k, a3), (_, a1)) in eva.params().iter().zip(one_worker.params()) {
        let (a3, a1) = (a3.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(), a1.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert!(a3.iter().zip(&a1).all(|(x, y)| x.to_bits() == y.to_bits()), "{k} differs between one worker and three");
    }
    assert!(max_abs_diff(&logits(&m, &probe), &base) < 1e-5, "B = 0: the model is unchanged");
    let params = eva.params();
    let total_rank: usize = params.iter().filter(|(k, _)| k.ends_with("lora_A.weight")).map(|(_, v)| v.dims()[0]).sum();
    assert_eq!(total_rank, 2 * 4, "budget r × sites");
    // Layer 0's q_proj sees the normed embeddings.
    let mut stacked = Vec::new();
    for b in &batches {
        let x = m.embed_ids(&b.input_ids, b.batch_size, b.seq_len).unwrap();
        let h = ferrotune::kernels::rms_norm(&x, &m.layers[0].input_layernorm, m.config.rms_norm_eps).unwrap();
        let h = h.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let n = m.config.hidden_size;
        for (i, &len) in b.lengths.iter().enumerate() {
            stacked.extend_from_slice(&h[i * b.seq_len * n..(i * b.seq_len + len) * n]);
        }
    }
    let n = m.config.hidden_size;
    let x = linalg::from_rows(stacked.len() / n, n, &stacked);
    let mean = x.row_mean();
    let centred = Mat::from_fn(x.nrows(), n, |i, j| x[(i, j)] - mean[j]);
    let svd = linalg::svd(&centred).unwrap();
    let a = &params.iter().find(|(k, _)| k.contains("layers.0.self_attn.q_proj.lora_A")).unwrap().1;
    let a = linalg::from_tensor(&a.as_detached_tensor()).unwrap();
    for k in 0..a.nrows() {
        let cos = (a.row(k) * svd.vt.row(k).transpose())[(0, 0)] / a.row(k).norm();
        assert!((cos.abs() - 1.0).abs() < 1e-4, "A row {k} vs the {k}-th right-singular vector: |cos| = {}", cos.abs());
    }
}

#[test]
fn eva_rank_redistribution_follows_the_budget_rule() {
    use ferrotune::methods::eva::distribute_ranks;
    // Site 0 explains most, site 2 least; r = 2, ρ = 2: four ratios each, budget 6.
    let ratios = vec![vec![0.5, 0.3, 0.1, 0.05], vec![0.4, 0.2, 0.02, 0.01], vec![0.15, 0.03, 0.02, 0.01]];
    let ranks = distribute_ranks(&ratios, 6);
    assert_eq!(ranks.iter().sum::<usize>(), 6);
    // Pooled and sorted: 0.5 (0), 0.4 (1), 0.3 (0), 0.2 (1), 0.15 (2), 0.1 (0) make the cut.
    assert_eq!(ranks, vec![3, 2, 1]);
    assert!(ranks.iter().all(|&r| r <= 4), "at most r·ρ");
    let uniform = distribute_ranks(&[vec![0.2, 0.1], vec![0.2, 0.1]], 2);
    assert_eq!(uniform, vec![1, 1]);
}

/// A forward that fails inside the recording pass (here: a token id outside the vocabulary in
/// one sequence of the batch) is reported as itself, and the other workers waiting for that
/// sequence's turn give up instead of hanging.
#[test]
fn a_failed_recording_forward_is_reported_not_hung() {
    use common::*;
    use ferrotune::methods::{registry, TargetModules};
    let d = tempfile::tempdir().unwrap();
    write_tiny_hf(d.path(), &TinySpec::default());
    let mut m = ferrotune::models::load::load_model(d.path()).unwrap();
    let t = 8;
    let mut input_ids = ids(64, 4 * t, 9);
    input_ids[t + 3] = 1_000_000;
    let batch = ferrotune::data::Batch { input_ids, targets: vec![-100; 4 * t], batch_size: 4, seq_len: t, n_targets: 0, lengths: vec![t; 4], ..Default::default() };
    for method in ["eva", "corda"] {
        let opts = [("init_batches", toml::Value::Integer(1)), ("eva_use_label_mask", toml::Value::Boolean(false))];
        let opts = if method == "eva" { &opts[..] } else { &opts[..1] };
        let spec = common::method_spec(method, 2, 4.0, TargetModules::Names(vec!["q_proj".into()]), 0, opts.iter().map(|(k, v)| (k.to_string(), v.clone())).collect());
        let mut meth = registry::create(&spec).unwrap();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let err = pool.install(|| meth.prepare(&mut m, std::slice::from_ref(&batch))).expect_err("the bad token must fail the pass").to_string();
        assert!(err.contains("outside the vocabulary"), "{method}: {err}");
        assert!(m.linears().all(|l| l.hook.is_none()), "{method}: the recording hooks come off");
    }
}

/// Full fine-tuning of chosen sites keeps the method contract, and changes exactly the chosen
/// matrices: after merging, every other base tensor is bit-identical to the base.
#[test]
fn full_fine_tuning_keeps_the_contract_and_touches_only_its_sites() {
    let d = tempfile::tempdir().unwrap();
    check_method(d.path(), &Promise { adapter: "full", extra: "", mergeable: true, peft: false, gguf_lora: false, identity_at_init: true });
    let d = tempfile::tempdir().unwrap();
    let p = Promise { adapter: "full", extra: "", mergeable: true, peft: false, gguf_lora: false, identity_at_init: true };
    common::contract::plan(d.path(), &p, 2);
    let cfg = ferrotune::config::TrainConfig::load(&d.path().join("run.toml"), &["lora_target_modules=[\"q_proj\", \"down_proj\"]".into()]).unwrap();
    ferrotune::train::train(&cfg, &Default::default()).unwrap();
    let base = ferrotune::models::load::load_model(&d.path().join("model")).unwrap().named_weights().unwrap();
    let mut session = ferrotune::session::Session::load(&d.path().join("model"), Some(&d.path().join("out/adapter"))).unwrap();
    assert_eq!(session.method.as_ref().unwrap().num_params(), 2 * (32 * 32 + 32 * 64), "q_proj and down_proj of both layers");
    session.merge_adapter().unwrap();
    let merged = session.model.named_weights().unwrap();
    for ((name, b), (name2, m)) in base.iter().zip(&merged) {
        assert_eq!(name, name2);
        let (b, m): (Vec<f32>, Vec<f32>) = (b.flatten_all().unwrap().to_vec1().unwrap(), m.flatten_all().unwrap().to_vec1().unwrap());
        let changed = b.iter().zip(&m).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
        if name.ends_with("q_proj.weight") || name.ends_with("down_proj.weight") {
            assert!(changed > b.len() / 2, "{name}: only {changed} of {} entries trained", b.len());
        } else {
            assert_eq!(changed, 0, "{name} is not a trained site, and {changed} of its entries changed");
        }
    }
}

#[test]
fn hft_keeps_the_contract() {
    let d = tempfile::tempdir().unwrap();
    check_method(d.path(), &Promise { adapter: "hft", extra: "", mergeable: true, peft: false, gguf_lora: false, identity_at_init: true });
}

/// HFT's rule: in every layer exactly 2 of the 4 attention projections, and 1 of the 3 MLP
/// projections in ⌊L/2⌋ layers, 2 in the others, so half of each pair of layers trains; other
/// stages draw other halves; the trainer trains exactly those matrices.
#[test]
fn hft_trains_exactly_half_of_the_block_projections() {
    use ferrotune::models::SiteInfo;
    let names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    for layers in [1usize, 2, 5, 30] {
        let mut sites: Vec<SiteInfo> = (0..layers)
            .flat_map(|i| names.iter().map(move |n| SiteInfo { name: format!("model.layers.{i}.{}.{n}", if n.ends_with("_proj") && ["gate_proj", "up_proj", "down_proj"].contains(n) { "mlp" } else { "self_attn" }), in_features: 8, out_features: 8 }))
            .collect();
        sites.push(SiteInfo { name: "lm_head".into(), in_features: 8, out_features: 8 });
        let mut draws = std::collections::BTreeSet::new();
        for stage in 0..4 {
            let chosen = ferrotune::methods::hft::select(&sites, 3, stage);
            assert!(!chosen.contains(&"lm_head".to_string()));
            let mut one_mlp = 0;
            for i in 0..layers {
                let count = |kind: &[&str]| chosen.iter().filter(|c| c.starts_with(&format!("model.layers.{i}.")) && kind.iter().any(|k| c.ends_with(k))).count();
                assert_eq!(count(&names[..4]), 2, "layer {i} of {layers}: attention projections trained");
                let mlp = count(&names[4..]);
                assert!(mlp == 1 || mlp == 2, "layer {i}: {mlp} MLP projections");
                one_mlp += (mlp == 1) as usize;
            }
            assert_eq!(one_mlp, layers / 2, "{layers} layers: layers training one MLP projection");
            assert_eq!(chosen.len(), 2 * layers + layers + (layers - layers / 2));
            draws.insert(chosen);
        }
        assert!(draws.len() > 1, "{layers} layers: every stage drew the same half");
    }
    // Through the trainer: the run trains exactly the drawn matrices, each whole.
    let d = tempfile::tempdir().unwrap();
    let p = Promise { adapter: "hft", extra: "", mergeable: true, peft: false, gguf_lora: false, identity_at_init: true };
    let cfg = common::contract::plan(d.path(), &p, 2);
    ferrotune::train::train(&cfg, &Default::default()).unwrap();
    let model = ferrotune::models::load::load_model(&d.path().join("model")).unwrap();
    let want = ferrotune::methods::hft::select(&model.sites(), cfg.seed, 0);
    let session = ferrotune::session::Session::load(&d.path().join("model"), Some(&d.path().join("out/adapter"))).unwrap();
    let mut got = session.method.as_ref().unwrap().sites();
    got.sort();
    let mut want_sorted = want.clone();
    want_sorted.sort();
    assert_eq!(got, want_sorted);
}

#[test]
fn greentrainer_keeps_the_contract() {
    // Its selection needs the importance probe on data, so it is not attached bare.
    let d = tempfile::tempdir().unwrap();
    check_method(d.path(), &Promise { adapter: "greentrainer", extra: "greentrainer_rho = 0.7", mergeable: true, peft: false, gguf_lora: false, identity_at_init: false });
}

/// GreenTrainer's DP finds the best selection: the same total importance as trying every
/// subset, on random small instances (negative importances, tight and loose budgets).
#[test]
fn greentrainer_selection_matches_brute_force() {
    use ferrotune::methods::greentrainer::select;
    let mut rng = ferrotune::rng::SplitMix64::new(17);
    for case in 0..300 {
        let n = 1 + (case % 10);
        let importance: Vec<f64> = (0..n).map(|_| rng.next_f32() as f64 * 2.0 - 0.4).collect();
        let dw: Vec<usize> = (0..n).map(|_| 1 + rng.below(40) as usize).collect();
        let dy: Vec<usize> = (0..n).map(|_| rng.below(30) as usize).collect();
        let budget = rng.below(200) as usize;
        let cost = |sel: &[bool]| -> usize {
            let deepest = sel.iter().rposition(|&s| s);
            sel.iter().zip(&dw).filter(|(s, _)| **s).map(|(_, w)| w).sum::<usize>() + deepest.map_or(0, |d| dy[..=d].iter().sum())
        };
        let value = |sel: &[bool]| -> f64 { sel.iter().zip(&importance).filter(|(s, _)| **s).map(|(_, i)| i).sum() };
        let mut best = 0f64;
        for mask in 0u32..(1 << n) {
            let sel: Vec<bool> = (0..n).map(|i| mask >> i & 1 == 1).collect();
            if cost(&sel) <= budget {
                best = best.max(value(&sel));
            }
        }
        let got = select(&importance, &dw, &dy, budget);
        assert!(cost(&got) <= budget, "case {case}: the DP's selection costs {} > {budget}", cost(&got));
        assert!((value(&got) - best).abs() < 1e-9, "case {case}: DP {} vs brute force {best}", value(&got));
    }
}

/// The cost model counts what the benchmark counts: its forward plus the full backward equal
/// `bench`'s FLOPs per token for full fine-tuning of the same projections; a selection's
/// backward shrinks with what it leaves out.
#[test]
fn greentrainer_cost_model_matches_the_benchmark_flops() {
    use ferrotune::methods::greentrainer::CostModel;
    let d = tempfile::tempdir().unwrap();
    common::write_tiny_hf(d.path(), &common::TinySpec::default());
    let model = ferrotune::models::load::load_model(d.path()).unwrap();
    let seq = 48;
    let m = CostModel::new(&model.config, &model.sites(), &ferrotune::methods::TargetModules::AllLinear, seq).unwrap();
    let weights: usize = model.sites().iter().filter(|s| s.name != "lm_head").map(|s| s.in_features * s.out_features).sum();
    let bench = ferrotune::bench::flops_per_token(&model.config, seq, weights, true) - 4.0 * weights as f64;
    assert!((m.forward + m.full_backward() - bench).abs() < 1e-6 * bench, "cost model {} vs bench {bench}", m.forward + m.full_backward());
    let all = vec![true; m.names.len()];
    assert!((m.backward(&all) - m.full_backward()).abs() < 1e-6);
    // Only the output-most site: its weight gradient and its own activation gradient.
    let mut first = vec![false; m.names.len()];
    first[0] = true;
    assert_eq!(m.backward(&first), m.fixed + m.dw[0] + m.dy[0]);
    assert!(m.names[0].ends_with("layers.1.mlp.down_proj"), "backward order starts at the output: {}", m.names[0]);
    // ρ = 1 is the whole backward; smaller ρ leaves less, floored at 5%.
    assert!((m.backward_ratio(1.0) - 1.0).abs() < 1e-12);
    assert!(m.backward_ratio(0.5) < 0.5 && m.backward_ratio(0.01) == 0.05);
}

#[test]
fn mosa_keeps_the_contract() {
    let d = tempfile::tempdir().unwrap();
    check_method(
        d.path(),
        &Promise { adapter: "mosa", extra: "adapter_bottleneck = 8\nadapter_scale = 0.5\nmosa_modules = 3", mergeable: false, peft: false, gguf_lora: false, identity_at_init: true },
    );
}

/// MoSA's defining property: the modules partition the adapter's entries; a training forward
/// sends gradient only to the entries of the modules drawn for it, and inference uses them all
/// (the dense adapter, their sum).
#[test]
fn mosa_trains_only_the_drawn_module_and_infers_with_all() {
    use common::*;
    use ferrotune::methods::adaptformer::Split;
    use ferrotune::methods::{registry, TargetModules};
    use ferrotune::models::ForwardCtx;
    let d = tempfile::tempdir().unwrap();
    write_tiny_hf(d.path(), &TinySpec::default());
    let mut m = ferrotune::models::load::load_model(d.path()).unwrap();
    let opts = [("adapter_bottleneck".to_string(), toml::Value::Integer(4)), ("mosa_modules".to_string(), toml::Value::Integer(4))];
    let spec = common::method_spec("mosa", 1, 1.0, TargetModules::AllLinear, 5, opts.into_iter().collect());
    let mut mosa = registry::create(&spec).unwrap();
    mosa.attach(&mut m).unwrap();
    let params = mosa.params();
    perturb(&params.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>(), 3);
    let split = Split { modules: 4, active: 1, seed: 5 };
    let probe = ids(64, 12, 1);
    let targets: Vec<i32> = probe[1..].iter().map(|&t| t as i32).chain([-100]).collect();
    for seed in [11u64, 12, 13] {
        let nll = m.nll(&probe, std::sync::Arc::new(targets.clone()), 1, probe.len(), &ForwardCtx::train(seed)).unwrap();
        let store = nll.sum_all().unwrap().backward().unwrap();
        for (site, layer) in [("model.layers.0.mlp", 0usize), ("model.layers.1.mlp", 1)] {
            let drawn = split.drawn(layer, seed);
            assert_eq!(drawn.len(), 1);
            for (which, w) in [(0u64, "down.weight"), (1, "up.weight")] {
                let (_, v) = params.iter().find(|(k, _)| k == &format!("{site}.adaptformer.{w}")).unwrap();
                let g: Vec<f32> = store.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let part = split.partition(layer, which, g.len());
                let live: Vec<u8> = g.iter().zip(&part).filter(|(g, _)| **g != 0.0).map(|(_, p)| *p).collect();
                assert!(!live.is_empty(), "{site} {w}: no gradient at all");
                assert!(live.iter().all(|p| *p == drawn[0]), "{site} {w}: gradient outside the drawn module {}", drawn[0]);
            }
        }
    }
    // Inference: the dense adapter. Zeroing one module's entries changes the output, so all count.
    let full = logits(&m, &probe);
    let (_, up) = params.iter().find(|(k, _)| k.ends_with("layers.1.mlp.adaptformer.up.weight")).unwrap();
    let part = split.partition(1, 1, up.elem_count());
    let vals: Vec<f32> = up.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    let without: Vec<f32> = vals.iter().zip(&part).map(|(v, p)| if *p == 2 { 0.0 } else { *v }).collect();
    up.set(&candle_core::Tensor::from_vec(without, up.shape(), up.device()).unwrap()).unwrap();
    assert!(max_abs_diff(&full, &logits(&m, &probe)) > 1e-5, "module 2 of layer 1 takes part in inference");
}

#[test]
fn locft_bf_keeps_the_contract_and_trains_its_one_module() {
    let d = tempfile::tempdir().unwrap();
    let out = check_method(d.path(), &Promise { adapter: "locft_bf", extra: "", mergeable: true, peft: false, gguf_lora: false, identity_at_init: true });
    let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    // Two layers: round(22/32 · 2) = 1.
    assert_eq!(run["resolved"]["method"]["details"]["trained_modules"], serde_json::json!(["model.layers.1.mlp.down_proj"]));
    assert_eq!(ferrotune::methods::locft::default_layer(32), 22);
    assert_eq!(ferrotune::methods::locft::default_layer(30), 21);
    // A location the model does not have is refused by key.
    let p = Promise { adapter: "locft_bf", extra: "locft_layer = 5", mergeable: true, peft: false, gguf_lora: false, identity_at_init: true };
    let d = tempfile::tempdir().unwrap();
    let cfg = common::contract::plan(d.path(), &p, 1);
    let err = ferrotune::train::train(&cfg, &Default::default()).unwrap_err().to_string();
    assert!(err.contains("locft_layer") && err.contains("2 layers"), "{err}");
}

#[test]
fn snella_keeps_the_contract() {
    // ΔW ≠ 0 at step 0 (the kernel of random tables), so no identity at init; an interval of 2
    // changes the sparsity at step 2, where the resumed half starts.
    let d = tempfile::tempdir().unwrap();
    check_method(
        d.path(),
        &Promise { adapter: "snella", extra: "snella_mask_interval = 2\nsnella_rho_target = 0.5", mergeable: true, peft: false, gguf_lora: false, identity_at_init: false },
    );
}

/// SNELLA's update: the kernel as its formula gives it entry by entry, zeroed at the matrix's
/// ρ-quantile of |K|, each survivor times |K|; and of higher rank than its tables' q (the point
/// of a distance kernel over a dot product).
#[test]
fn snella_update_is_the_sparsified_distance_kernel_and_is_high_rank() {
    use common::*;
    use ferrotune::methods::{registry, TargetModules};
    let d = tempfile::tempdir().unwrap();
    write_tiny_hf(d.path(), &TinySpec::default());
    let base = ferrotune::models::load::load_model(d.path()).unwrap();
    let mut m = ferrotune::models::load::load_model(d.path()).unwrap();
    let opts = [("snella_rho_init".to_string(), toml::Value::Float(0.25))];
    let q = 4;
    let spec = common::method_spec("snella", q, 1.0, TargetModules::Names(vec!["up_proj".into()]), 9, opts.into_iter().collect());
    let mut snella = registry::create(&spec).unwrap();
    snella.attach(&mut m).unwrap();
    let params = snella.params();
    let get = |k: &str| -> Vec<f32> { params.iter().find(|(n, _)| n == &format!("model.layers.0.mlp.up_proj.snella.{k}")).unwrap().1.as_tensor().flatten_all().unwrap().to_vec1().unwrap() };
    let (p, qt) = (get("P"), get("Q"));
    let (n, rows, heads, dh) = (32usize, 64usize, 2usize, q / 2);
    // K[i, o] by its formula (α = γ = 1, β = 0 at init).
    let mut k = vec![0f64; n * rows];
    for i in 0..n {
        for o in 0..rows {
            k[i * rows + o] = (0..heads)
                .map(|h| {
                    let c = if h == 0 { 0.1 } else { -0.1 };
                    let dist: f64 = (0..dh).map(|j| (p[(h * n + i) * dh + j] as f64 - qt[(h * rows + o) * dh + j] as f64).powi(2)).sum::<f64>().sqrt();
                    c * dist
                })
                .sum();
        }
        let row = &mut k[i * rows..(i + 1) * rows];
        let mx = row.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = row.iter().map(|v| (v - mx).exp()).sum();
        let soft: Vec<f64> = row.iter().map(|v| (v - mx).exp() / z).collect();
        row.iter_mut().zip(soft).for_each(|(v, s)| *v += s);
    }
    let mut mags: Vec<f64> = k.iter().map(|v| v.abs()).collect();
    mags.sort_by(f64::total_cmp);
    let threshold = mags[(k.len() as f64 * 0.25).ceil() as usize - 1];
    let want: Vec<f64> = k.iter().map(|v| if v.abs() > threshold { v * v.abs() } else { 0.0 }).collect();
    // The merged weight's change is ΔW = (that matrix)ᵀ.
    snella.merge(&mut m).unwrap();
    let w = |model: &ferrotune::models::Llama| model.linears().find(|l| l.name == "model.layers.0.mlp.up_proj").unwrap().weight.to_f32_vec();
    let (w0, w1) = (w(&base), w(&m));
    let mut zeros = 0;
    for o in 0..rows {
        for i in 0..n {
            let got = (w1[o * n + i] - w0[o * n + i]) as f64;
            let exp = want[i * rows + o];
            assert!((got - exp).abs() < 1e-6 + 1e-4 * exp.abs(), "ΔW[{o}, {i}] = {got}, the kernel gives {exp}");
            zeros += (exp == 0.0) as usize;
        }
    }
    assert_eq!(zeros, (n * rows) / 4, "ρ = 0.25 zeroes a quarter of the entries");
    // Rank well above q = 4.
    let delta: Vec<f32> = (0..rows * n).map(|j| w1[j] - w0[j]).collect();
    let s = ferrotune::linalg::svd(&ferrotune::linalg::from_rows(rows, n, &delta)).unwrap().s;
    let rank = s.iter().filter(|&&x| x > 1e-6 * s[0]).count();
    assert!(rank > 4 * q, "the kernel update has rank {rank}, hardly above q = {q}");
}

/// The bi-level competition's budget: cubic from V0 to V_T, and shared in proportion to the
/// scores with each matrix capped at its size, the remainder going to the others.
#[test]
fn snella_budget_schedule_and_allocation_follow_their_rules() {
    use ferrotune::methods::snella::{allocate, budget_at};
    assert_eq!(budget_at(0, 10, 0, 0, 100.0, 40.0), 100.0);
    assert_eq!(budget_at(10, 10, 0, 0, 100.0, 40.0), 40.0);
    assert!((budget_at(5, 10, 0, 0, 100.0, 40.0) - (40.0 + 60.0 * 0.125)).abs() < 1e-12);
    assert_eq!(budget_at(2, 10, 3, 2, 100.0, 40.0), 100.0, "warm-up keeps V0");
    assert_eq!(budget_at(9, 10, 3, 2, 100.0, 40.0), 40.0, "the final warm-up holds V_T");
    // Proportional when nothing is capped.
    let a = allocate(&[0.5, 0.25, 0.25], &[100, 100, 100], 80.0);
    assert!((a[0] - 40.0).abs() < 1e-9 && (a[1] - 20.0).abs() < 1e-9 && (a[2] - 20.0).abs() < 1e-9, "{a:?}");
    // Matrix 0 would get 120 of 10: capped, its excess shared by the others in proportion.
    let a = allocate(&[0.6, 0.3, 0.1], &[10, 1000, 1000], 200.0);
    assert!((a[0] - 10.0).abs() < 1e-9, "{a:?}");
    assert!((a[1] - 142.5).abs() < 1e-6 && (a[2] - 47.5).abs() < 1e-6, "{a:?}");
    assert!((a.iter().sum::<f64>() - 200.0).abs() < 1e-6);
    // More budget than room: everything full.
    assert_eq!(allocate(&[1.0, 0.0], &[5, 7], 100.0), vec![5.0, 7.0]);
}
