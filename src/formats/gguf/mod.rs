//! GGUF: the llama.cpp model file format (reader, writer, block quantization).
//!
//! Spec: little-endian; magic "GGUF", version (u32, 2 or 3), tensor count (u64), metadata count
//! (u64), metadata key/value pairs, tensor infos, padding to `general.alignment` (default 32),
//! then the tensor data. Dimensions are stored innermost first (ggml's `ne[0]` is the row
//! length), so a `[out, in]` torch matrix is stored with dims `[in, out]`.

/// One metadata value. The enum mirrors GGUF's value types one to one so that a file read and
/// written back keeps every key exactly as it was.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

pub mod quants;

pub use quants::GgmlType;

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Version written by [`GgufWriter`].
pub const GGUF_VERSION: u32 = 3;
/// Alignment of the data section and every tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u32 = 32;
/// The metadata key that overrides [`DEFAULT_ALIGNMENT`] (must be a U32 power of two).
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// ggml tensors have at most 4 dimensions.
pub const MAX_DIMS: usize = 4;
/// llama.cpp rejects tensor names of 64 bytes or more (`GGML_MAX_NAME`).
const MAX_NAME_LEN: usize = 63;
/// Real files nest arrays at most once (arrays of token-merge arrays); anything much deeper is
/// garbage, and bounding it keeps a crafted file from overflowing the stack.
const MAX_ARRAY_DEPTH: usize = 8;

/// GGUF's metadata value type ids.
mod vtype {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;

    /// The fewest bytes a value of type `t` can occupy, or `None` for an unknown type.
    /// Used to reject element counts the rest of the file could not possibly hold.
    pub fn min_size(t: u32) -> Option<usize> {
        Some(match t {
            U8 | I8 | BOOL => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | STRING => 8,
            ARRAY => 12,
            _ => return None,
        })
    }
}

impl GgufValue {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// Any integer type whose value is non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v as u64),
            Self::U16(v) => Some(v as u64),
            Self::U32(v) => Some(v as u64),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer type whose value fits an i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Self::I8(v) => Some(v as i64),
            Self::I16(v) => Some(v as i64),
            Self::I32(v) => Some(v as i64),
            Self::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// F32 or F64 (integers are not silently taken as floats).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v as f64),
            Self::F64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }

    /// Short lower-case name of the variant, for error messages ("u32", "string", "array").
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::U8(_) => "u8",
            Self::I8(_) => "i8",
            Self::U16(_) => "u16",
            Self::I16(_) => "i16",
            Self::U32(_) => "u32",
            Self::I32(_) => "i32",
            Self::F32(_) => "f32",
            Self::Bool(_) => "bool",
            Self::String(_) => "string",
            Self::Array(_) => "array",
            Self::U64(_) => "u64",
            Self::I64(_) => "i64",
            Self::F64(_) => "f64",
        }
    }

    /// GGUF's on-disk value type id.
    pub fn type_id(&self) -> u32 {
        match self {
            Self::U8(_) => vtype::U8,
            Self::I8(_) => vtype::I8,
            Self::U16(_) => vtype::U16,
            Self::I16(_) => vtype::I16,
            Self::U32(_) => vtype::U32,
            Self::I32(_) => vtype::I32,
            Self::F32(_) => vtype::F32,
            Self::Bool(_) => vtype::BOOL,
            Self::String(_) => vtype::STRING,
            Self::Array(_) => vtype::ARRAY,
            Self::U64(_) => vtype::U64,
            Self::I64(_) => vtype::I64,
            Self::F64(_) => vtype::F64,
        }
    }
}

/// One tensor's header entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// As stored: innermost (the row length, ggml's `ne[0]`) first.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Byte offset relative to the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Product of the dims (1 for a 0-dim tensor). Saturates rather than wraps; files whose
    /// tensors overflow are rejected by [`GgufFile::open`].
    pub fn n_elements(&self) -> usize {
        self.dims
            .iter()
            .fold(1usize, |a, &d| a.saturating_mul(d as usize))
    }

    /// Bytes of block data (0 when the row length is not a whole number of blocks, which
    /// [`GgufFile::open`] rejects).
    pub fn n_bytes(&self) -> usize {
        self.ggml_type.bytes_for(self.n_elements()).unwrap_or(0)
    }

    /// torch-style shape: the dims reversed (outermost first).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

