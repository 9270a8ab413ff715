//! Byte layout of the engine's ordered keyspace (one flat keyspace per backend).
//!
//! - `v<key>\0<rev:u64be>` -> [`Record`]: one entry per version of a key, so a
//!   list at an older revision is a range scan (MVCC, like etcd's key index).
//! - `l<rev:u64be>` -> `<key>`: which key changed at each revision (the watch log).
//! - `m/rev`, `m/compact` -> `u64be`: the current and compacted revisions.

use bytes::Bytes;

use crate::{Revision, StoreError};

pub(crate) const META_REVISION: &[u8] = b"m/rev";
pub(crate) const META_COMPACTED: &[u8] = b"m/compact";
const VERSION_TAG: u8 = b'v';
const LOG_TAG: u8 = b'l';
const SEPARATOR: u8 = 0;

/// Rejects keys the layout cannot hold unambiguously.
pub(crate) fn check_key(key: &str) -> Result<(), StoreError> {
    let reason = if key.is_empty() {
        "empty"
    } else if key.as_bytes().contains(&SEPARATOR) {
        "contains a NUL byte"
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidKey {
        key: key.to_owned(),
        reason,
    })
}

pub(crate) fn version_key(key: &str, rev: Revision) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 10);
    out.push(VERSION_TAG);
    out.extend_from_slice(key.as_bytes());
    out.push(SEPARATOR);
    out.extend_from_slice(&rev.to_be_bytes());
    out
}

/// The half-open range holding every version of `key`.
pub(crate) fn versions_of(key: &str) -> (Vec<u8>, Vec<u8>) {
    (version_key(key, 0), {
        let mut end = version_key(key, 0);
        let n = end.len();
        end[n - 9] = SEPARATOR + 1;
        end.truncate(n - 8);
        end
    })
}

/// The half-open range holding every version of every key starting with `prefix`.
pub(crate) fn versions_with_prefix(prefix: &str) -> (Vec<u8>, Vec<u8>) {
    let mut start = vec![VERSION_TAG];
    start.extend_from_slice(prefix.as_bytes());
    let end = successor(&start);
    (start, end)
}

/// Splits a version key into the user key and revision.
pub(crate) fn parse_version_key(raw: &[u8]) -> Result<(&str, Revision), StoreError> {
    let corrupt = || StoreError::Corrupt {
        what: format!("version key {:?}", String::from_utf8_lossy(raw)),
    };
    if raw.len() < 10 || raw[0] != VERSION_TAG || raw[raw.len() - 9] != SEPARATOR {
        return Err(corrupt());
    }
    let key = std::str::from_utf8(&raw[1..raw.len() - 9]).map_err(|_| corrupt())?;
    Ok((key, be_u64(&raw[raw.len() - 8..]).ok_or_else(corrupt)?))
}

pub(crate) fn log_key(rev: Revision) -> Vec<u8> {
    let mut out = vec![LOG_TAG];
    out.extend_from_slice(&rev.to_be_bytes());
    out
}

pub(crate) fn be_u64(raw: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(raw.try_into().ok()?))
}

/// The smallest byte string greater than every string starting with `prefix`.
fn successor(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    vec![u8::MAX; prefix.len() + 1]
}

/// One version of a key: a value, or a tombstone left by a delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    pub create_revision: Revision,
    /// `None` marks a delete.
    pub value: Option<Bytes>,
}

impl Record {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let value = self.value.as_deref().unwrap_or_default();
        let mut out = Vec::with_capacity(9 + value.len());
        out.push(u8::from(self.value.is_none()));
        out.extend_from_slice(&self.create_revision.to_be_bytes());
        out.extend_from_slice(value);
        out
    }

    pub(crate) fn decode(raw: &[u8]) -> Result<Self, StoreError> {
        let corrupt = || StoreError::Corrupt {
            what: "version record".into(),
        };
        if raw.len() < 9 {
            return Err(corrupt());
        }
        let create_revision = be_u64(&raw[1..9]).ok_or_else(corrupt)?;
        let value = match raw[0] {
            0 => Some(Bytes::copy_from_slice(&raw[9..])),
            1 => None,
            _ => return Err(corrupt()),
        };
        Ok(Self {
            create_revision,
            value,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_keys_sort_by_key_then_revision() {
        let mut keys = [
            version_key("/a/b", 2),
            version_key("/a", 300),
            version_key("/a/b", 1),
            version_key("/a", 7),
        ];
        keys.sort();
        let parsed: Vec<_> = keys.iter().map(|k| parse_version_key(k).unwrap()).collect();
        assert_eq!(parsed, [("/a", 7), ("/a", 300), ("/a/b", 1), ("/a/b", 2)]);
    }

    #[test]
    fn versions_of_excludes_longer_keys() {
        let (start, end) = versions_of("/a");
        assert!(version_key("/a", u64::MAX) < end);
        assert!(version_key("/a", 0) >= start);
        assert!(version_key("/a/b", 1) >= end);
    }

    #[test]
    fn records_round_trip() {
        for rec in [
            Record {
                create_revision: 9,
                value: Some(Bytes::from_static(b"x")),
            },
            Record {
                create_revision: 1,
                value: Some(Bytes::new()),
            },
            Record {
                create_revision: 4,
                value: None,
            },
        ] {
            assert_eq!(Record::decode(&rec.encode()).unwrap(), rec);
        }
        assert!(Record::decode(b"\x07").is_err());
    }
}
