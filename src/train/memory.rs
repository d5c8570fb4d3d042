//! Peak memory of a training run, estimated before the model is loaded, and the check of that
//! estimate against the memory this machine (or its cgroup) has available.
//!
//! Every term follows from what the code allocates, not from a fitted curve:
//! - **weights**: the frozen matrices as they will be stored (GGUF blocks, bf16 or f32; read
//!   from the GGUF header or `config.json`, nothing is loaded), norms, biases and RoPE tables;
//! - **loading**: while a model loads, its file is mapped (its pages count as resident), every
//!   tensor is built from it, and `FrozenWeight::from_tensor` copies one matrix at a time;
//! - **adapter**: the LoRA parameters, their gradient buffers (the step's sum, and candle's
//!   `GradStore` until it is folded in) and AdamW's two moments, all f32;
//! - **activations**: what the autograd graph keeps alive at the peak of a step. Every candle
//!   op keeps its inputs until the graph is dropped after the backward, so a block keeps
//!   exactly the tensors that are some op's input (listed in [`block_floats_per_token`]); our
//!   kernels keep little else (attention recomputes its probabilities, dropout its mask; the
//!   fused LoRA op keeps its rank-r product, `r` values a token and site), except the LM head,
//!   which keeps `∂nll/∂h` (`tokens × hidden`) instead of its logits. On top of that comes the
//!   largest short-lived buffer set (a logits chunk of the head, the MLP's backward,
//!   attention's per-thread score tiles and its backward's dK/dV shares).
//!   With `gradient_checkpointing` only the block inputs stay, plus one block's graph at a
//!   time in the backward;
//! - **process**: what the process holds when the estimate is made (binary, libraries,
//!   tokenizer and the encoded data), read from `/proc/self/status`;
//! - **runtime**: one constant for what no tensor accounts for, measured once
//!   ([`RUNTIME_OVERHEAD`]).
//!
//! The sizes of the micro-batches come from the run's own sampler: the largest padded
//! micro-batch this run will form, not `micro_batch_size × sequence_len`.

use super::trainer::Sampler;
use crate::config::TrainConfig;
use crate::data::EncodedExample;
use crate::error::{Error, Result};
use crate::formats::gguf::quants::GgmlType;
use crate::formats::gguf::GgufFile;
use crate::kernels::FrozenWeight;
use crate::methods::PlannedMemory;
use crate::models::BlockSiteInfo;
use crate::models::load::{config_from_gguf, hf_name, is_frozen_matrix, weight_files, LoadOptions, ModelSource};
use crate::models::{ModelConfig, SiteInfo};
use crate::methods::TargetModules;
use std::path::Path;

const F32: u64 = 4;
const MIB: u64 = 1 << 20;
const GIB: f64 = (1u64 << 30) as f64;

/// Environment variable that replaces the detected available memory (MiB); for tests and for
/// machines whose limit the detection cannot see.
pub const AVAILABLE_ENV: &str = "FERROTUNE_AVAILABLE_MEMORY_MIB";

/// Rows per chunk of the LM-head cross-entropy (`kernels::cross_entropy::CHUNK_ROWS`).
const HEAD_CHUNK_ROWS: u64 = 128;
/// The decoder precomputes RoPE tables for at most this many positions (`models::llama`).
const MAX_ROPE_TABLE: u64 = 65536;
/// What the process holds before the model loads when `/proc` cannot tell (not Linux).
const FALLBACK_PROCESS: u64 = 32 * MIB;
/// What the running process adds that no tensor accounts for: code pages touched for the
/// first time (the binary's text is 12 MB), the GEMM's packing buffers, worker stacks, and
/// the allocator's fragmentation as steps repeat. Measured once, as the gap between `VmHWM`
/// and the other terms: 10–20 MiB on the SmolLM2-135M bench workloads, 6–11 MiB on the test
/// model of `tests/memory_estimate.rs`.
const RUNTIME_OVERHEAD: u64 = 12 * MIB;

/// The base model as it will sit in memory, worked out from its headers alone.
#[derive(Debug, Clone)]
pub struct Footprint {
    pub config: ModelConfig,
    /// Frozen matrices (linear layers, embedding, untied head) as stored after loading.
    pub frozen: u64,
    /// Everything else, in f32: norms, biases, RoPE tables.
    pub dense: u64,
    /// Most bytes held at once while loading.
    pub load_peak: u64,
}

impl Footprint {
    /// The model at `path` (HF directory or GGUF) loaded with `opts`.
    pub fn of_model(path: &Path, opts: &LoadOptions) -> Result<Self> {
        match ModelSource::detect(path)? {
            ModelSource::HfDir(dir) => {
                let cfg_path = dir.join("config.json");
                let config = ModelConfig::from_hf_json(&cfg_path, &crate::io_util::read_to_string(&cfg_path)?)?;
                // Shards are read one at a time, each mapped while its tensors become f32.
                let largest_file = weight_files(&dir)?.iter().map(|f| file_len(f)).max().unwrap_or(0);
                Ok(Self::from_f32_shapes(config, opts.bf16, largest_file))
            }
            ModelSource::Gguf(file) => Self::of_gguf(&file, opts),
        }
    }

