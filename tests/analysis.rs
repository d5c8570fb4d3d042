//! `ferrotune analyze` (METHODS.md §8). TuCo is 0 when the fine-tune equals the base, lies in
//! (0, 1) when it does not, and its steering gives the fine-tuned forward exactly at κ = 1 and
//! the pre-trained one at κ = 0. The forgetting probe's losses are `eval`'s; the report's
//! ‖ΔW‖ is that of the LoRA product.

mod common;

use common::*;
use ferrotune::analysis::tuco::tuco;
use ferrotune::methods::TargetModules;
use ferrotune::models::{ForwardCtx, Llama};

fn run(m: &Llama, ids: &[u32], kappa: f64) -> ferrotune::analysis::tuco::Tuco {
    let x0 = m.embed_ids(ids, 1, ids.len()).unwrap();
    tuco(
        x0,
        m.layers.len(),
        kappa,
        |l, x| Ok(m.block_forward(l, x, 0, None, &ForwardCtx::reference())?),
        |l, x| Ok(m.block_forward(l, x, 0, None, &ForwardCtx::eval())?),
    )
    .unwrap()
}

fn values(t: &candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn tuco_measures_the_fine_tuning_and_steers_it() {
    let d = tempfile::tempdir().unwrap();
    let (m, params) = tiny_with_lora(d.path(), TargetModules::AllLinear);
    let probe = ids(64, 10, 5);
    // A LoRA as attached (B = 0) is the base: no contribution at all.
    let r = run(&m, &probe, 1.0);
    assert_eq!(r.tuco, 0.0);
    assert!(r.layers.iter().all(|l| l.ftc_norm == 0.0 && l.ptc_norm > 0.0));
    perturb(&params, 9);
    let r = run(&m, &probe, 1.0);
    assert!(r.tuco > 0.0 && r.tuco < 1.0, "TuCo {}", r.tuco);
    assert_eq!(r.layers.last().unwrap().tuco_so_far, r.tuco);
    // κ = 1 is the fine-tuned forward bit for bit; κ = 0 the pre-trained one.
    let plain = m.residual(&probe, 1, probe.len(), None, &ForwardCtx::eval()).unwrap();
    assert_eq!(values(&r.residual), values(&plain));
    let base = m.residual(&probe, 1, probe.len(), None, &ForwardCtx::reference()).unwrap();
    let off = run(&m, &probe, 0.0);
    assert!(
        max_abs_diff(&values(&off.residual), &values(&base)) < 1e-4,
        "κ = 0 differs from the base by {}",
        max_abs_diff(&values(&off.residual), &values(&base))
    );
    assert!(max_abs_diff(&values(&off.residual), &values(&plain)) > 1e-3, "the adapter changes the stream");
    // Amplifying moves the stream further from the base than the fine-tune does.
    let amp = run(&m, &probe, 2.0);
    let dist = |a: &candle_core::Tensor| values(a).iter().zip(values(&base)).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>();
    assert!(dist(&amp.residual) > dist(&plain));
}

#[test]
fn analyze_tuco_writes_json_and_plot() {
    use common::contract::{plan, Promise};
    let d = tempfile::tempdir().unwrap();
    let cfg = plan(d.path(), &Promise { adapter: "lora", extra: "", mergeable: true, peft: true, gguf_lora: true, identity_at_init: true }, 2);
    ferrotune::train::train(&cfg, &Default::default()).unwrap();
    let bin = || std::process::Command::new(env!("CARGO_BIN_EXE_ferrotune"));
    // Runs `ferrotune analyze ARGS` in the run's folder; it must succeed.
    let analyze = |args: &[&str]| {
        let o = bin().arg("analyze").args(args).current_dir(d.path()).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    analyze(&["tuco", "--model", "model", "--adapter", "out/adapter", "--prompt", "Question 1: what is 1 plus 3?", "--prompt", "Hello", "--out", "tuco"]);
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.path().join("tuco/tuco.json")).unwrap()).unwrap();
    let prompts = j["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 2);
    for p in prompts {
        let t = p["tuco"].as_f64().unwrap();
        assert!(t > 0.0 && t < 1.0, "{p}");
        assert_eq!(p["layers"].as_array().unwrap().len(), TinySpec::default().layers);
    }
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(d.path().join("tuco/tuco.png")).unwrap()));
    let info = decoder.read_info().unwrap().info().clone();
    assert_eq!((info.width, info.height), ferrotune::plot::CHART_SIZE);
    // The same model as its own fine-tune contributes nothing.
    analyze(&["tuco", "--model", "model", "--finetuned", "model", "--prompt", "Hello", "--out", "same"]);
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.path().join("same/tuco.json")).unwrap()).unwrap();
    assert_eq!(j["mean_tuco"].as_f64(), Some(0.0));
    // Intruders: only the adapter's modules changed; counts grow with ε; both plots drawn.
    analyze(&["intruders", "--model", "model", "--adapter", "out/adapter", "--top-k", "4", "--out", "intr"]);
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.path().join("intr/intruders.json")).unwrap()).unwrap();
    let spec = TinySpec::default();
    assert_eq!(j["modules_changed"].as_u64(), Some(7 * spec.layers as u64), "all-linear LoRA");
    let totals: Vec<u64> = ["0.1", "0.5", "0.9"].iter().map(|e| j["intruders_total"][e].as_u64().unwrap()).collect();
    assert!(totals.windows(2).all(|w| w[0] <= w[1]), "{totals:?}");
    for f in ["intruders_by_epsilon.png", "intruders_by_layer.png"] {
        assert!(png::Decoder::new(std::io::BufReader::new(std::fs::File::open(d.path().join("intr").join(f)).unwrap())).read_info().is_ok(), "{f}");
    }
    let o = bin().args(["analyze", "intruders", "--model", "model", "--finetuned", "model", "--out", "nothing"]).current_dir(d.path()).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("changes no linear module"), "{err}");
    // Forgetting: each file's losses are what `eval` gives without and with the adapter, and a
    // model against itself forgets nothing.
    write_lines(&d.path().join("general.jsonl"), &["{\"text\": \"The cat sat on the mat and looked out of the window.\"}".into(), "{\"text\": \"Rivers run to the sea.\"}".into()]);
    write_lines(&d.path().join("other.jsonl"), &["{\"prompt\": \"Name a colour: \", \"completion\": \"blue\"}".into()]);
    analyze(&["forgetting", "--model", "model", "--adapter", "out/adapter", "--data", "general.jsonl", "--data", "other.jsonl", "--out", "forget"]);
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.path().join("forget/forgetting.json")).unwrap()).unwrap();
    let files = j["files"].as_array().unwrap();
    assert_eq!(files.len(), 2);
    for (f, name) in files.iter().zip(["general.jsonl", "other.jsonl"]) {
        let eval = |extra: &[&str]| -> f64 {
            let o = bin().args(["eval", "--model", "model", "--data", name, "--sequence-len", "1024"]).args(extra).current_dir(d.path()).output().unwrap();
            assert!(o.status.success());
            let last: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
            last["loss"].as_f64().unwrap()
        };
        let (before, after) = (f["loss_before"].as_f64().unwrap(), f["loss_after"].as_f64().unwrap());
        assert!((before - eval(&[])).abs() < 1e-9 && (after - eval(&["--adapter", "out/adapter"])).abs() < 1e-9, "{f}");
        assert!(before != after, "the adapter changes the loss");
    }
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(d.path().join("forget/forgetting.png")).unwrap()));
    let info = decoder.read_info().unwrap().info().clone();
    assert_eq!((info.width, info.height), ferrotune::plot::CHART_SIZE);
    analyze(&["forgetting", "--model", "model", "--finetuned", "model", "--data", "general.jsonl", "--out", "forget0"]);
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.path().join("forget0/forgetting.json")).unwrap()).unwrap();
    assert_eq!(j["files"][0]["change"].as_f64(), Some(0.0));
    // Report: every adapted module, ‖ΔW‖_F equal to that of s·B·A computed here, rank ≤ r.
    analyze(&["report", "--model", "model", "--adapter", "out/adapter", "--out", "report"]);
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.path().join("report/report.json")).unwrap()).unwrap();
    assert_eq!(j["modules_changed"].as_u64(), Some(7 * spec.layers as u64));
    let acfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.path().join("out/adapter/adapter_config.json")).unwrap()).unwrap();
    let (r, alpha) = (acfg["r"].as_u64().unwrap() as usize, acfg["lora_alpha"].as_f64().unwrap());
    let tensors = candle_core::safetensors::load(d.path().join("out/adapter/adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let factor = |n: &str| -> (Vec<f32>, Vec<usize>) {
        let t = &tensors[&format!("base_model.model.model.layers.1.mlp.down_proj.{n}.weight")];
        (t.flatten_all().unwrap().to_vec1().unwrap(), t.dims().to_vec())
    };
    let ((a, ad), (b, bd)) = (factor("lora_A"), factor("lora_B"));
    let (rows, cols) = (bd[0], ad[1]);
    let mut sq = 0.0f64;
    for i in 0..rows {
        for j in 0..cols {
            let v: f64 = (0..r).map(|k| b[i * r + k] as f64 * a[k * cols + j] as f64).sum::<f64>() * alpha / r as f64;
            sq += v * v;
        }
    }
    let m = &j["modules"]["model.layers.1.mlp.down_proj"];
    let got = m["frobenius"].as_f64().unwrap();
    assert!((got - sq.sqrt()).abs() < 1e-4 * sq.sqrt(), "‖ΔW‖_F {got} vs {}", sq.sqrt());
    assert!(m["numerical_rank"].as_u64().unwrap() as usize <= r && m["effective_rank"].as_f64().unwrap() <= r as f64 + 1e-9, "{m}");
    for f in ["norms_by_layer.png", "spectra.png"] {
        assert!(png::Decoder::new(std::io::BufReader::new(std::fs::File::open(d.path().join("report").join(f)).unwrap())).read_info().is_ok(), "{f}");
    }
    // One fine-tune, given one way.
    let o = bin().args(["analyze", "tuco", "--model", "model", "--prompt", "Hello", "--out", "none"]).current_dir(d.path()).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--adapter") && err.contains("--finetuned"), "{err}");
}
