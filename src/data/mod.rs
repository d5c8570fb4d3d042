//! Dataset pipeline: JSONL records → typed examples → (chat template) → tokens with a label
//! mask → padded, shifted batches, in a deterministic order.
//!
//! - [`source`]: reading JSON Lines with line numbers;
//! - [`formats`]: record → [`Example`] (text, completion, chat, Alpaca; auto-detection);
//! - [`template`]: Hugging Face chat templates rendered with minijinja;
//! - [`tokenize`]: [`TextTokenizer`] from a HF directory or a GGUF's metadata;
//! - [`encode`]: example → [`EncodedExample`] (ids + labels), inspection rendering;
//! - [`pack`]: several short examples in one row (`sample_packing`);
//! - [`batch`]: [`Batch`], [`make_batch`], [`epoch_order`].

pub mod batch;
pub mod encode;
pub mod formats;
pub mod pack;
pub mod preference;
pub mod source;
pub mod template;
pub mod tokenize;

pub use batch::{epoch_order, make_batch, Batch};
pub use encode::{encode_example, render_for_inspection, EncodeOptions, EncodedExample, IGNORE_INDEX};
pub use formats::{DatasetFormat, Example, Message};
pub use source::{read_jsonl, Record};
pub use template::ChatTemplate;
pub use tokenize::TextTokenizer;

use crate::error::{Error, Result};
use rayon::prelude::*;
use std::path::Path;

/// Counts from encoding a dataset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatasetStats {
    /// Records read.
    pub records: usize,
    /// Examples kept (those with at least one target token).
    pub examples: usize,
    /// Examples cut at `sequence_len` (kept or not).
    pub truncated: usize,
    /// Examples dropped because no token was left to train on.
    pub without_targets: usize,
    /// Tokens and target tokens over the kept examples.
    pub tokens: usize,
    pub targets: usize,
}

/// Encoded examples with the stats of how they were made.
#[derive(Debug, Clone, Default)]
pub struct EncodedDataset {
    pub examples: Vec<EncodedExample>,
    pub stats: DatasetStats,
}

/// Turns records into encoded examples (in parallel, order kept). Any error is reported against
/// the record's file and line. Examples with no target token are dropped and counted in
/// [`DatasetStats::without_targets`]; the caller should warn when that is not zero.
pub fn encode_records(
    records: &[Record],
    format: DatasetFormat,
    tok: &TextTokenizer,
    opts: &EncodeOptions,
) -> Result<EncodedDataset> {
    // Large files take a while to tokenize: progress every few seconds, checked every 1024 records.
    let done = std::sync::atomic::AtomicUsize::new(0);
    let ticker = std::sync::Mutex::new(crate::console::Ticker::new("encoding", records.len(), "records"));
    let encoded: Vec<EncodedExample> = records
        .par_iter()
        .map(|r| {
            let ex = Example::from_record(r, format)?;
            let encoded = encode_example(tok, &ex, opts).map_err(|e| match e {
                e @ Error::Data { .. } => e,
                other => r.error(other.to_string()),
            });
            let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            if n.is_multiple_of(1024) {
                if let Ok(mut t) = ticker.try_lock() {
                    t.tick(n, None);
                }
            }
            encoded
        })
        .collect::<Result<_>>()?;
    let mut stats = DatasetStats {
        records: records.len(),
        ..Default::default()
    };
    let mut examples = Vec::with_capacity(encoded.len());
    for ex in encoded {
        stats.truncated += ex.truncated as usize;
        if !ex.has_targets() {
            stats.without_targets += 1;
            continue;
        }
        stats.tokens += ex.tokens();
        stats.targets += ex.n_targets();
        examples.push(ex);
    }
    stats.examples = examples.len();
    Ok(EncodedDataset { examples, stats })
}

/// Reads a JSONL file and encodes it; see [`encode_records`].
pub fn load_jsonl_dataset(
    path: &Path,
    format: DatasetFormat,
    tok: &TextTokenizer,
    opts: &EncodeOptions,
) -> Result<EncodedDataset> {
    let records = read_jsonl(path)?;
    if records.is_empty() {
        return Err(Error::format(path, "holds no records (it is empty or only blank lines); expected one JSON object per line"));
    }
    encode_records(&records, format, tok, opts)
}
