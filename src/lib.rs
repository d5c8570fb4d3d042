//! ferrotune: parameter-efficient fine-tuning of pre-trained models on CPU (and later GPU).
//! See `DESIGN.md` in the shared folder for the architecture; module layout follows it.

pub mod error;
pub mod fuzz;
pub mod io_util;
pub mod formats;
pub mod analysis;
pub mod bench;
pub mod cli;
pub mod config;
pub mod console;
pub mod data;
pub mod decode;
pub mod export;
pub mod failpoint;
pub mod kernels;
pub mod linalg;
pub mod testutil;
pub mod methods;
pub mod models;
pub mod objectives;
pub mod optim;
pub mod plan_keys;
pub mod plot;
pub mod posthoc;
pub mod rng;
pub mod runtime;
pub mod session;
pub mod train;

pub use error::{Error, Result};
