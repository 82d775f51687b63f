//! torchvision's ImageFolder layout: `ROOT/<class>/<image>` (images may sit in
//! subfolders of a class folder), classes sorted by name, files by path. PNG, JPEG, BMP and
//! WebP are decoded with the `image` crate; gray stays one channel (replicated when a batch
//! is written), everything else becomes RGB (alpha dropped), 16-bit becomes 8-bit.

use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageReader};
use rayon::prelude::*;

use super::transform::Img;
use crate::{Error, Result};

/// File extensions taken as images (case-insensitive).
pub const IMAGE_EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "bmp", "webp"];

pub(crate) fn data_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Data { path: path.display().to_string(), msg: msg.into() }
}

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io { path: path.display().to_string(), source }
}

fn hidden(p: &Path) -> bool {
    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
}

fn is_image(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// The sorted, visible entries of a folder.
fn entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let p = e.map_err(|e| io_err(dir, e))?.path();
        if !hidden(&p) {
            v.push(p);
        }
    }
    v.sort();
    Ok(v)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for p in entries(dir)? {
        if p.is_dir() {
            walk(&p, out)?;
        } else if is_image(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// A scanned folder: class names and, per sample, its file and class index.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    pub classes: Vec<String>,
    pub files: Vec<PathBuf>,
    pub labels: Vec<i64>,
    pub skipped: Vec<PathBuf>,
}

/// Lists `root/<class>/...` and checks every image: its header always, its whole data too
/// when `skip_bad` (bad files are then left out and listed in `skipped`, else the first is
/// an error naming it).
pub(crate) fn scan(root: &Path, skip_bad: bool) -> Result<Scan> {
    if !root.is_dir() {
        return Err(data_err(root, "not a folder (expected ROOT/<class>/<image>)"));
    }
    let class_dirs: Vec<PathBuf> = entries(root)?.into_iter().filter(|p| p.is_dir()).collect();
    if class_dirs.is_empty() {
        return Err(data_err(root, "no class folders (expected ROOT/<class>/<image>)"));
    }
    let mut s = Scan::default();
    for dir in &class_dirs {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| data_err(dir, "class folder name is not UTF-8"))?
            .to_string();
        let mut files = Vec::new();
        walk(dir, &mut files)?;
        if files.is_empty() {
            return Err(data_err(dir, format!("class folder without images (.{})", IMAGE_EXTENSIONS.join(", ."))));
        }
        let checks: Vec<Option<Error>> = files.par_iter().map(|f| check(f, skip_bad).err()).collect();
        let label = s.classes.len() as i64;
        let before = s.files.len();
        for (f, bad) in files.into_iter().zip(checks) {
            match bad {
                None => {
                    s.files.push(f);
                    s.labels.push(label);
                }
                Some(_) if skip_bad => s.skipped.push(f),
                Some(e) => return Err(e),
            }
        }
        if s.files.len() == before {
            return Err(data_err(dir, "class folder without readable images (every one was bad and skipped)"));
        }
        s.classes.push(name);
    }
    Ok(s)
}

/// Checks that a file is a readable image: the header (size) only, or a full decode.
fn check(path: &Path, full: bool) -> Result<()> {
    if full {
        decode(path).map(|_| ())
    } else {
        reader(path)?.into_dimensions().map_err(|e| data_err(path, format!("unreadable or corrupt image: {e}")))?;
        Ok(())
    }
}

fn reader(path: &Path) -> Result<ImageReader<std::io::BufReader<std::fs::File>>> {
    let r = ImageReader::open(path).map_err(|e| io_err(path, e))?.with_guessed_format().map_err(|e| io_err(path, e))?;
    if r.format().is_none() {
        return Err(data_err(path, "not a PNG, JPEG, BMP or WebP image (unrecognized contents)"));
    }
    Ok(r)
}

/// Decodes an image to 8-bit gray (1 channel) or RGB (3 channels).
pub(crate) fn decode(path: &Path) -> Result<Img> {
    let img = reader(path)?.decode().map_err(|e| data_err(path, format!("unreadable or corrupt image: {e}")))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return Err(data_err(path, "image of zero size"));
    }
    Ok(match img {
        DynamicImage::ImageLuma8(_)
        | DynamicImage::ImageLuma16(_)
        | DynamicImage::ImageLumaA8(_)
        | DynamicImage::ImageLumaA16(_) => Img { w, h, c: 1, data: img.into_luma8().into_raw() },
        _ => Img { w, h, c: 3, data: img.into_rgb8().into_raw() },
    })
}
