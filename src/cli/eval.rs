use crate::config::DatasetSpec;
use crate::data::EncodeOptions;
use crate::train::dataset::load_spec;
use crate::train::evaluate;
use std::path::Path;

pub fn run(model: &Path, adapter: Option<&Path>, data: &Path, format: &str, sequence_len: usize, batch_size: usize) -> anyhow::Result<()> {
    let data_path = data;
    if sequence_len == 0 || batch_size == 0 {
        anyhow::bail!("--sequence-len and --batch-size must be at least 1");
    }
    let session = crate::session::Session::load(model, adapter)?;
    let spec = DatasetSpec { path: data.to_path_buf(), format: format.to_string() };
    // `tokenizer(text)` semantics: nothing appended beyond what the tokenizer itself adds.
    let opts = EncodeOptions { train_on_inputs: false, add_eos: false, sequence_len };
    let data = load_spec(&spec, &session.tokenizer, &opts)?;
    if data.stats.without_targets > 0 {
        eprintln!("note: {} examples have no target token and were skipped", data.stats.without_targets);
    }
    if data.examples.is_empty() {
        anyhow::bail!(
            "{}: no example has a target token to score ({} records; {} without a target after truncation to --sequence-len {sequence_len})",
            data_path.display(),
            data.stats.records,
            data.stats.without_targets
        );
    }
    let r = evaluate(&session.model, &data.examples, batch_size, session.tokenizer.pad_id())?;
    if !r.loss.is_finite() {
        anyhow::bail!(
            "the loss over {} is {} ({} target tokens): the model{} produces non-finite logits",
            data_path.display(),
            r.loss,
            r.tokens,
            if adapter.is_some() { " with this adapter" } else { "" }
        );
    }
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
