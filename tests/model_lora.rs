//! The decoder and LoRA on tiny models: HF vs GGUF loading, LoRA gradients, merge, PEFT I/O.

mod common;

use candle_core::{Tensor, Var};
use common::*;
use ferrotune::formats::gguf::GgmlType;
use ferrotune::methods::{Lora, LoraConfig, TargetModules};
use ferrotune::models::{load, ForwardCtx, Llama};
use std::sync::Arc;

fn lora_cfg(targets: TargetModules) -> LoraConfig {
    LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, target_modules: targets, use_rslora: false, ..Default::default() }
}

/// Gives every B a non-zero value so the adapter changes the output.
fn perturb_b(lora: &Lora, seed: u64) {
    let mut r = ferrotune::rng::SplitMix64::new(seed);
    for s in &lora.sites {
        let n = s.b.elem_count();
        let v: Vec<f32> = (0..n).map(|_| 0.2 * (2.0 * r.next_f32() - 1.0)).collect();
        s.b.set(&Tensor::from_vec(v, s.b.shape(), s.b.device()).unwrap()).unwrap();
    }
}

#[test]
fn gguf_and_hf_copies_give_the_same_logits() {
    for spec in [TinySpec::default(), TinySpec { tied: false, qkv_bias: true, ..Default::default() }] {
        let dir = tempfile::tempdir().unwrap();
        let vocab = write_tiny_hf(&dir.path().join("hf"), &spec);
        write_tiny_gguf(&dir.path().join("m.gguf"), &spec, GgmlType::F32);
        let hf = load::load_model(&dir.path().join("hf")).unwrap();
        let gg = load::load_model(&dir.path().join("m.gguf")).unwrap();
        assert_eq!(hf.config.tie_word_embeddings, gg.config.tie_word_embeddings);
        let x = ids(vocab, 12, 1);
        let diff = max_abs_diff(&logits(&hf, &x), &logits(&gg, &x));
        assert_eq!(diff, 0.0, "{}: F32 GGUF must load to exactly the HF weights (q/k un-permuted)", spec.model_type());

        // A quantized GGUF loads too and stays close to the f32 model.
        write_tiny_gguf(&dir.path().join("q.gguf"), &spec, GgmlType::Q8_0);
        let q = load::load_model(&dir.path().join("q.gguf")).unwrap();
        let diff = max_abs_diff(&logits(&hf, &x), &logits(&q, &x));
        assert!(diff > 0.0 && diff < 0.05, "Q8_0 logits differ by {diff}");
    }
}

