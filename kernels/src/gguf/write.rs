//! A GGUF v3 writer, streaming: metadata and tensor infos first, then each
//! tensor's bytes from a callback, so a multi-gigabyte file never sits in
//! memory. Used to make synthetic models of any llama shape.

use std::io::{self, Write};

use super::{Value, DEFAULT_ALIGNMENT};
use crate::quant::GgmlType;

/// A tensor to be written: name, dims (ggml order: row length first), type.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

impl TensorSpec {
    /// Bytes of its data.
    pub fn size(&self) -> u64 {
        let row = self.dims[0] as usize;
        let rows: u64 = self.dims[1..].iter().product();
        self.ty.row_bytes(row) as u64 * rows
    }
}

#[derive(Debug, Default)]
pub struct GgufWriter {
    kvs: Vec<(String, Value)>,
    tensors: Vec<TensorSpec>,
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => put_str(out, s),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Array(items) => {
            let ty = items.first().map(value_type).unwrap_or(0);
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, i);
            }
        }
    }
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn kv(&mut self, key: impl Into<String>, v: Value) -> &mut Self {
        self.kvs.push((key.into(), v));
        self
    }

    pub fn tensor(&mut self, t: TensorSpec) -> &mut Self {
        self.tensors.push(t);
        self
    }

    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    /// Total file size once written.
    pub fn file_size(&self) -> u64 {
        let (head, offsets) = self.layout();
        let last = self.tensors.len().checked_sub(1);
        last.map(|i| head + offsets[i] + self.tensors[i].size())
            .unwrap_or(head)
    }

    fn header(&self, offsets: &[u64]) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(b"GGUF");
        h.extend_from_slice(&3u32.to_le_bytes());
        h.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        h.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for (k, v) in &self.kvs {
            put_str(&mut h, k);
            h.extend_from_slice(&value_type(v).to_le_bytes());
            put_value(&mut h, v);
        }
        for (t, off) in self.tensors.iter().zip(offsets) {
            put_str(&mut h, &t.name);
            h.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                h.extend_from_slice(&d.to_le_bytes());
            }
            h.extend_from_slice(&t.ty.id().to_le_bytes());
            h.extend_from_slice(&off.to_le_bytes());
        }
        let pad = (DEFAULT_ALIGNMENT - h.len() as u64 % DEFAULT_ALIGNMENT) % DEFAULT_ALIGNMENT;
        h.resize(h.len() + pad as usize, 0);
        h
    }

    /// (header bytes incl. padding, each tensor's offset in the data).
    fn layout(&self) -> (u64, Vec<u64>) {
        let mut offsets = Vec::with_capacity(self.tensors.len());
        let mut off = 0u64;
        for t in &self.tensors {
            offsets.push(off);
            off += t.size();
            off = off.div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
        }
        (self.header(&offsets).len() as u64, offsets)
    }

    /// Writes the file; `data(i, buf)` must fill `buf` (exactly the size of
    /// tensor i) with its bytes.
    pub fn write(
        &self,
        out: &mut impl Write,
        mut data: impl FnMut(usize, &mut [u8]),
    ) -> io::Result<()> {
        let (_, offsets) = self.layout();
        out.write_all(&self.header(&offsets))?;
        let mut pos = 0u64;
        let mut buf = Vec::new();
        for (i, (t, off)) in self.tensors.iter().zip(&offsets).enumerate() {
            if *off > pos {
                out.write_all(&vec![0u8; (*off - pos) as usize])?;
            }
            buf.resize(t.size() as usize, 0);
            data(i, &mut buf);
            out.write_all(&buf)?;
            pos = off + t.size();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::Gguf;

    #[test]
    fn written_files_read_back() {
        let mut w = GgufWriter::new();
        w.kv("general.architecture", Value::String("llama".into()))
            .kv("llama.block_count", Value::U32(2))
            .kv("x.f", Value::F32(0.5))
            .kv(
                "x.list",
                Value::Array(vec![Value::String("a".into()), Value::String("bc".into())]),
            )
            .tensor(TensorSpec {
                name: "a".into(),
                dims: vec![32, 3],
                ty: GgmlType::Q4_0,
            })
            .tensor(TensorSpec {
                name: "b".into(),
                dims: vec![5],
                ty: GgmlType::F32,
            });
        let mut bytes = Vec::new();
        w.write(&mut bytes, |i, buf| buf.fill(i as u8 + 1)).unwrap();
        assert_eq!(bytes.len() as u64, w.file_size());
        let g = Gguf::from_vec(bytes).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.metadata.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(g.metadata.get_str_array("x.list").unwrap(), vec!["a", "bc"]);
        let a = g.tensor("a").unwrap();
        assert_eq!(a.size, 54);
        assert!(g.tensor_data(a).iter().all(|&b| b == 1));
        let b = g.tensor("b").unwrap();
        assert_eq!(b.offset % DEFAULT_ALIGNMENT, 0);
        assert!(g.tensor_data(b).iter().all(|&x| x == 2));
    }
}
