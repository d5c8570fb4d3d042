//! The zeroth-order estimator (MeZO-SGD, METHODS.md §4.1): its direction is regenerated
//! exactly from the seed, its two-point estimate is the finite-difference directional
//! derivative along that direction (and approaches backprop's), and the in-place perturbation
//! leaves every weight bit-identical.

mod common;

use candle_core::Var;
use ferrotune::models::ForwardCtx;
use ferrotune::optim::zo;
use std::sync::Arc;

fn values(params: &[Var]) -> Vec<Vec<f32>> {
    params.iter().map(|p| p.as_tensor().flatten_all().unwrap().to_vec1().unwrap()).collect()
}

#[test]
fn directions_are_standard_normal_and_regenerate_exactly() {
    let a = zo::direction(5, 0, 100_001);
    assert_eq!(a, zo::direction(5, 0, 100_001), "the same seed gives the same z");
    assert_ne!(a[..10], zo::direction(6, 0, 10)[..], "another seed, another z");
    assert_ne!(a[..10], zo::direction(5, 1, 10)[..], "another tensor, another z");
    assert_eq!(a[..10], zo::direction(5, 0, 10)[..], "a prefix does not depend on the length asked for");
    let n = a.len() as f64;
    let mean = a.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    assert!(mean.abs() < 0.01 && (var - 1.0).abs() < 0.02, "mean {mean}, variance {var}");
}

#[test]
fn the_estimate_is_the_directional_derivative_and_restores_every_weight() {
    let d = tempfile::tempdir().unwrap();
    let (model, params) = common::tiny_with_lora(d.path(), ferrotune::methods::TargetModules::AllLinear);
    common::perturb(&params, 4);
    let probe = common::ids(64, 12, 3);
    let targets: Arc<Vec<i32>> = Arc::new(probe[1..].iter().map(|&t| t as i32).chain([-100]).collect());
    let loss = |train: bool| -> candle_core::Tensor {
        model.nll(&probe, targets.clone(), 1, probe.len(), &ForwardCtx { train, ..ForwardCtx::eval() }).unwrap().sum_all().unwrap()
    };
    let eval = || -> ferrotune::Result<f64> { Ok(loss(false).to_scalar::<f32>().unwrap() as f64) };
    let before = values(&params);
    let (seed, eps) = (77u64, 1e-3);
    let est = zo::spsa(&params, seed, eps, eval).unwrap();
    assert_eq!(values(&params), before, "θ is bit-identical after the two perturbed passes");
    // The same two points built independently (copies, not in place), differenced in f64.
    let at = |sign: f32| -> f64 {
        for (i, p) in params.iter().enumerate() {
            let z = zo::direction(seed, i, before[i].len());
            let v: Vec<f32> = before[i].iter().zip(&z).map(|(w, z)| w + sign * eps as f32 * z).collect();
            p.set(&candle_core::Tensor::from_vec(v, p.shape(), p.device()).unwrap()).unwrap();
        }
        let l = eval().unwrap();
        for (p, b) in params.iter().zip(&before) {
            p.set(&candle_core::Tensor::from_vec(b.clone(), p.shape(), p.device()).unwrap()).unwrap();
        }
        l
    };
    let (plus, minus) = (at(1.0), at(-1.0));
    assert_eq!((est.loss_plus, est.loss_minus), (plus, minus));
    assert_eq!(est.projected_grad, (plus - minus) / (2.0 * eps));
    // … which estimates ∇L·z, the directional derivative backprop gives.
    let grads = loss(true).backward().unwrap();
    let exact: f64 = params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let g: Vec<f32> = grads.get(p.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            g.iter().zip(zo::direction(seed, i, g.len())).map(|(g, z)| (g * z) as f64).sum::<f64>()
        })
        .sum();
    assert!((est.projected_grad - exact).abs() < 2e-2 * exact.abs().max(1.0), "estimate {} vs ∇L·z {exact}", est.projected_grad);
    // A step at learning rate 0 changes nothing; at lr, exactly −lr·g·z.
    zo::update(&params, seed, est.projected_grad, 0.0, 0.1).unwrap();
    assert_eq!(values(&params), before);
    zo::update(&params, seed, est.projected_grad, 1e-2, 0.0).unwrap();
    let after = values(&params);
    let z0 = zo::direction(seed, 0, before[0].len());
    for j in [0, before[0].len() / 2] {
        assert_eq!(after[0][j], before[0][j] - (1e-2 * est.projected_grad) as f32 * z0[j]);
    }
    // A failed forward leaves θ as it was.
    common::perturb(&params, 5);
    let snapshot = values(&params);
    assert!(zo::spsa(&params, seed, eps, || Err(ferrotune::Error::Training("boom".into()))).is_err());
    assert_eq!(values(&params), snapshot);
}

