//! Gradients that fused ops hand past candle's autograd. An op has at most three tensor inputs
//! there, and candle accumulates every input's gradient by zero-filling a buffer and adding
//! into it, on the thread that runs the graph while the workers wait. The fused decoder
//! sublayers ([`super::decoder_block`]) therefore take only the residual stream as their
//! input and deliver their LoRA factors' gradients here, keyed by the factors' tensor ids;
//! [`collecting`] opens a sink around a forward and backward and returns what arrived.
//!
//! The sink is per thread: candle runs an op's forward and backward on the thread that
//! called them. Ops only fuse when a sink is open ([`is_open`]), so a backward run by code
//! that does not collect (GreenTrainer's importance pass, SPT's scoring) never loses a
//! gradient: it gets the unfused graph.

use candle_core::{bail, Result, TensorId};
use std::cell::RefCell;

/// Delivered gradients: each parameter's id with its gradient, flattened.
pub type Delivered = Vec<(TensorId, Vec<f32>)>;

thread_local! {
    static SINK: RefCell<Option<Delivered>> = const { RefCell::new(None) };
}

/// Runs `f` with a sink open on this thread and returns its result with every gradient
/// delivered meanwhile. Nested calls each collect their own.
pub fn collecting<R>(f: impl FnOnce() -> R) -> (R, Delivered) {
    struct Restore(Option<Delivered>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            SINK.with(|s| *s.borrow_mut() = previous);
        }
    }
    let restore = Restore(SINK.with(|s| s.borrow_mut().replace(Vec::new())));
    let out = f();
    let got = SINK.with(|s| s.borrow_mut().take()).unwrap_or_default();
    drop(restore);
    (out, got)
}

/// Whether a sink is open on this thread.
pub fn is_open() -> bool {
    SINK.with(|s| s.borrow().is_some())
}

/// Hands `grad` for the tensor `id` to the open sink.
pub(super) fn deliver(id: TensorId, grad: Vec<f32>) -> Result<()> {
    SINK.with(|s| match s.borrow_mut().as_mut() {
        Some(sink) => {
            sink.push((id, grad));
            Ok(())
        }
        None => bail!("a fused op's backward ran with no gradient sink open: its parameters' gradients would be lost"),
    })
}
