//! The machinery of sparse fine-tuning: masked AdamW against dense AdamW restricted to the
//! mask (also across a mask change), and the sparse diff artefact (round trip, application,
//! composition by addition).

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
