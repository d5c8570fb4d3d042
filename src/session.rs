//! A loaded model with its tokenizer and, optionally, an attached adapter: what `eval`,
//! `generate`, `merge` and `export` all start from.

use crate::data::TextTokenizer;
use crate::error::Result;
use crate::methods::Lora;
use crate::models::load::{self, ModelSource};
use crate::models::Llama;
use std::path::Path;

pub struct Session {
    pub source: ModelSource,
    pub model: Llama,
    pub tokenizer: TextTokenizer,
    pub lora: Option<Lora>,
}

impl Session {
    pub fn load(model_path: &Path, adapter: Option<&Path>) -> Result<Self> {
        let source = ModelSource::detect(model_path)?;
        let mut model = load::load_model(model_path)?;
        let tokenizer = load::load_tokenizer(model_path)?;
        let lora = adapter.map(|dir| Lora::load_peft(&mut model, dir)).transpose()?;
        Ok(Self { source, model, tokenizer, lora })
    }

    /// Folds the attached adapter into the base weights (no-op without one).
    pub fn merge_adapter(&mut self) -> Result<()> {
        if let Some(lora) = self.lora.take() {
            lora.merge_into(&mut self.model)?;
        }
        Ok(())
    }
}
