//! The traits of an identify or the properties of an event, rendered once.
//!
//! A row's fields are written as the JSON object ConveYour receives while
//! the row is mapped, straight from the tuple's text, and the sink copies
//! those bytes into its request bodies. Building a `serde_json` map per
//! row (a heap string per key and per value, a tree, then walking it again
//! to encode and to free) was most of the connector's work per change.

use std::fmt;

use serde_json::{Map, Value};

use crate::json;

/// A JSON object, keys in byte order (as a `serde_json::Map` would order
/// them), valid JSON by construction.
#[derive(Clone, PartialEq, Eq)]
pub struct Fields {
    json: Vec<u8>,
    len: usize,
}

impl Fields {
    /// An object written field by field.
    pub(crate) fn writer() -> FieldsWriter {
        let mut json = Vec::with_capacity(128);
        json.push(b'{');
        FieldsWriter { json, len: 0 }
    }

    /// The object of a map: for fields that are not built from a row
    /// (constants, counters, coalesced identifies).
    pub fn from_map(map: &Map<String, Value>) -> Fields {
        Fields {
            // A map of Values always serialises.
            json: serde_json::to_vec(map).unwrap_or_else(|_| b"{}".to_vec()),
            len: map.len(),
        }
    }

    /// The object as a map, for merging and inspection; None only if the
    /// bytes were not the JSON object they always are.
    pub fn to_map(&self) -> Option<Map<String, Value>> {
        serde_json::from_slice(&self.json).ok()
    }

    /// The object's JSON text.
    pub fn as_bytes(&self) -> &[u8] {
        &self.json
    }

    /// How many fields the object has.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Default for Fields {
    fn default() -> Fields {
        Fields {
            json: b"{}".to_vec(),
            len: 0,
        }
    }
}

impl fmt::Debug for Fields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.json))
    }
}

/// A field's key as written into the object (`"name":`), encoded once
/// when the mapping is planned rather than for every row.
#[derive(Debug, Clone)]
pub(crate) struct FieldKey(Box<[u8]>);

impl FieldKey {
    pub(crate) fn new(name: &str) -> FieldKey {
        let mut key = Vec::with_capacity(name.len() + 3);
        json::write_str(&mut key, name);
        key.push(b':');
        FieldKey(key.into_boxed_slice())
    }
}

/// Writes a [`Fields`] object one field at a time; the caller gives the
/// fields in key order.
pub(crate) struct FieldsWriter {
    json: Vec<u8>,
    len: usize,
}

impl FieldsWriter {
    /// Writes `"key":` and then the value `write` appends. When `write`
    /// says there is no value (Ok(false)) or fails, the field is taken out
    /// again, so a left-out field leaves no trace.
    pub(crate) fn field<E>(
        &mut self,
        key: &FieldKey,
        write: impl FnOnce(&mut Vec<u8>) -> Result<bool, E>,
    ) -> Result<(), E> {
        let mark = self.json.len();
        if self.len > 0 {
            self.json.push(b',');
        }
        self.json.extend_from_slice(&key.0);
        match write(&mut self.json) {
            Ok(true) => {
                self.len += 1;
                Ok(())
            }
            Ok(false) => {
                self.json.truncate(mark);
                Ok(())
            }
            Err(e) => {
                self.json.truncate(mark);
                Err(e)
            }
        }
    }

    pub(crate) fn finish(mut self) -> Fields {
        self.json.push(b'}');
        Fields {
            json: self.json,
            len: self.len,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn written_fields_are_the_json_object_of_the_map() {
        let mut w = Fields::writer();
        w.field(&FieldKey::new("a\"b"), |out| {
            out.extend_from_slice(b"1");
            Ok::<_, ()>(true)
        })
        .unwrap();
        // Left out, then failed: neither leaves a trace.
        w.field(&FieldKey::new("gone"), |out| {
            out.extend_from_slice(b"null");
            Ok::<_, ()>(false)
        })
        .unwrap();
        assert!(w
            .field(&FieldKey::new("broken"), |out| {
                out.extend_from_slice(b"\"half");
                Err(())
            })
            .is_err());
        w.field(&FieldKey::new("z"), |out| {
            out.extend_from_slice(b"[true]");
            Ok::<_, ()>(true)
        })
        .unwrap();
        let fields = w.finish();
        let map = json!({"a\"b": 1, "z": [true]});
        let map = map.as_object().unwrap();
        assert_eq!(fields.len(), 2);
        assert_eq!(fields, Fields::from_map(map));
        assert_eq!(fields.to_map().as_ref(), Some(map));
        assert_eq!(Fields::writer().finish(), Fields::default());
        assert!(Fields::default().is_empty());
    }
}
