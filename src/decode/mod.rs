//! Decoding: text generation from one model, or from several combined at decode time (EFT, CGE).

pub mod combine;
pub mod generate;
pub mod task;

pub use combine::{check_same_tokenizer, generate_combined, Combiner};
pub use generate::{generate, generate_batch, note_room, prompt_ids, stop_tokens, Completion, SamplingOptions, Stops, TextPieces};
