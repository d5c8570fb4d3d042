//! The command line: `ferrotune train|eval|generate|merge|export|inspect-data|methods|bench`.

mod analyze;
mod bench;
mod combine;
mod eval;
mod export;
mod generate;
mod inspect;
mod merge;
mod train;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(name = "ferrotune", version, about = "Parameter-efficient fine-tuning of pre-trained models")]
pub struct Cli {
    /// Worker threads (0 = one per core).
    #[arg(long, global = true, default_value_t = 0)]
    pub threads: usize,
    /// Say nothing on stderr but warnings and errors (results still go to stdout).
    #[arg(long, short, global = true, conflicts_with = "json_logs")]
    pub quiet: bool,
    /// Write every note, warning, progress line, training step and evaluation to stderr as one
    /// JSON object per line (`{"event": "step", …}`), for scripts; results still go to stdout.
    #[arg(long, global = true)]
    pub json_logs: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Analysis {
    /// TuCo: the share of each prompt's last-token representation that fine-tuning contributes,
    /// per layer, with optional steering κ; writes tuco.json and tuco.png into --out.
    Tuco {
        /// The pre-trained model.
        #[arg(long)]
        model: PathBuf,
        /// The fine-tune as an adapter of --model …
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// … or as a whole fine-tuned model (HF folder or GGUF).
        #[arg(long)]
        finetuned: Option<PathBuf>,
        /// A prompt (repeatable).
        #[arg(long)]
        prompt: Vec<String>,
        /// Prompts from a JSONL file (each line's `prompt`, `question`, `instruction` or `text`).
        #[arg(long)]
        prompts: Option<PathBuf>,
        /// Wrap each prompt in the model's chat template as a user turn.
        #[arg(long)]
        chat: bool,
        /// Steering: the fine-tuning's contribution is multiplied by κ in the forward pass.
        #[arg(long, default_value_t = 1.0)]
        kappa: f64,
        /// Output folder for tuco.json and tuco.png.
        #[arg(long)]
        out: PathBuf,
    },
    /// Intruder dimensions: per changed module, the top-k singular vectors of the fine-tuned
    /// weight that resemble none of the base's, counted for ε = 0.1 … 0.9; writes
    /// intruders.json and two PNGs into --out.
    Intruders {
        /// The pre-trained model.
        #[arg(long)]
        model: PathBuf,
        /// The fine-tune as an adapter of --model (any method that merges) …
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// … or as a whole fine-tuned model.
        #[arg(long)]
        finetuned: Option<PathBuf>,
        /// How many leading singular vectors of each fine-tuned weight are examined.
        #[arg(long, default_value_t = 10)]
        top_k: usize,
        /// Output folder for intruders.json and its two PNGs.
        #[arg(long)]
        out: PathBuf,
    },
    /// Forgetting probe: the loss of --model and of the fine-tune on texts the fine-tune was not
    /// about (general text; the task in a conjugate form, such as translated), file by file, with
    /// the examples that got most worse; writes forgetting.json and forgetting.png into --out.
    Forgetting {
        /// The pre-trained model.
        #[arg(long)]
        model: PathBuf,
        /// The fine-tune as an adapter of --model (any method) …
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// … or as a whole fine-tuned model.
        #[arg(long)]
        finetuned: Option<PathBuf>,
        /// A JSONL file to score (repeatable): any format `eval` reads.
        #[arg(long, required = true)]
        data: Vec<PathBuf>,
        /// Data format: auto, text, completion, chat, alpaca.
        #[arg(long, default_value = "auto")]
        format: String,
        /// Truncate each example to this many tokens.
        #[arg(long, default_value_t = 1024)]
        sequence_len: usize,
        /// Examples per forward pass.
        #[arg(long, default_value_t = 4)]
        batch_size: usize,
        /// Score only the first N examples of each file.
        #[arg(long)]
        limit: Option<usize>,
        /// Output folder for forgetting.json and forgetting.png.
        #[arg(long)]
        out: PathBuf,
    },
    /// What a fine-tune changed in each linear module: ‖ΔW‖ (absolute and relative), spectral
    /// norm, stable and effective rank, the leading singular values; writes report.json,
    /// norms_by_layer.png and spectra.png into --out.
    Report {
        /// The pre-trained model.
        #[arg(long)]
        model: PathBuf,
        /// The fine-tune as an adapter of --model (any method that merges) …
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// … or as a whole fine-tuned model.
        #[arg(long)]
        finetuned: Option<PathBuf>,
        /// Output folder for report.json, norms_by_layer.png and spectra.png.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum Command {
    /// Fine-tune a model as a TOML run plan describes.
    Train {
        /// The run plan, a TOML file (see the README's config keys).
        config: PathBuf,
        /// Override a config key, e.g. `--set learning_rate=1e-4` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Continue the run in output_dir from its newest checkpoint (the plan must be the run's).
        #[arg(long)]
        resume: bool,
        /// Start again in an output_dir that holds an earlier run: its checkpoints, metrics,
        /// run.json and adapter files are removed (other files there are kept).
        #[arg(long)]
        overwrite: bool,
        /// Train even when the memory estimate exceeds the available memory.
        #[arg(long)]
        force: bool,
    },
    /// Mean NLL over the target tokens of a JSONL file; the last stdout line is JSON.
    Eval {
        /// Hugging Face model directory or .gguf file.
        #[arg(long, required_unless_present = "run", conflicts_with = "run")]
        model: Option<PathBuf>,
        /// Adapter directory (PEFT's or any ferrotune method's); with --run, instead of the run's own.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// JSONL file to score. Plain `eval` encodes it as `tokenizer(text)` does: no EOS added,
        /// truncated at --sequence-len.
        #[arg(long, required_unless_present = "run", conflicts_with = "run")]
        data: Option<PathBuf>,
        /// A training run's output_dir: score its validation set exactly as the run did (its
        /// plan's base model, tokenization, add_eos, sequence_len, batch size and objective) with
        /// its adapter, reproducing the run's reported eval loss.
        #[arg(long)]
        run: Option<PathBuf>,
        /// With --run: score the base model without the adapter (the run's eval loss before training).
        #[arg(long, requires = "run")]
        base_only: bool,
        /// Record format: auto, text, completion, chat, alpaca, preference.
        #[arg(long, default_value = "auto")]
        format: String,
        /// Truncate each example to this many tokens.
        #[arg(long, default_value_t = 2048)]
        sequence_len: usize,
        /// Examples per forward pass (and prompts decoded together with --task).
        #[arg(long, default_value_t = 4)]
        batch_size: usize,
        /// `sft` (the mean token NLL) or `dpo` (preference pairs scored against the model with
        /// the adapter switched off: DPO loss, implicit-reward accuracy and margin).
        #[arg(long, default_value = "sft")]
        objective: String,
        /// DPO's β for `--objective dpo`.
        #[arg(long, default_value_t = 0.1)]
        dpo_beta: f64,
        /// Score generations instead of the loss: each example's prompt is continued greedily
        /// and compared with its reference completion. `gsm8k` (the number after `####`),
        /// `exact-match`, `contains`, or `regex` (with --pattern). Prints the accuracy.
        #[arg(long)]
        task: Option<String>,
        /// The pattern of `--task regex`: its first capture group (or whole match) must agree.
        #[arg(long)]
        pattern: Option<String>,
        /// Longest generation per example for `--task`.
        #[arg(long, default_value_t = 256)]
        max_new_tokens: usize,
        /// Score only the first N examples.
        #[arg(long)]
        limit: Option<usize>,
        /// Write every prompt, generation, reference and verdict of `--task` to this JSONL file.
        #[arg(long)]
        predictions: Option<PathBuf>,
        /// Run the model as its quantised form would, with the quantisation plan (`roste.json`)
        /// of a RoSTE adapter or of a model merged from one.
        #[arg(long)]
        fake_quant: bool,
    },
    /// Continue a prompt (greedy unless --temperature is set); with --tuned, from several models combined (EFT, CGE).
    Generate {
        /// Hugging Face model directory or .gguf file (with --tuned: the large, pre-training-scale base; with --cge: the pre-trained model).
        #[arg(long)]
        model: PathBuf,
        /// Adapter directory attached to --model.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// The text to continue (with --chat: the user's message).
        #[arg(long, required_unless_present = "data", conflicts_with = "data")]
        prompt: Option<String>,
        /// Many prompts: a JSONL file (each line's `prompt`, `question`, `instruction` or `text`),
        /// decoded --batch-size at a time; the completions go to --out.
        #[arg(long, requires = "out")]
        data: Option<PathBuf>,
        /// With --data: the JSONL file of results (prompt, sample, completion, tokens, stopped).
        #[arg(long, requires = "data")]
        out: Option<PathBuf>,
        /// With --data: prompts decoded together.
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Completions per prompt (each with its own random stream; use --temperature above 0).
        #[arg(long, default_value_t = 1)]
        num_return_sequences: usize,
        /// Wrap the prompt as a user message with the model's chat template.
        #[arg(long)]
        chat: bool,
        /// Most tokens to generate (fewer when an end-of-sequence token or the context ends it).
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// Sampling temperature; 0 decodes greedily.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        /// Nucleus sampling: draw from the smallest set of tokens holding this probability (1 keeps all; needs --temperature above 0).
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        /// Top-k sampling: draw only from the k most probable tokens, before --top-p (0 keeps all; needs --temperature above 0).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// A completion ends when its text comes to contain this string, which is cut off (repeat for several).
        #[arg(long)]
        stop: Vec<String>,
        /// Seed of the sampling draws.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Decode-time combination (EFT, METHODS.md §7.1): a fine-tuned model whose change is
        /// added to --model's log-probabilities. A model (directory or .gguf), or an adapter
        /// folder of --small-base. Repeat for several (β-weighted) fine-tunes.
        #[arg(long)]
        tuned: Vec<PathBuf>,
        /// EFT's fine-tuning-scale base, the model --tuned was fine-tuned from (default: --model).
        /// Up-scaling: a small base here and a large base as --model.
        #[arg(long)]
        small_base: Option<PathBuf>,
        /// EFT's weight of each fine-tune's log-probability change: one for all, or one per --tuned
        /// (default 1).
        #[arg(long, allow_negative_numbers = true)]
        beta: Vec<f64>,
        /// Contrastive generation (CGE, METHODS.md §7.2): draw from log π_tuned − γ·log π_model over
        /// the tokens the fine-tune finds plausible, to show what fine-tuning taught.
        #[arg(long)]
        cge: bool,
        /// CGE's γ, the weight of --model's log-probabilities (default 1).
        #[arg(long)]
        cge_gamma: Option<f64>,
        /// CGE's plausibility ratio α: tokens with π_tuned < α·max π_tuned are never drawn (default 0.1).
        #[arg(long)]
        cge_alpha: Option<f64>,
    },
    /// Fold an adapter into the base weights and write a Hugging Face model directory.
    Merge {
        /// The base model: Hugging Face model directory or .gguf file.
        #[arg(long)]
        model: PathBuf,
        /// The adapter directory to fold into it (any method that merges).
        #[arg(long)]
        adapter: PathBuf,
        /// Output folder for the merged Hugging Face model (config, tokenizer, safetensors).
        #[arg(long)]
        out: PathBuf,
        /// Storage dtype of the merged weights: f32, bf16, f16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Write into an existing, non-empty --out folder, replacing only the merged model's
        /// own files (config, weights, tokenizer); other files there are kept.
        #[arg(long)]
        overwrite: bool,
    },
    /// Write an adapter for other tools: peft, merged-safetensors, merged-gguf, gguf-lora.
    Export {
        /// The base model the adapter was trained on: Hugging Face model directory or .gguf file.
        #[arg(long)]
        model: PathBuf,
        /// The adapter directory to export.
        #[arg(long)]
        adapter: PathBuf,
        /// peft, merged-safetensors, merged-gguf or gguf-lora.
        #[arg(long)]
        format: String,
        /// Output directory (peft, merged-safetensors) or .gguf file.
        #[arg(long)]
        out: PathBuf,
        /// merged-safetensors: f32, bf16, f16 (default f32); gguf-lora: f32, f16, bf16 (default f32).
        #[arg(long)]
        dtype: Option<String>,
        /// merged-gguf: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k (default q8_0).
        #[arg(long)]
        quant: Option<String>,
        /// Replace an existing --out file, or write into an existing, non-empty --out folder
        /// (only the export's own files are replaced; other files there are kept).
        #[arg(long)]
        overwrite: bool,
    },
    /// Merge several fine-tunes of one base by their task vectors (task arithmetic, TIES,
    /// LiNeS) into one model, or rewrite one LoRA adapter without its intruder dimensions.
    Combine {
        /// The base model the fine-tunes share (HF folder or GGUF).
        #[arg(long)]
        model: PathBuf,
        /// The fine-tunes, comma-separated: adapter folders (any method that merges) or whole
        /// models with the base's tensors.
        #[arg(long, value_delimiter = ',', required = true)]
        inputs: Vec<PathBuf>,
        /// One weight per input, comma-separated (default 1 each).
        #[arg(long, value_delimiter = ',')]
        weights: Option<Vec<f64>>,
        /// task_arithmetic (Σ w·τ), ties (trim, elect sign, disjoint mean), lines (LiNeS),
        /// intruders (one LoRA adapter without its intruder dimensions), or graft (the few
        /// entries of one fine-tune that carry its skill, found on --data).
        #[arg(long)]
        method: String,
        /// TIES: the share of each task vector's entries kept, by magnitude, tensor by tensor
        /// (default 0.2).
        #[arg(long)]
        density: Option<f64>,
        /// LiNeS on one fine-tune: λ (α = λ, β = 1 − λ).
        #[arg(long)]
        lambda: Option<f64>,
        /// LiNeS on several fine-tunes: β (α comes from the task vectors' norms).
        #[arg(long)]
        beta: Option<f64>,
        /// LiNeS on several fine-tunes: how they are merged before scaling: task_arithmetic
        /// (default) or ties.
        #[arg(long)]
        lines_merge: Option<String>,
        /// intruders: how many leading singular vectors of W0 + ΔW are examined (10).
        #[arg(long)]
        top_k: Option<usize>,
        /// intruders: a vector whose best |cosine| with the base's is below this is an
        /// intruder (0.5).
        #[arg(long)]
        threshold_epsilon: Option<f64>,
        /// intruders: the factor intruder components are scaled by (0.75).
        #[arg(long)]
        mitigation_lambda: Option<f64>,
        /// merged-safetensors or merged-gguf; peft for intruders and for task_arithmetic of
        /// LoRA adapters; sparse (an adapter folder holding a sparse diff) for graft.
        #[arg(long)]
        format: String,
        /// Output directory (merged-safetensors, peft) or .gguf file.
        #[arg(long)]
        out: PathBuf,
        /// merged-safetensors: f32, bf16, f16 (default f32).
        #[arg(long)]
        dtype: Option<String>,
        /// merged-gguf: f32, f16, bf16, q8_0, q4_0, … (default q8_0).
        #[arg(long)]
        quant: Option<String>,
        /// Replace an existing --out file, or write into an existing --out folder.
        #[arg(long)]
        overwrite: bool,
        #[command(flatten)]
        graft: combine::GraftFlags,
    },
    /// What fine-tuning changed: `tuco` (the tuning contribution per prompt and layer),
    /// `intruders` (new singular directions per module), `forgetting` (loss on other texts before
    /// and after), `report` (norms, ranks and spectra of each module's weight change).
    Analyze {
        #[command(subcommand)]
        what: Analysis,
    },
    /// Logits of every position of given token ids, as JSON (for checks against other runtimes).
    #[command(hide = true)]
    Logits {
        /// Hugging Face model directory or .gguf file.
        #[arg(long)]
        model: PathBuf,
        /// Adapter directory attached to --model.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Comma-separated token ids.
        #[arg(long, required_unless_present = "text", conflicts_with = "text")]
        ids: Option<String>,
        /// Text to tokenize with the model's tokenizer (special tokens added as `encode` adds them).
        #[arg(long)]
        text: Option<String>,
        /// Output JSON file: the ids and the logits of every position.
        #[arg(long)]
        out: PathBuf,
    },
    /// Time training steps (or forward passes, or decoding) of a method on a fixed batch (4×256 by default); prints JSON.
    Bench {
        /// Hugging Face model directory or .gguf file to time (or give --shape).
        #[arg(long)]
        model: Option<PathBuf>,
        /// A random model of a known architecture instead (smollm2-135m).
        #[arg(long)]
        shape: Option<String>,
        /// Rows per step.
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Tokens per row.
        #[arg(long, default_value_t = 256)]
        seq: usize,
        /// Untimed steps first.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Timed steps (the report gives their mean).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Time forward passes only (evaluation throughput).
        #[arg(long)]
        forward_only: bool,
        /// Per-block activation checkpointing (recompute in the backward).
        #[arg(long)]
        checkpointing: bool,
        /// Base weights: f32 (dequantized), bf16 (stored bf16, f32 accumulation) or gguf (the
        /// GGUF's own quantized blocks, dequantized tile by tile).
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// What to attach, r=16, α=32 on all seven projections: a method's name (see `ferrotune
        /// methods`), rslora, or none (the bare base model, forward-only). Default: lora when
        /// training, none with --forward-only.
        #[arg(long)]
        method: Option<String>,
        /// The training objective: sft, or dpo (the batch's rows as the chosen sides of as many
        /// preference pairs, each with its own rejected row; reference log-probabilities
        /// computed before timing, as the trainer caches them).
        #[arg(long, default_value = "sft")]
        objective: String,
        /// The update: adamw, or mezo (zeroth-order: two forward passes per step along a seeded
        /// direction, ε = 1e-3, one direction; no backward, no moments).
        #[arg(long, default_value = "adamw")]
        optimizer: String,
        /// With --optimizer mezo --method full: ZO2-style offloading, the trained matrices in a
        /// scratch file (in the temp folder) streamed through memory two blocks at a time.
        #[arg(long)]
        zo_offload: bool,
        /// Time batched generation instead: --batch rows, each a random prompt of --seq tokens,
        /// this many new tokens each (greedy, no adapter unless --method). `--generate` is the
        /// same flag.
        #[arg(long, value_name = "NEW_TOKENS", alias = "generate")]
        decode: Option<usize>,
    },
    /// List the fine-tuning methods (`adapter = "<name>"`), with their own config keys.
    Methods {
        /// Only the names, one per line.
        #[arg(long)]
        names: bool,
    },
    /// Show how a run plan's data is tokenized, with non-target tokens marked.
    InspectData {
        /// The run plan, a TOML file.
        config: PathBuf,
        /// Override a config key, e.g. `--set sequence_len=512` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// How many examples to show.
        #[arg(short, long, default_value_t = 3)]
        n: usize,
    },
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    crate::console::set_mode(match (cli.quiet, cli.json_logs) {
        (true, _) => crate::console::Mode::Quiet,
        (_, true) => crate::console::Mode::Json,
        _ => crate::console::Mode::Normal,
    });
    crate::runtime::init_threads(cli.threads);
    match cli.command {
        Command::Train { config, set, resume, overwrite, force } => train::run(&config, &set, resume, overwrite, force),
        Command::Eval { model, adapter, data, run, base_only, format, sequence_len, batch_size, objective, dpo_beta, task, pattern, max_new_tokens, limit, predictions, fake_quant } => {
            if let Some(dir) = run {
                return eval::run_as_trained(&dir, adapter.as_deref(), base_only);
            }
            let (Some(model), Some(data)) = (model, data) else { anyhow::bail!("eval: give --model and --data, or --run OUTPUT_DIR") };
            let task = task.map(|name| eval::TaskArgs { name, pattern, max_new_tokens, predictions });
            let opts = eval::EvalOptions { format: &format, sequence_len, batch_size, objective: &objective, dpo_beta, task: task.as_ref(), limit, fake_quant };
            eval::run(&model, adapter.as_deref(), &data, &opts)
        }
        Command::Generate { model, adapter, prompt, data, out, batch_size, num_return_sequences, chat, max_new_tokens, temperature, top_p, top_k, stop, seed, tuned, small_base, beta, cge, cge_gamma, cge_alpha } => {
            let opts = crate::decode::SamplingOptions { max_new_tokens, temperature, top_p, top_k, stop_strings: stop, seed };
            let combo = generate::Combination { tuned, small_base, beta, cge, cge_gamma, cge_alpha };
            let prompts = match (prompt, data, out) {
                (Some(p), None, None) => generate::Prompts::One(p),
                (None, Some(data), Some(out)) => generate::Prompts::File { data, out, batch_size },
                _ => bail!("generate: give --prompt TEXT, or --data FILE.jsonl with --out FILE.jsonl"),
            };
            generate::run(&model, adapter.as_deref(), &prompts, chat, num_return_sequences, &opts, &combo)
        }
        Command::Merge { model, adapter, out, dtype, overwrite } => merge::run(&model, &adapter, &out, &dtype, overwrite),
        Command::Combine { model, inputs, weights, method, density, lambda, beta, lines_merge, top_k, threshold_epsilon, mitigation_lambda, format, out, dtype, quant, overwrite, graft } => combine::run(&combine::CombineArgs {
            model: &model,
            inputs: &inputs,
            weights: weights.as_deref(),
            method: &method,
            density,
            lambda,
            beta,
            lines_merge: lines_merge.as_deref(),
            top_k,
            threshold_epsilon,
            mitigation_lambda,
            format: &format,
            out: &out,
            dtype: dtype.as_deref(),
            quant: quant.as_deref(),
            overwrite,
            graft: &graft,
        }),
        Command::Analyze { what: Analysis::Intruders { model, adapter, finetuned, top_k, out } } => {
            analyze::run_intruders(&analyze::IntruderArgs { model: &model, adapter: adapter.as_deref(), finetuned: finetuned.as_deref(), top_k, out: &out })
        }
        Command::Analyze { what: Analysis::Forgetting { model, adapter, finetuned, data, format, sequence_len, batch_size, limit, out } } => {
            analyze::run_forgetting(&analyze::ForgettingArgs {
                model: &model,
                adapter: adapter.as_deref(),
                finetuned: finetuned.as_deref(),
                data: &data,
                format: &format,
                sequence_len,
                batch_size,
                limit,
                out: &out,
            })
        }
        Command::Analyze { what: Analysis::Report { model, adapter, finetuned, out } } => {
            analyze::run_report(&model, adapter.as_deref(), finetuned.as_deref(), &out)
        }
        Command::Analyze { what: Analysis::Tuco { model, adapter, finetuned, prompt, prompts, chat, kappa, out } } => analyze::run_tuco(&analyze::TucoArgs {
            model: &model,
            adapter: adapter.as_deref(),
            finetuned: finetuned.as_deref(),
            prompts: &prompt,
            prompts_file: prompts.as_deref(),
            chat,
            kappa,
            out: &out,
        }),
        Command::Export { model, adapter, format, out, dtype, quant, overwrite } => export::run(&export::ExportArgs {
            model: &model,
            adapter: &adapter,
            format: &format,
            out: &out,
            dtype: dtype.as_deref(),
            quant: quant.as_deref(),
            overwrite,
        }),
        Command::Logits { model, adapter, ids, text, out } => export::run_logits(&model, adapter.as_deref(), ids.as_deref(), text.as_deref(), &out),
        Command::InspectData { config, set, n } => inspect::run(&config, &set, n),
        Command::Methods { names } => {
            for e in crate::methods::registry::entries() {
                if names {
                    println!("{}", e.name);
                } else {
                    let keys = if e.keys.is_empty() { String::new() } else { format!(" [keys: {}]", e.keys.join(", ")) };
                    println!("{:<14} {}{keys}", e.name, e.summary);
                }
            }
            Ok(())
        }
        Command::Bench { model, shape, batch, seq, warmup, steps, forward_only, checkpointing, dtype, method, objective, optimizer, zo_offload, decode } => {
            let method = method.unwrap_or_else(|| if forward_only || decode.is_some() { "none" } else { "lora" }.to_string());
            let opts = crate::bench::BenchOptions { batch, seq, warmup, steps, forward_only, method, dtype, checkpointing, objective, optimizer, zo_offload, decode };
            bench::run(model.as_deref(), shape.as_deref(), &opts)
        }
    }
}

/// The fields a prompt is read from, first found first.
pub(crate) const PROMPT_FIELDS: [&str; 4] = ["prompt", "question", "instruction", "text"];

/// Prompts from a JSONL file: each line's first field of [`PROMPT_FIELDS`].
pub(crate) fn read_prompts(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = crate::io_util::read_to_string(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
        match PROMPT_FIELDS.iter().find_map(|f| v.get(*f)).and_then(|p| p.as_str()) {
            Some(p) => out.push(p.to_string()),
            None => bail!("{}:{}: expected a string field {}", path.display(), i + 1, PROMPT_FIELDS.map(|f| format!("`{f}`")).join(", ")),
        }
    }
    Ok(out)
}