#[test]
fn kv_cache_decoding_matches_full_forward() {
    let dir = tempfile::tempdir().unwrap();
    let vocab = write_tiny_hf(dir.path(), &TinySpec::default());
    let m = load::load_model(dir.path()).unwrap();
    let x = ids(vocab, 9, 2);
    let full = logits(&m, &x);
    let mut cache = ferrotune::models::KvCache::new(m.config.num_hidden_layers);
    let a = m.logits(&x[..5], 1, 5, Some(&mut cache), &ForwardCtx::eval()).unwrap();
    let b = m.logits(&x[5..], 1, 4, Some(&mut cache), &ForwardCtx::eval()).unwrap();
    let inc: Vec<f32> = Tensor::cat(&[a, b], 0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert!(max_abs_diff(&full, &inc) < 1e-5);
}

#[test]
fn fresh_lora_is_identity_and_merge_reproduces_adapter_logits() {
    let dir = tempfile::tempdir().unwrap();
    let vocab = write_tiny_hf(dir.path(), &TinySpec::default());
    let x = ids(vocab, 10, 3);
    let base = logits(&load::load_model(dir.path()).unwrap(), &x);
    let mut m = load::load_model(dir.path()).unwrap();
    let lora = Lora::attach(&mut m, lora_cfg(TargetModules::AllLinear), 5).unwrap();
    assert_eq!(lora.sites.len(), 14);
    assert_eq!(logits(&m, &x), base, "B = 0 at init: the adapter must not change the output");
    perturb_b(&lora, 9);
    let adapted = logits(&m, &x);
    assert!(max_abs_diff(&adapted, &base) > 1e-3, "a non-zero adapter must change the output");
    lora.merge_into(&mut m).unwrap();
    let merged = logits(&m, &x);
    let d = max_abs_diff(&adapted, &merged);
    assert!(d < 1e-4, "merged model differs from base+adapter by {d}");
}

#[test]
fn lora_gradients_match_finite_differences() {
    let dir = tempfile::tempdir().unwrap();
    let vocab = write_tiny_hf(dir.path(), &TinySpec::default());
    let mut m = load::load_model(dir.path()).unwrap();
    let lora = Lora::attach(&mut m, lora_cfg(TargetModules::Names(vec!["q_proj".into(), "down_proj".into()])), 5).unwrap();
    perturb_b(&lora, 11);
    let x = ids(vocab, 8, 4);
    let targets: Vec<i32> = x[1..].iter().map(|&t| t as i32).chain([-100]).collect();
    let targets = Arc::new(targets);
    let loss = |m: &Llama| -> f64 {
        m.nll(&x, targets.clone(), 1, 8, &ForwardCtx::eval()).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64
    };
    // Training mode: only then do the adapter parameters enter the autograd graph.
    let train = ForwardCtx::train(0);
    let nll = m.nll(&x, targets.clone(), 1, 8, &train).unwrap().sum_all().unwrap();
    let grads = nll.backward().unwrap();
    let params: Vec<(String, Var)> = lora.params();
    assert_eq!(params.len(), 8);
    for (name, var) in params.iter().step_by(3) {
        let g: Vec<f32> = grads.get(var.as_tensor()).expect("every LoRA tensor gets a gradient").flatten_all().unwrap().to_vec1().unwrap();
        let base: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for probe in 0..3 {
            let idx = (probe * 37 + 5) % base.len();
            let eps = 1e-2f32;
            let eval = |delta: f32| {
                let mut p = base.clone();
                p[idx] += delta;
                var.set(&Tensor::from_vec(p, var.shape(), var.device()).unwrap()).unwrap();
                let l = loss(&m);
                var.set(&Tensor::from_vec(base.clone(), var.shape(), var.device()).unwrap()).unwrap();
                l
            };
            let fd = (eval(eps) - eval(-eps)) / (2.0 * eps as f64);
            let an = g[idx] as f64;
            assert!((fd - an).abs() < 2e-2 * an.abs().max(0.1), "{name}[{idx}]: finite difference {fd}, analytic {an}");
        }
    }
}

#[test]
fn peft_adapter_round_trip_and_mismatch_errors() {
    let dir = tempfile::tempdir().unwrap();
    let vocab = write_tiny_hf(&dir.path().join("m"), &TinySpec::default());
    let mut m = load::load_model(&dir.path().join("m")).unwrap();
    let lora = Lora::attach(&mut m, lora_cfg(TargetModules::Names(vec!["v_proj".into(), "up_proj".into()])), 5).unwrap();
    perturb_b(&lora, 13);
    let x = ids(vocab, 7, 5);
    let want = logits(&m, &x);
    let ad = dir.path().join("adapter");
    lora.save_peft(&ad, "tiny").unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ad.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["target_modules"], serde_json::json!(["up_proj", "v_proj"]));
    let st = ferrotune::formats::safetensors::load_f32(&ad.join("adapter_model.safetensors")).unwrap();
    assert!(st.contains_key("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"));
    assert_eq!(st["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"].dims(), &[4, 32]);

    let mut m2 = load::load_model(&dir.path().join("m")).unwrap();
    Lora::load_peft(&mut m2, &ad).unwrap();
    assert_eq!(logits(&m2, &x), want, "a saved and reloaded adapter gives the same logits");

    // The same adapter on a model with other shapes is refused with the tensor named.
    write_tiny_hf(&dir.path().join("wide"), &TinySpec { hidden: 48, heads: 6, kv_heads: 3, ..Default::default() });
    let mut wide = load::load_model(&dir.path().join("wide")).unwrap();
    let err = Lora::load_peft(&mut wide, &ad).err().expect("shape mismatch must fail").to_string();
    assert!(err.contains("lora_A.weight") && err.contains("shape"), "{err}");

    // A target that matches nothing is refused with the name and what exists.
    let mut m3 = load::load_model(&dir.path().join("m")).unwrap();
    let err = Lora::attach(&mut m3, lora_cfg(TargetModules::Names(vec!["qproj".into()])), 1).err().unwrap().to_string();
    assert!(err.contains("qproj") && err.contains("q_proj"), "{err}");
}

#[test]
fn sharded_safetensors_load_like_a_single_file() {
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one");
    let vocab = write_tiny_hf(&one, &TinySpec::default());
    // Split the same tensors over two shards with an index, as transformers does.
    let sharded = dir.path().join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(one.join(f), sharded.join(f)).unwrap();
    }
    let all = ferrotune::formats::safetensors::load_f32(&one.join("model.safetensors")).unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", a), ("model-00002-of-00002.safetensors", b)] {
        let ts: Vec<(String, Tensor)> = part.iter().map(|n| ((*n).clone(), all[*n].clone())).collect();
        ferrotune::formats::safetensors::save(&sharded.join(file), &ts, ferrotune::formats::safetensors::SaveDType::F32, None).unwrap();
        part.iter().for_each(|n| {
            map.insert((*n).clone(), serde_json::Value::from(file));
        });
    }
    std::fs::write(sharded.join("model.safetensors.index.json"), serde_json::json!({"metadata": {}, "weight_map": map}).to_string()).unwrap();
    let x = ids(vocab, 6, 8);
    assert_eq!(logits(&load::load_model(&one).unwrap(), &x), logits(&load::load_model(&sharded).unwrap(), &x));
}

