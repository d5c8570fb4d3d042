//! GGUF reader, writer and block quantization (owned by the gguf helper; placeholder).
