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
    use ferrotune::methods::{registry, MethodSpec, TargetModules};
    let d = tempfile::tempdir().unwrap();
    write_tiny_hf(d.path(), &TinySpec { qkv_bias: true, ..Default::default() });
    let mut m = ferrotune::models::load::load_model(d.path()).unwrap();
    let spec = MethodSpec {
        adapter: "ssf".into(),
        r: 1,
        alpha: 1.0,
        dropout: 0.0,
        target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into(), "up_proj".into()]),
        use_rslora: false,
        seed: 11,
        options: [("ssf_init".to_string(), toml::Value::String("normal".into()))].into_iter().collect(),
    };
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
    use ferrotune::methods::{registry, MethodSpec, TargetModules};
    use ferrotune::models::ForwardCtx;
    let d = tempfile::tempdir().unwrap();
    write_tiny_hf(d.path(), &TinySpec::default());
    let mut m = ferrotune::models::load::load_model(d.path()).unwrap();
    let spec = MethodSpec {
        adapter: "adaptformer".into(),
        r: 1,
        alpha: 1.0,
        dropout: 0.0,
        target_modules: TargetModules::AllLinear,
        use_rslora: false,
        seed: 2,
        options: [("adapter_bottleneck".to_string(), toml::Value::Integer(4))].into_iter().collect(),
    };
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
    let probe = ids(64, 6, 9);
    let targets: std::sync::Arc<Vec<i32>> = std::sync::Arc::new(probe[1..].iter().map(|&t| t as i32).chain([-100]).collect());
    let loss = |train: bool| m.nll(&probe, targets.clone(), 1, probe.len(), &ForwardCtx { train, seed: 0 }).unwrap().sum_all().unwrap();
    let grads = loss(true).backward().unwrap();
    for (k, v) in params.iter().filter(|(k, _)| k.contains("layers.1") && k.ends_with("weight")) {
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
        }
    }
}