    /// A model built in memory from f32 tensors (the bench's `--shape`): no file is mapped.
    pub fn of_random(config: ModelConfig, bf16: bool) -> Self {
        Self::from_f32_shapes(config, bf16, 0)
    }

    fn from_f32_shapes(config: ModelConfig, bf16: bool, mapped: u64) -> Self {
        let c = &config;
        let d = c.hidden_size as u64;
        let mut shapes: Vec<(usize, usize)> = site_shapes(c).iter().map(|s| (s.out_features, s.in_features)).collect();
        shapes.push((c.vocab_size, c.hidden_size));
        if !c.tie_word_embeddings {
            shapes.push((c.vocab_size, c.hidden_size));
        }
        let matrices: Vec<u64> = shapes.iter().map(|&(o, i)| (o * i) as u64).collect();
        let elems: u64 = matrices.iter().sum();
        let largest = matrices.iter().copied().max().unwrap_or(0) * F32;
        let biases = if c.attention_bias { c.num_hidden_layers as u64 * qkv_out(c) } else { 0 };
        let dense = (c.num_hidden_layers as u64 * 2 * d + d + biases) * F32 + rope_bytes(c);
        let frozen = if bf16 { shapes.iter().map(|&(o, i)| FrozenWeight::bf16_storage_bytes(o, i)).sum() } else { elems * F32 };
        // All tensors in f32 at once; on top, a shard's mapped file while it is read, then the
        // copy `FrozenWeight::from_tensor` makes of one matrix, and with bf16 that matrix's f32
        // copy and bf16 bytes while it is rounded.
        let load_peak = elems * F32 + dense + mapped.max(largest + if bf16 { largest / 2 } else { 0 });
        Self { config, frozen, dense, load_peak }
    }

    fn of_gguf(path: &Path, opts: &LoadOptions) -> Result<Self> {
        let g = GgufFile::open(path)?;
        let config = config_from_gguf(&g)?;
        let (mut frozen, mut dense, mut built, mut largest) = (0u64, 0u64, 0u64, 0u64);
        for info in g.tensors() {
            if info.name == "rope_freqs.weight" {
                continue;
            }
            let name = hf_name(&info.name).unwrap_or_default();
            let matrix = is_frozen_matrix(&name) && info.dims.len() == 2;
            let ty = info.ggml_type;
            // The same rule as `load_gguf`: such matrices stay in their blocks.
            if opts.keep_quantized && matrix && ty != GgmlType::F32 && ty.can_dequantize() {
                let kept = if ty == GgmlType::BF16 { bf16_matrix_bytes(&info.dims) } else { info.n_bytes() as u64 };
                frozen += kept;
                built += kept;
                continue;
            }
            let f32_bytes = info.n_elements() as u64 * F32;
            built += f32_bytes;
            if matrix {
                frozen += if opts.bf16 { bf16_matrix_bytes(&info.dims) } else { f32_bytes };
                largest = largest.max(f32_bytes);
            } else {
                dense += f32_bytes;
            }
        }
        dense += rope_bytes(&config);
        // The file stays mapped (its pages resident) until every tensor is built from it and
        // `from_tensor` has copied the f32 matrices one at a time; bf16 rounding comes after.
        // The parsed header (vocabulary, merges, tensor names) lives as long as the file.
        let rounding = if opts.bf16 { largest + largest / 2 } else { 0 };
        let load_peak = built + rope_bytes(&config) + (file_len(path) + parsed_header_bytes(&g) + largest).max(rounding);
        Ok(Self { config, frozen, dense, load_peak })
    }

    pub fn weights(&self) -> u64 {
        self.frozen + self.dense
    }
}

