use std::time::Instant;
fn main() {
    ferrotune::runtime::init_threads(2);
    for (m, k, n) in [(1024, 1024, 1024), (1024, 576, 1536), (2048, 2048, 512), (1024,1536,576), (128, 576, 49152)] {
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; n * k];
        let mut c = vec![0f32; m * n];
        let mut v = vec![];
        for _ in 0..8 {
            let t0 = Instant::now();
            ferrotune::kernels::gemm::matmul_nt(&mut c, &a, &b, m, k, n, false);
            v.push((2.0 * (m * k * n) as f64 / t0.elapsed().as_secs_f64() / 1e9) as i64);
        }
        println!("{m}x{k}x{n}: {v:?}");
    }
}
