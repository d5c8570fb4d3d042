use crate::config::TrainConfig;
use crate::data::render_for_inspection;
use crate::train::dataset::{encode_options, load_spec};

pub fn run(config: &std::path::Path, set: &[String], n: usize) -> anyhow::Result<()> {
    let cfg = TrainConfig::load(config, set)?;
    let tok = crate::models::load::load_tokenizer(&cfg.base_model)?;
    let opts = encode_options(&cfg);
    let mut shown = 0;
    for spec in &cfg.datasets {
        let data = load_spec(spec, &tok, &opts)?;
        let s = &data.stats;
        println!(
            "{}: {} records, {} examples, {} truncated, {} without targets, {} tokens ({} trained on)",
            spec.path.display(), s.records, s.examples, s.truncated, s.without_targets, s.tokens, s.targets
        );
        for e in data.examples.iter().take(n - shown) {
            println!("── example {} ──", shown + 1);
            println!("{}", render_for_inspection(&tok, e)?);
            shown += 1;
        }
        if shown >= n {
            break;
        }
    }
    Ok(())
}