/// Heap bytes of a parsed GGUF header: every metadata value is a `GgufValue` (a string or an
/// array its own allocation), every tensor a `TensorInfo` with its name and dims.
fn parsed_header_bytes(g: &GgufFile) -> u64 {
    use crate::formats::gguf::{GgufValue, TensorInfo};
    // glibc's chunk for an n-byte request: 8 bytes of header, 16-byte granules, 32 at least.
    fn chunk(n: usize) -> u64 {
        if n == 0 { 0 } else { ((n + 8).next_multiple_of(16)).max(32) as u64 }
    }
    fn value(v: &GgufValue) -> u64 {
        match v {
            GgufValue::String(s) => chunk(s.capacity()),
            GgufValue::Array(a) => chunk(a.capacity() * std::mem::size_of::<GgufValue>()) + a.iter().map(value).sum::<u64>(),
            _ => 0,
        }
    }
    let meta: u64 = g.metadata().iter().map(|(k, v)| chunk(k.capacity()) + std::mem::size_of::<(String, GgufValue)>() as u64 + value(v)).sum();
    let tensors: u64 = g
        .tensors()
        .iter()
        .map(|t| std::mem::size_of::<TensorInfo>() as u64 + chunk(t.name.capacity()) + chunk(t.dims.capacity() * 8))
        .sum();
    meta + tensors
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

fn rope_bytes(c: &ModelConfig) -> u64 {
    // cos and sin, `[positions, head_dim / 2]` each.
    (c.max_position_embeddings as u64).clamp(1, MAX_ROPE_TABLE) * c.head_dim as u64 * F32
}

/// Output features of q, k and v summed (the biases of an `attention_bias` model).
fn qkv_out(c: &ModelConfig) -> u64 {
    ((c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim) as u64
}

/// The block-level sites (each layer's MLP) of a model of config `c`.
pub fn block_shapes(c: &ModelConfig) -> Vec<BlockSiteInfo> {
    (0..c.num_hidden_layers).map(|i| BlockSiteInfo { name: format!("model.layers.{i}.mlp"), hidden_size: c.hidden_size }).collect()
}

/// What a bf16 frozen matrix of GGUF dimensions `[in, out]` occupies once loaded.
fn bf16_matrix_bytes(dims: &[u64]) -> u64 {
    FrozenWeight::bf16_storage_bytes(dims[1] as usize, dims[0] as usize)
}

/// Every linear site of the decoder with its shape, in `Llama::sites` order.
pub fn site_shapes(c: &ModelConfig) -> Vec<SiteInfo> {
    let (d, ff) = (c.hidden_size, c.intermediate_size);
    let (q, kv) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
    let mut out = Vec::with_capacity(7 * c.num_hidden_layers);
    for i in 0..c.num_hidden_layers {
        for (name, in_features, out_features) in [
            ("self_attn.q_proj", d, q),
            ("self_attn.k_proj", d, kv),
            ("self_attn.v_proj", d, kv),
            ("self_attn.o_proj", q, d),
            ("mlp.gate_proj", d, ff),
            ("mlp.up_proj", d, ff),
            ("mlp.down_proj", ff, d),
        ] {
            out.push(SiteInfo { name: format!("model.layers.{i}.{name}"), in_features, out_features });
        }
    }
    out
}

/// Trainable LoRA parameters of rank `r` on the `targets` sites: `r·(in + out)` per site.
pub fn lora_params(c: &ModelConfig, targets: &TargetModules, r: usize) -> Result<u64> {
    let sites = site_shapes(c);
    let chosen = targets.select(&sites, "lora_target_modules")?;
    Ok(chosen.iter().map(|s| (r * (s.in_features + s.out_features)) as u64).sum())
}

/// What a step processes: the largest micro-batch (padded tokens, and the longest padded
/// sequence) of training and of evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepShape {
    pub train_tokens: usize,
    pub train_seq: usize,
    pub eval_tokens: usize,
    pub eval_seq: usize,
    pub checkpointing: bool,
    /// Trainable parameters (0: no training, evaluation only).
    pub adapter_params: u64,
    /// f32 values per training token that the method's own ops keep for the backward, over
    /// the whole model (`PlannedMemory::floats_per_token`).
    pub method_floats_per_token: u64,
    pub threads: usize,
    /// Training runs the fused decoder block (`PlannedMemory::fused_blocks`).
    pub fused_blocks: bool,
}

/// The estimate, in bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryEstimate {
    /// The expected peak resident set of the whole process.
    pub total: u64,
    pub weights: u64,
    pub adapter: u64,
    pub activations: u64,
    /// Held before the model loads (binary, tokenizer, data).
    pub process: u64,
    /// Extra held while the model loads, on top of `process`.
    pub load_peak: u64,
}

fn gib(b: u64) -> f64 {
    b as f64 / GIB
}

fn mib(b: u64) -> f64 {
    b as f64 / MIB as f64
}

impl MemoryEstimate {
    /// What the process still has to allocate beyond what it holds now.
    pub fn additional(&self) -> u64 {
        self.total.saturating_sub(self.process)
    }

    pub fn summary(&self) -> String {
        format!(
            "{:.2} GiB (weights {:.2}, adapter+grads+AdamW {:.2}, activations {:.2}, process+tokenizer+data {:.2}, runtime {:.2}; loading peaks at {:.2})",
            gib(self.total),
            gib(self.weights),
            gib(self.adapter),
            gib(self.activations),
            gib(self.process),
            gib(RUNTIME_OVERHEAD),
            gib(self.process + RUNTIME_OVERHEAD + self.load_peak),
        )
    }

    /// The total in MiB, to one decimal (as reported beside `peak_rss_mib`).
    pub fn total_mib(&self) -> f64 {
        (mib(self.total) * 10.0).round() / 10.0
    }

    pub fn to_json(&self) -> serde_json::Value {
        let r = |b: u64| (mib(b) * 10.0).round() / 10.0;
        serde_json::json!({
            "total_mib": r(self.total),
            "weights_mib": r(self.weights),
            "adapter_mib": r(self.adapter),
            "activations_mib": r(self.activations),
            "process_mib": r(self.process),
            "runtime_mib": r(RUNTIME_OVERHEAD),
            "load_peak_mib": r(self.process + RUNTIME_OVERHEAD + self.load_peak),
        })
    }
}

/// f32 values per token that one decoder block's autograd graph keeps alive: the inputs of its
/// ops (`Llama::block_forward`). `reshape` of a contiguous tensor shares its storage, so q and k
/// count once before and once after RoPE. The fused block (`kernels::decoder_block`) keeps
/// each sublayer's input and what its own backward reads.
fn block_floats_per_token(c: &ModelConfig, fused: bool) -> u64 {
    let (d, ff) = (c.hidden_size as u64, c.intermediate_size as u64);
    let (q, kv) = ((c.num_attention_heads * c.head_dim) as u64, (c.num_key_value_heads * c.head_dim) as u64);
    if fused {
        // x, norm(x), q and k after RoPE, v, the attention output; x + o, its norm, gate, up,
        // silu(gate)·up.
        return 4 * d + (2 * q + 2 * kv) + 3 * ff;
    }
    // x, norm(x), o_proj's output, x + o, its norm, down_proj's output;
    // q and k before and after RoPE, v, the attention output; gate, up, silu(gate)·up.
    6 * d + (2 * q + 2 * kv + kv + q) + 3 * ff
}