fn align_up(x: u64, a: u64) -> Option<u64> {
    x.checked_next_multiple_of(a)
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

type Parse<T> = std::result::Result<T, String>;

/// Bounds-checked little-endian reader over the header. Every failure is a message naming
/// what was being read and where, never a panic, whatever the bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Parse<&'a [u8]> {
        if n > self.left() {
            return Err(format!(
                "truncated header: reading {what} at byte {} needs {n} bytes, but the file is {} bytes long",
                self.pos,
                self.buf.len()
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Parse<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Parse<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Parse<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items of at least `min_item` bytes each. Refuses counts the rest of the file
    /// could not hold, so garbage never triggers a huge allocation or a long loop.
    fn count(&mut self, what: &str, min_item: usize) -> Parse<usize> {
        let n = self.u64(what)?;
        if n.saturating_mul(min_item as u64) > self.left() as u64 {
            return Err(format!(
                "{what} is {n}, more than the remaining {} bytes of the file can hold (truncated or corrupt file?)",
                self.left()
            ));
        }
        Ok(n as usize)
    }

    fn raw_string(&mut self, what: &str) -> Parse<&'a [u8]> {
        let n = self.count(what, 1)?;
        self.take(n, what)
    }

    /// Keys and tensor names must be UTF-8: they are looked up by name.
    fn strict_string(&mut self, what: &str) -> Parse<String> {
        let b = self.raw_string(what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what} is not valid UTF-8"))
    }

    /// String values are decoded leniently: a single bad byte in a 50k-entry vocabulary should
    /// not make a model unopenable. (Such a value would not round-trip byte for byte.)
    fn lossy_string(&mut self, what: &str) -> Parse<String> {
        let b = self.raw_string(what)?;
        Ok(String::from_utf8_lossy(b).into_owned())
    }

    fn value(&mut self, ty: u32, depth: usize) -> Parse<GgufValue> {
        Ok(match ty {
            vtype::U8 => GgufValue::U8(self.array::<1>("u8")?[0]),
            vtype::I8 => GgufValue::I8(self.array::<1>("i8")?[0] as i8),
            vtype::U16 => GgufValue::U16(u16::from_le_bytes(self.array("u16")?)),
            vtype::I16 => GgufValue::I16(i16::from_le_bytes(self.array("i16")?)),
            vtype::U32 => GgufValue::U32(self.u32("u32")?),
            vtype::I32 => GgufValue::I32(i32::from_le_bytes(self.array("i32")?)),
            vtype::F32 => GgufValue::F32(f32::from_le_bytes(self.array("f32")?)),
            vtype::BOOL => GgufValue::Bool(self.array::<1>("bool")?[0] != 0),
            vtype::STRING => GgufValue::String(self.lossy_string("string")?),
            vtype::ARRAY => self.array_value(depth)?,
            vtype::U64 => GgufValue::U64(self.u64("u64")?),
            vtype::I64 => GgufValue::I64(i64::from_le_bytes(self.array("i64")?)),
            vtype::F64 => GgufValue::F64(f64::from_le_bytes(self.array("f64")?)),
            other => return Err(format!("unknown value type {other}")),
        })
    }

    fn array_value(&mut self, depth: usize) -> Parse<GgufValue> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(format!("arrays nested more than {MAX_ARRAY_DEPTH} deep"));
        }
        let elem = self.u32("array element type")?;
        let min =
            vtype::min_size(elem).ok_or_else(|| format!("unknown array element type {elem}"))?;
        let n = self.count("array length", min)?;
        let mut items = Vec::with_capacity(n);
        for i in 0..n {
            let v = self
                .value(elem, depth + 1)
                .map_err(|e| format!("array element {i}: {e}"))?;
            items.push(v);
        }
        Ok(GgufValue::Array(items))
    }
}

/// Everything the header says, validated against the file length.
struct Header {
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<TensorInfo>,
    alignment: u32,
    data_offset: u64,
}

/// Minimum bytes of one metadata entry (key length, type, 1-byte value) and one tensor info
/// (name length, n_dims, type, offset).
const MIN_KV_BYTES: usize = 8 + 4 + 1;
const MIN_TENSOR_INFO_BYTES: usize = 8 + 4 + 4 + 8;

