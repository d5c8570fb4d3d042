//! RoSTE (`objective = "roste"`): quantisation-aware sites compute the quantised model's
//! product, choose their rotation by quantisation error, pass gradients straight through to
//! the adapter, and the merged export with its plan reproduces the trained forward.

mod common;

use candle_core::{Tensor, Var};
use common::*;
use ferrotune::kernels;
use ferrotune::methods::TargetModules;
use ferrotune::models::qat::{self, QatPlan};
use ferrotune::models::{ForwardCtx, Llama};

fn model_with_lora(dir: &std::path::Path) -> (Llama, Vec<Var>) {
    tiny_with_lora(dir, TargetModules::AllLinear)
}

fn plan(m: &Llama, bits: (u32, u32), rotate: impl Fn(usize) -> bool) -> QatPlan {
    QatPlan { weight_bits: bits.0, activation_bits: bits.1, weight_clip_ratio: 1.0, rotations: m.linears().enumerate().map(|(i, l)| (l.name.clone(), rotate(i))).collect() }
}

/// `Q(v)` per row: codes on the symmetric grid (ties to even), times the step.
fn quantize_rows(v: &[f32], n: usize, bits: u32) -> Vec<f64> {
    let qmax = ((1i64 << (bits - 1)) - 1) as f32;
    v.chunks(n)
        .flat_map(|row| {
            let step = row.iter().fold(0f32, |m, x| m.max(x.abs())) / qmax;
            row.iter().map(move |&x| if step == 0.0 { 0.0 } else { ((x / step).round_ties_even().clamp(-qmax - 1.0, qmax) * step) as f64 }).collect::<Vec<_>>()
        })
        .collect()
}

