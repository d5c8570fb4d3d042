//! Frozen linear layer `y = x · Wᵀ`: the backward returns the input gradient only. candle's
//! matmul would also form `dW = dyᵀ · x`, a weight-sized product nobody needs when W is frozen.

use super::{f32_slice, gemm::matmul_nn, gemm::matmul_nt, with_f32};
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

struct FrozenLinear;

impl CustomOp2 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        let (out_f, in_f) = l2.shape().dims2()?;
        let dims = l1.shape().dims();
        if dims.last() != Some(&in_f) {
            bail!("frozen-linear: input {:?} does not end in {in_f}", dims);
        }
        let rows = x.len() / in_f;
        let mut y = vec![0f32; rows * out_f];
        matmul_nt(&mut y, x, w, rows, in_f, out_f, false);
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().unwrap() = out_f;
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (out_f, in_f) = w.dims2()?;
        let rows = x.elem_count() / in_f;
        let dx = with_f32(dy, self.name(), |dy| {
            with_f32(w, self.name(), |w| {
                let mut dx = vec![0f32; rows * in_f];
                matmul_nn(&mut dx, dy, w, rows, out_f, in_f, false);
                Ok(dx)
            })
        })?;
        Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), None))
    }
}

/// `x · Wᵀ` for `x: [.., in]`, `W: [out, in]` (torch Linear layout). Gradients flow to `x` only.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, FrozenLinear)
}