/// Bytes of the largest short-lived buffer set of a step over `tokens` rows, on top of what
/// the graph keeps: the LM head's logits chunk; the MLP backward (the gradient of
/// `silu(gate)·up` being consumed, the gate's and up's gradients it produces, and the zero
/// tensor plus sum candle's `GradStore` forms when it first stores one: five
/// `tokens × intermediate` buffers, with a few residual-stream gradients; fused, no `GradStore`
/// copies: three, with three); or attention's gathered outputs/gradients.
fn transient_bytes(c: &ModelConfig, tokens: u64, training: bool, fused: bool) -> u64 {
    let (d, ff, v) = (c.hidden_size as u64, c.intermediate_size as u64, c.vocab_size as u64);
    let (q, kv) = ((c.num_attention_heads * c.head_dim) as u64, (c.num_key_value_heads * c.head_dim) as u64);
    let rows = tokens.min(HEAD_CHUNK_ROWS);
    let head = rows * v + 2 * rows * d;
    let attention = 2 * tokens * (q + 2 * kv);
    let mlp = match (training, fused) {
        (true, false) => tokens * (5 * ff + 4 * d),
        (true, true) => tokens * (3 * ff + 3 * d),
        (false, _) => tokens * 2 * ff,
    };
    head.max(attention).max(mlp) * F32
}

/// Bytes attention's worker threads hold, in their own allocator arenas (so on top of the
/// main thread's peak, not sharing its freed memory): per thread, one block of query rows'
/// probabilities over the keys (and in the backward its score gradient), plus the per-head
/// outputs or gradients before they are gathered, and in the backward each task's share of dK
/// and dV until the shares are summed. The arenas do not always fit a new tile into the
/// previous one's hole: one more tile per thread covers that.
fn attention_worker_bytes(c: &ModelConfig, tokens: u64, seq: u64, threads: u64, training: bool) -> u64 {
    let (q, kv) = ((c.num_attention_heads * c.head_dim) as u64, (c.num_key_value_heads * c.head_dim) as u64);
    let tiles_per_thread = if training { 3 } else { 2 };
    let rows = seq.min(crate::kernels::ATTENTION_ROW_BLOCK as u64);
    let shares = match (training, seq) {
        (true, 1..) => {
            let b = tokens.div_ceil(seq) as usize;
            crate::kernels::attention_backward_share_floats(b, seq as usize, c.num_attention_heads, c.num_key_value_heads, c.head_dim, threads.max(1) as usize) as u64
        }
        _ => 0,
    };
    (threads.max(1) * tiles_per_thread * rows * seq + tokens * (q + 2 * kv) + shares) * F32
}

/// Activation bytes at the peak of a training step (or of an evaluation forward).
fn activation_bytes(c: &ModelConfig, s: &StepShape) -> u64 {
    let (d, layers) = (c.hidden_size as u64, c.num_hidden_layers as u64);
    let threads = s.threads as u64;
    // Evaluation keeps no graph: at most one block's tensors and the residual stream.
    let (et, es) = (s.eval_tokens as u64, s.eval_seq as u64);
    let eval = (et * (block_floats_per_token(c, false) + 2 * d)) * F32 + transient_bytes(c, et, false, false) + attention_worker_bytes(c, et, es, threads, false);
    let block = block_floats_per_token(c, s.fused_blocks);
    if s.adapter_params == 0 {
        return eval;
    }
    let (n, t) = (s.train_tokens as u64, s.train_seq as u64);
    let transient = transient_bytes(c, n, true, s.fused_blocks) + attention_worker_bytes(c, n, t, threads, true);
    let train = if s.checkpointing {
        // `grads::checkpointed_backward` keeps the input of every block, the last output and
        // its copy as a `Var` (`Var::from_tensor` copies), the head's norm output (the head's
        // graph lives to the end) and the gradient `g` reaching the current block. On top:
        // the head (`∂nll/∂h` and a logits chunk), or one block's rebuilt graph with the
        // copy of its input, `y ⊙ g`, and the gradients candle forms for both factors.
        let kept = (layers + 4) * n * d * F32;
        let head = n * d * F32;
        let one_block = (block + 5 * d + s.method_floats_per_token / layers.max(1)) * n * F32;
        kept + head.max(one_block) + transient
    } else {
        // Every block's graph, the last block's output, the head's norm output and `∂nll/∂h`.
        (layers * block + 3 * d + s.method_floats_per_token) * n * F32 + transient
    };
    train.max(eval)
}