/// A quantisation-aware site computes `Q_a(x·R)·Q_w((W0 + ΔW)·R)ᵀ`: checked against codes
/// computed here, for a rotated and an unrotated site, with a non-zero adapter.
#[test]
fn a_qat_site_computes_the_quantised_product_of_the_merged_weight() {
    let d = tempfile::tempdir().unwrap();
    let (mut m, params) = model_with_lora(d.path());
    perturb(&params, 2);
    let hidden = m.config.hidden_size;
    let mut rng = ferrotune::rng::SplitMix64::new(77);
    let x = Tensor::from_vec((0..2 * 3 * hidden).map(|_| rng.next_f32() * 2.0 - 1.0).collect::<Vec<_>>(), (2, 3, hidden), m.device()).unwrap();
    // The merged weight of the first two sites (q_proj, k_proj of layer 0), before wrapping.
    let merged: Vec<(Vec<f32>, usize)> = m
        .linears()
        .take(2)
        .map(|l| {
            let w = (l.weight.to_tensor().unwrap() + l.hook.as_ref().unwrap().delta_weight(false).unwrap().unwrap()).unwrap();
            (w.flatten_all().unwrap().to_vec1().unwrap(), l.info().out_features)
        })
        .collect();
    let p = plan(&m, (4, 8), |i| i == 1);
    qat::attach(&mut m, &p).unwrap();
    let sites = [&m.layers[0].q_proj, &m.layers[0].k_proj];
    for (si, ((w, out), site)) in merged.iter().zip(sites).enumerate() {
        let got: Vec<f32> = site.forward(&x, &ForwardCtx::eval()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let (mut xr, mut wr): (Vec<f32>, Vec<f32>) = (x.flatten_all().unwrap().to_vec1().unwrap(), w.clone());
        if si == 1 {
            ferrotune::linalg::hadamard::rotate_rows(&mut xr, hidden);
            ferrotune::linalg::hadamard::rotate_rows(&mut wr, hidden);
        }
        let (xq, wq) = (quantize_rows(&xr, hidden, 8), quantize_rows(&wr, hidden, 4));
        for t in 0..6 {
            for o in 0..*out {
                let want: f64 = (0..hidden).map(|k| xq[t * hidden + k] * wq[o * hidden + k]).sum();
                let g = got[t * out + o] as f64;
                assert!((g - want).abs() < 1e-4 * (1.0 + want.abs()), "site {si}, token {t}, output {o}: {g} vs {want}");
            }
        }
    }
}

/// With a fine grid the quantised model is the float model (the rotations are orthogonal), and
/// its straight-through gradient is the float gradient; a 4-bit grid changes both.
#[test]
fn fine_grids_give_back_the_float_model_and_its_gradient() {
    let d = tempfile::tempdir().unwrap();
    let ids = ids(64, 10, 3);
    let targets = std::sync::Arc::new(ids[1..].iter().map(|&t| t as i32).chain([-100]).collect::<Vec<i32>>());
    let loss_and_grads = |bits: Option<(u32, u32)>| {
        let (mut m, params) = model_with_lora(d.path());
        perturb(&params, 4);
        if let Some(b) = bits {
            let p = plan(&m, b, |i| i % 2 == 0);
            qat::attach(&mut m, &p).unwrap();
        }
        let loss = m.nll(&ids, targets.clone(), 1, ids.len(), &ForwardCtx::train(1)).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        let grads: Vec<f32> = params.iter().flat_map(|p| g.get(p.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect();
        (loss.to_scalar::<f32>().unwrap(), grads)
    };
    let (l0, g0) = loss_and_grads(None);
    let (l16, g16) = loss_and_grads(Some((16, 16)));
    let (l4, g4) = loss_and_grads(Some((4, 4)));
    let rel = |a: &[f32], b: &[f32]| {
        let scale = b.iter().fold(0f32, |s, x| s.max(x.abs()));
        a.iter().zip(b).fold(0f32, |s, (x, y)| s.max((x - y).abs())) / scale
    };
    assert!((l16 - l0).abs() < 1e-3 * l0.abs(), "16-bit loss {l16} vs float {l0}");
    assert!(rel(&g16, &g0) < 1e-2, "16-bit STE gradient vs float: {}", rel(&g16, &g0));
    assert!((l4 - l0).abs() > 1e-4 && rel(&g4, &g0) > 1e-3, "a 4-bit grid leaves the model unchanged");
    assert!(g4.iter().all(|v| v.is_finite()) && g4.iter().any(|&v| v != 0.0));
}

/// Each site keeps the rotation with the smaller quantisation error of its weight (here `W0`: a
/// fresh adapter) on its calibration inputs: checked for the first site, whose input (the
/// normalised embeddings) is computed here.
#[test]
fn calibration_keeps_the_rotation_with_the_smaller_error() {
    let d = tempfile::tempdir().unwrap();
    let (mut m, _) = model_with_lora(d.path());
    let ids = ids(64, 12, 9);
    let base = plan(&m, (4, 4), |_| false);
    let sites = qat::attach(&mut m, &base).unwrap();
    sites
        .choose_rotations(&m, &mut |m| {
            m.nll(&ids, std::sync::Arc::new(vec![-100; ids.len()]), 1, ids.len(), &ForwardCtx::eval())?;
            Ok(())
        })
        .unwrap();
    let chosen = sites.plan();
    assert_eq!(chosen.rotations.len(), m.linears().count());
    assert!(m.linears().all(|l| l.hook.as_ref().unwrap().delta_weight(false).is_some()), "the quantisation-aware sites carry the adapter");
    let l = &m.layers[0];
    let x = kernels::rms_norm(&m.embed_ids(&ids, 1, ids.len()).unwrap(), &l.input_layernorm, m.config.rms_norm_eps).unwrap();
    let w = l.q_proj.weight.to_tensor().unwrap();
    let exact = x.broadcast_matmul(&w.t().unwrap()).unwrap();
    let error = |rotate: bool| {
        let (xr, wr) = if rotate { (kernels::hadamard_rotate(&x).unwrap(), kernels::hadamard_rotate(&w).unwrap()) } else { (x.clone(), w.clone()) };
        let g = kernels::QuantGrid { bits: 4, clip_ratio: 1.0 };
        let y = kernels::fake_quant(&xr, g).unwrap().broadcast_matmul(&kernels::fake_quant(&wr, g).unwrap().t().unwrap()).unwrap();
        (y - &exact).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
    };
    assert_eq!(chosen.rotations[&l.q_proj.name], error(true) < error(false), "errors: plain {}, rotated {}", error(false), error(true));
}

/// Through the trainer and the CLI: a RoSTE run writes its plan beside the adapter, `merge`
/// carries it to the merged model, and `eval --fake-quant` on the merged model gives the loss
/// of the adapter's quantisation-aware forward (the export is what was trained); without
/// --fake-quant the loss is the float model's.
#[test]
fn a_roste_run_exports_a_merged_model_that_quantises_as_trained() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let p = common::contract::Promise {
        adapter: "lora",
        extra: "objective = \"roste\"\nroste_weight_bits = 4\nroste_activation_bits = 8\nroste_rotation_refresh_steps = 1\nlora_dropout = 0.0",
        mergeable: true,
        peft: true,
        gguf_lora: true,
        identity_at_init: true,
    };
    let cfg = common::contract::plan(dir, &p, 4);
    let s = ferrotune::train::train(&cfg, &Default::default()).unwrap();
    // Two steps, then --resume to four: the rotations (re-chosen after every step) come back
    // from the checkpoint, and the adapter is the uninterrupted run's, byte for byte.
    let mut part = cfg.clone();
    part.output_dir = dir.join("part");
    part.max_steps = Some(2);
    ferrotune::train::train(&part, &Default::default()).unwrap();
    assert!(qat::read_plan(&dir.join("part/checkpoints/step-2")).unwrap().is_some(), "checkpoints keep the plan");
    part.max_steps = Some(4);
    ferrotune::train::train(&part, &ferrotune::train::TrainOptions { resume: true, ..Default::default() }).unwrap();
    let bytes = |run: &str| std::fs::read(dir.join(run).join("adapter/adapter_model.safetensors")).unwrap();
    assert!(bytes("out") == bytes("part"), "a resumed RoSTE run differs from an uninterrupted one");
    assert_eq!(std::fs::read(dir.join("out/adapter/roste.json")).unwrap(), std::fs::read(dir.join("part/adapter/roste.json")).unwrap());
    assert!(s.eval_after.unwrap().is_finite());
    let plan = qat::read_plan(&dir.join("out/adapter")).unwrap().expect("the adapter keeps its plan");
    assert_eq!((plan.weight_bits, plan.activation_bits), (4, 8));
    let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("out/run.json")).unwrap()).unwrap();
    assert_eq!(run["resolved"]["objective"]["name"], "roste");
    let cli = |args: &[&str]| -> serde_json::Value {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferrotune")).args(args).current_dir(dir).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or("null")).unwrap_or(serde_json::Value::Null)
    };
    cli(&["merge", "--model", "model", "--adapter", "out/adapter", "--out", "merged"]);
    assert_eq!(qat::read_plan(&dir.join("merged")).unwrap().as_ref(), Some(&plan));
    let loss = |v: serde_json::Value| v["loss"].as_f64().unwrap();
    let trained = loss(cli(&["eval", "--model", "model", "--adapter", "out/adapter", "--data", "val.jsonl", "--fake-quant"]));
    let exported = loss(cli(&["eval", "--model", "merged", "--data", "val.jsonl", "--fake-quant"]));
    let float = loss(cli(&["eval", "--model", "merged", "--data", "val.jsonl"]));
    assert!((trained - exported).abs() < 1e-3 * trained, "merged + plan {exported} vs the trained forward {trained}");
    assert!((float - exported).abs() > 1e-5, "the plan changes nothing: {float} vs {exported}");
}
