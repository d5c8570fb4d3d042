use crate::config::DatasetSpec;
use crate::data::EncodeOptions;
use crate::train::dataset::load_spec;
use crate::train::evaluate;
use std::path::Path;

pub fn run(model: &Path, adapter: Option<&Path>, data: &Path, format: &str, sequence_len: usize, batch_size: usize) -> anyhow::Result<()> {
    let session = crate::session::Session::load(model, adapter)?;
    let spec = DatasetSpec { path: data.to_path_buf(), format: format.to_string() };
    // `tokenizer(text)` semantics: nothing appended beyond what the tokenizer itself adds.
    let opts = EncodeOptions { train_on_inputs: false, add_eos: false, sequence_len };
    let data = load_spec(&spec, &session.tokenizer, &opts)?;
    if data.stats.without_targets > 0 {
        eprintln!("note: {} examples have no target token and were skipped", data.stats.without_targets);
    }
    let r = evaluate(&session.model, &data.examples, batch_size, session.tokenizer.pad_id())?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
