//! Gradient clipping by global L2 norm (`torch.nn.utils.clip_grad_norm_`).

/// Returns the global norm before clipping; scales the gradients when it exceeds `max_norm`
/// (`max_norm <= 0` only measures).
pub fn clip_grad_norm(grads: &mut [Vec<f32>], max_norm: f64) -> f64 {
    let total: f64 = grads.iter().flat_map(|g| g.iter()).map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt();
    if max_norm > 0.0 {
        let coef = max_norm / (total + 1e-6);
        if coef < 1.0 {
            let coef = coef as f32;
            grads.iter_mut().flat_map(|g| g.iter_mut()).for_each(|x| *x *= coef);
        }
    }
    total
}
