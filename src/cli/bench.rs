use crate::bench::{random_model, run as run_bench, shape_config, BenchOptions};
use std::path::Path;

pub fn run(model: Option<&Path>, shape: Option<&str>, opts: &BenchOptions) -> anyhow::Result<()> {
    let env_model = std::env::var_os("PEERS_GGUF").map(std::path::PathBuf::from);
    let m = match (model, shape) {
        (Some(p), _) => crate::models::load::load_model(p)?,
        (None, Some(s)) => random_model(shape_config(s)?, 0)?,
        (None, None) => match env_model {
            Some(p) => crate::models::load::load_model(&p)?,
            None => anyhow::bail!("give --model PATH or --shape NAME (or set PEERS_GGUF)"),
        },
    };
    let report = run_bench(m, opts)?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