impl MemoryEstimate {
    /// Adds what a method holds beyond its trainable values: its own buffers, and the graph
    /// bytes its ops keep (one block's share with checkpointing).
    pub fn add_method(&mut self, planned: &PlannedMemory, c: &ModelConfig, checkpointing: bool) {
        let graph = if checkpointing { planned.graph_bytes / c.num_hidden_layers.max(1) as u64 } else { planned.graph_bytes };
        self.adapter += planned.extra_bytes;
        self.activations += graph;
        self.total += planned.extra_bytes + graph;
    }
}

/// The estimate for a run of `shape` on a model of footprint `fp`, by a process that holds
/// `process` bytes before loading it.
pub fn estimate(fp: &Footprint, s: &StepShape, process: u64) -> MemoryEstimate {
    let c = &fp.config;
    let p = s.adapter_params * F32;
    // Parameters, AdamW's two moments and the step's gradient sum; candle's GradStore holds
    // a second copy of the gradients until they are folded into the sum: all of them after
    // the plain backward, one block's worth with checkpointing.
    let grad_store = if s.checkpointing { p / c.num_hidden_layers.max(1) as u64 } else { p };
    let adapter = if s.adapter_params == 0 { 0 } else { 4 * p + grad_store };
    let activations = activation_bytes(c, s);
    let weights = fp.weights();
    let steady = weights + adapter + activations;
    let total = process + RUNTIME_OVERHEAD + steady.max(fp.load_peak);
    MemoryEstimate { total, weights, adapter, activations, process, load_peak: fp.load_peak }
}

/// Resident bytes of this process now (`VmRSS`), when `/proc` can tell.
pub fn resident_bytes() -> Option<u64> {
    status_kib("VmRSS:").map(|k| k * 1024)
}

/// Peak resident bytes of this process so far (`VmHWM`), when `/proc` can tell.
pub fn peak_resident_bytes() -> Option<u64> {
    status_kib("VmHWM:").map(|k| k * 1024)
}

fn status_kib(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse().ok()
}

/// What the process holds now, or a fixed allowance where that cannot be read. Memory freed
/// so far (reading and tokenizing the data) is handed back to the kernel first: the runtime
/// keeps freed heap memory for reuse (`runtime::tune_allocator`), and the steps will reuse
/// it, so counting it here as well would count it twice.
pub fn process_bytes() -> u64 {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
    resident_bytes().unwrap_or(FALLBACK_PROCESS)
}

/// Sizes of the largest micro-batches the run will form: it replays the run's own sampler
/// over all its steps (training) and walks the validation set in order (evaluation).
pub fn step_shape(cfg: &TrainConfig, train: &[EncodedExample], val: &[EncodedExample], total_steps: usize, adapter_params: u64) -> StepShape {
    let mb = cfg.micro_batch_size.max(1);
    let per_step = mb * cfg.gradient_accumulation_steps.max(1);
    let (mut train_tokens, mut train_seq) = (0, 0);
    if !train.is_empty() {
        let mut sampler = Sampler::new(train.len(), cfg.seed, cfg.shuffle);
        let samples = (total_steps * per_step) as u64;
        for first in (0..samples).step_by(mb) {
            // A preference pair is two rows of the micro-batch.
            let rows: Vec<&EncodedExample> = (first..first + mb as u64).map(|k| &train[sampler.index(k)]).collect();
            let t = rows.iter().map(|e| e.longest()).max().unwrap_or(0);
            let n: usize = rows.iter().map(|e| e.sequences().count()).sum();
            train_tokens = train_tokens.max(n * t);
            train_seq = train_seq.max(t);
        }
    }
    let (mut eval_tokens, mut eval_seq) = (0, 0);
    for chunk in val.chunks(mb) {
        let t = chunk.iter().map(|e| e.longest()).max().unwrap_or(0);
        let n: usize = chunk.iter().map(|e| e.sequences().count()).sum();
        eval_tokens = eval_tokens.max(n * t);
        eval_seq = eval_seq.max(t);
    }
    StepShape {
        train_tokens,
        train_seq,
        eval_tokens,
        eval_seq,
        checkpointing: cfg.gradient_checkpointing,
        adapter_params,
        threads: rayon::current_num_threads(),
        method_floats_per_token: 0,
        fused_blocks: false,
    }
}

/// What `method` plans to hold on a model of config `c`; a method that says nothing is counted
/// as a LoRA of rank `r` on `targets`.
pub fn method_plan(method: &dyn crate::methods::Method, c: &ModelConfig, targets: &TargetModules, r: usize) -> Result<PlannedMemory> {
    Ok(match method.planned_memory(&site_shapes(c), &block_shapes(c))? {
        Some(p) => p,
        None => {
            let sites = targets.select(&site_shapes(c), "lora_target_modules")?.len() as u64;
            // The fused LoRA op keeps its rank-r product for the backward; the blocks fuse.
            PlannedMemory { trainable_params: lora_params(c, targets, r)?, floats_per_token: r as u64 * sites, fused_blocks: true, ..Default::default() }
        }
    })
}

