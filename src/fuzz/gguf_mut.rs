//! Structure-aware GGUF mutation: walk the header of a seed, note where every count, length,
//! type id, dimension and offset sits, then overwrite one of them with a value chosen for its
//! kind (a string length of 2^60, a tensor count past the end of the file, an unknown type id,
//! an unaligned offset …). Byte-level havoc is mixed in for everything else.
//!
//! The walker is deliberately lenient and independent of the reader under test: it stops at
//! the first thing it cannot follow and keeps what it found so far.

use super::mutate::{below, havoc, interesting, one_in, pick, put_le};
use crate::formats::gguf::{parse_metadata_bytes, put_str, put_value, GgufValue};
use crate::rng::SplitMix64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Version,
    /// Tensor count, metadata count, array length.
    Count,
    /// Byte length of a key, a string value or a tensor name.
    StrLen,
    ValueType,
    NDims,
    Dim,
    GgmlType,
    Offset,
    /// The bytes of a scalar value (used for `general.alignment` and friends).
    Scalar,
}

#[derive(Debug, Clone, Copy)]
struct Field {
    pos: usize,
    width: usize,
    kind: Kind,
}

/// Walks as far as it can; fields are returned in file order. At most `MAX_FIELDS` are kept
/// (a real vocabulary has 10^5 strings; which of them is mutated does not matter much).
const MAX_FIELDS: usize = 4096;

struct Walker<'a> {
    buf: &'a [u8],
    pos: usize,
    fields: Vec<Field>,
    /// Where the metadata entries end and where the tensor infos end, once reached.
    kv_end: Option<usize>,
    infos_end: Option<usize>,
}

impl Walker<'_> {
    fn read(&mut self, width: usize, kind: Kind) -> Option<u64> {
        let bytes = self.buf.get(self.pos..self.pos.checked_add(width)?)?;
        let mut v = [0u8; 8];
        v[..width].copy_from_slice(bytes);
        if self.fields.len() < MAX_FIELDS {
            self.fields.push(Field { pos: self.pos, width, kind });
        }
        self.pos += width;
        Some(u64::from_le_bytes(v))
    }

    fn skip(&mut self, n: u64) -> Option<()> {
        let end = self.pos.checked_add(usize::try_from(n).ok()?)?;
        (end <= self.buf.len()).then(|| self.pos = end)
    }

    fn string(&mut self) -> Option<()> {
        let n = self.read(8, Kind::StrLen)?;
        self.skip(n)
    }

    fn value(&mut self, ty: u64, depth: usize) -> Option<()> {
        match ty {
            0 | 1 | 7 => self.read(1, Kind::Scalar).map(drop),
            2 | 3 => self.read(2, Kind::Scalar).map(drop),
            4..=6 => self.read(4, Kind::Scalar).map(drop),
            10..=12 => self.read(8, Kind::Scalar).map(drop),
            8 => self.string(),
            9 if depth < 4 => {
                let elem = self.read(4, Kind::ValueType)?;
                let n = self.read(8, Kind::Count)?;
                for _ in 0..n {
                    self.value(elem, depth + 1)?;
                }
                Some(())
            }
            _ => None,
        }
    }

    fn header(&mut self) -> Option<()> {
        self.skip(4)?; // magic
        self.read(4, Kind::Version)?;
        let n_tensors = self.read(8, Kind::Count)?;
        let n_kv = self.read(8, Kind::Count)?;
        for _ in 0..n_kv {
            self.string()?;
            let ty = self.read(4, Kind::ValueType)?;
            self.value(ty, 0)?;
        }
        self.kv_end = Some(self.pos);
        for _ in 0..n_tensors {
            self.string()?;
            let n_dims = self.read(4, Kind::NDims)?;
            for _ in 0..n_dims.min(8) {
                self.read(8, Kind::Dim)?;
            }
            self.read(4, Kind::GgmlType)?;
            self.read(8, Kind::Offset)?;
        }
        self.infos_end = Some(self.pos);
        Some(())
    }
}

fn walk(buf: &[u8]) -> Walker<'_> {
    let mut w = Walker { buf, pos: 0, fields: Vec::new(), kv_end: None, infos_end: None };
    w.header();
    w
}

fn fields(buf: &[u8]) -> Vec<Field> {
    walk(buf).fields
}

