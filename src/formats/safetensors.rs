//! safetensors reading (any float dtype, converted to f32) and atomic writing.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::{BTreeMap, HashMap};
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
    let shape = view.shape().to_vec();
    let bytes = view.data();
    let vals: Vec<f32> = match view.dtype() {
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        other => return Err(format!("dtype {other:?} is not supported (expected F32, F16 or BF16)")),
    };
    Tensor::from_vec(vals, shape, &Device::Cpu).map_err(|e| e.to_string())
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
    let mut encoded: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for (name, t) in tensors {
        let (dt, bytes) = match dtype {
            SaveDType::F32 => (Dtype::F32, t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
            SaveDType::F16 => (Dtype::F16, t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect()),
            SaveDType::BF16 => (Dtype::BF16, t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect()),
        };
        encoded.insert(name.clone(), (dt, t.dims().to_vec(), bytes));
    }
    let views: Vec<(String, TensorView<'_>)> = encoded
        .iter()
        .map(|(n, (dt, shape, bytes))| TensorView::new(*dt, shape.clone(), bytes).map(|v| (n.clone(), v)))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::format(path, format!("cannot encode tensors: {e}")))?;
    let bytes = safetensors::tensor::serialize(views, metadata).map_err(|e| Error::format(path, format!("cannot encode tensors: {e}")))?;
    crate::io_util::write_atomic(path, &bytes)
}
