use crate::bench::{random_model, run as run_bench, shape_config, BenchOptions};
use crate::models::load::{load_model_with, LoadOptions};
use std::path::Path;

pub fn run(model: Option<&Path>, shape: Option<&str>, opts: &BenchOptions) -> anyhow::Result<()> {
    let load = match opts.dtype.as_str() {
        "f32" => LoadOptions::f32(),
        "bf16" => LoadOptions { keep_quantized: false, bf16: true },
        "gguf" => LoadOptions { keep_quantized: true, bf16: false },
        other => anyhow::bail!("--dtype `{other}`: expected f32, bf16 or gguf"),
    };
    let env_model = std::env::var_os("PEERS_GGUF").map(std::path::PathBuf::from);
    let m = match (model, shape) {
        (Some(p), _) => load_model_with(p, &load)?,
        (None, Some(s)) => {
            let mut m = random_model(shape_config(s)?, 0)?;
            if load.bf16 {
                m.frozen_to_bf16()?;
            }
            m
        }
        (None, None) => match env_model {
            Some(p) => load_model_with(&p, &load)?,
            None => anyhow::bail!("give --model PATH or --shape NAME (or set PEERS_GGUF)"),
        },
    };
    let report = run_bench(m, opts)?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
