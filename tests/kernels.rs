//! Each training kernel against (a) a plain composition of candle ops with candle's autograd,
//! forward and gradients, and (b) central finite differences of a random projection of its output.

use candle_core::{DType, Device, IndexOp, Tensor, Var, D};
use ferrotune::formats::gguf::quants::{self, GgmlType};
use ferrotune::kernels::{self, bf16_gemm, FrozenWeight, RopeTables};
use std::sync::Arc;

const DEV: Device = Device::Cpu;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // Deterministic pseudo-normal values without relying on candle's global RNG.
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64
    };
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let (u1, u2) = (next().max(1e-12), next());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect();
    Tensor::from_vec(v, shape, &DEV).unwrap()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-6);
    diff / scale
}

/// Checks `f`'s gradient w.r.t. each input against candle's autograd on `reference`, and
/// against finite differences for a few coordinates.
fn check(
    inputs: &[Tensor],
    f: &dyn Fn(&[Tensor]) -> Tensor,
    reference: &dyn Fn(&[Tensor]) -> Tensor,
    tol: f32,
) {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts);
    let y_ref = reference(&ts);
    assert_eq!(y.dims(), y_ref.dims());
    let fwd_err = max_rel(&y, &y_ref);
    assert!(fwd_err < tol, "forward differs from the candle composition: {fwd_err}");

    let r = randn(y.dims(), 99);
    let loss = (&y * &r).unwrap().sum_all().unwrap();
    let loss_ref = (&y_ref * &r).unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap();
    let g_ref = loss_ref.backward().unwrap();
    for (i, v) in vars.iter().enumerate() {
        let (Some(gi), Some(gr)) = (g.get(v.as_tensor()), g_ref.get(v.as_tensor())) else {
            panic!("input {i}: missing gradient");
        };
        let err = max_rel(gi, gr);
        assert!(err < tol, "input {i}: gradient differs from candle autograd by {err}");

        // Finite differences in f64 arithmetic on a handful of coordinates.
        let base: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let gvec: Vec<f32> = gi.flatten_all().unwrap().to_vec1().unwrap();
        let eps = 1e-2f32;
        for probe in 0..4 {
            let idx = (probe * 7919 + 13) % base.len();
            let eval = |delta: f32| -> f64 {
                let mut p = base.clone();
                p[idx] += delta;
                let mut args = ts.clone();
                args[i] = Tensor::from_vec(p, v.dims(), &DEV).unwrap();
                let out = f(&args).to_dtype(DType::F64).unwrap();
                (out * r.to_dtype(DType::F64).unwrap()).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
            };
            let fd = (eval(eps) - eval(-eps)) / (2.0 * eps as f64);
            let an = gvec[idx] as f64;
            assert!(
                (fd - an).abs() <= 2e-2 * an.abs().max(1.0),
                "input {i} coord {idx}: finite difference {fd} vs analytic {an}"
            );
        }
    }
}

fn frozen(t: &Tensor) -> FrozenWeight {
    FrozenWeight::from_tensor(t).unwrap()
}

#[test]
fn frozen_linear_matches_matmul() {
    let x = randn(&[2, 5, 12], 1);
    let w = randn(&[7, 12], 2);
    let fw = frozen(&w);
    let y = kernels::frozen_linear(&Var::from_tensor(&x).unwrap(), &fw).unwrap();
    let y_ref = x.matmul(&w.t().unwrap().broadcast_left(2).unwrap()).unwrap();
    assert!(max_rel(&y, &y_ref) < 1e-5);
    // Input gradient against autograd and finite differences; W enters as a constant.
    check(
        &[x],
        &|a| kernels::frozen_linear(&a[0], &fw).unwrap(),
        &|a| a[0].broadcast_matmul(&w.t().unwrap()).unwrap(),
        1e-4,
    );
}

/// For every storage type a GGUF base may arrive in: the tiled product on the blocks equals
/// dequantize-then-matmul (forward and input gradient) within f32 rounding. The matrix is tall
/// enough (300 rows of 512) to span several tiles, one of them partial. 21 input rows take the
/// dot-product path of decoding, 45 the GEMM path of training.
#[test]
fn frozen_linear_on_gguf_blocks_equals_dequantize_then_matmul() {
    for (b, t) in [(3, 7), (5, 9)] {
        frozen_blocks_case(b, t);
    }
}

