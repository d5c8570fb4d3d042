//! A frozen linear layer with a LoRA branch, as one op:
//! `y = x·W0ᵀ + s · (drop(x)·Aᵀ)·Bᵀ`.
//!
//! Built from candle ops the branch costs two transposes, four small matmuls on candle's
//! single-threaded element-wise path, a scaling, an add and, in the backward, a gradient
//! accumulation for `x` (which feeds both the base and the branch). Here every product is one
//! call into the multi-threaded GEMM, the scaling rides on the GEMM's `beta`, the branch is
//! added into the base output in place, and the backward writes `dx` once. The rank-r
//! intermediate `drop(x)·Aᵀ` is kept for the backward: `rows × r` values (64 KB for 1024 rows
//! at r = 16), where recomputing it cost a sixth of the branch's backward.

use super::dropout::apply_mask;
use super::frozen_weight::FrozenWeight;
use super::gemm::{matmul_nn, matmul_nn_scaled, matmul_nt, matmul_nt_scaled, matmul_strided, matmul_tn_scaled, View};
use super::{f32_slice, output_vec, with_f32};
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

struct LoraLinear {
    /// Frozen base weight `[out, in]`.
    w: FrozenWeight,
    scaling: f32,
    dropout: f32,
    seed: u64,
    /// `drop(x)·Aᵀ` as the forward computed it.
    h: std::sync::OnceLock<Vec<f32>>,
}

/// A LoRA branch on slices: `A: [r, in]`, `B: [out, r]`, its scaling, and its dropout (a
/// mask drawn from `seed`, as [`super::dropout`]; `0` disables it). The fused decoder block
/// runs its sites through these too.
pub(super) struct Branch<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub r: usize,
    pub scaling: f32,
    pub dropout: f32,
    pub seed: u64,
}