/// A value suited to a field of kind `kind` in a file of `len` bytes.
fn value_for(rng: &mut SplitMix64, kind: Kind, old: u64, len: usize) -> u64 {
    let near = |rng: &mut SplitMix64| old.wrapping_add(rng.below(5)).wrapping_sub(2);
    match kind {
        Kind::Version => *pick(rng, &[0, 1, 2, 3, 4, 0x0200_0000, 0x0300_0000, u32::MAX as u64]),
        Kind::ValueType => match rng.below(3) {
            0 => rng.below(14),
            1 => near(rng),
            _ => *pick(rng, &[13, 255, u32::MAX as u64]),
        },
        Kind::GgmlType => match rng.below(3) {
            0 => rng.below(40),
            1 => near(rng),
            _ => *pick(rng, &[4, 5, 31, 255, u32::MAX as u64]),
        },
        Kind::NDims => *pick(rng, &[0, 1, 2, 3, 4, 5, 8, 64, u32::MAX as u64]),
        Kind::Dim => match rng.below(3) {
            0 => *pick(rng, &[0, 1, 31, 32, 33, 256, 1 << 31, 1 << 32, 1 << 62, u64::MAX]),
            1 => near(rng),
            _ => interesting(rng, len),
        },
        Kind::Offset => match rng.below(3) {
            0 => *pick(rng, &[0, 1, 31, 32, len as u64, u64::MAX - 31, 1 << 63]),
            1 => near(rng).wrapping_add(rng.below(2) * 32),
            _ => interesting(rng, len),
        },
        Kind::Count | Kind::StrLen => match rng.below(3) {
            0 => near(rng),
            1 => *pick(rng, &[0, 1, len as u64, (len / 8) as u64, 1 << 32, 1 << 60, u64::MAX]),
            _ => interesting(rng, len),
        },
        Kind::Scalar => match rng.below(2) {
            0 => *pick(rng, &[0, 1, 3, 16, 32, 33, 64, 1 << 31, u64::MAX]),
            _ => rng.next_u64(),
        },
    }
}

/// One mutated GGUF: usually a few field edits, often with byte havoc on top.
pub fn mutate(rng: &mut SplitMix64, seed: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    let mut buf = seed.to_vec();
    let fs = fields(seed);
    if fs.is_empty() || one_in(rng, 4) {
        havoc(rng, &mut buf, others);
        return buf;
    }
    for _ in 0..=rng.below(3) {
        // Fields near the start (counts, early keys) matter most; bias towards them.
        let limit = if one_in(rng, 2) { fs.len().min(32) } else { fs.len() };
        let f = fs[below(rng, limit)];
        let mut old = [0u8; 8];
        old[..f.width].copy_from_slice(&seed[f.pos..f.pos + f.width]);
        let v = value_for(rng, f.kind, u64::from_le_bytes(old), seed.len());
        put_le(&mut buf, f.pos, f.width, v);
    }
    if one_in(rng, 3) {
        havoc(rng, &mut buf, others);
    }
    buf
}

/// Metadata keys the model and tokenizer readers look up, so that added or replaced values land
/// where they matter.
const META_KEYS: [&str; 26] = [
    "general.architecture", "general.alignment", "llama.block_count", "llama.embedding_length",
    "llama.attention.head_count", "llama.attention.head_count_kv", "llama.attention.key_length",
    "llama.feed_forward_length", "llama.context_length", "llama.vocab_size",
    "llama.rope.scaling.type", "llama.rope.scaling.factor", "llama.rope.freq_base",
    "llama.attention.layer_norm_rms_epsilon", "tokenizer.ggml.model", "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
    "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
    "tokenizer.chat_template",
];

const WEIRD_STRINGS: [&str; 18] = [
    "", " ", "llama", "gpt2", "mistral", "qwen2", "none", "linear", "yarn", "llama-bpe", "smollm",
    "tekken", "bert", "a b c", "a  b", "<0x41>", "\u{FFFD}\u{0}", "{% for %}{{ x",
];

fn weird_value(rng: &mut SplitMix64, n: u64) -> GgufValue {
    use GgufValue as V;
    match rng.below(14) {
        0 => V::U32(*pick(rng, &[0, 1, n.saturating_sub(1) as u32, n as u32, u32::MAX])),
        1 => V::I32(*pick(rng, &[-1, i32::MIN, i32::MAX])),
        2 => V::U64(*pick(rng, &[u64::MAX, 1 << 40, n])),
        3 => V::I64(-1),
        4 => V::F32(*pick(rng, &[f32::NAN, 0.0, -1.0, f32::INFINITY, 1e-30])),
        5 => V::F64(1e300),
        6 => V::Bool(one_in(rng, 2)),
        7 => V::U8(255),
        8 => V::Array(vec![]),
        9 => V::Array(vec![V::U32(u32::MAX), V::U32(0)]),
        10 => V::Array(vec![V::Array(vec![V::String("x".into())])]),
        _ => V::String(pick(rng, &WEIRD_STRINGS).to_string()),
    }
}

