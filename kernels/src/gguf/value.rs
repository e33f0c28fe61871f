//! Metadata values and typed access to them.

use std::collections::BTreeMap;

use super::{GgufError, Reader, Result, MAX_VALUE_DEPTH};

/// GGUF metadata value types, with their on-disk numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    fn from_u32(v: u32) -> Option<Self> {
        use ValueType::*;
        Some(match v {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// Fewest bytes one value of this type occupies on disk.
    fn min_size(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn type_name(&self) -> String {
        match self {
            Value::U8(_) => "u8".into(),
            Value::I8(_) => "i8".into(),
            Value::U16(_) => "u16".into(),
            Value::I16(_) => "i16".into(),
            Value::U32(_) => "u32".into(),
            Value::I32(_) => "i32".into(),
            Value::U64(_) => "u64".into(),
            Value::I64(_) => "i64".into(),
            Value::F32(_) => "f32".into(),
            Value::F64(_) => "f64".into(),
            Value::Bool(_) => "bool".into(),
            Value::String(_) => "string".into(),
            Value::Array(a) => match a.first() {
                Some(v) => format!("array of {} {}", a.len(), v.type_name()),
                None => "empty array".into(),
            },
        }
    }

    /// Any non-negative integer value, widened.
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

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

pub(super) fn read_value(r: &mut Reader<'_>, key: &str, ty: u32, depth: usize) -> Result<Value> {
    let ty = ValueType::from_u32(ty).ok_or_else(|| GgufError::UnknownValueType {
        key: key.to_string(),
        ty,
    })?;
    let what = || format!("value of {key:?}");
    Ok(match ty {
        ValueType::U8 => Value::U8(r.array::<1>(&what)?[0]),
        ValueType::I8 => Value::I8(r.array::<1>(&what)?[0] as i8),
        ValueType::U16 => Value::U16(u16::from_le_bytes(r.array(&what)?)),
        ValueType::I16 => Value::I16(i16::from_le_bytes(r.array(&what)?)),
        ValueType::U32 => Value::U32(u32::from_le_bytes(r.array(&what)?)),
        ValueType::I32 => Value::I32(i32::from_le_bytes(r.array(&what)?)),
        ValueType::U64 => Value::U64(u64::from_le_bytes(r.array(&what)?)),
        ValueType::I64 => Value::I64(i64::from_le_bytes(r.array(&what)?)),
        ValueType::F32 => Value::F32(f32::from_le_bytes(r.array(&what)?)),
        ValueType::F64 => Value::F64(f64::from_le_bytes(r.array(&what)?)),
        ValueType::Bool => Value::Bool(r.array::<1>(&what)?[0] != 0),
        // Strings in metadata can be large (chat templates), but never larger
        // than the file; `string` checks against what is left.
        ValueType::String => Value::String(r.string(u64::MAX, &what)?),
        ValueType::Array => {
            if depth >= MAX_VALUE_DEPTH {
                return Err(GgufError::NestingTooDeep {
                    key: key.to_string(),
                    max: MAX_VALUE_DEPTH,
                });
            }
            let ety_raw = r.u32(&|| format!("element type of {key:?}"))?;
            let ety = ValueType::from_u32(ety_raw).ok_or_else(|| GgufError::UnknownValueType {
                key: key.to_string(),
                ty: ety_raw,
            })?;
            let n = r.u64(&|| format!("element count of {key:?}"))?;
            r.check_count(n, ety.min_size(), &|| format!("array {key:?} element"))?;
            let mut items = Vec::with_capacity(n as usize);
            for _ in 0..n {
                items.push(read_value(r, key, ety_raw, depth + 1)?);
            }
            Value::Array(items)
        }
    })
}

/// The metadata key/value table with typed, error-reporting accessors.
#[derive(Debug, Clone, Default)]
pub struct Metadata {
    map: BTreeMap<String, Value>,
}

impl Metadata {
    pub fn insert(&mut self, key: String, value: Value) -> Option<Value> {
        self.map.insert(key, value)
    }
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key)
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.map.iter()
    }

    fn require(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }

    fn wrong(key: &str, expected: &'static str, v: &Value) -> GgufError {
        GgufError::WrongType {
            key: key.to_string(),
            expected,
            found: v.type_name(),
        }
    }

    /// An unsigned integer that must fit a `usize` and lie in `1..=max`.
    pub fn get_usize(&self, key: &str, max: u64) -> Result<usize> {
        let v = self.require(key)?;
        let n = v
            .as_u64()
            .ok_or_else(|| Self::wrong(key, "unsigned integer", v))?;
        if n == 0 || n > max {
            return Err(GgufError::OutOfRange {
                key: key.to_string(),
                value: n.to_string(),
                detail: format!("expected 1 to {max}"),
            });
        }
        Ok(n as usize)
    }

    pub fn opt_usize(&self, key: &str, max: u64) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.get_usize(key, max).map(Some),
        }
    }

    pub fn get_f32(&self, key: &str) -> Result<f32> {
        let v = self.require(key)?;
        let x = v.as_f64().ok_or_else(|| Self::wrong(key, "number", v))?;
        if !x.is_finite() {
            return Err(GgufError::OutOfRange {
                key: key.to_string(),
                value: x.to_string(),
                detail: "must be finite".into(),
            });
        }
        Ok(x as f32)
    }

    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.get_f32(key).map(Some),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| Self::wrong(key, "string", v))
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.get_str(key).map(Some),
        }
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| Self::wrong(key, "bool", v)),
        }
    }

    /// An optional token id; absent or out of the vocabulary reads as `None`
    /// only when absent, out-of-range ids are an error.
    pub fn opt_token(&self, key: &str, n_vocab: usize) -> Result<Option<u32>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => {
                let id = v.as_u64().ok_or_else(|| Self::wrong(key, "token id", v))?;
                if id >= n_vocab as u64 {
                    return Err(GgufError::OutOfRange {
                        key: key.to_string(),
                        value: id.to_string(),
                        detail: format!("vocabulary has {n_vocab} tokens"),
                    });
                }
                Ok(Some(id as u32))
            }
        }
    }

    fn array(&self, key: &str) -> Result<&[Value]> {
        let v = self.require(key)?;
        v.as_array().ok_or_else(|| Self::wrong(key, "array", v))
    }

    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        self.array(key)?
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| Self::wrong(key, "array of string", v))
            })
            .collect()
    }

    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        self.array(key)?
            .iter()
            .map(|v| {
                v.as_f64()
                    .map(|x| x as f32)
                    .ok_or_else(|| Self::wrong(key, "array of number", v))
            })
            .collect()
    }

    pub fn get_i64_array(&self, key: &str) -> Result<Vec<i64>> {
        self.array(key)?
            .iter()
            .map(|v| {
                v.as_i64()
                    .ok_or_else(|| Self::wrong(key, "array of integer", v))
            })
            .collect()
    }

    pub fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }
}