fn parse_header(buf: &[u8]) -> Parse<Header> {
    let mut c = Cursor { buf, pos: 0 };
    let version = parse_preamble(&mut c)?;
    let n_tensors = c.count("tensor count", MIN_TENSOR_INFO_BYTES)?;
    let n_kv = c.count("metadata entry count", MIN_KV_BYTES)?;
    let metadata = parse_metadata(&mut c, n_kv)?;
    let alignment = alignment_of(&metadata)?;
    let tensors = (0..n_tensors)
        .map(|i| parse_tensor_info(&mut c, i, alignment))
        .collect::<Parse<Vec<_>>>()?;
    check_unique_names(&tensors)?;
    let data_offset = align_up(c.pos as u64, alignment as u64).ok_or("header too large")?;
    check_tensor_extents(&tensors, data_offset, buf.len() as u64)?;
    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

fn parse_preamble(c: &mut Cursor) -> Parse<u32> {
    let magic = c.take(4, "magic")?;
    if magic != GGUF_MAGIC {
        return Err(format!(
            "bad magic {:?} (expected \"GGUF\"): not a GGUF file",
            String::from_utf8_lossy(magic)
        ));
    }
    let version = c.u32("version")?;
    match version {
        2 | 3 => Ok(version),
        1 => Err("GGUF version 1 is not supported (only versions 2 and 3)".into()),
        v if matches!(v.swap_bytes(), 2 | 3) => {
            Err(format!("unsupported version {v}: this looks like a big-endian GGUF file, which is not supported"))
        }
        v => Err(format!("unsupported GGUF version {v} (only versions 2 and 3)")),
    }
}

fn parse_metadata(c: &mut Cursor, n_kv: usize) -> Parse<Vec<(String, GgufValue)>> {
    let mut seen = std::collections::HashSet::new();
    let mut metadata = Vec::with_capacity(n_kv);
    for i in 0..n_kv {
        let key = c.strict_string(&format!("key of metadata entry {i}"))?;
        let value = c
            .u32("value type")
            .and_then(|ty| c.value(ty, 0))
            .map_err(|e| format!("metadata key `{key}`: {e}"))?;
        if !seen.insert(key.clone()) {
            return Err(format!("metadata key `{key}` appears twice"));
        }
        metadata.push((key, value));
    }
    Ok(metadata)
}

/// `general.alignment` if present (a U32 power of two, as llama.cpp and gguf-py demand).
fn alignment_of(metadata: &[(String, GgufValue)]) -> Parse<u32> {
    match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        None => Ok(DEFAULT_ALIGNMENT),
        Some((_, GgufValue::U32(a))) if a.is_power_of_two() => Ok(*a),
        Some((_, v)) => Err(format!(
            "{ALIGNMENT_KEY} must be a u32 power of two, found {v:?}"
        )),
    }
}

fn parse_tensor_info(c: &mut Cursor, i: usize, alignment: u32) -> Parse<TensorInfo> {
    let name = c.strict_string(&format!("name of tensor {i}"))?;
    let ctx = |e: String| format!("tensor `{name}`: {e}");
    let n_dims = c.u32("dimension count").map_err(ctx)? as usize;
    if n_dims > MAX_DIMS {
        return Err(ctx(format!(
            "{n_dims} dimensions, at most {MAX_DIMS} are allowed"
        )));
    }
    let dims = (0..n_dims)
        .map(|_| c.u64("dimension"))
        .collect::<Parse<Vec<_>>>()
        .map_err(ctx)?;
    let type_id = c.u32("type id").map_err(ctx)?;
    let ggml_type = GgmlType::from_u32(type_id)
        .ok_or_else(|| format!("unknown ggml type id {type_id} for tensor `{name}`"))?;
    let offset = c.u64("data offset").map_err(ctx)?;
    let info = TensorInfo {
        name: name.clone(),
        dims,
        ggml_type,
        offset,
    };
    check_tensor_shape(&info, alignment).map_err(ctx)?;
    Ok(info)
}

/// The element count must fit in memory, rows must be whole blocks, and the offset must be
/// aligned (llama.cpp writes and requires that).
fn check_tensor_shape(t: &TensorInfo, alignment: u32) -> Parse<()> {
    let n = t
        .dims
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64 && usize::try_from(n).is_ok())
        .ok_or_else(|| format!("dims {:?} have an absurd number of elements", t.dims))?;
    let row = t.dims.first().copied().unwrap_or(1);
    let bs = t.ggml_type.block_size() as u64;
    if row % bs != 0 {
        return Err(format!(
            "row length {row} is not a multiple of the {} block size {bs}",
            t.ggml_type
        ));
    }
    if (n / bs)
        .checked_mul(t.ggml_type.type_size() as u64)
        .is_none()
    {
        return Err(format!("dims {:?} take an absurd number of bytes", t.dims));
    }
    if !t.offset.is_multiple_of(alignment as u64) {
        return Err(format!(
            "data offset {} is not a multiple of the alignment {alignment}",
            t.offset
        ));
    }
    Ok(())
}

