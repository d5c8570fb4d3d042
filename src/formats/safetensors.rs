//! safetensors reading (any float dtype, converted to f32) and atomic writing.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::path::Path;

/// Loads every tensor of a `.safetensors` file as f32 (F32, F16 and BF16 are accepted).
pub fn load_f32(path: &Path) -> Result<HashMap<String, Tensor>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only and lives only inside this function; model files are not
    // expected to change while they are being read.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let st = SafeTensors::deserialize(&mmap).map_err(|e| {
        let culprit = truncated_tensor(&mmap).map(|t| format!("; {t}")).unwrap_or_default();
        Error::format(path, format!("not a valid safetensors file: {e}{culprit}"))
    })?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let t = view_to_f32(&view).map_err(|d| Error::format(path, format!("tensor `{name}`: {d}")))?;
        out.insert(name, t);
    }
    Ok(out)
}

/// For a file the safetensors crate rejects: the first tensor (in data order) whose bytes lie
/// past the end of the file, as "tensor `name` needs bytes a..b of the data, which has only c",
/// so a truncated download names what it lost. `None` when the header itself is unreadable.
fn truncated_tensor(bytes: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    let data_len = bytes.len() - 8 - n;
    let mut spans: Vec<(u64, u64, &str)> = header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .filter_map(|(k, v)| {
            let o = v.get("data_offsets")?.as_array()?;
            Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?, k.as_str()))
        })
        .collect();
    spans.sort();
    let (a, b, name) = spans.into_iter().find(|&(_, end, _)| end > data_len as u64)?;
    Some(format!("tensor `{name}` needs bytes {a}..{b} of the data, which has only {data_len} (the file is truncated)"))
}

fn view_to_f32(view: &TensorView<'_>) -> std::result::Result<Tensor, String> {
    let vals = decode_f32(view.dtype(), view.data())?;
    Tensor::from_vec(vals, view.shape().to_vec(), &Device::Cpu).map_err(|e| e.to_string())
}

/// Little-endian f32 values.
pub fn le_f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// A tensor's bytes of `dtype` (F32, F16 or BF16) as f32 values.
fn decode_f32(dtype: Dtype, bytes: &[u8]) -> std::result::Result<Vec<f32>, String> {
    Ok(match dtype {
        Dtype::F32 => le_f32s(bytes),
        Dtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        other => return Err(format!("dtype {other:?} is not supported (expected F32, F16 or BF16)")),
    })
}

/// Storage dtype for writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDType {
    F32,
    F16,
    BF16,
}

impl SaveDType {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Some(Self::F32),
            "f16" | "float16" | "fp16" => Some(Self::F16),
            "bf16" | "bfloat16" => Some(Self::BF16),
            _ => None,
        }
    }
}

/// Writes tensors (sorted by name, as PEFT and transformers do) atomically.
pub fn save(path: &Path, tensors: &[(String, Tensor)], dtype: SaveDType, metadata: Option<HashMap<String, String>>) -> Result<()> {
    let shapes: Vec<(String, Vec<usize>)> = tensors.iter().map(|(n, t)| (n.clone(), t.dims().to_vec())).collect();
    save_streamed(path, &shapes, dtype, metadata, |i| Ok(tensors[i].1.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?))
}

/// One tensor's entry in a safetensors header: where its bytes lie in the data section.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderEntry {
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Byte range within the file (the data section's offsets plus the header's length).
    pub start: u64,
    pub end: u64,
}

