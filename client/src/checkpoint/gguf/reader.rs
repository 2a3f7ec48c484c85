//! The GGUF container: header, metadata, tensor index, and positioned reads of tensor bytes.
//!
//! Layout (little-endian, as ggml's `gguf.cpp` reads it): magic `GGUF`, version (3; 2 has the
//! same layout), tensor count and metadata count (u64), the metadata key/value pairs, one info
//! per tensor (name, dimensions with `ne[0]` the fastest-varying, ggml type, offset into the
//! data section), padding to `general.alignment` (default 32), then the tensor data.
//!
//! Opening reads only the header; tensor bytes are read on demand with a seek under a mutex
//! (the workspace forbids `unsafe`, so no memory map). Everything read from the file is checked
//! before it is trusted: every count and length against what is left of the file and against a
//! cap, so that a damaged or hostile file is refused with an error that names the file and the
//! key or tensor at fault, and never makes us allocate more than a few hundred megabytes.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::dequant::GgmlType;
use crate::error::CheckpointError;

/// The four bytes every GGUF file starts with.
pub const MAGIC: [u8; 4] = *b"GGUF";

/// Alignment of the tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Most bytes the header (metadata and tensor infos) may take. Real headers are a few MB (a
/// 256k-token vocabulary with its merges is ~20 MB); the cap bounds what a bad file can make us
/// allocate.
pub const MAX_HEADER_BYTES: u64 = 256 << 20;

/// Longest string accepted (chat templates are tens of KB).
pub const MAX_STRING_LEN: u64 = 16 << 20;

/// Most elements of one metadata array (vocabularies have up to ~262k tokens, merges fewer).
pub const MAX_ARRAY_LEN: u64 = 4 << 20;

/// Most metadata pairs and most tensors (large models have a few thousand tensors).
pub const MAX_ENTRIES: u64 = 1 << 20;

/// Deepest nesting of arrays inside arrays.
const MAX_ARRAY_DEPTH: usize = 4;

/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: usize = 4;

/// Most elements one tensor may have (2^48; far above any real tensor, far below overflow).
const MAX_ELEMENTS: u64 = 1 << 48;

/// Longest tensor name accepted (ggml itself allows 63 bytes).
const MAX_NAME_LEN: u64 = 4096;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array, stored by element type (a vocabulary is one `Vec<String>`, not a vector
/// of enums).
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    Str(Vec<String>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
    /// An array of arrays (the format allows it; no common key uses it).
    Nested(Vec<Array>),
}

impl Value {
    /// The GGUF name of the value's type, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "uint8",
            Value::I8(_) => "int8",
            Value::U16(_) => "uint16",
            Value::I16(_) => "int16",
            Value::U32(_) => "uint32",
            Value::I32(_) => "int32",
            Value::F32(_) => "float32",
            Value::Bool(_) => "bool",
            Value::Str(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "uint64",
            Value::I64(_) => "int64",
            Value::F64(_) => "float64",
        }
    }

    /// Any integer type holding a non-negative value (writers differ in the width they use).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64).or(match *self {
                Value::I8(v) => Some(v.into()),
                Value::I16(v) => Some(v.into()),
                Value::I32(v) => Some(v.into()),
                Value::I64(v) => Some(v as f64),
                _ => None,
            }),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl Array {
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::Str(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
            Array::Nested(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The GGUF name of the element type, for messages.
    pub fn element_type_name(&self) -> &'static str {
        match self {
            Array::U8(_) => "uint8",
            Array::I8(_) => "int8",
            Array::U16(_) => "uint16",
            Array::I16(_) => "int16",
            Array::U32(_) => "uint32",
            Array::I32(_) => "int32",
            Array::F32(_) => "float32",
            Array::Bool(_) => "bool",
            Array::Str(_) => "string",
            Array::U64(_) => "uint64",
            Array::I64(_) => "int64",
            Array::F64(_) => "float64",
            Array::Nested(_) => "array",
        }
    }

    /// Integer elements as i64 (token types are int32 in llama.cpp's files, but any width is
    /// accepted); `None` for non-integer arrays or a u64 beyond i64.
    pub fn to_i64s(&self) -> Option<Vec<i64>> {
        match self {
            Array::U8(v) => Some(v.iter().map(|&x| x.into()).collect()),
            Array::I8(v) => Some(v.iter().map(|&x| x.into()).collect()),
            Array::U16(v) => Some(v.iter().map(|&x| x.into()).collect()),
            Array::I16(v) => Some(v.iter().map(|&x| x.into()).collect()),
            Array::U32(v) => Some(v.iter().map(|&x| x.into()).collect()),
            Array::I32(v) => Some(v.iter().map(|&x| x.into()).collect()),
            Array::I64(v) => Some(v.clone()),
            Array::U64(v) => v.iter().map(|&x| i64::try_from(x).ok()).collect(),
            _ => None,
        }
    }

    /// Float elements as f32 (scores are float32 in llama.cpp's files).
    pub fn to_f32s(&self) -> Option<Vec<f32>> {
        match self {
            Array::F32(v) => Some(v.clone()),
            Array::F64(v) => Some(v.iter().map(|&x| x as f32).collect()),
            _ => None,
        }
    }
}

/// Where one tensor lies and how it is stored, as the file states it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions in GGUF order: `dims[0]` is the fastest-varying (a row's length).
    pub dims: Vec<u64>,
    /// The storage type.
    pub ggml_type: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
    /// Number of elements.
    pub elements: u64,
    /// Bytes the tensor occupies.
    pub bytes: u64,
}