fn check_unique_names(tensors: &[TensorInfo]) -> Parse<()> {
    let mut seen = std::collections::HashSet::new();
    match tensors.iter().find(|t| !seen.insert(t.name.as_str())) {
        Some(t) => Err(format!("tensor `{}` appears twice", t.name)),
        None => Ok(()),
    }
}

fn check_tensor_extents(tensors: &[TensorInfo], data_offset: u64, file_len: u64) -> Parse<()> {
    for t in tensors {
        let start = data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(t.n_bytes() as u64));
        if end.is_none_or(|e| e > file_len) {
            return Err(format!(
                "tensor `{}` data (offset {} + {} bytes after the data section at byte {data_offset}) \
                 extends past the end of the file ({file_len} bytes; truncated download?)",
                t.name,
                t.offset,
                t.n_bytes()
            ));
        }
    }
    Ok(())
}

/// The metadata of a GGUF held in memory, in file order (header validation included; the
/// message says what is wrong). For tools that edit GGUF bytes, such as the fuzzer.
pub fn parse_metadata_bytes(buf: &[u8]) -> std::result::Result<Vec<(String, GgufValue)>, String> {
    parse_header(buf).map(|h| h.metadata)
}

/// An opened, memory-mapped GGUF file with its parsed header.
pub struct GgufFile {
    path: PathBuf,
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u32,
    data_offset: u64,
    mmap: memmap2::Mmap,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

impl GgufFile {
    /// Opens and memory-maps `path`, parsing and validating the whole header. Errors name the
    /// file and what is wrong with it; no input makes this panic.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len == 0 {
            // Mapping an empty file fails on some platforms; say what is really wrong.
            return Err(Error::format(path, "file is empty, not a GGUF file"));
        }
        // SAFETY: the map is read-only. Like every mmap-based model loader we assume the file
        // is not truncated or rewritten by another process while it is open.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let h = parse_header(&mmap).map_err(|e| Error::format(path, e))?;
        let index = h
            .metadata
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        let tensor_index = h
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            version: h.version,
            metadata: h.metadata,
            index,
            tensors: h.tensors,
            tensor_index,
            alignment: h.alignment,
            data_offset: h.data_offset,
            mmap,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// The alignment in force (from `general.alignment`, default 32).
    pub fn alignment(&self) -> u32 {
        self.alignment
    }

    /// Absolute byte offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// All metadata, in file order.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn err(&self, detail: String) -> Error {
        Error::format(&self.path, detail)
    }

    /// `Ok(None)` when absent; an error when present but `convert` rejects it.
    fn typed<'a, T>(
        &'a self,
        key: &str,
        expected: &str,
        convert: impl Fn(&'a GgufValue) -> Option<T>,
    ) -> Result<Option<T>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        convert(v).map(Some).ok_or_else(|| {
            self.err(format!(
                "metadata key `{key}` has type {}, expected {expected}",
                v.type_name()
            ))
        })
    }

    fn required<T>(&self, key: &str, v: Option<T>) -> Result<T> {
        v.ok_or_else(|| self.err(format!("metadata key `{key}` is missing")))
    }

    pub fn get_opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.typed(key, "string", GgufValue::as_str)
    }

    /// Any integer type whose value fits a u32.
    pub fn get_opt_u32(&self, key: &str) -> Result<Option<u32>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        if v.as_u64().is_none() && v.as_i64().is_none() {
            let t = v.type_name();
            return Err(self.err(format!(
                "metadata key `{key}` has type {t}, expected an integer"
            )));
        }
        let fits = v.as_u64().and_then(|x| u32::try_from(x).ok());
        fits.map(Some).ok_or_else(|| {
            self.err(format!(
                "metadata key `{key}` = {v:?} does not fit in a u32"
            ))
        })
    }

    /// F32 or F64 (an F64 is rounded to f32).
    pub fn get_opt_f32(&self, key: &str) -> Result<Option<f32>> {
        self.typed(key, "f32 or f64", |v| v.as_f64().map(|x| x as f32))
    }

    pub fn get_opt_array(&self, key: &str) -> Result<Option<&[GgufValue]>> {
        self.typed(key, "array", GgufValue::as_array)
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.get_opt_str(key)?;
        self.required(key, v)
    }

    pub fn get_u32(&self, key: &str) -> Result<u32> {
        let v = self.get_opt_u32(key)?;
        self.required(key, v)
    }

    pub fn get_f32(&self, key: &str) -> Result<f32> {
        let v = self.get_opt_f32(key)?;
        self.required(key, v)
    }

    pub fn get_array(&self, key: &str) -> Result<&[GgufValue]> {
        let v = self.get_opt_array(key)?;
        self.required(key, v)
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    fn require_tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor_info(name)
            .ok_or_else(|| self.err(format!("no tensor named `{name}`")))
    }

    /// The tensor's raw block bytes, borrowed from the memory map.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.require_tensor(name)?;
        // `open` checked the extent; stay panic-free even so.
        let start = self
            .data_offset
            .checked_add(t.offset)
            .and_then(|s| usize::try_from(s).ok());
        start
            .and_then(|s| self.mmap.get(s..s.checked_add(t.n_bytes())?))
            .ok_or_else(|| self.err(format!("tensor `{name}` data lies outside the file")))
    }

    /// The tensor dequantized to f32, row-major in torch shape order (the storage order).
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.require_tensor(name)?;
        let bytes = self.tensor_bytes(name)?;
        quants::dequantize(t.ggml_type, bytes, t.n_elements())
            .map_err(|e| self.err(format!("tensor `{name}`: {e}")))
    }
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    bytes: Vec<u8>,
}