fn frozen_blocks_case(batch: usize, seq: usize) {
    let (out_f, in_f) = (300, 512);
    let w = randn(&[out_f, in_f], 23);
    let wv: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
    let x = randn(&[batch, seq, in_f], 24);
    let dy = randn(&[batch, seq, out_f], 25);
    for ty in [GgmlType::F32, GgmlType::BF16, GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K] {
        let bytes = quants::quantize(ty, &wv).unwrap();
        let fw = FrozenWeight::from_blocks(ty, bytes.clone(), out_f, in_f).unwrap();
        // bf16 on a CPU with a bf16 kernel is held in its two tiled layouts (twice the bytes,
        // and padding).
        let stored = if ty == GgmlType::BF16 { FrozenWeight::bf16_storage_bytes(out_f, in_f) as usize } else { bytes.len() };
        assert_eq!(fw.storage_bytes(), stored);
        assert_eq!(fw.to_f32_vec(), quants::dequantize(ty, &bytes, out_f * in_f).unwrap(), "{ty}: the stored matrix reads back");
        let deq = Tensor::from_vec(quants::dequantize(ty, &bytes, out_f * in_f).unwrap(), (out_f, in_f), &DEV).unwrap();
        let xv = Var::from_tensor(&x).unwrap();
        let y = kernels::frozen_linear(xv.as_tensor(), &fw).unwrap();
        // A bf16 weight on a CPU with bf16 products (training rows, not decoding's few) rounds
        // the other operand to bf16 too, as PyTorch's bf16 autocast does: the reference then
        // multiplies the rounded operand.
        let bf16_products = ty == GgmlType::BF16 && bf16_gemm::kernel() != bf16_gemm::Kernel::None && batch * seq > 32;
        let operand = |t: &Tensor| if bf16_products { t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap() } else { t.clone() };
        let y_ref = operand(&x).broadcast_matmul(&deq.t().unwrap()).unwrap();
        let err = max_rel(&y, &y_ref);
        assert!(err < 1e-5, "{ty}: forward differs from dequantize-then-matmul by {err}");
        let g = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let dx_ref = operand(&dy).broadcast_matmul(&deq).unwrap();
        let err = max_rel(g.get(xv.as_tensor()).unwrap(), &dx_ref);
        assert!(err < 1e-5, "{ty}: input gradient differs by {err}");
        // The fused LoRA op reads the same blocks.
        let a = randn(&[4, in_f], 26);
        let b = randn(&[out_f, 4], 27);
        let yl = kernels::lora_linear(&x, &fw, &a, &b, 0.5, 0.0, 0).unwrap();
        let yl_ref = (&y_ref + (x.broadcast_matmul(&a.t().unwrap()).unwrap().broadcast_matmul(&b.t().unwrap()).unwrap() * 0.5).unwrap()).unwrap();
        assert!(max_rel(&yl, &yl_ref) < 1e-5, "{ty}: lora-linear on blocks");
    }
    // Rows that are not whole blocks are refused, not misread.
    assert!(FrozenWeight::from_blocks(GgmlType::Q4K, vec![0; 144], 1, 255).is_err());
    assert!(FrozenWeight::from_blocks(GgmlType::Q8_0, vec![0; 10], 1, 32).is_err());
}

fn rms_ref(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let r = (ms + eps).unwrap().sqrt().unwrap().recip().unwrap();
    x.broadcast_mul(&r).unwrap().broadcast_mul(w).unwrap()
}

#[test]
fn rms_norm_gradients() {
    let x = randn(&[3, 4, 16], 4);
    let w = randn(&[16], 5).affine(0.5, 1.0).unwrap();
    check(&[x, w], &|a| kernels::rms_norm(&a[0], &a[1], 1e-5).unwrap(), &|a| rms_ref(&a[0], &a[1], 1e-5), 1e-4);
}

fn rope_ref(x: &Tensor, inv_freq: &[f32], pos0: usize) -> Tensor {
    let (_, t, _, d) = x.dims4().unwrap();
    let half = d / 2;
    let mut cos = vec![];
    let mut sin = vec![];
    for p in pos0..pos0 + t {
        for rep in 0..2 {
            let _ = rep;
            for &f in inv_freq {
                let a = (p as f32 * f) as f64;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
    }
    let cos = Tensor::from_vec(cos, (1, t, 1, d), &DEV).unwrap();
    let sin = Tensor::from_vec(sin, (1, t, 1, d), &DEV).unwrap();
    let x1 = x.narrow(3, 0, half).unwrap();
    let x2 = x.narrow(3, half, half).unwrap();
    let rot = Tensor::cat(&[&x2.neg().unwrap(), &x1], 3).unwrap();
    (x.broadcast_mul(&cos).unwrap() + rot.broadcast_mul(&sin).unwrap()).unwrap()
}

#[test]
fn rope_gradients_and_offset() {
    let inv_freq: Vec<f32> = (0..4).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / 8.0)).collect();
    let tables = RopeTables::new(&inv_freq, 64);
    let x = randn(&[2, 5, 3, 8], 6);
    for pos0 in [0, 7] {
        let t = tables.clone();
        let f = inv_freq.clone();
        check(&[x.clone()], &move |a| kernels::rope(&a[0], &t, pos0).unwrap(), &move |a| rope_ref(&a[0], &f, pos0), 1e-5);
    }
    assert!(kernels::rope(&x, &tables, 60).is_err(), "positions past the table must be refused");
}