/// The estimate for the run `cfg` describes, on its prepared data. The adapter is the one the
/// plan describes (`lora_r`, `lora_target_modules`), also when `init_adapter` or `--resume`
/// will load one.
pub fn estimate_run(cfg: &TrainConfig, train: &[EncodedExample], val: &[EncodedExample], total_steps: usize, process: u64) -> Result<MemoryEstimate> {
    let fp = Footprint::of_model(&cfg.base_model, &cfg.load_options()?)?;
    let method = crate::methods::registry::create(&crate::methods::MethodSpec::from_config(cfg))?;
    let planned = method_plan(method.as_ref(), &fp.config, &cfg.target_modules(), cfg.lora_r)?;
    let (objective_bytes, objective_floats) = crate::objectives::create(&cfg.objective_spec())?.planned_memory(&fp.config);
    let mut shape = step_shape(cfg, train, val, total_steps, planned.trainable_params);
    if cfg.optimizer == "mezo" {
        return Ok(zeroth_order_estimate(&fp, &shape, process, planned.trainable_params, cfg.zo_offload.then_some(cfg.zo_window.unwrap_or(2))));
    }
    shape.method_floats_per_token = planned.floats_per_token + objective_floats;
    shape.fused_blocks = planned.fused_blocks && crate::kernels::decoder_block::enabled();
    let mut e = estimate(&fp, &shape, process);
    e.adapter += objective_bytes;
    e.total += objective_bytes;
    e.add_method(&planned, &fp.config, cfg.gradient_checkpointing);
    Ok(e)
}

/// What a zeroth-order step holds: two forward passes over the step's tokens (inference's
/// activations; with `offload_window`, the `+` and `−` residual streams of every micro-batch
/// too) and, beside `trainable` values, in memory their saved copy, or offloaded only a window
/// of blocks with the direction and the perturbed matrices being built (the blocks taken as
/// equal shares of the trainable values).
pub fn zeroth_order_estimate(fp: &Footprint, s: &StepShape, process: u64, trainable: u64, offload_window: Option<usize>) -> MemoryEstimate {
    let c = &fp.config;
    let tokens = s.train_tokens.max(s.eval_tokens);
    let forward = StepShape { train_tokens: 0, train_seq: 0, eval_tokens: tokens, eval_seq: s.train_seq.max(s.eval_seq), adapter_params: 0, method_floats_per_token: 0, ..*s };
    let mut e = estimate(fp, &forward, process);
    let (held, streams) = match offload_window {
        Some(w) => ((w as u64 + 2) * F32 * trainable / c.num_hidden_layers.max(1) as u64, 2 * (tokens * c.hidden_size) as u64 * F32),
        None => (2 * F32 * trainable, 0),
    };
    e.adapter += held;
    e.activations += streams;
    e.total += held + streams;
    e
}

/// Memory the run may still allocate, and where that figure comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct Available {
    pub bytes: u64,
    pub source: String,
}

/// The smaller of the kernel's `MemAvailable` and the room left under a cgroup limit (v2
/// `memory.max − memory.current` of this process's cgroup and its ancestors, v1
/// `memory.limit_in_bytes − memory.usage_in_bytes`); `FERROTUNE_AVAILABLE_MEMORY_MIB` replaces
/// both. `Ok(None)` when nothing can be read (no check is possible).
pub fn available_memory() -> Result<Option<Available>> {
    if let Some(v) = std::env::var_os(AVAILABLE_ENV) {
        let s = v.to_string_lossy();
        let mib: f64 = s
            .trim()
            .parse()
            .ok()
            .filter(|m: &f64| m.is_finite() && *m >= 0.0)
            .ok_or_else(|| Error::config(AVAILABLE_ENV, format!("`{s}` is not a number of MiB")))?;
        return Ok(Some(Available { bytes: (mib * MIB as f64) as u64, source: format!("${AVAILABLE_ENV}") }));
    }
    let mut best: Option<Available> = None;
    let mut consider = |bytes: u64, source: String| {
        if best.as_ref().is_none_or(|b| bytes < b.bytes) {
            best = Some(Available { bytes, source });
        }
    };
    if let Some(kib) = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| meminfo_kib(&s, "MemAvailable:")) {
        consider(kib * 1024, "MemAvailable".into());
    }
    if let Some((room, src)) = cgroup_room() {
        consider(room, src);
    }
    Ok(best)
}

fn meminfo_kib(text: &str, key: &str) -> Option<u64> {
    text.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()
}

/// Room under the tightest cgroup memory limit that applies to this process.
fn cgroup_room() -> Option<(u64, String)> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut rooms: Vec<(u64, String)> = Vec::new();
    // v2: `0::/path`; the limit may sit on any ancestor (a container sees its own as `/`).
    if let Some(path) = cgroups.lines().find_map(|l| l.strip_prefix("0::")) {
        let mut dir = Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
        loop {
            if let Some(room) = limit_room(&dir.join("memory.max"), &dir.join("memory.current")) {
                rooms.push((room, format!("cgroup {}", dir.join("memory.max").display())));
            }
            if dir == Path::new("/sys/fs/cgroup") || !dir.pop() {
                break;
            }
        }
    }
    // v1: the memory controller's hierarchy, as mounted (a container sees its own at the root).
    let v1 = cgroups.lines().find_map(|l| l.split(':').nth(2).filter(|_| l.split(':').nth(1) == Some("memory")).map(str::to_string));
    let mut dirs = vec![Path::new("/sys/fs/cgroup/memory").to_path_buf()];
    if let Some(p) = v1 {
        dirs.push(Path::new("/sys/fs/cgroup/memory").join(p.trim_start_matches('/')));
    }
    for dir in dirs {
        if let Some(room) = limit_room(&dir.join("memory.limit_in_bytes"), &dir.join("memory.usage_in_bytes")) {
            rooms.push((room, format!("cgroup {}", dir.join("memory.limit_in_bytes").display())));
        }
    }
    rooms.into_iter().min_by_key(|(r, _)| *r)
}

