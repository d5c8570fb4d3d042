use crate::bench::{create_method, random_model, run as run_bench, shape_config, BenchOptions};
use crate::methods::{PlannedMemory, TargetModules};
use crate::models::load::{load_model_with, LoadOptions};
use crate::train::memory::{self, Footprint, StepShape};
use std::path::Path;

pub fn run(model: Option<&Path>, shape: Option<&str>, opts: &BenchOptions) -> anyhow::Result<()> {
    let load = match opts.dtype.as_str() {
        "f32" => LoadOptions::f32(),
        "bf16" => LoadOptions { keep_quantized: false, bf16: true },
        "gguf" => LoadOptions { keep_quantized: true, bf16: false },
        other => anyhow::bail!("--dtype `{other}`: expected f32, bf16 or gguf"),
    };
    if !["adamw", "mezo"].contains(&opts.optimizer.as_str()) {
        anyhow::bail!("--optimizer `{}`: expected adamw or mezo", opts.optimizer);
    }
    let env_model = std::env::var_os("PEERS_GGUF").map(std::path::PathBuf::from);
    // What the process holds before the model exists, as `ferrotune train` measures it.
    let process = memory::process_bytes();
    let (m, footprint) = match (model.map(Path::to_path_buf).or(if shape.is_none() { env_model } else { None }), shape) {
        (Some(p), _) => {
            let footprint = Footprint::of_model(&p, &load)?;
            (load_model_with(&p, &load)?, footprint)
        }
        (None, Some(s)) => {
            let cfg = shape_config(s)?;
            let mut m = random_model(cfg.clone(), 0)?;
            if load.bf16 {
                m.frozen_to_bf16()?;
            }
            (m, Footprint::of_random(cfg, load.bf16))
        }
        (None, None) => anyhow::bail!("give --model PATH or --shape NAME (or set PEERS_GGUF)"),
    };
    if let Some(new_tokens) = opts.decode {
        let mut m = m;
        // Decoding through a freshly attached adapter, as a run's rollouts do; kept alive to
        // the end.
        let _method = match opts.method.as_str() {
            "none" => None,
            name => {
                let mut method = create_method(name)?;
                if method.init_batches() > 0 {
                    anyhow::bail!("--decode --method {name}: this method initialises from data; time it with lora or none");
                }
                method.attach(&mut m)?;
                Some(method)
            }
        };
        println!("{}", serde_json::to_string(&crate::bench::run_decode(&m, opts.batch, opts.seq, new_tokens, &opts.dtype)?)?);
        return Ok(());
    }
    let mut report = run_bench(m, opts)?;
    // What the bench's method plans to hold, as `ferrotune train`'s check counts it.
    let planned = if opts.method == "none" {
        PlannedMemory::default()
    } else {
        // The bench's adapter: r = 16 on all seven projections.
        memory::method_plan(create_method(&opts.method)?.as_ref(), &footprint.config, &TargetModules::AllLinear, 16)?
    };
    let tokens = report.rows * opts.seq;
    let step = StepShape {
        train_tokens: if opts.forward_only { 0 } else { tokens },
        train_seq: opts.seq,
        eval_tokens: if opts.forward_only { tokens } else { 0 },
        eval_seq: opts.seq,
        checkpointing: opts.checkpointing,
        adapter_params: if opts.forward_only { 0 } else { planned.trainable_params },
        threads: rayon::current_num_threads(),
        method_floats_per_token: if opts.forward_only { 0 } else { planned.floats_per_token },
        fused_blocks: planned.fused_blocks && crate::kernels::decoder_block::enabled(),
    };
    let estimate = if opts.optimizer == "mezo" && !opts.forward_only {
        // Two forward passes, and the parameters' saved copy or a window of offloaded blocks.
        memory::zeroth_order_estimate(&footprint, &step, process, planned.trainable_params, opts.zo_offload.then_some(2))
    } else {
        let mut e = memory::estimate(&footprint, &step, process);
        if !opts.forward_only {
            e.add_method(&planned, &footprint.config, opts.checkpointing);
        }
        e
    };
    report.memory_estimate_mib = Some(estimate.total_mib());
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
