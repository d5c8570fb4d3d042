//! Writing artefacts other tools load: PEFT adapters (see `methods::lora`), merged models
//! (Hugging Face directories, GGUF) and llama.cpp LoRA GGUFs.

pub mod gguf;
pub mod merged;

/// What `ferrotune export --format` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// The PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`).
    Peft,
    /// A Hugging Face model directory with the adapter merged.
    MergedSafetensors,
    /// A GGUF model file with the adapter merged, matrices re-quantized.
    MergedGguf,
    /// A llama.cpp LoRA adapter GGUF.
    GgufLora,
}

impl ExportFormat {
    pub const ALL: [ExportFormat; 4] = [Self::Peft, Self::MergedSafetensors, Self::MergedGguf, Self::GgufLora];

    pub fn name(self) -> &'static str {
        match self {
            Self::Peft => "peft",
            Self::MergedSafetensors => "merged-safetensors",
            Self::MergedGguf => "merged-gguf",
            Self::GgufLora => "gguf-lora",
        }
    }

    pub fn parse(s: &str) -> crate::Result<Self> {
        Self::ALL.into_iter().find(|f| f.name() == s.trim()).ok_or_else(|| {
            let all: Vec<&str> = Self::ALL.iter().map(|f| f.name()).collect();
            crate::Error::flag("--format", format!("unknown format `{s}` (expected one of: {})", all.join(", ")))
        })
    }
}
