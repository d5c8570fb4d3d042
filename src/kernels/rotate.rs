//! The block Hadamard rotation of `linalg::hadamard` as a differentiable op on the last
//! dimension. The matrix is symmetric and orthonormal, so the backward is the same rotation.

use super::{f32_slice, with_f32};
use crate::linalg::hadamard::rotate_rows;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

struct Rotate;

impl CustomOp1 for Rotate {
    fn name(&self) -> &'static str {
        "hadamard-rotate"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = match l.dims().last() {
            Some(&n) if n > 0 => n,
            _ => bail!("hadamard-rotate: expected a non-empty last dimension, got {:?}", l.dims()),
        };
        let mut y = f32_slice(s, l, self.name())?.to_vec();
        rotate_rows(&mut y, n);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let n = *x.dims().last().unwrap_or(&1);
        let dx = with_f32(dy, self.name(), |g| {
            let mut d = g.to_vec();
            rotate_rows(&mut d, n);
            Ok(d)
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// `x·H` on the last dimension, `H` the orthonormal block Hadamard matrix of its size.
pub fn hadamard_rotate(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Rotate)
}