/// An opened GGUF file: its header parsed and checked, its tensors read on demand.
pub struct GgufFile {
    path: PathBuf,
    /// The format version (2 or 3).
    pub version: u32,
    /// Every metadata pair.
    pub metadata: BTreeMap<String, Value>,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    /// Alignment of the data section and of every tensor in it.
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_offset: u64,
    file: Mutex<File>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

impl GgufFile {
    /// Opens and checks a GGUF file's header; reads no tensor data.
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        let io = |source| CheckpointError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut header = HeaderReader {
            inner: BufReader::with_capacity(1 << 16, file),
            pos: 0,
            file_len,
            limit: file_len.min(MAX_HEADER_BYTES),
            path,
        };

        let magic = header.bytes::<4>(|| "the magic number".into())?;
        if magic != MAGIC {
            return Err(header.bad(format!(
                "not a GGUF file: it starts with {:02x?}, not the magic bytes \"GGUF\"",
                magic
            )));
        }
        let version = header.u32(|| "the version".into())?;
        if version != 2 && version != 3 {
            let hint = if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
                " (a big-endian file, which is not supported)"
            } else if version == 1 {
                " (version 1 predates the format's 64-bit counts and is not supported)"
            } else {
                ""
            };
            return Err(header.bad(format!(
                "GGUF version {version} is not supported (supported: 2, 3){hint}"
            )));
        }
        let tensor_count = header.u64(|| "the tensor count".into())?;
        let kv_count = header.u64(|| "the metadata count".into())?;
        // A pair takes at least 13 bytes (key length, type, one byte of value), a tensor info
        // at least 32 (name length, one dimension, type, offset).
        header.check_count(kv_count, 13, MAX_ENTRIES, || "metadata pairs".into())?;
        header.check_count(tensor_count, 32, MAX_ENTRIES, || "tensors".into())?;

        let mut metadata = BTreeMap::new();
        for i in 0..kv_count {
            let key = header.string(|| format!("the key of metadata pair {i}"))?;
            let value_type = header.u32(|| format!("the type of metadata key `{key}`"))?;
            let value = header.value(value_type, &key, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(header.bad(format!("metadata key `{key}` appears twice")));
            }
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) if a.is_power_of_two() => u64::from(*a),
            Some(other) => {
                return Err(CheckpointError::Config {
                    path: path.display().to_string(),
                    field: "general.alignment".into(),
                    reason: format!(
                        "must be a uint32 power of two, found {} {other:?}",
                        other.type_name()
                    ),
                });
            }
        };

        let mut tensors = Vec::with_capacity(tensor_count as usize);
        let mut by_name = HashMap::with_capacity(tensor_count as usize);
        for i in 0..tensor_count {
            let info = header.tensor_info(i)?;
            if by_name.insert(info.name.clone(), tensors.len()).is_some() {
                return Err(header.bad(format!("tensor `{}` appears twice", info.name)));
            }
            tensors.push(info);
        }

        let data_offset = header.pos.div_ceil(alignment) * alignment;
        for info in &tensors {
            if info.offset % alignment != 0 {
                return Err(header.bad(format!(
                    "tensor `{}` starts at data offset {}, which is not a multiple of the \
                     alignment {alignment}",
                    info.name, info.offset
                )));
            }
            let end = data_offset
                .checked_add(info.offset)
                .and_then(|s| s.checked_add(info.bytes))
                .unwrap_or(u64::MAX);
            if end > file_len {
                return Err(header.bad(format!(
                    "tensor `{}` ({} bytes of {}) ends at byte {end}, past the end of the file \
                     ({file_len} bytes): the file is truncated",
                    info.name,
                    info.bytes,
                    info.ggml_type.name()
                )));
            }
        }
        // The header reader's position is of no further use: tensor reads seek.
        let file = header.inner.into_inner();
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            by_name,
            alignment,
            data_offset,
            file: Mutex::new(file),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A tensor's info by its GGUF name.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The stored bytes of one tensor (a positioned read; bounds were checked at open).
    pub fn read_tensor_bytes(&self, info: &TensorInfo) -> Result<Vec<u8>, CheckpointError> {
        let len = usize::try_from(info.bytes).map_err(|_| {
            self.bad(format!(
                "tensor `{}` has {} bytes, more than this machine can address",
                info.name, info.bytes
            ))
        })?;
        let mut bytes = vec![0u8; len];
        let io = |source| CheckpointError::Io {
            path: format!("{} (tensor `{}`)", self.path.display(), info.name),
            source,
        };
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        file.seek(SeekFrom::Start(self.data_offset + info.offset))
            .map_err(io)?;
        file.read_exact(&mut bytes).map_err(io)?;
        Ok(bytes)
    }

    fn bad(&self, reason: String) -> CheckpointError {
        CheckpointError::Format {
            path: self.path.display().to_string(),
            reason,
        }
    }
}