/// `limit − usage` from two cgroup files; `None` when either is missing or there is no limit
/// (`max` in v2, a page-rounded `i64::MAX` in v1).
fn limit_room(limit: &Path, usage: &Path) -> Option<u64> {
    let limit: u64 = std::fs::read_to_string(limit).ok()?.trim().parse().ok()?;
    if limit >= 1 << 60 {
        return None;
    }
    let usage: u64 = std::fs::read_to_string(usage).ok()?.trim().parse().ok()?;
    Some(limit.saturating_sub(usage))
}

/// What the check decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Fits,
    /// Nothing to compare with: no check was possible.
    Unknown,
    /// Over the available memory, and `--force` was given.
    Forced,
}

/// Estimates the run, prints the estimate, and refuses (an error naming cheaper settings
/// with their estimates) when it needs more than is available, unless `force`.
pub fn check_run(cfg: &TrainConfig, train: &[EncodedExample], val: &[EncodedExample], total_steps: usize, force: bool) -> Result<(MemoryEstimate, Verdict)> {
    let process = process_bytes();
    let est = estimate_run(cfg, train, val, total_steps, process)?;
    let avail = available_memory()?;
    let line = format!("memory estimate: {}", est.summary());
    let Some(avail) = avail else {
        crate::note!("{line}; available memory unknown (no /proc/meminfo or cgroup limit readable), not checked");
        return Ok((est, Verdict::Unknown));
    };
    crate::note!("{line}; available {:.2} GiB ({})", gib(avail.bytes), avail.source);
    if est.additional() <= avail.bytes {
        return Ok((est, Verdict::Fits));
    }
    let advice = suggestions(cfg, train, val, total_steps, process, avail.bytes)?;
    let msg = format!(
        "this run needs an estimated {:.2} GiB more memory but only {:.2} GiB is available ({}); estimate {}.{}",
        gib(est.additional()),
        gib(avail.bytes),
        avail.source,
        est.summary(),
        advice
    );
    if force {
        crate::warning!("{msg}");
        crate::warning!("--force given: training anyway");
        return Ok((est, Verdict::Forced));
    }
    Err(Error::Training(format!("{msg}\nOr pass --force to train anyway (the estimate may be pessimistic; the run may be killed).")))
}