/// Edits one value in place, keeping its type most of the time (so the reader gets past the
/// type checks and into the semantics: ids past the vocabulary, merges of unknown tokens …).
fn mutate_value(rng: &mut SplitMix64, v: &mut GgufValue, n: u64) {
    use GgufValue as V;
    match v {
        V::Array(items) if !items.is_empty() && !one_in(rng, 6) => {
            let i = below(rng, items.len());
            match rng.below(5) {
                0 => items.truncate(i),
                1 => drop(items.remove(i)),
                2 => {
                    let dup = items[i].clone();
                    items.insert(below(rng, items.len()), dup);
                }
                // Elements keep the array's type: GGUF arrays hold one type.
                _ => mutate_value(rng, &mut items[i], n),
            }
        }
        V::String(s) if !one_in(rng, 4) => {
            let mut b = std::mem::take(s).into_bytes();
            if one_in(rng, 2) {
                havoc(rng, &mut b, &[]);
            } else {
                b = pick(rng, &WEIRD_STRINGS).as_bytes().to_vec();
            }
            *s = String::from_utf8_lossy(&b).into_owned();
        }
        V::U32(x) => *x = *pick(rng, &[0, 1, n.saturating_sub(1) as u32, n as u32, n as u32 + 1, u32::MAX]),
        V::I32(x) => *x = *pick(rng, &[-1, 0, 1, 2, 3, 4, 5, 6, 7, i32::MAX]),
        V::F32(x) => *x = *pick(rng, &[f32::NAN, 0.0, -1.0, f32::INFINITY, f32::MIN_POSITIVE]),
        _ => *v = weird_value(rng, n),
    }
}

/// Re-encodes the seed with edited metadata values: the preamble and metadata are rebuilt, the
/// tensor infos and data section are carried over (re-aligned), so the file stays readable up
/// to whatever the edit broke. Falls back to [`mutate`] for seeds it cannot take apart.
pub fn mutate_metadata(rng: &mut SplitMix64, seed: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    let w = walk(seed);
    let (Some(kv_end), Some(infos_end), Ok(mut meta)) = (w.kv_end, w.infos_end, parse_metadata_bytes(seed)) else {
        return mutate(rng, seed, others);
    };
    let old_data = infos_end.next_multiple_of(alignment(&meta) as usize).min(seed.len());
    let vocab = meta
        .iter()
        .find(|(k, _)| k == "tokenizer.ggml.tokens")
        .and_then(|(_, v)| v.as_array())
        .map_or(64, |a| a.len() as u64);
    for _ in 0..=rng.below(2) {
        match rng.below(6) {
            0 if !meta.is_empty() => drop(meta.remove(below(rng, meta.len()))),
            1 => {
                let key = pick(rng, &META_KEYS).to_string();
                meta.retain(|(k, _)| *k != key);
                meta.push((key, weird_value(rng, vocab)));
            }
            2 if !meta.is_empty() && one_in(rng, 4) => {
                let dup = meta[below(rng, meta.len())].clone();
                meta.push(dup);
            }
            _ => {
                // Prefer keys the readers use.
                let known: Vec<usize> = (0..meta.len()).filter(|&i| META_KEYS.contains(&meta[i].0.as_str())).collect();
                let i = match (known.is_empty(), one_in(rng, 4)) {
                    (false, false) => *pick(rng, &known),
                    _ => below(rng, meta.len()),
                };
                if let Some((_, v)) = meta.get_mut(i) {
                    mutate_value(rng, v, vocab);
                }
            }
        }
    }
    let mut out = seed[..16].to_vec(); // magic, version, tensor count
    out.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (k, v) in &meta {
        put_str(&mut out, k);
        out.extend_from_slice(&v.type_id().to_le_bytes());
        if put_value(&mut out, v).is_err() {
            return mutate(rng, seed, others);
        }
    }
    out.extend_from_slice(&seed[kv_end..infos_end]);
    out.resize(out.len().next_multiple_of(alignment(&meta) as usize), 0);
    out.extend_from_slice(&seed[old_data..]);
    if one_in(rng, 6) {
        havoc(rng, &mut out, others);
    }
    out
}

/// `general.alignment` when it is usable, else the default (the reader rejects bad ones anyway;
/// this only decides where the data section is put).
fn alignment(meta: &[(String, GgufValue)]) -> u32 {
    match meta.iter().find(|(k, _)| k == "general.alignment") {
        Some((_, GgufValue::U32(a))) if a.is_power_of_two() && *a <= 1 << 16 => *a,
        _ => 32,
    }
}

/// Either kind of GGUF mutation, half the time each.
pub fn mutate_any(rng: &mut SplitMix64, seed: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    if one_in(rng, 2) {
        mutate_metadata(rng, seed, others)
    } else {
        mutate(rng, seed, others)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::gguf::{GgmlType, GgufWriter};

    #[test]
    fn walker_finds_every_header_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let mut w = GgufWriter::new();
        w.add_metadata("a", GgufValue::Array(vec![GgufValue::String("x".into())]));
        w.add_tensor_f32("t", &[2, 32], &[0.0; 64], GgmlType::F32).unwrap();
        w.write(&path).unwrap();
        let kinds: Vec<Kind> = fields(&std::fs::read(&path).unwrap()).iter().map(|f| f.kind).collect();
        let (count, len, vt) = (Kind::Count, Kind::StrLen, Kind::ValueType);
        assert_eq!(
            kinds,
            [Kind::Version, count, count, len, vt, vt, count, len, len, Kind::NDims, Kind::Dim, Kind::Dim, Kind::GgmlType, Kind::Offset]
        );
    }
}