/// Collects metadata and tensors, then writes a GGUF v3 file atomically. Tensors are laid out
/// in insertion order, each at an offset aligned to `general.alignment` (default 32).
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<PendingTensor>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata key, or replaces its value in place if it already exists.
    pub fn add_metadata(&mut self, key: impl Into<String>, v: GgufValue) {
        let key = key.into();
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = v,
            None => self.metadata.push((key, v)),
        }
    }

    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    /// Adds a tensor given in torch shape order, quantizing `data` to `ty`.
    pub fn add_tensor_f32(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        data: &[f32],
        ty: GgmlType,
    ) -> std::result::Result<(), String> {
        let name = name.into();
        let n = checked_elements(&name, shape)?;
        if n != data.len() {
            return Err(format!(
                "tensor `{name}`: shape {shape:?} holds {n} values, got {}",
                data.len()
            ));
        }
        check_row(&name, shape, ty)?;
        let bytes = quants::quantize(ty, data).map_err(|e| format!("tensor `{name}`: {e}"))?;
        self.add_tensor_raw(name, shape, ty, bytes)
    }

    /// Adds a tensor of already-encoded blocks; `shape` is in torch order.
    pub fn add_tensor_raw(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        ty: GgmlType,
        bytes: Vec<u8>,
    ) -> std::result::Result<(), String> {
        let name = name.into();
        if name.len() > MAX_NAME_LEN {
            return Err(format!(
                "tensor name `{name}` is longer than {MAX_NAME_LEN} bytes (llama.cpp's limit)"
            ));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(format!("tensor `{name}` was already added"));
        }
        if shape.is_empty() || shape.len() > MAX_DIMS {
            return Err(format!(
                "tensor `{name}`: shape {shape:?} must have 1 to {MAX_DIMS} dimensions"
            ));
        }
        let n = checked_elements(&name, shape)?;
        check_row(&name, shape, ty)?;
        let expected = ty
            .bytes_for(n)
            .ok_or_else(|| format!("tensor `{name}`: size overflow"))?;
        if bytes.len() != expected {
            return Err(format!(
                "tensor `{name}`: {n} {ty} values take {expected} bytes, got {}",
                bytes.len()
            ));
        }
        let dims = shape.iter().rev().map(|&d| d as u64).collect();
        self.tensors.push(PendingTensor {
            name,
            dims,
            ty,
            bytes,
        });
        Ok(())
    }

    /// The alignment the file will use: `general.alignment` if set (must be a U32 power of
    /// two, since readers reject anything else), else 32.
    pub fn alignment(&self) -> std::result::Result<u32, String> {
        alignment_of(&self.metadata)
    }

    /// Writes the file atomically (a crash leaves the old file or the complete new one).
    pub fn write(&self, path: &Path) -> Result<()> {
        let alignment = self.alignment().map_err(|e| Error::format(path, e))? as u64;
        let header = self
            .header_bytes(alignment)
            .map_err(|e| Error::format(path, e))?;
        crate::io_util::write_atomic_with(path, |w| self.write_body(w, &header, alignment))
    }

    /// The whole file in memory (for tools that build GGUFs without touching the disk, such as
    /// the fuzzer).
    pub fn to_bytes(&self) -> std::result::Result<Vec<u8>, String> {
        let alignment = self.alignment()? as u64;
        let header = self.header_bytes(alignment)?;
        let mut out = Vec::new();
        self.write_body(&mut out, &header, alignment)
            .map_err(|e| e.to_string())?;
        Ok(out)
    }

    fn write_body(&self, w: &mut impl Write, header: &[u8], alignment: u64) -> std::io::Result<()> {
        w.write_all(header)?;
        for t in &self.tensors {
            w.write_all(&t.bytes)?;
            write_padding(w, t.bytes.len() as u64, alignment)?;
        }
        Ok(())
    }

    /// Everything up to the data section, padded to the alignment. Tensor offsets are the
    /// running total of the padded tensor sizes, so each tensor starts aligned.
    fn header_bytes(&self, alignment: u64) -> std::result::Result<Vec<u8>, String> {
        let mut w = Vec::new();
        w.extend_from_slice(&GGUF_MAGIC);
        w.extend_from_slice(&GGUF_VERSION.to_le_bytes());
        w.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        w.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, v) in &self.metadata {
            put_str(&mut w, key);
            w.extend_from_slice(&v.type_id().to_le_bytes());
            put_value(&mut w, v).map_err(|e| format!("metadata key `{key}`: {e}"))?;
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            put_str(&mut w, &t.name);
            w.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                w.extend_from_slice(&d.to_le_bytes());
            }
            w.extend_from_slice(&t.ty.to_u32().to_le_bytes());
            w.extend_from_slice(&offset.to_le_bytes());
            offset = align_up(offset + t.bytes.len() as u64, alignment).ok_or("file too large")?;
        }
        let len = align_up(w.len() as u64, alignment).ok_or("header too large")?;
        w.resize(len as usize, 0);
        Ok(w)
    }
}

