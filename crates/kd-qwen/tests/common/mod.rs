//! Reading and writing whole safetensors files, for tests that build altered checkpoints.

use std::path::Path;

use safetensors::Dtype;

/// One tensor of a safetensors file: name, dtype, shape and raw little-endian bytes.
pub type Entry = (String, Dtype, Vec<usize>, Vec<u8>);

/// Every tensor of the file at `path`, in the file's order.
pub fn read_tensors(path: &Path) -> Vec<Entry> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect()
}

/// Writes `tensors` to `path` as one safetensors file.
pub fn write_tensors(path: &Path, tensors: &[Entry]) {
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, None, path).unwrap();
}