fn attention_ref(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    let (b, tq, hq, d) = q.dims4().unwrap();
    let (_, tk, hkv, _) = k.dims4().unwrap();
    let rep = hq / hkv;
    let expand = |t: &Tensor| {
        // [b, tk, hkv, d] -> [b, hq, tk, d], each kv head repeated for its group
        let t = t.transpose(1, 2).unwrap(); // b hkv tk d
        let t = t.unsqueeze(2).unwrap().expand((b, hkv, rep, tk, d)).unwrap();
        t.reshape((b, hq, tk, d)).unwrap()
    };
    let qh = q.transpose(1, 2).unwrap().contiguous().unwrap();
    let kh = expand(k).contiguous().unwrap();
    let vh = expand(v).contiguous().unwrap();
    let s = (qh.matmul(&kh.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
    let off = tk - tq;
    let mask: Vec<f32> = (0..tq)
        .flat_map(|i| (0..tk).map(move |j| if j <= i + off { 0.0 } else { -1e9 }))
        .collect();
    let mask = Tensor::from_vec(mask, (1, 1, tq, tk), &DEV).unwrap();
    let s = s.broadcast_add(&mask).unwrap();
    let m = s.max_keepdim(D::Minus1).unwrap().detach();
    let e = s.broadcast_sub(&m).unwrap().exp().unwrap();
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
    p.matmul(&vh).unwrap().transpose(1, 2).unwrap().contiguous().unwrap()
}

#[test]
fn causal_attention_gqa_gradients() {
    let q = randn(&[2, 6, 4, 8], 7);
    let k = randn(&[2, 6, 2, 8], 8);
    let v = randn(&[2, 6, 2, 8], 9);
    check(
        &[q, k, v],
        &|a| kernels::causal_attention(&a[0], &a[1], &a[2]).unwrap(),
        &|a| attention_ref(&a[0], &a[1], &a[2]),
        1e-4,
    );
    // Long enough for several causal row blocks (the last one partial), and with fewer
    // queries than keys so the blocks' key counts are offset.
    let k = randn(&[1, 150, 1, 8], 28);
    let v = randn(&[1, 150, 1, 8], 29);
    for tq in [150, 100] {
        let q = randn(&[1, tq, 2, 8], 30);
        check(
            &[q, k.clone(), v.clone()],
            &|a| kernels::causal_attention(&a[0], &a[1], &a[2]).unwrap(),
            &|a| attention_ref(&a[0], &a[1], &a[2]),
            1e-4,
        );
    }
}

/// Per token of rows made of examples of the given lengths, its position inside its example.
fn packed_positions(rows: &[&[usize]]) -> Arc<[u32]> {
    rows.iter().flat_map(|r| r.iter().flat_map(|&n| 0..n as u32)).collect()
}

/// `f` applied to each example of each row on its own, the results put back in place.
fn per_example(a: &[Tensor], rows: &[&[usize]], f: &dyn Fn(&[Tensor]) -> Tensor) -> Tensor {
    let out: Vec<Tensor> = rows
        .iter()
        .enumerate()
        .map(|(b, lens)| {
            let mut start = 0;
            let parts: Vec<Tensor> = lens
                .iter()
                .map(|&n| {
                    let args: Vec<Tensor> = a.iter().map(|t| t.narrow(0, b, 1).unwrap().narrow(1, start, n).unwrap()).collect();
                    start += n;
                    f(&args)
                })
                .collect();
            Tensor::cat(&parts, 1).unwrap()
        })
        .collect();
    Tensor::cat(&out, 0).unwrap()
}

#[test]
fn packed_attention_and_rope_equal_each_example_alone() {
    // Row 0 holds four examples (the 64-row causal blocks straddle their boundaries), row 1 one.
    let rows: [&[usize]; 2] = [&[70, 50, 100, 36], &[256]];
    let positions = packed_positions(&rows);
    let q = randn(&[2, 256, 4, 8], 40);
    let k = randn(&[2, 256, 2, 8], 41);
    let v = randn(&[2, 256, 2, 8], 42);
    let p = positions.clone();
    check(
        &[q.clone(), k.clone(), v.clone()],
        &move |a| kernels::packed_causal_attention(&a[0], &a[1], &a[2], &p).unwrap(),
        &|a| per_example(a, &rows, &|s| attention_ref(&s[0], &s[1], &s[2])),
        1e-4,
    );
    // Without the positions the examples would see each other: the outputs differ.
    let plain = kernels::causal_attention(&q, &k, &v).unwrap();
    assert!(max_rel(&plain, &kernels::packed_causal_attention(&q, &k, &v, &positions).unwrap()) > 1e-2);

    let inv_freq: Vec<f32> = (0..4).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / 8.0)).collect();
    let tables = RopeTables::new(&inv_freq, 256);
    let (t, p) = (tables.clone(), positions.clone());
    check(&[q.clone()], &move |a| kernels::rope_positions(&a[0], &t, &p).unwrap(), &|a| per_example(a, &rows, &|s| rope_ref(&s[0], &inv_freq, 0)), 1e-5);

    // Positions that do not fit the tensor, or run past a token's own index, are refused.
    assert!(kernels::rope_positions(&q, &tables, &packed_positions(&[&[256]])).is_err());
    let ahead: Arc<[u32]> = (0..512u32).map(|i| (i % 256) + 1).collect();
    assert!(kernels::packed_causal_attention(&q, &k, &v, &ahead).is_err());
}

