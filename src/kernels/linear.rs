//! Frozen linear layer `y = x · Wᵀ`: the backward returns the input gradient only. candle's
//! matmul would also form `dW = dyᵀ · x`, a weight-sized product nobody needs when W is frozen.

use super::frozen_weight::FrozenWeight;
use super::{f32_slice, with_f32};
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

struct FrozenLinear {
    w: FrozenWeight,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let (out_f, in_f) = self.w.dims();
        let dims = l1.shape().dims();
        if dims.last() != Some(&in_f) {
            bail!("frozen-linear: input {:?} does not end in {in_f}", dims);
        }
        let rows = x.len() / in_f;
        let mut y = super::output_vec(rows * out_f);
        self.w.matmul_t(x, rows, &mut y, false);
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().unwrap() = out_f;
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let in_f = self.w.dims().1;
        let rows = x.elem_count() / in_f;
        let dx = with_f32(dy, self.name(), |dy| {
            let mut dx = super::output_vec(rows * in_f);
            self.w.matmul(dy, rows, &mut dx, false);
            Ok(dx)
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// `x · Wᵀ` for `x: [.., in]` and a frozen `W: [out, in]` (torch Linear layout, any storage
/// type). Gradients flow to `x` only.
pub fn frozen_linear(x: &Tensor, w: &FrozenWeight) -> Result<Tensor> {
    x.contiguous()?.apply_op1(FrozenLinear { w: w.clone() })
}