/// Sequential reads of the header, counting bytes so that every length can be checked against
/// what is left before anything is allocated.
struct HeaderReader<'a> {
    inner: BufReader<File>,
    pos: u64,
    file_len: u64,
    /// `min(file length, MAX_HEADER_BYTES)`: no header read may pass it.
    limit: u64,
    path: &'a Path,
}

impl HeaderReader<'_> {
    fn bad(&self, reason: String) -> CheckpointError {
        CheckpointError::Format {
            path: self.path.display().to_string(),
            reason,
        }
    }

    /// Refuses to read `n` more bytes when they would pass the end of the file or the header
    /// cap.
    fn ensure(&self, n: u64, what: &dyn Fn() -> String) -> Result<(), CheckpointError> {
        let end = self.pos.saturating_add(n);
        if end <= self.limit {
            return Ok(());
        }
        Err(if end > self.file_len {
            self.bad(format!(
                "truncated: {} needs bytes {}..{end}, but the file has {} bytes",
                what(),
                self.pos,
                self.file_len
            ))
        } else {
            self.bad(format!(
                "{} would take the header past {MAX_HEADER_BYTES} bytes, more than any real \
                 GGUF header",
                what()
            ))
        })
    }

    /// Checks a count read from the file: at most `cap`, and `count × min_size` bytes must
    /// still fit.
    fn check_count(
        &self,
        count: u64,
        min_size: u64,
        cap: u64,
        what: impl Fn() -> String,
    ) -> Result<(), CheckpointError> {
        if count > cap {
            return Err(self.bad(format!(
                "{} count {count} is above the limit of {cap}: the file is damaged",
                what()
            )));
        }
        self.ensure(count.saturating_mul(min_size), &|| {
            format!("{count} {}", what())
        })
    }

    fn fill(&mut self, buf: &mut [u8], what: &dyn Fn() -> String) -> Result<(), CheckpointError> {
        self.ensure(buf.len() as u64, what)?;
        self.inner
            .read_exact(buf)
            .map_err(|source| CheckpointError::Io {
                path: self.path.display().to_string(),
                source,
            })?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn bytes<const N: usize>(
        &mut self,
        what: impl Fn() -> String,
    ) -> Result<[u8; N], CheckpointError> {
        let mut buf = [0u8; N];
        self.fill(&mut buf, &what)?;
        Ok(buf)
    }

    fn u32(&mut self, what: impl Fn() -> String) -> Result<u32, CheckpointError> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: impl Fn() -> String) -> Result<u64, CheckpointError> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    fn string_max(
        &mut self,
        max: u64,
        what: impl Fn() -> String,
    ) -> Result<String, CheckpointError> {
        let len = self.u64(|| format!("the length of {}", what()))?;
        if len > max {
            return Err(self.bad(format!(
                "{} is {len} bytes long, above the limit of {max}: the file is damaged",
                what()
            )));
        }
        self.ensure(len, &what)?;
        let mut buf = vec![0u8; len as usize];
        self.fill(&mut buf, &what)?;
        String::from_utf8(buf).map_err(|e| self.bad(format!("{} is not UTF-8: {e}", what())))
    }

    fn string(&mut self, what: impl Fn() -> String) -> Result<String, CheckpointError> {
        self.string_max(MAX_STRING_LEN, what)
    }

    /// One value of GGUF type `value_type` for metadata key `key`.
    fn value(
        &mut self,
        value_type: u32,
        key: &str,
        depth: usize,
    ) -> Result<Value, CheckpointError> {
        let what = || format!("the value of metadata key `{key}`");
        Ok(match value_type {
            0 => Value::U8(self.bytes::<1>(what)?[0]),
            1 => Value::I8(self.bytes::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.bytes(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes(what)?)),
            4 => Value::U32(u32::from_le_bytes(self.bytes(what)?)),
            5 => Value::I32(i32::from_le_bytes(self.bytes(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes(what)?)),
            7 => Value::Bool(self.bool(&what)?),
            8 => Value::Str(self.string(what)?),
            9 => Value::Array(self.array(key, depth)?),
            10 => Value::U64(u64::from_le_bytes(self.bytes(what)?)),
            11 => Value::I64(i64::from_le_bytes(self.bytes(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes(what)?)),
            other => {
                return Err(self.bad(format!(
                    "metadata key `{key}` has unknown value type {other} (known: 0..=12)"
                )));
            }
        })
    }

    fn bool(&mut self, what: &dyn Fn() -> String) -> Result<bool, CheckpointError> {
        let b = self.bytes::<1>(what)?[0];
        match b {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(self.bad(format!("{} is a bool of value {other}, not 0 or 1", what()))),
        }
    }

    fn array(&mut self, key: &str, depth: usize) -> Result<Array, CheckpointError> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(self.bad(format!(
                "metadata key `{key}` nests arrays deeper than {MAX_ARRAY_DEPTH} levels"
            )));
        }
        let element_type = self.u32(|| format!("the element type of metadata array `{key}`"))?;
        let count = self.u64(|| format!("the length of metadata array `{key}`"))?;
        // Smallest encoding of one element: 8 bytes for strings (the length) and arrays (type
        // and length are 12), the type's width otherwise.
        let min_size = match element_type {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 => 8,
            9 => 12,
            10..=12 => 8,
            other => {
                return Err(self.bad(format!(
                    "metadata array `{key}` has unknown element type {other} (known: 0..=12)"
                )));
            }
        };
        self.check_count(count, min_size, MAX_ARRAY_LEN, || {
            format!("elements of metadata array `{key}`")
        })?;
        let n = count as usize;
        let what = |i: usize| move || format!("element {i} of metadata array `{key}`");
        macro_rules! numbers {
            ($variant:ident, $ty:ty) => {{
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(<$ty>::from_le_bytes(self.bytes(what(i))?));
                }
                Array::$variant(v)
            }};
        }
        Ok(match element_type {
            0 => numbers!(U8, u8),
            1 => numbers!(I8, i8),
            2 => numbers!(U16, u16),
            3 => numbers!(I16, i16),
            4 => numbers!(U32, u32),
            5 => numbers!(I32, i32),
            6 => numbers!(F32, f32),
            7 => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.bool(&what(i))?);
                }
                Array::Bool(v)
            }
            8 => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.string(what(i))?);
                }
                Array::Str(v)
            }
            9 => {
                // Each element is itself an array: element type, length, elements (as
                // gguf-py reads them; there is no per-element type tag).
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.array(&format!("{key}[{i}]"), depth + 1)?);
                }
                Array::Nested(v)
            }
            10 => numbers!(U64, u64),
            11 => numbers!(I64, i64),
            _ => numbers!(F64, f64),
        })
    }

    fn tensor_info(&mut self, index: u64) -> Result<TensorInfo, CheckpointError> {
        let name = self.string_max(MAX_NAME_LEN, || format!("the name of tensor {index}"))?;
        let n_dims = self.u32(|| format!("the dimension count of tensor `{name}`"))?;
        if n_dims == 0 || n_dims as usize > MAX_DIMS {
            return Err(self.bad(format!(
                "tensor `{name}` has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(self.u64(|| format!("dimension {d} of tensor `{name}`"))?);
        }
        let elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n > 0 && n <= MAX_ELEMENTS)
            .ok_or_else(|| {
                self.bad(format!(
                    "tensor `{name}` has dimensions {dims:?}: empty or impossibly large"
                ))
            })?;
        let type_id = self.u32(|| format!("the type of tensor `{name}`"))?;
        // An id ggml does not define leaves the tensor's size unknown, so the file cannot be
        // checked (a known but unconvertible type is refused only when the tensor is read).
        let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
            self.bad(format!(
                "tensor `{name}` has unknown ggml type {type_id} (this reader converts {})",
                super::dequant::SUPPORTED
            ))
        })?;
        let offset = self.u64(|| format!("the data offset of tensor `{name}`"))?;
        let (block, block_bytes) = ggml_type.block();
        if dims[0] % block != 0 {
            return Err(self.bad(format!(
                "tensor `{name}` has rows of {} elements, not a multiple of the {} block size {block}",
                dims[0],
                ggml_type.name()
            )));
        }
        let bytes = elements / block * block_bytes;
        Ok(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            elements,
            bytes,
        })
    }
}