#[test]
fn causal_attention_with_fewer_queries_than_keys() {
    // Decoding with a cache: 2 new queries over 7 keys must equal the last 2 rows of the full run.
    let q = randn(&[1, 7, 4, 8], 10);
    let k = randn(&[1, 7, 1, 8], 11);
    let v = randn(&[1, 7, 1, 8], 12);
    let full = kernels::causal_attention(&q, &k, &v).unwrap();
    let tail = kernels::causal_attention(&q.narrow(1, 5, 2).unwrap(), &k, &v).unwrap();
    assert!(max_rel(&tail, &full.narrow(1, 5, 2).unwrap()) < 1e-6);
    check(
        &[q.narrow(1, 4, 3).unwrap().contiguous().unwrap(), k, v],
        &|a| kernels::causal_attention(&a[0], &a[1], &a[2]).unwrap(),
        &|a| attention_ref(&a[0], &a[1], &a[2]),
        1e-4,
    );
}

#[test]
fn swiglu_gradients() {
    let g = randn(&[4, 10], 13);
    let u = randn(&[4, 10], 14);
    let reference = |a: &[Tensor]| {
        let sig = (a[0].neg().unwrap().exp().unwrap() + 1.0).unwrap().recip().unwrap();
        (&a[0] * sig).unwrap().mul(&a[1]).unwrap()
    };
    check(&[g, u], &|a| kernels::swiglu(&a[0], &a[1]).unwrap(), &reference, 1e-5);
}

#[test]
fn column_scale_and_shift_gradients() {
    // More rows than one work item, so that the per-thread partial sums are exercised.
    let y = randn(&[3, 50, 7], 15);
    let v = randn(&[7], 16);
    check(&[y.clone(), v.clone()], &|a| kernels::scale_columns(&a[0], &a[1]).unwrap(), &|a| a[0].broadcast_mul(&a[1]).unwrap(), 1e-5);
    let shift = randn(&[7], 17);
    check(&[y, v, shift], &|a| kernels::scale_shift_columns(&a[0], &a[1], &a[2]).unwrap(), &|a| a[0].broadcast_mul(&a[1]).unwrap().broadcast_add(&a[2]).unwrap(), 1e-5);
    assert!(kernels::scale_columns(&randn(&[2, 3], 1), &randn(&[2], 2)).is_err(), "a vector of the wrong length is refused");
}

#[test]
fn gram_lower_accumulate_matches_the_full_product() {
    use kernels::gemm::{gram_entry, gram_lower_accumulate};
    // n spans more than one column block, and the accumulation adds to what is there.
    let (rows, n) = (9, 300);
    let x: Vec<f32> = randn(&[rows, n], 21).flatten_all().unwrap().to_vec1().unwrap();
    let mut c = vec![0f32; n * n];
    gram_lower_accumulate(&mut c, &x, rows, n, 0.5);
    gram_lower_accumulate(&mut c, &x, rows, n, 0.25);
    for i in 0..n {
        for j in 0..n {
            let want: f64 = 0.75 * (0..rows).map(|t| x[t * n + i] as f64 * x[t * n + j] as f64).sum::<f64>();
            let got = gram_entry(&c, n, i, j) as f64;
            assert!((got - want).abs() < 1e-4 * (1.0 + want.abs()), "({i}, {j}): {got} vs {want}");
        }
    }
}