/// `optimizer = "mezo"` through the trainer keeps the method contract (the adapter trains,
/// reloads, merges, exports, and a resumed run draws the same directions bit for bit), and
/// holds no optimizer moments.
#[test]
fn mezo_trains_a_lora_through_the_trainer_and_resumes_exactly() {
    use common::contract::{check_method, Promise};
    let d = tempfile::tempdir().unwrap();
    let out = check_method(d.path(), &Promise { adapter: "lora", extra: "optimizer = \"mezo\"\nzo_eps = 1e-3\nzo_n_spsa = 2", mergeable: true, peft: true, gguf_lora: true, identity_at_init: true });
    let ckpt = out.join("checkpoints/step-4/optimizer.safetensors");
    let opt = ferrotune::formats::safetensors::load_f32(&ckpt).unwrap();
    assert!(opt.is_empty(), "MeZO keeps no moments: {:?}", opt.keys().collect::<Vec<_>>());
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("zo_projected_grad"), "{metrics}");
    // Its settings belong to it alone.
    let p = Promise { adapter: "lora", extra: "zo_eps = 1e-3", mergeable: true, peft: true, gguf_lora: true, identity_at_init: true };
    let d = tempfile::tempdir().unwrap();
    common::contract::plan_text(d.path(), &p, 1);
    let err = ferrotune::config::TrainConfig::load(&d.path().join("run.toml"), &[]).unwrap_err().to_string();
    assert!(err.contains("zo_eps") && err.contains("mezo"), "{err}");
}

/// ZO2-style offloading (METHODS.md §4.2): full-weight MeZO whose matrices live in a file and
/// stream through memory a window of blocks at a time keeps the method contract as `full`
/// (trains, reloads, merges, exports, resumes bit for bit) and leaves no scratch file behind.
#[test]
fn offloaded_full_weight_mezo_keeps_the_method_contract() {
    use common::contract::{check_method, Promise};
    let d = tempfile::tempdir().unwrap();
    let p = Promise {
        adapter: "full",
        extra: "optimizer = \"mezo\"\nzo_offload = true\nzo_window = 3",
        mergeable: true,
        peft: false,
        gguf_lora: false,
        identity_at_init: true,
    };
    let out = check_method(d.path(), &p);
    assert!(
        !out.join(ferrotune::methods::offloaded::STORE_FILE).exists(),
        "the scratch store is removed when the run finishes"
    );
}