/// Reads only the header of a safetensors file (not its data): for files too large to map
/// into memory at once, whose tensors are then read one at a time ([`read_tensor_f32`]).
pub fn read_header(path: &Path) -> Result<HashMap<String, HeaderEntry>> {
    use std::io::Read;
    let bad = |m: String| Error::format(path, format!("not a valid safetensors file: {m}"));
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| bad("shorter than its 8-byte header length".into()))?;
    let n = u64::from_le_bytes(len);
    if n > file_len.saturating_sub(8) || n > 100 << 20 {
        return Err(bad(format!(
            "its header length {n} does not fit in the file ({file_len} bytes)"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("its header is not JSON: {e}")))?;
    let mut out = HashMap::new();
    for (name, v) in json.iter().filter(|(k, _)| *k != "__metadata__") {
        let entry = (|| {
            let dtype = v.get("dtype")?.as_str()?.to_string();
            let shape = v
                .get("shape")?
                .as_array()?
                .iter()
                .map(|d| d.as_u64().map(|d| d as usize))
                .collect::<Option<Vec<_>>>()?;
            let o = v.get("data_offsets")?.as_array()?;
            let (a, b) = (o.first()?.as_u64()?, o.get(1)?.as_u64()?);
            Some(HeaderEntry {
                dtype,
                shape,
                start: 8 + n + a,
                end: 8 + n + b,
            })
        })()
        .ok_or_else(|| {
            bad(format!(
                "tensor `{name}` has no dtype, shape and data_offsets"
            ))
        })?;
        if entry.end < entry.start || entry.end > file_len {
            return Err(bad(format!("tensor `{name}` needs bytes {}..{} of a file of {file_len} (the file is truncated)", entry.start, entry.end)));
        }
        out.insert(name.clone(), entry);
    }
    Ok(out)
}

/// Reads tensor `name` (F32, F16 or BF16) of a file whose header [`read_header`] gave, as f32.
pub fn read_tensor_f32(path: &Path, name: &str, e: &HeaderEntry) -> Result<Vec<f32>> {
    use std::os::unix::fs::FileExt;
    let unsupported = || Error::format(path, format!("tensor `{name}`: dtype {} is not supported (expected F32, F16 or BF16)", e.dtype));
    let (dtype, width) = match e.dtype.as_str() {
        "F32" => (Dtype::F32, 4),
        "F16" => (Dtype::F16, 2),
        "BF16" => (Dtype::BF16, 2),
        _ => return Err(unsupported()),
    };
    let count: usize = e.shape.iter().product();
    if (e.end - e.start) as usize != count * width {
        return Err(Error::format(path, format!("tensor `{name}`: {} bytes for shape {:?} of {}", e.end - e.start, e.shape, e.dtype)));
    }
    let f = std::fs::File::open(path).map_err(|err| Error::io(path, err))?;
    let mut bytes = vec![0u8; count * width];
    f.read_exact_at(&mut bytes, e.start).map_err(|err| Error::io(path, err))?;
    decode_f32(dtype, &bytes).map_err(|_| unsupported())
}

/// Writes tensors of known shapes atomically, stored as `dtype`, asking `values(i)` for tensor
/// `i`'s f32 values only when its turn comes: a model is written with one tensor in memory
/// beside it, not a second copy of itself. Tensors are laid out by name.
pub fn save_streamed(
    path: &Path,
    tensors: &[(String, Vec<usize>)],
    dtype: SaveDType,
    metadata: Option<HashMap<String, String>>,
    mut values: impl FnMut(usize) -> Result<Vec<f32>>,
) -> Result<()> {
    use std::io::Write;
    let (name, width) = match dtype {
        SaveDType::F32 => ("F32", 4),
        SaveDType::F16 => ("F16", 2),
        SaveDType::BF16 => ("BF16", 2),
    };
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| tensors[a].0.cmp(&tensors[b].0));
    let mut header = serde_json::Map::new();
    if let Some(m) = metadata {
        header.insert("__metadata__".into(), serde_json::json!(m));
    }
    let mut offset = 0u64;
    for &i in &order {
        let (tensor, shape) = &tensors[i];
        let len = width * shape.iter().product::<usize>() as u64;
        header.insert(tensor.clone(), serde_json::json!({ "dtype": name, "shape": shape, "data_offsets": [offset, offset + len] }));
        offset += len;
    }
    let mut text = serde_json::to_vec(&header).expect("JSON values always serialise");
    // The data section starts 8-byte aligned, as the safetensors crate writes it.
    while !(8 + text.len()).is_multiple_of(8) {
        text.push(b' ');
    }
    let mut failure = None;
    let written = crate::io_util::write_atomic_with(path, |w| {
        w.write_all(&(text.len() as u64).to_le_bytes())?;
        w.write_all(&text)?;
        for &i in &order {
            let v = match values(i) {
                Ok(v) => v,
                Err(e) => {
                    failure = Some(e);
                    return Err(std::io::Error::other(
                        "the tensor's values could not be read",
                    ));
                }
            };
            if v.len() != tensors[i].1.iter().product::<usize>() {
                failure = Some(Error::format(
                    path,
                    format!(
                        "tensor `{}`: {} values for shape {:?}",
                        tensors[i].0,
                        v.len(),
                        tensors[i].1
                    ),
                ));
                return Err(std::io::Error::other("wrong number of values"));
            }
            for chunk in v.chunks(1 << 16) {
                let bytes: Vec<u8> = match dtype {
                    SaveDType::F32 => chunk.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    SaveDType::F16 => chunk.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
                    SaveDType::BF16 => chunk.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
                };
                w.write_all(&bytes)?;
            }
        }
        Ok(())
    });
    match failure {
        Some(e) => Err(e),
        None => written,
    }
}