#[test]
fn lm_head_nll_matches_log_softmax_and_skips_ignored() {
    let (n, d, vocab) = (300, 16, 50); // more rows than one chunk
    let h = randn(&[n, d], 15);
    let w = randn(&[vocab, d], 16);
    let targets: Vec<i32> = (0..n).map(|i| if i % 5 == 0 { -100 } else { ((i * 31) % vocab) as i32 }).collect();
    let targets = Arc::new(targets);
    let tg = targets.clone();
    let reference = move |a: &[Tensor]| {
        let logits = a[0].matmul(&w.t().unwrap()).unwrap();
        let m = logits.max_keepdim(1).unwrap().detach();
        let lse = (logits.broadcast_sub(&m).unwrap().exp().unwrap().sum_keepdim(1).unwrap().log().unwrap() + &m).unwrap();
        let idx: Vec<u32> = tg.iter().map(|&t| t.max(0) as u32).collect();
        let idx = Tensor::from_vec(idx, (n, 1), &DEV).unwrap();
        let picked = logits.gather(&idx, 1).unwrap();
        let keep: Vec<f32> = tg.iter().map(|&t| if t < 0 { 0.0 } else { 1.0 }).collect();
        let keep = Tensor::from_vec(keep, (n, 1), &DEV).unwrap();
        ((lse - picked).unwrap() * keep).unwrap().squeeze(1).unwrap()
    };
    let w2 = randn(&[vocab, d], 16);
    let tg2 = targets.clone();
    let w2 = frozen(&w2);
    check(&[h.clone()], &move |a| kernels::lm_head_nll(&a[0], &w2, tg2.clone(), true).unwrap(), &reference, 1e-4);
    let w3 = frozen(&randn(&[vocab, d], 16));
    let nll = kernels::lm_head_nll(&h, &w3, targets, false).unwrap();
    assert_eq!(nll.i(0).unwrap().to_scalar::<f32>().unwrap(), 0.0, "ignored rows have zero loss");
    let bad = Arc::new(vec![vocab as i32; n]);
    assert!(kernels::lm_head_nll(&h, &w3, bad, false).is_err(), "out-of-vocab targets are refused");
}

/// ASFT's head: per row the NLL and the full-vocabulary `KL(p_ref ‖ p_θ)`, against the plain
/// composition of candle ops (values, gradients under a random mix of both columns, and finite
/// differences).
#[test]
fn lm_head_nll_kl_matches_the_explicit_divergence() {
    let (n, d, vocab) = (300, 16, 50);
    let h = randn(&[n, d], 25);
    let href = (&h + (randn(&[n, d], 26) * 0.3).unwrap()).unwrap();
    let w = randn(&[vocab, d], 27);
    let targets: Arc<Vec<i32>> = Arc::new((0..n).map(|i| if i % 7 == 3 { -100 } else { ((i * 13) % vocab) as i32 }).collect());
    let (tg, wr, hr) = (targets.clone(), w.clone(), href.clone());
    let reference = move |a: &[Tensor]| {
        let log_softmax = |l: &Tensor| {
            let m = l.max_keepdim(1).unwrap().detach();
            let lse = (l.broadcast_sub(&m).unwrap().exp().unwrap().sum_keepdim(1).unwrap().log().unwrap() + &m).unwrap();
            l.broadcast_sub(&lse).unwrap()
        };
        let lp = log_softmax(&a[0].matmul(&wr.t().unwrap()).unwrap());
        let lq = log_softmax(&hr.matmul(&wr.t().unwrap()).unwrap());
        let idx = Tensor::from_vec(tg.iter().map(|&t| t.max(0) as u32).collect::<Vec<_>>(), (n, 1), &DEV).unwrap();
        let keep = Tensor::from_vec(tg.iter().map(|&t| if t < 0 { 0f32 } else { 1.0 }).collect::<Vec<_>>(), (n, 1), &DEV).unwrap();
        let nll = lp.gather(&idx, 1).unwrap().neg().unwrap();
        let kl = (lq.exp().unwrap() * (&lq - &lp).unwrap()).unwrap().sum_keepdim(1).unwrap();
        (Tensor::cat(&[nll, kl], 1).unwrap().broadcast_mul(&keep)).unwrap()
    };
    let (w2, tg2, hr2) = (frozen(&w), targets.clone(), href.clone());
    check(&[h.clone()], &move |a| kernels::lm_head_nll_kl(&a[0], &hr2, &w2, tg2.clone(), true).unwrap(), &reference, 1e-4);
    // The model against itself: no divergence at all.
    let same = kernels::lm_head_nll_kl(&h, &h, &frozen(&w), targets, false).unwrap();
    let kl: Vec<f32> = same.i((.., 1)).unwrap().to_vec1().unwrap();
    assert!(kl.iter().all(|&v| v == 0.0), "KL of a model to itself: {:?}", kl.iter().fold(0f32, |a, v| a.max(v.abs())));
}