/// Settings that would make this run smaller, each with its estimate.
fn suggestions(cfg: &TrainConfig, train: &[EncodedExample], val: &[EncodedExample], total_steps: usize, process: u64, avail: u64) -> Result<String> {
    let mut options: Vec<(String, TrainConfig)> = Vec::new();
    if !cfg.gradient_checkpointing {
        let mut c = cfg.clone();
        c.gradient_checkpointing = true;
        options.push(("gradient_checkpointing = true".into(), c));
    }
    // Halve the micro-batch while keeping the examples per step.
    let mut mb = cfg.micro_batch_size;
    while mb > 1 {
        mb /= 2;
        let mut c = cfg.clone();
        c.micro_batch_size = mb;
        c.gradient_accumulation_steps = cfg.gradient_accumulation_steps * cfg.micro_batch_size.div_ceil(mb);
        let fits = estimate_run(&c, train, val, total_steps, process)?.additional() <= avail;
        if fits || mb == 1 {
            options.push((format!("micro_batch_size = {mb}, gradient_accumulation_steps = {}", c.gradient_accumulation_steps), c));
            break;
        }
    }
    let is_gguf = matches!(ModelSource::detect(&cfg.base_model)?, ModelSource::Gguf(_));
    if is_gguf && !cfg.load_quantized {
        let mut c = cfg.clone();
        c.load_quantized = true;
        options.push(("load_quantized = true (keep the GGUF's blocks)".into(), c));
    }
    if cfg.base_dtype == "f32" {
        let mut c = cfg.clone();
        c.base_dtype = "bf16".into();
        let before = Footprint::of_model(&cfg.base_model, &cfg.load_options()?)?.frozen;
        if Footprint::of_model(&c.base_model, &c.load_options()?)?.frozen < before {
            options.push(("base_dtype = \"bf16\"".into(), c));
        }
    }
    if options.len() > 1 {
        // Everything at once.
        let mut c = cfg.clone();
        for (_, o) in &options {
            c.gradient_checkpointing |= o.gradient_checkpointing;
            c.load_quantized |= o.load_quantized;
            if o.base_dtype == "bf16" {
                c.base_dtype = "bf16".into();
            }
            if o.micro_batch_size < c.micro_batch_size {
                c.micro_batch_size = o.micro_batch_size;
                c.gradient_accumulation_steps = o.gradient_accumulation_steps;
            }
        }
        options.push(("all of the above".into(), c));
    }
    let mut out = String::from("\nSettings that need less for this run (estimated peak):");
    for (what, c) in &options {
        let e = estimate_run(c, train, val, total_steps, process)?;
        let fits = if e.additional() <= avail { "fits" } else { "does not fit" };
        out.push_str(&format!("\n  {what}: {:.2} GiB ({fits})", gib(e.total)));
    }
    let longest = train.iter().map(|e| e.longest()).max().unwrap_or(0);
    out.push_str(&format!("\n  a shorter sequence_len (now {}, longest example {longest} tokens) also shrinks the activations", cfg.sequence_len));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2() -> ModelConfig {
        crate::bench::shape_config("smollm2-135m").unwrap()
    }

    fn shape(tokens: usize, seq: usize, checkpointing: bool) -> StepShape {
        StepShape { train_tokens: tokens, train_seq: seq, eval_tokens: 0, eval_seq: 0, checkpointing, adapter_params: 1, threads: 2, method_floats_per_token: 0, fused_blocks: false }
    }

    #[test]
    fn site_shapes_match_the_model() {
        let mut c = smollm2();
        c.num_hidden_layers = 2;
        c.vocab_size = 64;
        let m = crate::bench::random_model(c.clone(), 1).unwrap();
        assert_eq!(site_shapes(&c), m.sites());
    }

    #[test]
    fn random_footprint_matches_the_built_model() {
        let mut c = smollm2();
        c.num_hidden_layers = 2;
        c.vocab_size = 64;
        for bf16 in [false, true] {
            let mut m = crate::bench::random_model(c.clone(), 1).unwrap();
            if bf16 {
                m.frozen_to_bf16().unwrap();
            }
            assert_eq!(Footprint::of_random(c.clone(), bf16).frozen, m.frozen_bytes() as u64);
        }
    }

    #[test]
    fn activations_scale_with_tokens_and_checkpointing_saves() {
        let fp = Footprint::of_random(smollm2(), false);
        let a1 = estimate(&fp, &shape(1024, 256, false), 0).activations;
        let a2 = estimate(&fp, &shape(2048, 256, false), 0).activations;
        // The graph grows linearly; only the head's fixed-size chunk does not.
        assert!(a2 > a1 * 19 / 10 && a2 <= a1 * 2, "{a1} {a2}");
        let c = estimate(&fp, &shape(1024, 256, true), 0).activations;
        assert!(c * 5 < a1, "checkpointing keeps block inputs only: {c} vs {a1}");
    }

    #[test]
    fn step_shape_replays_the_batches_the_run_forms() {
        let cfg = |steps: usize, shuffle: bool| -> TrainConfig {
            toml::from_str(&format!(
                "base_model = 'm'\ndatasets = [{{ path = 'd' }}]\noutput_dir = 'o'\nmicro_batch_size = 2\nmax_steps = {steps}\nshuffle = {shuffle}\n"
            ))
            .unwrap()
        };
        let ex = |n: usize| EncodedExample { input_ids: vec![5; n], labels: vec![5; n], truncated: false, targets_cut: 0, rejected: None, reference_logp: None, packed: Vec::new() };
        let train: Vec<EncodedExample> = [10, 20, 50, 30].into_iter().map(ex).collect();
        let val: Vec<EncodedExample> = [7, 3, 9].into_iter().map(ex).collect();
        // In order, the first step pads [10, 20] to 20; the longest example comes in step 2.
        let s = step_shape(&cfg(1, false), &train, &val, 1, 0);
        assert_eq!((s.train_tokens, s.train_seq), (40, 20));
        let s = step_shape(&cfg(2, false), &train, &val, 2, 0);
        assert_eq!((s.train_tokens, s.train_seq), (100, 50));
        // Evaluation batches the validation set in order: [7, 3] → 14, [9] → 9.
        assert_eq!((s.eval_tokens, s.eval_seq), (14, 9));
        // Shuffled, the sampler's own order decides; over two epochs every example is seen.
        let mut sampler = Sampler::new(4, 42, true);
        let first: Vec<usize> = (0..2).map(|k| train[sampler.index(k)].input_ids.len()).collect();
        let s = step_shape(&cfg(1, true), &train, &val, 1, 0);
        assert_eq!(s.train_tokens, 2 * first.iter().max().unwrap());
        assert_eq!(step_shape(&cfg(4, true), &train, &val, 4, 0).train_seq, 50);
    }

    #[test]
    fn cgroup_limit_room() {
        let d = tempfile::tempdir().unwrap();
        let (l, u) = (d.path().join("limit"), d.path().join("usage"));
        std::fs::write(&l, "max\n").unwrap();
        std::fs::write(&u, "100\n").unwrap();
        assert_eq!(limit_room(&l, &u), None, "no limit");
        std::fs::write(&l, "1000\n").unwrap();
        assert_eq!(limit_room(&l, &u), Some(900));
        std::fs::write(&l, "9223372036854771712\n").unwrap();
        assert_eq!(limit_room(&l, &u), None, "v1's unlimited");
        assert_eq!(limit_room(&d.path().join("missing"), &u), None);
    }

    #[test]
    fn meminfo_parsing() {
        let t = "MemTotal:       24684544 kB\nMemFree:        22948460 kB\nMemAvailable:   24341712 kB\n";
        assert_eq!(meminfo_kib(t, "MemAvailable:"), Some(24341712));
        assert_eq!(meminfo_kib("MemTotal: 5 kB\n", "MemAvailable:"), None);
    }
}
