//! GGUF v3 checkpoints (llama.cpp's format), opened into the same [`Checkpoint`] as a Hugging
//! Face directory.
//!
//! A GGUF file holds everything in one place: the architecture and the tokenizer as metadata,
//! and every tensor in ggml's storage types. Opening reads and checks the header only
//! ([`reader`]); the architecture comes from the metadata ([`spec`]), the tokenizer is rebuilt
//! from the vocabulary the file carries ([`tokenizer`]). Each tensor is read when the model
//! builder asks for it by its Hugging Face name: dequantised to f32 ([`dequant`]), its
//! dimensions put in Hugging Face order and, for Llama-architecture q/k projections, its rows
//! un-permuted back to the rotate-half RoPE layout ([`names`]).
//!
//! Supported: architectures `llama`, `qwen2` and `gemma3` (text); tensor types F32, F16, BF16,
//! Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K (others are refused when read, naming the tensor and its type); tokenizers `gpt2`
//! (byte-level BPE) and `llama` (SentencePiece BPE).

pub mod dequant;
pub mod names;
pub mod reader;
pub mod spec;
pub mod tokenizer;

#[cfg(test)]
mod test_writer;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::Path;

use super::fingerprint::checkpoint_fingerprint;
use super::{Checkpoint, CheckpointFormat, HostTensor, WeightSource};
use crate::error::CheckpointError;
use dequant::DequantError;
use names::QkRole;
use reader::GgufFile;

/// Opens a GGUF file: header, architecture, tokenizer and fingerprint; tensors are read later,
/// one at a time, through [`Checkpoint::weights`].
pub fn open(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let file = GgufFile::open(path)?;
    let mut spec = spec::spec_from_metadata(&file)?;
    spec.weights_sha256 = Some(checkpoint_fingerprint(&[path])?);
    let tokenizer = tokenizer::tokenizer_from_metadata(&file)?;
    let weights = GgufWeights::new(file, spec.num_attention_heads, spec.num_key_value_heads)?;
    Ok(Checkpoint {
        path: path.to_path_buf(),
        format: CheckpointFormat::Gguf,
        spec,
        weights: Box::new(weights),
        tokenizer,
    })
}

/// The tensors of a GGUF file under their Hugging Face names, converted on demand.
pub struct GgufWeights {
    file: GgufFile,
    /// Hugging Face name → (index into `file.tensors`, q/k role when rows must be un-permuted,
    /// whether the file stores `1 + w`).
    index: BTreeMap<String, (usize, Option<QkRole>, bool)>,
    n_head: usize,
    n_head_kv: usize,
}

impl GgufWeights {
    /// Indexes the tensors of `file` by Hugging Face name. `n_head` and `n_head_kv` are the
    /// model's query and key/value head counts, needed to un-permute q/k rows of
    /// Llama-architecture files. Tensors with no Hugging Face counterpart are left out.
    pub fn new(file: GgufFile, n_head: usize, n_head_kv: usize) -> Result<Self, CheckpointError> {
        let arch = spec::arch(&file)?;
        let mut index = BTreeMap::new();
        for (i, info) in file.tensors.iter().enumerate() {
            if let Some(mapped) = names::hf_name(&info.name, arch) {
                index.insert(mapped.hf, (i, mapped.qk, mapped.minus_one));
            }
        }
        Ok(GgufWeights {
            file,
            index,
            n_head,
            n_head_kv,
        })
    }

    /// The underlying file, for its metadata.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }
}

impl WeightSource for GgufWeights {
    fn names(&self) -> Vec<String> {
        self.index.keys().cloned().collect()
    }

    fn tensor(&self, name: &str) -> Result<HostTensor, CheckpointError> {
        let &(i, role, minus_one) =
            self.index
                .get(name)
                .ok_or_else(|| CheckpointError::MissingTensor {
                    path: self.file.path().display().to_string(),
                    name: name.to_string(),
                })?;
        let info = &self.file.tensors[i];
        let described = || format!("{name} (GGUF {})", info.name);
        if !info.ggml_type.is_supported() {
            return Err(CheckpointError::UnsupportedDtype {
                name: described(),
                dtype: info.ggml_type.name().to_string(),
                supported: dequant::SUPPORTED,
            });
        }
        let bytes = self.file.read_tensor_bytes(info)?;
        let data = dequant::dequantize(info.ggml_type, &bytes).map_err(|e| match e {
            DequantError::Unsupported(t) => CheckpointError::UnsupportedDtype {
                name: described(),
                dtype: t.name().to_string(),
                supported: dequant::SUPPORTED,
            },
            DequantError::Length { bytes, block_bytes } => CheckpointError::Format {
                path: self.file.path().display().to_string(),
                reason: format!(
                    "tensor `{}` has {bytes} bytes, not a whole number of {block_bytes}-byte \
                     blocks",
                    info.name
                ),
            },
        })?;
        let shape = names::hf_shape(&info.dims);
        let mut data = data;
        if minus_one {
            data.iter_mut().for_each(|v| *v -= 1.0);
        }
        let data = match role {
            None => data,
            Some(role) => {
                let heads = match role {
                    QkRole::Query => self.n_head,
                    QkRole::Key => self.n_head_kv,
                };
                let rows = shape[0];
                let cols = shape[1..].iter().product();
                names::unpermute_rows(&data, rows, cols, heads).map_err(|reason| {
                    CheckpointError::Format {
                        path: self.file.path().display().to_string(),
                        reason: format!("tensor `{}`: {reason}", info.name),
                    }
                })?
            }
        };
        Ok(HostTensor { shape, data })
    }
}