impl Branch<'_> {
    fn dropped<'x>(&self, x: &'x [f32]) -> std::borrow::Cow<'x, [f32]> {
        if self.dropout > 0.0 {
            apply_mask(x, self.dropout, self.seed).into()
        } else {
            x.into()
        }
    }

    /// `y = x·W0ᵀ + s·(drop(x)·Aᵀ)·Bᵀ` for `rows` rows of `x`, and the rank-r `drop(x)·Aᵀ`
    /// the backward needs.
    pub(super) fn forward(&self, w: &FrozenWeight, x: &[f32], rows: usize) -> (Vec<f32>, Vec<f32>) {
        let (out_f, in_f) = w.dims();
        let r = self.r;
        let xd = self.dropped(x);
        let mut h = output_vec(rows * r);
        matmul_nt(&mut h, &xd, self.a, rows, in_f, r, false);
        let mut y = output_vec(rows * out_f);
        w.matmul_t(x, rows, &mut y, false);
        matmul_nt_scaled(&mut y, &h, self.b, rows, r, out_f, true, self.scaling);
        (y, h)
    }

    /// `dx (+)= dy·W0 + drop'(s·dy·B·A)` from the forward's `x` and `h`; returns `(dA, dB)`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(&self, w: &FrozenWeight, x: &[f32], rows: usize, h: &[f32], dy: &[f32], dx: &mut [f32], accumulate: bool) -> (Vec<f32>, Vec<f32>) {
        let (out_f, in_f) = w.dims();
        let (r, s) = (self.r, self.scaling);
        let xd = self.dropped(x);
        // dB = s·dyᵀ·h
        let mut db = output_vec(out_f * r);
        matmul_tn_scaled(&mut db, dy, h, out_f, rows, r, false, s);
        // gh = s·dy·B, the gradient reaching the branch's rank-r activations
        let mut gh = output_vec(rows * r);
        matmul_nn_scaled(&mut gh, dy, self.b, rows, out_f, r, false, s);
        // dA = ghᵀ·drop(x), formed as its transpose drop(x)ᵀ·gh written into dA transposed:
        // the GEMM then tiles `in` rows instead of r = 16, where it had only its narrowest
        // kernel (a ninth of a bf16 training step went to that kernel).
        let mut da = output_vec(r * in_f);
        let da_t = View { offset: 0, row_stride: 1, col_stride: in_f };
        matmul_strided(&mut da, da_t, &xd, View::rows(0, in_f).t(), &gh, View::rows(0, r), in_f, rows, r, false, 1.0);
        // dx (+)= dy·W0 + drop'(gh·A)
        w.matmul(dy, rows, dx, accumulate);
        if self.dropout > 0.0 {
            let mut t = output_vec(rows * in_f);
            matmul_nn(&mut t, &gh, self.a, rows, r, in_f, false);
            let t = apply_mask(&t, self.dropout, self.seed);
            dx.iter_mut().zip(t).for_each(|(d, v)| *d += v);
        } else {
            matmul_nn_scaled(dx, &gh, self.a, rows, r, in_f, true, 1.0);
        }
        (da, db)
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sa: &CpuStorage, la: &Layout, sb: &CpuStorage, lb: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(sx, lx, self.name())?;
        let a = f32_slice(sa, la, self.name())?;
        let b = f32_slice(sb, lb, self.name())?;
        let (out_f, in_f) = self.w.dims();
        let (r, a_in) = la.shape().dims2()?;
        let (b_out, b_r) = lb.shape().dims2()?;
        let dims = lx.shape().dims();
        if dims.last() != Some(&in_f) || a_in != in_f || b_out != out_f || b_r != r {
            bail!("lora-linear: x {dims:?}, W [{out_f}, {in_f}], A {:?}, B {:?} do not fit", la.dims(), lb.dims());
        }
        let rows = x.len() / in_f.max(1);
        let (y, h) = self.branch(a, b, r).forward(&self.w, x, rows);
        let _ = self.h.set(h);
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().unwrap() = out_f;
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }

    fn bwd(&self, x_t: &Tensor, a_t: &Tensor, b_t: &Tensor, _res: &Tensor, dy_t: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let in_f = self.w.dims().1;
        let r = a_t.dim(0)?;
        let rows = x_t.elem_count() / in_f.max(1);
        let name = self.name();
        let (dx, da, db) = with_f32(x_t, name, |x| {
            with_f32(a_t, name, |a| {
                with_f32(b_t, name, |b| {
                    with_f32(dy_t, name, |dy| {
                        let Some(h) = self.h.get() else { bail!("lora-linear: backward before the forward") };
                        let mut dx = output_vec(rows * in_f);
                        let (da, db) = self.branch(a, b, r).backward(&self.w, x, rows, h, dy, &mut dx, false);
                        Ok((dx, da, db))
                    })
                })
            })
        })?;
        Ok((
            Some(Tensor::from_vec(dx, x_t.shape(), x_t.device())?),
            Some(Tensor::from_vec(da, a_t.shape(), a_t.device())?),
            Some(Tensor::from_vec(db, b_t.shape(), b_t.device())?),
        ))
    }
}

impl LoraLinear {
    fn branch<'a>(&self, a: &'a [f32], b: &'a [f32], r: usize) -> Branch<'a> {
        Branch { a, b, r, scaling: self.scaling, dropout: self.dropout, seed: self.seed }
    }
}

/// `x·Wᵀ + scaling · (dropout(x)·Aᵀ)·Bᵀ` for `x: [.., in]`, frozen `W: [out, in]`, `A: [r, in]`,
/// `B: [out, r]`. Gradients flow to `x`, `A` and `B`; the dropout mask is a function of
/// `seed` (as [`super::dropout`]), and `dropout = 0` disables it.
pub fn lora_linear(x: &Tensor, w: &FrozenWeight, a: &Tensor, b: &Tensor, scaling: f32, dropout: f32, seed: u64) -> Result<Tensor> {
    let op = LoraLinear { w: w.clone(), scaling, dropout, seed, h: std::sync::OnceLock::new() };
    x.contiguous()?.apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}