/// The trained matrices of a run, by name.
fn adapter_values(out: &std::path::Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    ferrotune::formats::safetensors::load_f32(&out.join("adapter/adapter_model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}

fn step_losses(out: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines()
        .filter(|l| l.contains("\"loss\""))
        .map(|l| l.split("\"tokens_per_s\"").next().unwrap().to_string())
        .collect()
}

/// ZO2's small-scale check: with the same seeds, the offloaded run (deferred updates, fused
/// dual forward, any window) and in-memory MeZO give identical parameters and losses after N
/// steps, on a GGUF base whose projections stay in their quantized blocks.
#[test]
fn offloaded_mezo_follows_in_memory_mezo_bit_for_bit() {
    use ferrotune::formats::gguf::GgmlType;
    let d = tempfile::tempdir().unwrap();
    common::write_tiny_gguf(
        &d.path().join("m.gguf"),
        &common::TinySpec::default(),
        GgmlType::Q8_0,
    );
    let lines: Vec<String> = (0..10).map(|i| serde_json::json!({"text": format!("Item {i} costs {} coins and weighs {} grams.", i * 7, i + 2)}).to_string()).collect();
    common::write_lines(&d.path().join("train.jsonl"), &lines);
    let run = |name: &str, extra: &str| -> std::path::PathBuf {
        let text = format!(
            "base_model = \"m.gguf\"\ndatasets = [{{ path = \"train.jsonl\" }}]\nadapter = \"full\"\nlora_target_modules = [\"q_proj\", \"down_proj\", \"up_proj\"]\n\
             sequence_len = 32\nmicro_batch_size = 2\ngradient_accumulation_steps = 2\nmax_steps = 5\neval_steps = 2\nsave_steps = 3\nval_size = 2\n\
             learning_rate = 1e-3\nweight_decay = 0.1\nwarmup_steps = 1\noptimizer = \"mezo\"\nzo_eps = 1e-2\nseed = 11\noutput_dir = {:?}\n{extra}\n",
            d.path().join(name)
        );
        std::fs::write(d.path().join(format!("{name}.toml")), text).unwrap();
        let cfg = ferrotune::config::TrainConfig::load(&d.path().join(format!("{name}.toml")), &[])
            .unwrap();
        ferrotune::train::train(&cfg, &Default::default()).unwrap();
        d.path().join(name)
    };
    let memory = run("memory", "");
    let want = adapter_values(&memory);
    let base: Vec<f32> = {
        let m = ferrotune::models::load::load_model(&d.path().join("m.gguf")).unwrap();
        let q = m
            .linears()
            .find(|l| l.name == "model.layers.0.self_attn.q_proj")
            .unwrap()
            .weight
            .to_tensor()
            .unwrap();
        q.flatten_all().unwrap().to_vec1().unwrap()
    };
    assert_ne!(
        want["model.layers.0.self_attn.q_proj.weight"], base,
        "the in-memory run trained"
    );
    for window in ["zo_window = 1", "zo_window = 2", "zo_window = 4"] {
        let name = format!("offload-{}", window.rsplit(' ').next().unwrap());
        let out = run(&name, &format!("zo_offload = true\n{window}"));
        let got = adapter_values(&out);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>()
        );
        for (k, v) in &want {
            assert!(
                got[k] == *v,
                "{window}: {k} differs from the in-memory run's"
            );
        }
        assert_eq!(
            step_losses(&out),
            step_losses(&memory),
            "{window}: the losses differ"
        );
        // The checkpoint written mid-run (step 3, its update flushed) is the in-memory one's too.
        let ck = |o: &std::path::Path| {
            ferrotune::formats::safetensors::load_f32(
                &o.join("checkpoints/step-3/adapter_model.safetensors"),
            )
            .unwrap()
        };
        let (a, b) = (ck(&memory), ck(&out));
        for (k, v) in &a {
            assert!(
                b[k].flatten_all().unwrap().to_vec1::<f32>().unwrap()
                    == v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{window}: checkpoint tensor {k} differs"
            );
        }
    }
}

/// Offloading belongs to full-weight MeZO with one direction per step; the plan says so.
#[test]
fn offloading_settings_are_checked() {
    let d = tempfile::tempdir().unwrap();
    let load = |extra: &str| -> String {
        let text = format!("base_model = \"m\"\ndatasets = [{{ path = \"t.jsonl\" }}]\noutput_dir = \"o\"\nmax_steps = 1\n{extra}\n");
        std::fs::write(d.path().join("p.toml"), text).unwrap();
        match ferrotune::config::TrainConfig::load(&d.path().join("p.toml"), &[]) {
            Ok(_) => "accepted".into(),
            Err(e) => e.to_string(),
        }
    };
    let full_mezo = "adapter = \"full\"\noptimizer = \"mezo\"";
    assert_eq!(
        load(&format!("{full_mezo}\nzo_offload = true\nzo_window = 3")),
        "accepted"
    );
    let e = load("adapter = \"full\"\nzo_offload = true");
    assert!(e.contains("zo_offload") && e.contains("mezo"), "{e}");
    let e = load("adapter = \"lora\"\noptimizer = \"mezo\"\nzo_offload = true");
    assert!(e.contains("zo_offload") && e.contains("full"), "{e}");
    let e = load(&format!("{full_mezo}\nzo_offload = true\nzo_n_spsa = 2"));
    assert!(e.contains("zo_n_spsa"), "{e}");
    let e = load(&format!("{full_mezo}\nzo_window = 2"));
    assert!(e.contains("zo_window") && e.contains("zo_offload"), "{e}");
    let e = load(&format!("{full_mezo}\nzo_offload = true\nzo_window = 0"));
    assert!(e.contains("zo_window"), "{e}");
}