#[test]
fn dropout_mask_is_seeded_scaled_and_reused_by_the_backward() {
    let x = randn(&[64, 50], 17);
    let p = 0.25f32;
    let y = kernels::dropout(&x, p, 5).unwrap();
    let again = kernels::dropout(&x, p, 5).unwrap();
    let other = kernels::dropout(&x, p, 6).unwrap();
    let (xv, yv): (Vec<f32>, Vec<f32>) = (x.flatten_all().unwrap().to_vec1().unwrap(), y.flatten_all().unwrap().to_vec1().unwrap());
    assert_eq!(yv, again.flatten_all().unwrap().to_vec1::<f32>().unwrap(), "same seed, same mask");
    assert_ne!(yv, other.flatten_all().unwrap().to_vec1::<f32>().unwrap(), "another seed, another mask");
    let dropped = yv.iter().filter(|v| **v == 0.0).count() as f64 / yv.len() as f64;
    assert!((dropped - 0.25).abs() < 0.03, "dropped share {dropped}");
    for (a, b) in xv.iter().zip(&yv) {
        assert!(*b == 0.0 || (b - a / (1.0 - p)).abs() < 1e-6);
    }
    // The gradient is the same mask: d(sum(y ⊙ r))/dx = r ⊙ mask / (1 − p).
    let v = Var::from_tensor(&x).unwrap();
    let r = randn(&[64, 50], 18);
    let g = (kernels::dropout(v.as_tensor(), p, 5).unwrap() * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let gv: Vec<f32> = g.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let rv: Vec<f32> = r.flatten_all().unwrap().to_vec1().unwrap();
    for i in 0..gv.len() {
        let want = if yv[i] == 0.0 { 0.0 } else { rv[i] / (1.0 - p) };
        assert!((gv[i] - want).abs() < 1e-5, "element {i}: {} vs {want}", gv[i]);
    }
}

#[test]
fn lora_linear_matches_the_unfused_branch_with_and_without_dropout() {
    // Big enough (rows × features) that the GEMMs run multi-threaded.
    let (rows, d_in, d_out, r) = (40, 48, 36, 4);
    let x = randn(&[2, rows / 2, d_in], 19);
    let w = randn(&[d_out, d_in], 20);
    let a = randn(&[r, d_in], 21);
    let b = randn(&[d_out, r], 22);
    let s = 1.5f32;
    for p in [0.0f32, 0.3] {
        let (w1, w2) = (w.clone(), w.clone());
        let reference = move |t: &[Tensor]| {
            let xd = kernels::dropout(&t[0], p, 7).unwrap();
            let base = t[0].broadcast_matmul(&w1.t().unwrap()).unwrap();
            let branch = xd.broadcast_matmul(&t[1].t().unwrap()).unwrap().broadcast_matmul(&t[2].t().unwrap()).unwrap();
            (base + (branch * s as f64).unwrap()).unwrap()
        };
        check(
            &[x.clone(), a.clone(), b.clone()],
            &move |t| kernels::lora_linear(&t[0], &frozen(&w2), &t[1], &t[2], s, p, 7).unwrap(),
            &reference,
            1e-4,
        );
    }
}

/// RoSTE's fake quantisation is quantize → dequantize: per row, integer codes on a symmetric
/// `b`-bit grid scaled by the row's (clipped) largest magnitude, times the step; at most 2^b
/// values per row; idempotent without clipping. Its gradient passes straight through inside the
/// grid's range and stops at clipped entries.
#[test]
fn fake_quant_is_quantize_then_dequantize_with_a_straight_through_gradient() {
    use ferrotune::kernels::{fake_quant, QuantGrid};
    let x = randn(&[5, 33], 41);
    let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    for (bits, clip) in [(4, 1.0f32), (8, 1.0), (4, 0.6)] {
        let grid = QuantGrid { bits, clip_ratio: clip };
        let y: Vec<f32> = fake_quant(&x, grid).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let qmax = (1i64 << (bits - 1)) - 1;
        for (r, (row, yrow)) in xv.chunks(33).zip(y.chunks(33)).enumerate() {
            let max = row.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
            let step = max * clip as f64 / qmax as f64;
            let mut codes = std::collections::BTreeSet::new();
            for (&v, &q) in row.iter().zip(yrow) {
                let code = ((v as f64 / step).round() as i64).clamp(-qmax - 1, qmax);
                codes.insert(code);
                let want = code as f64 * step;
                assert!((q as f64 - want).abs() <= 1e-6 * max, "{bits} bits, row {r}: {v} → {q}, expected {want}");
            }
            assert!(codes.len() <= 1 << bits);
        }
        if clip == 1.0 {
            let again: Vec<f32> = fake_quant(&Tensor::from_vec(y.clone(), (5, 33), &DEV).unwrap(), grid).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(again, y, "quantising a quantised tensor changes it");
        }
        // The straight-through gradient: 1 inside the range, 0 where the value was clipped.
        let xvar = Var::from_tensor(&x).unwrap();
        let g = fake_quant(xvar.as_tensor(), grid).unwrap().sum_all().unwrap().backward().unwrap();
        let gx: Vec<f32> = g.get(xvar.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for (row, grow) in xv.chunks(33).zip(gx.chunks(33)) {
            let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let step = max * clip / qmax as f32;
            for (&v, &gv) in row.iter().zip(grow) {
                let inside = v >= -(qmax as f32 + 1.0) * step && v <= qmax as f32 * step;
                assert_eq!(gv, if inside { 1.0 } else { 0.0 }, "value {v}, step {step}");
            }
        }
        if clip < 1.0 {
            assert!(gx.contains(&0.0), "clipping at {clip} stops some gradients");
        }
    }
    assert!(fake_quant(&x, QuantGrid { bits: 1, clip_ratio: 1.0 }).is_err());
}

/// The block Hadamard rotation is orthonormal and its own inverse; for a power of two it is
/// Sylvester's Hadamard matrix over √n; rotating inputs and weights alike leaves `x·Wᵀ` as it
/// was (SmolLM2's 576 rotates in 9 blocks of 64).
#[test]
fn block_hadamard_rotation_is_orthonormal_and_leaves_products_unchanged() {
    use ferrotune::linalg::hadamard::{block_size, rotate_rows};
    assert_eq!((block_size(576), block_size(1536), block_size(64), block_size(7)), (64, 512, 64, 1));
    // n = 8: the rotation of the unit vectors is H₈/√8, H₈[i][j] = (−1)^popcount(i & j).
    let mut eye: Vec<f32> = (0..64).map(|i| (i / 8 == i % 8) as u8 as f32).collect();
    rotate_rows(&mut eye, 8);
    for i in 0..8usize {
        for j in 0..8usize {
            let want = if (i & j).count_ones().is_multiple_of(2) { 1.0 } else { -1.0 } / 8f32.sqrt();
            assert!((eye[i * 8 + j] - want).abs() < 1e-6);
        }
    }
    let n = 576;
    let x: Vec<f32> = randn(&[3, n], 51).flatten_all().unwrap().to_vec1().unwrap();
    let w: Vec<f32> = randn(&[4, n], 52).flatten_all().unwrap().to_vec1().unwrap();
    let (mut xr, mut wr) = (x.clone(), w.clone());
    rotate_rows(&mut xr, n);
    rotate_rows(&mut wr, n);
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(p, q)| (*p as f64) * (*q as f64)).sum::<f64>();
    for i in 0..3 {
        assert!((dot(&xr[i * n..(i + 1) * n], &xr[i * n..(i + 1) * n]) - dot(&x[i * n..(i + 1) * n], &x[i * n..(i + 1) * n])).abs() < 1e-3, "norms are kept");
        for o in 0..4 {
            let (a, b) = (dot(&xr[i * n..(i + 1) * n], &wr[o * n..(o + 1) * n]), dot(&x[i * n..(i + 1) * n], &w[o * n..(o + 1) * n]));
            assert!((a - b).abs() < 1e-3, "x·Wᵀ changed by the rotation: {a} vs {b}");
        }
    }
    rotate_rows(&mut xr, n);
    assert!(xr.iter().zip(&x).all(|(a, b)| (a - b).abs() < 1e-5), "the rotation is its own inverse");
}

/// The decoding product with a row length that is not a multiple of the 16 lanes and a row
/// count that is not a multiple of four: every tail is summed.
#[test]
fn skinny_products_handle_ragged_sizes() {
    for (m, inp) in [(1, 37), (6, 37), (7, 5), (32, 70)] {
        let out = 9;
        let w = randn(&[out, inp], 61);
        let x = randn(&[m, inp], 62);
        let fw = frozen(&w);
        let (wv, xv): (Vec<f32>, Vec<f32>) = (w.flatten_all().unwrap().to_vec1().unwrap(), x.flatten_all().unwrap().to_vec1().unwrap());
        let mut y = vec![1f32; m * out];
        fw.matmul_t(&xv, m, &mut y, true);
        for i in 0..m {
            for o in 0..out {
                let want = 1.0 + (0..inp).map(|k| xv[i * inp + k] as f64 * wv[o * inp + k] as f64).sum::<f64>();
                assert!((y[i * out + o] as f64 - want).abs() < 1e-4, "m {m}, in {inp}: [{i}, {o}] {} vs {want}", y[i * out + o]);
            }
        }
    }
}

/// SNELLA's fused distance kernel against its composition from candle ops (the spec's formula
/// written out, the softmax by hand): the same update, and the same gradients for the tables
/// and the three scalars, with and without sparsification.
#[test]
fn distance_kernel_matches_its_composition_and_gradients() {
    use candle_core::{DType, Device, Tensor, Var, D};
    let (heads, n, m, d) = (2usize, 7usize, 9usize, 3usize);
    let mut rng = ferrotune::rng::SplitMix64::new(31);
    let mut rand = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.next_f32() - 0.5).collect() };
    let p = Var::from_tensor(&Tensor::from_vec(rand(heads * n * d), (heads, n, d), &Device::Cpu).unwrap()).unwrap();
    let q = Var::from_tensor(&Tensor::from_vec(rand(heads * m * d), (heads, m, d), &Device::Cpu).unwrap()).unwrap();
    let s = Var::from_tensor(&Tensor::from_vec(vec![0.7f32, 1.3, 0.05], 3, &Device::Cpu).unwrap()).unwrap();
    let probe = Tensor::from_vec(rand(n * m), (n, m), &Device::Cpu).unwrap();
    let composed = |rho: f64| -> Tensor {
        let mut k: Option<Tensor> = None;
        for h in 0..heads {
            let (ph, qh) = (p.as_tensor().get(h).unwrap(), q.as_tensor().get(h).unwrap());
            let diff = ph.unsqueeze(1).unwrap().broadcast_sub(&qh.unsqueeze(0).unwrap()).unwrap();
            let dist = (diff.sqr().unwrap().sum(D::Minus1).unwrap() + 1e-12).unwrap().sqrt().unwrap();
            let c = if h % 2 == 0 { 0.1 } else { -0.1 };
            let term = (dist * c).unwrap();
            k = Some(match k { Some(a) => (a + term).unwrap(), None => term });
        }
        let k0 = k.unwrap();
        let (alpha, gamma, beta) = (s.as_tensor().get(0).unwrap(), s.as_tensor().get(1).unwrap(), s.as_tensor().get(2).unwrap());
        let z = k0.broadcast_div(&gamma).unwrap();
        let e = z.broadcast_sub(&z.max_keepdim(D::Minus1).unwrap().detach()).unwrap().exp().unwrap();
        let soft = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        let kk = (k0 + soft.broadcast_mul(&alpha).unwrap()).unwrap().broadcast_add(&beta).unwrap();
        let mag = kk.abs().unwrap().detach();
        let keep = if rho > 0.0 {
            let mut v: Vec<f32> = mag.flatten_all().unwrap().to_vec1().unwrap();
            let at = ((v.len() as f64 * rho).ceil() as usize).clamp(1, v.len()) - 1;
            let t = *v.select_nth_unstable_by(at, |a, b| a.total_cmp(b)).1;
            mag.gt(t as f64).unwrap().to_dtype(DType::F32).unwrap()
        } else {
            mag.ones_like().unwrap()
        };
        (kk * (mag * keep).unwrap()).unwrap()
    };
    for rho in [0.0, 0.3] {
        let fused = ferrotune::kernels::distance_kernel(p.as_tensor(), q.as_tensor(), s.as_tensor(), rho).unwrap();
        let reference = composed(rho);
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let (a, b): (Vec<f32>, Vec<f32>) = (a.flatten_all().unwrap().to_vec1().unwrap(), b.flatten_all().unwrap().to_vec1().unwrap());
            let err = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            let scale = b.iter().fold(0f32, |m, y| m.max(y.abs())).max(1e-3);
            assert!(err <= 1e-4 * scale.max(1.0), "ρ = {rho}: {what} off by {err} (scale {scale})");
        };
        close(&fused, &reference, "update");
        let zeros = fused.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().filter(|v| **v == 0.0).count();
        assert_eq!(zeros, ((n * m) as f64 * rho).ceil() as usize, "ρ = {rho}: zeroed entries");
        let g = (fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = (reference * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for (v, what) in [(&p, "P"), (&q, "Q"), (&s, "scalars")] {
            close(g.get(v.as_tensor()).unwrap(), g_ref.get(v.as_tensor()).unwrap(), what);
        }
    }
}
