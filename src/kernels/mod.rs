//! Fused CPU training kernels: candle `CustomOp`s with forward *and* backward written on raw
//! slices. candle's own fused ops (`softmax_last_dim`, `rms_norm`, `rope`) have no backward and
//! silently cut the gradient, and its matmul backward computes weight gradients even for frozen
//! weights; these kernels exist so that the training graph is both correct and lean.
//!
//! Every kernel has a finite-difference gradient test and a test against a plain composition
//! of candle ops (`tests/kernels.rs`).

mod attention;
pub mod bf16_gemm;
mod columns;
mod cross_entropy;
mod decode_attention;
pub mod decoder_block;
mod distance_kernel;
mod dropout;
mod fake_quant;
pub mod q8_dot;
mod frozen_weight;
pub mod gemm;
pub mod grad_sink;
mod linear;
mod lora_linear;
mod rmsnorm;
mod rope;
mod rotate;
mod skinny;
mod sparse_linear;
mod swiglu;
pub(crate) mod vexp;

pub use attention::{backward_share_floats as attention_backward_share_floats, causal_attention, packed_causal_attention, ROW_BLOCK as ATTENTION_ROW_BLOCK};
pub use columns::{scale_columns, scale_shift_columns};
pub use cross_entropy::{lm_head_argmax, lm_head_logits, lm_head_nll, lm_head_nll_kl, IGNORE_INDEX};
pub use decode_attention::{decode_attention, DecodeShape};
pub use distance_kernel::distance_kernel;
pub use dropout::dropout;
pub use fake_quant::{fake_quant, QuantGrid};
pub use frozen_weight::{FrozenWeight, RowPatch};
pub use linear::frozen_linear;
pub use lora_linear::lora_linear;
pub use q8_dot::with_int8_activations;
pub use rmsnorm::rms_norm;
pub use rope::{rope, rope_at, rope_positions, RopeTables};
pub use rotate::hadamard_rotate;
pub use sparse_linear::{sparse_linear, SparseChange};
pub use swiglu::swiglu;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Result, Storage, Tensor};

/// The contiguous f32 data an op received, or a clear error for anything else.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        other => bail!("{op}: expected f32 data, got {:?}", other.dtype()),
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: input must be contiguous"),
    }
}

/// Runs `f` on the contiguous f32 data of a tensor (used inside backward passes, where the
/// arguments arrive as tensors rather than storages).
pub(crate) fn with_f32<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cs) => f(f32_slice(cs, layout, op)?),
        _ => bail!("{op}: only the CPU backend is implemented"),
    }
}

/// Element types [`output_vec`] may hand out unwritten: plain numbers, every bit pattern valid.
pub(crate) trait PlainNumber: Copy {}
impl PlainNumber for f32 {}
impl PlainNumber for u16 {}

/// A buffer of `n` values for an output its caller writes whole before reading any of it (a
/// GEMM that does not accumulate, an element-wise map, a scatter covering every row). A
/// zeroed `vec!` here was written twice, and the first write, on the thread that runs the
/// graph while the workers wait, was 40% of that thread's time in a bf16 training step.
pub(crate) fn output_vec<T: PlainNumber>(n: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: the capacity is `n`; the element type has no invalid bit patterns, and the
    // callers (all in this module's kernels) overwrite every element before reading it.
    unsafe { v.set_len(n) };
    v
}

/// Number of worker threads the kernels split work over (rayon's pool, which
/// `RAYON_NUM_THREADS` or `--threads` sets).
pub(crate) fn threads() -> usize {
    rayon::current_num_threads().max(1)
}
