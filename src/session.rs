//! A loaded model with its tokenizer and, optionally, an attached adapter: what `eval`,
//! `generate`, `merge` and `export` all start from.

use crate::data::TextTokenizer;
use crate::error::Result;
use crate::methods::{registry, Method};
use crate::models::load::{self, ModelSource};
use crate::models::Llama;
use std::path::Path;

pub struct Session {
    pub source: ModelSource,
    pub model: Llama,
    pub tokenizer: TextTokenizer,
    /// The adapter attached, whichever method wrote it.
    pub method: Option<Box<dyn Method>>,
}

impl Session {
    pub fn load(model_path: &Path, adapter: Option<&Path>) -> Result<Self> {
        let source = ModelSource::detect(model_path)?;
        let mut model = load::load_model(model_path)?;
        let tokenizer = load::load_tokenizer(model_path)?;
        let method = adapter.map(|dir| registry::load(&mut model, dir)).transpose()?;
        Ok(Self { source, model, tokenizer, method })
    }

    /// Folds the attached adapter into the base weights (no-op without one).
    pub fn merge_adapter(&mut self) -> Result<()> {
        if let Some(method) = self.method.take() {
            method.merge(&mut self.model)?;
        }
        Ok(())
    }
}
