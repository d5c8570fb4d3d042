//! Writing artefacts other tools load: PEFT adapters (see `methods::lora`), merged models.

pub mod merged;
