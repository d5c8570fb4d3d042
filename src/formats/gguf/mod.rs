//! GGUF: the llama.cpp model file format (reader, writer, block quantization).
//!
//! Spec: little-endian; magic "GGUF", version (u32, 2 or 3), tensor count (u64), metadata count
//! (u64), metadata key/value pairs, tensor infos, padding to `general.alignment` (default 32),
//! then the tensor data. Dimensions are stored innermost first (ggml's `ne[0]` is the row
//! length), so a `[out, in]` torch matrix is stored with dims `[in, out]`.

/// One metadata value. The enum mirrors GGUF's value types one to one so that a file read and
/// written back keeps every key exactly as it was.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}
