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