fn checked_elements(name: &str, shape: &[usize]) -> std::result::Result<usize, String> {
    shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("tensor `{name}`: shape {shape:?} overflows"))
}

/// Blocks run along the innermost (last torch) dimension, so each row must be whole blocks.
fn check_row(name: &str, shape: &[usize], ty: GgmlType) -> std::result::Result<(), String> {
    let row = shape.last().copied().unwrap_or(1);
    if row % ty.block_size() != 0 {
        return Err(format!(
            "tensor `{name}`: row length {row} (last dim of {shape:?}) is not a multiple of the {ty} block size {}",
            ty.block_size()
        ));
    }
    Ok(())
}

fn write_padding(w: &mut impl Write, len: u64, alignment: u64) -> std::io::Result<()> {
    let pad = (alignment - len % alignment) % alignment;
    w.write_all(&vec![0u8; pad as usize])
}

pub(crate) fn put_str(w: &mut Vec<u8>, s: &str) {
    w.extend_from_slice(&(s.len() as u64).to_le_bytes());
    w.extend_from_slice(s.as_bytes());
}

/// Appends a value's encoding (without its type id).
pub(crate) fn put_value(w: &mut Vec<u8>, v: &GgufValue) -> std::result::Result<(), String> {
    match v {
        GgufValue::U8(x) => w.push(*x),
        GgufValue::I8(x) => w.push(*x as u8),
        GgufValue::U16(x) => w.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => w.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => w.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => w.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => w.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => w.push(*x as u8),
        GgufValue::String(s) => put_str(w, s),
        GgufValue::Array(items) => put_array(w, items)?,
        GgufValue::U64(x) => w.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => w.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => w.extend_from_slice(&x.to_le_bytes()),
    }
    Ok(())
}

/// A GGUF array has one element type, so mixed arrays are refused. (Nested arrays may differ
/// from each other: each inner array carries its own element type.) An empty array is written
/// with element type u8; it reads back as an empty array either way.
fn put_array(w: &mut Vec<u8>, items: &[GgufValue]) -> std::result::Result<(), String> {
    let elem = items.first().map_or(vtype::U8, GgufValue::type_id);
    if let Some(odd) = items.iter().find(|v| v.type_id() != elem) {
        return Err(format!(
            "array mixes element types {} and {}; GGUF arrays hold a single type",
            items[0].type_name(),
            odd.type_name()
        ));
    }
    w.extend_from_slice(&elem.to_le_bytes());
    w.extend_from_slice(&(items.len() as u64).to_le_bytes());
    for v in items {
        put_value(w, v)?;
    }
    Ok(())
}
