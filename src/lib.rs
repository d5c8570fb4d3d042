//! ferrotune: parameter-efficient fine-tuning of pre-trained models on CPU (and later GPU).
//! See `DESIGN.md` in the shared folder for the architecture; module layout follows it.

pub mod error;
pub mod io_util;
pub mod formats;
pub mod data;
pub mod kernels;
pub mod testutil;

pub use error::{Error, Result};
