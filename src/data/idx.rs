//! The IDX format of the MNIST family: a big-endian header (two zero bytes, the element
//! type, the number of dimensions, then each dimension as a u32) followed by the elements.
//! Files may be gzip-compressed (recognized by their magic bytes, not their name).

use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

/// One IDX file's unsigned-byte contents.
#[derive(Clone, Debug)]
pub(crate) struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

fn err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Data { path: path.display().to_string(), msg: msg.into() }
}

/// Reads an IDX file (raw or gzip) of unsigned bytes.
pub(crate) fn read(path: &Path) -> Result<IdxArray> {
    let raw = std::fs::read(path).map_err(|source| Error::Io { path: path.display().to_string(), source })?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| err(path, format!("corrupt or truncated gzip stream: {e}")))?;
        out
    } else {
        raw
    };
    parse(&bytes).map_err(|msg| err(path, msg))
}

/// Parses IDX bytes; the error says what is wrong (the caller adds the file).
pub(crate) fn parse(b: &[u8]) -> std::result::Result<IdxArray, String> {
    if b.len() < 4 {
        return Err(format!("truncated IDX file: {} bytes, shorter than the 4-byte magic number", b.len()));
    }
    if b[0] != 0 || b[1] != 0 {
        return Err("not an IDX file (the magic number does not start with two zero bytes)".into());
    }
    let (ty, nd) = (b[2], b[3] as usize);
    if ty != 0x08 {
        return Err(format!("IDX element type 0x{ty:02x} is not supported (only unsigned bytes, 0x08)"));
    }
    if nd == 0 {
        return Err("IDX file with zero dimensions".into());
    }
    let head = 4 + 4 * nd;
    if b.len() < head {
        return Err(format!("truncated IDX file: {} bytes, shorter than its {head}-byte header", b.len()));
    }
    let dims: Vec<usize> =
        (0..nd).map(|i| u32::from_be_bytes(b[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize).collect();
    let count = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("IDX dimensions {dims:?} overflow"))?;
    let have = b.len() - head;
    if have < count {
        return Err(format!(
            "truncated IDX file: the header {dims:?} declares {count} bytes of data, the file holds {have}"
        ));
    }
    if have > count {
        return Err(format!(
            "IDX file longer than its header says: {dims:?} declares {count} bytes of data, the file holds {have}"
        ));
    }
    Ok(IdxArray { dims, data: b[head..].to_vec() })
}

/// Fashion-MNIST's class names, in label order.
pub const FASHION_MNIST_CLASSES: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let mut b = vec![0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3];
        b.extend([1, 2, 3, 4, 5, 6]);
        let a = parse(&b).unwrap();
        assert_eq!(a.dims, vec![2, 3]);
        assert_eq!(a.data, vec![1, 2, 3, 4, 5, 6]);
        assert!(parse(&b[..b.len() - 1]).unwrap_err().contains("truncated"));
        assert!(parse(&b[..6]).unwrap_err().contains("header"));
        let mut long = b.clone();
        long.push(0);
        assert!(parse(&long).unwrap_err().contains("longer"));
        let mut f = b.clone();
        f[2] = 0x0d;
        assert!(parse(&f).unwrap_err().contains("not supported"));
        let big = vec![0, 0, 8, 3, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255];
        assert!(parse(&big).is_err());
    }

    #[test]
    fn no_prefix_or_byte_flip_panics() {
        let mut b = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2];
        b.extend(0..8u8);
        for k in 0..=b.len() {
            let _ = parse(&b[..k]);
        }
        for i in 0..b.len() {
            for v in [0u8, 1, 3, 8, 0x7f, 0xff] {
                let mut m = b.clone();
                m[i] = v;
                let _ = parse(&m);
            }
        }
    }
}
