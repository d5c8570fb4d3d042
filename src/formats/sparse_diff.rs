//! The sparse diff: what a sparse fine-tuning run changed, per tensor the flat indices and
//! values of `θ − θ0`, in a safetensors file (`<name>.indices` as I64, `<name>.values` as F32,
//! the tensor's shape as `<name>.shape`, I64). The shape is a tensor rather than metadata so
//! that the file's bytes depend on its contents only (metadata is an unordered map). It applies to a base by adding the
//! values at their indices, and two diffs compose by addition (LT-SFT's composition).

use crate::error::{Error, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// One tensor's changed entries.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SparseTensor {
    pub shape: Vec<usize>,
    /// Flat indices, strictly increasing.
    pub indices: Vec<u64>,
    pub values: Vec<f32>,
}

impl SparseTensor {
    /// The entries where `after` differs from `before` (bit for bit), with `after − before`.
    pub fn between(shape: &[usize], before: &[f32], after: &[f32]) -> Self {
        assert_eq!(before.len(), after.len(), "sparse diff: tensors of different sizes");
        let mut t = SparseTensor { shape: shape.to_vec(), ..Default::default() };
        for (i, (b, a)) in before.iter().zip(after).enumerate() {
            if a.to_bits() != b.to_bits() {
                t.indices.push(i as u64);
                t.values.push(a - b);
            }
        }
        t
    }

    /// Adds the values to `weights` at their indices.
    pub fn apply(&self, weights: &mut [f32]) -> Result<()> {
        let n: usize = self.shape.iter().product();
        if weights.len() != n {
            return Err(Error::Model(format!("a sparse diff of shape {:?} applied to {} values", self.shape, weights.len())));
        }
        for (&i, &v) in self.indices.iter().zip(&self.values) {
            weights[i as usize] += v;
        }
        Ok(())
    }

    /// The sum of two diffs of the same tensor: values added where both have an entry.
    pub fn add(&self, other: &SparseTensor) -> Result<SparseTensor> {
        if self.shape != other.shape {
            return Err(Error::Model(format!("sparse diffs of shapes {:?} and {:?} do not add", self.shape, other.shape)));
        }
        let mut out = SparseTensor { shape: self.shape.clone(), ..Default::default() };
        let (mut i, mut j) = (0, 0);
        while i < self.indices.len() || j < other.indices.len() {
            let a = self.indices.get(i).copied().unwrap_or(u64::MAX);
            let b = other.indices.get(j).copied().unwrap_or(u64::MAX);
            let (idx, v) = match a.cmp(&b) {
                std::cmp::Ordering::Less => (a, self.values[i]),
                std::cmp::Ordering::Greater => (b, other.values[j]),
                std::cmp::Ordering::Equal => (a, self.values[i] + other.values[j]),
            };
            i += (a <= b) as usize;
            j += (b <= a) as usize;
            out.indices.push(idx);
            out.values.push(v);
        }
        Ok(out)
    }
}

/// Sparse diffs of several tensors, by Hugging Face name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SparseDiff {
    pub tensors: BTreeMap<String, SparseTensor>,
}

impl SparseDiff {
    /// Entries the diff changes, over all tensors.
    pub fn entries(&self) -> usize {
        self.tensors.values().map(|t| t.indices.len()).sum()
    }

    /// The composition of two diffs (LT-SFT): tensors of either, added where both have them.
    pub fn add(&self, other: &SparseDiff) -> Result<SparseDiff> {
        let mut out = self.clone();
        for (name, t) in &other.tensors {
            let sum = match out.tensors.get(name) {
                Some(mine) => mine.add(t)?,
                None => t.clone(),
            };
            out.tensors.insert(name.clone(), sum);
        }
        Ok(out)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let mut buffers: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut metadata = HashMap::new();
        for (name, t) in &self.tensors {
            let n = t.indices.len();
            buffers.push((format!("{name}.indices"), Dtype::I64, vec![n], t.indices.iter().flat_map(|&i| (i as i64).to_le_bytes()).collect()));
            buffers.push((format!("{name}.values"), Dtype::F32, vec![n], t.values.iter().flat_map(|v| v.to_le_bytes()).collect()));
            buffers.push((format!("{name}.shape"), Dtype::I64, vec![t.shape.len()], t.shape.iter().flat_map(|&d| (d as i64).to_le_bytes()).collect()));
        }
        metadata.insert("format".into(), "ferrotune-sparse-diff".into());
        let views: Vec<(String, TensorView<'_>)> = buffers
            .iter()
            .map(|(n, dt, shape, bytes)| TensorView::new(*dt, shape.clone(), bytes).map(|v| (n.clone(), v)))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::format(path, format!("cannot encode the sparse diff: {e}")))?;
        let bytes = safetensors::tensor::serialize(views, Some(metadata)).map_err(|e| Error::format(path, format!("cannot encode the sparse diff: {e}")))?;
        crate::io_util::write_atomic(path, &bytes)
    }

    pub fn load(path: &Path) -> Result<SparseDiff> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::format(path, format!("not a valid safetensors file: {e}")))?;
        let mut diff = SparseDiff::default();
        let mut names = st.names();
        names.sort();
        for key in names.iter().filter_map(|k| k.strip_suffix(".shape")) {
            let bad = |d: String| Error::format(path, format!("tensor `{key}`: {d}"));
            let view = |suffix: &str, dt: Dtype| {
                let v = st.tensor(&format!("{key}.{suffix}")).map_err(|e| bad(format!("{suffix}: {e}")))?;
                if v.dtype() != dt {
                    return Err(bad(format!("{suffix} are {:?}, expected {dt:?}", v.dtype())));
                }
                Ok(v.data().to_vec())
            };
            let shape: Vec<usize> = view("shape", Dtype::I64)?.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")).max(0) as usize).collect();
            let indices: Vec<u64> = view("indices", Dtype::I64)?.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as u64).collect();
            let values: Vec<f32> = view("values", Dtype::F32)?.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
            let n: usize = shape.iter().product();
            if indices.len() != values.len() || indices.windows(2).any(|w| w[0] >= w[1]) || indices.last().is_some_and(|&i| i as usize >= n) {
                return Err(bad(format!("{} indices and {} values: expected as many, strictly increasing, below {n}", indices.len(), values.len())));
            }
            diff.tensors.insert(key.to_string(), SparseTensor { shape, indices, values });
        }
        Ok(diff)
    }
}