#[test]
fn rslora_scales_by_alpha_over_sqrt_r_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let vocab = write_tiny_hf(dir.path(), &TinySpec::default());
    let x = ids(vocab, 6, 9);
    let w0 = load::load_model(dir.path()).unwrap().layers[1].o_proj.weight.to_tensor().unwrap();
    let mut deltas = vec![];
    for rs in [false, true] {
        let mut m = load::load_model(dir.path()).unwrap();
        let cfg = LoraConfig { use_rslora: rs, ..lora_cfg(TargetModules::Names(vec!["o_proj".into()])) };
        assert_eq!(cfg.scaling(), if rs { 8.0 / 2.0 } else { 8.0 / 4.0 });
        let lora = Lora::attach(&mut m, cfg, 3).unwrap();
        perturb_b(&lora, 4);
        let want = logits(&m, &x);
        let ad = dir.path().join(format!("ad-{rs}"));
        lora.save_peft(&ad, "tiny").unwrap();
        let mut m2 = load::load_model(dir.path()).unwrap();
        let back = Lora::load_peft(&mut m2, &ad).unwrap();
        assert_eq!(back.config.use_rslora, rs);
        assert_eq!(logits(&m2, &x), want, "use_rslora survives the PEFT round trip");
        back.merge_into(&mut m2).unwrap();
        deltas.push((&m2.layers[1].o_proj.weight.to_tensor().unwrap() - &w0).unwrap());
    }
    // Same A and B; scaling α/r = 2 vs α/√r = 4: the merged update doubles.
    let diff = (deltas[1].clone() - (&deltas[0] * 2.0).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = deltas[1].abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(scale > 1e-3 && diff < 1e-5 * scale.max(1.0), "rsLoRA update is not twice LoRA's: {diff} of {scale}");
}

/// The fused decoder block (taken in training forwards whose gradients a sink collects) gives
/// the unfused graph's outputs and gradients: for the LoRA factors (delivered to the sink), and
/// for the block input. Covered: dropout on the branches, Qwen2's q/k/v biases, sites without
/// LoRA (the MLP sublayer here has none), packed rows, and a first block whose input takes no
/// gradient.
#[test]
fn fused_block_gives_the_unfused_gradients() {
    use ferrotune::kernels::grad_sink;
    let cases = [
        (TinySpec::default(), TargetModules::AllLinear, false),
        (TinySpec { tied: false, qkv_bias: true, ..Default::default() }, TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]), true),
    ];
    for (spec, targets, packed) in cases {
        let dir = tempfile::tempdir().unwrap();
        let vocab = write_tiny_hf(dir.path(), &spec);
        let mut m = load::load_model(dir.path()).unwrap();
        let lora = Lora::attach(&mut m, LoraConfig { dropout: 0.25, ..lora_cfg(targets) }, 5).unwrap();
        perturb_b(&lora, 17);
        let params: Vec<Var> = lora.params().into_iter().map(|(_, v)| v).collect();
        let (b, t) = (2, 7);
        let mut ctx = ForwardCtx::train(23);
        if packed {
            ctx.positions = Some(Arc::from(vec![0u32, 1, 2, 0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 4]));
        }
        let x = m.embed_ids(&ids(vocab, b * t, 9), b, t).unwrap();
        let probe = Tensor::from_vec(ids(1000, b * t * spec.hidden, 3).iter().map(|&v| v as f32 / 500.0 - 1.0).collect::<Vec<_>>(), (b, t, spec.hidden), x.device()).unwrap();
        for input_grad in [true, false] {
            let x0 = Var::from_tensor(&x).unwrap();
            let x_in = if input_grad { x0.as_tensor().clone() } else { x.clone() };
            let run = || {
                let y = m.residual_from(x_in.clone(), &ctx).unwrap();
                let store = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                (y, store)
            };
            let (y_ref, store_ref) = run();
            let ((y, store), delivered) = grad_sink::collecting(run);
            let case = format!("{} (packed {packed}, input gradient {input_grad})", spec.model_type());
            // The fused path ran: every factor's gradient arrived through the sink, one per block.
            assert_eq!(delivered.len(), params.len(), "{case}: gradients delivered");
            assert!(max_abs_diff(&flat(&y), &flat(&y_ref)) < 1e-5, "{case}: outputs differ");
            for (i, p) in params.iter().enumerate() {
                assert!(store.get(p.as_tensor()).is_none(), "{case}: a factor's gradient also went through the graph");
                let got: Vec<f32> = delivered.iter().filter(|(id, _)| *id == p.as_tensor().id()).flat_map(|(_, g)| g.clone()).collect();
                let want = flat(store_ref.get(p.as_tensor()).unwrap());
                let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                assert!(scale > 0.0 && max_abs_diff(&got, &want) < 1e-5 * scale.max(1.0), "{case}: parameter {i} gradient differs");
            }
            if input_grad {
                let (g, g_ref) = (flat(store.get(x0.as_tensor()).unwrap()), flat(store_ref.get(x0.as_tensor()).unwrap()));
                assert!(max_abs_diff(&g, &g_ref) < 1e-5, "{case}: input gradient differs");
            } else {
                assert!(store.get(x0.as_tensor()).is_none());
            }
        }
    }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}
