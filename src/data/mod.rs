//! Training data: image folders and IDX files, task carving, augmentation and a prefetching,
//! deterministic, resumable batch loader that writes straight into the batch layout that
//! [`Model::set_batch`](crate::model::Model::set_batch) takes (images NCHW f32, normalized,
//! `[b, 3, size, size]`; targets i64 `[b]`).
//!
//! # Sources
//!
//! - **Image folders** (torchvision's ImageFolder): `ROOT/<class>/<image>`, classes sorted
//!   by name, PNG/JPEG/BMP/WebP. If `ROOT/train` exists it is the training set and
//!   `ROOT/val` (when there) the validation set; otherwise `ROOT` is split per class with a
//!   seeded `val_fraction` (default 0.1).
//! - **IDX** (the MNIST family, raw or gzip): `idx:IMAGES,LABELS`. Class names are
//!   Fashion-MNIST's when a path contains `fashion` (so `sandal,shirt` select classes),
//!   else the label numbers; [`Dataset::set_class_names`] renames them.
//!
//! # From a training loop
//!
//! ```no_run
//! use prunekit::data::{Augment, ClassSelection, Dataset, Loader, LoaderConfig, OpenOptions, Position};
//! # fn main() -> prunekit::Result<()> {
//! // Open a source; `val` is optional (otherwise a seeded 10% split per class).
//! let opts = OpenOptions {
//!     val: Some("idx:/data/fm/t10k-images-idx3-ubyte.gz,/data/fm/t10k-labels-idx1-ubyte.gz".into()),
//!     ..OpenOptions::default()
//! };
//! let spec = "idx:/data/fm/train-images-idx3-ubyte.gz,/data/fm/train-labels-idx1-ubyte.gz";
//! let data = Dataset::open(spec, &opts)?
//!     .select(&"sandal,shirt,bag".parse::<ClassSelection>()?)? // relabelled 0..3
//!     .per_class(100, 0)?; // 100 training images per class
//! println!("{}", data.summary());
//!
//! let cfg = LoaderConfig { batch: 32, size: 32, augment: Augment::CropFlip, seed: 0, ..LoaderConfig::default() };
//! let resume = Position::default(); // or the position saved with a checkpoint
//! let mut train = Loader::train(&data.train, &cfg, resume)?;
//! let mut val = Loader::eval(&data.val, &cfg)?;
//! let mut batch = train.new_batch(); // reused: no allocation per step
//! for _step in 0..1000 {
//!     train.next(&mut batch)?; // endless, reshuffled every epoch
//!     // model.set_batch(&mut ws, &batch.images, Some(&batch.targets))?; model.train_step(...)?;
//!     let _save_with_checkpoint = train.position();
//! }
//! println!("{}", train.cache_report()); // "cached N of M images, X MiB in memory ..."
//! while val.next(&mut batch)? {
//!     // one pass; the last batch is padded: only the first `batch.valid` entries count
//! }
//! # Ok(()) }
//! ```
//!
//! # Determinism
//!
//! Batches depend only on the data, the configuration and the seed: each epoch's order is
//! a shuffle seeded by (seed, epoch), each sample's augmentation by (seed, epoch, sample),
//! never by thread order or timing, so any thread count, cached or not, gives the same
//! bits, and a loader started at a saved [`Position`] continues exactly where the saved one
//! was.

mod folder;
mod idx;
mod loader;
mod transform;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

pub use folder::IMAGE_EXTENSIONS;
pub use idx::FASHION_MNIST_CLASSES;
pub use loader::{Batch, Loader, LoaderConfig, Position};
pub use transform::{Augment, Normalize};

use folder::data_err;
use transform::SampleRng;

use crate::{ensure, invalid, Error, Result};

/// Where the images of a [`Split`] live.
#[derive(Debug)]
pub(crate) enum Store {
    /// Decoded bytes in memory, HWC per image (IDX files or [`Split::from_u8`]).
    Memory { h: usize, w: usize, c: usize, data: Vec<u8> },
    /// Image files, decoded when loaded.
    Files(Vec<PathBuf>),
}

/// A set of labelled images: the training or the validation part of a [`Dataset`], after
/// any carving. Cheap to clone (the images are shared).
#[derive(Clone, Debug)]
pub struct Split {
    pub(crate) store: Arc<Store>,
    pub(crate) ids: Vec<usize>,
    pub(crate) labels: Vec<i64>,
    pub(crate) classes: Arc<Vec<String>>,
}

impl Split {
    /// A split of in-memory 8-bit images, `n` of `h` x `w` x `c` (c = 1 gray or 3 RGB, HWC),
    /// with one label in `0..classes.len()` each.
    pub fn from_u8(
        images: Vec<u8>,
        (h, w, c): (usize, usize, usize),
        labels: Vec<i64>,
        classes: Vec<String>,
    ) -> Result<Split> {
        ensure!(h > 0 && w > 0, "images of {h}x{w}: both sides must be positive");
        ensure!(c == 1 || c == 3, "images with {c} channels: expected 1 (gray) or 3 (RGB)");
        let want = [h, w, c].iter().try_fold(labels.len(), |a, &d| a.checked_mul(d));
        ensure!(want == Some(images.len()), "{} image bytes for {} labels of {h}x{w}x{c}", images.len(), labels.len());
        if let Some(&bad) = labels.iter().find(|&&l| l < 0 || l as usize >= classes.len()) {
            return Err(invalid!("label {bad} is outside 0..{}", classes.len()));
        }
        let n = labels.len();
        Ok(Split {
            store: Arc::new(Store::Memory { h, w, c, data: images }),
            ids: (0..n).collect(),
            labels,
            classes: Arc::new(classes),
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether it holds no image.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Class names, index = label.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Each image's label, in the split's order.
    pub fn labels(&self) -> &[i64] {
        &self.labels
    }

    /// Number of images of each class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.classes.len()];
        for &l in &self.labels {
            c[l as usize] += 1;
        }
        c
    }

    /// The image files, in the split's order (`None` for in-memory images such as IDX).
    pub fn files(&self) -> Option<Vec<&Path>> {
        match &*self.store {
            Store::Files(f) => Some(self.ids.iter().map(|&i| f[i].as_path()).collect()),
            Store::Memory { .. } => None,
        }
    }

    /// The split's indices of each class, in order.
    fn by_class(&self) -> Vec<Vec<usize>> {
        let mut v = vec![Vec::new(); self.classes.len()];
        for (i, &l) in self.labels.iter().enumerate() {
            v[l as usize].push(i);
        }
        v
    }

    fn subset(&self, keep: impl Fn(usize) -> bool) -> Split {
        let (ids, labels) = (0..self.len()).filter(|&i| keep(i)).map(|i| (self.ids[i], self.labels[i])).unzip();
        Split { store: self.store.clone(), ids, labels, classes: self.classes.clone() }
    }

    /// Keeps the given classes (original indices, sorted and distinct), relabelled 0..n-1.
    fn keep_classes(&self, keep: &[usize]) -> Split {
        let mut map = vec![-1i64; self.classes.len()];
        for (new, &old) in keep.iter().enumerate() {
            map[old] = new as i64;
        }
        let mut s = self.subset(|i| map[self.labels[i] as usize] >= 0);
        for l in &mut s.labels {
            *l = map[*l as usize];
        }
        s.classes = Arc::new(keep.iter().map(|&k| self.classes[k].clone()).collect());
        s
    }

    /// Keeps the first `n` images of each class in a shuffle seeded by (seed, class), in
    /// their original order (a class with fewer keeps them all).
    pub fn per_class(&self, n: usize, seed: u64) -> Result<Split> {
        ensure!(n > 0, "per-class count must be positive");
        let mut keep = vec![false; self.len()];
        for (c, mut of) in self.by_class().into_iter().enumerate() {
            SampleRng::new(seed, 0x0C1A_55E5, c as u64).shuffle(&mut of);
            for &i in of.iter().take(n) {
                keep[i] = true;
            }
        }
        Ok(self.subset(|i| keep[i]))
    }

    /// A seeded split per class: `fraction` of each class (rounded, at most all but one)
    /// goes to the second part.
    pub fn split_off(&self, fraction: f64, seed: u64) -> (Split, Split) {
        let mut to_val = vec![false; self.len()];
        for (c, mut of) in self.by_class().into_iter().enumerate() {
            let k = ((fraction * of.len() as f64).round() as usize).min(of.len().saturating_sub(1));
            SampleRng::new(seed, 0x5EED_5B17, c as u64).shuffle(&mut of);
            for &i in &of[..k] {
                to_val[i] = true;
            }
        }
        (self.subset(|i| !to_val[i]), self.subset(|i| to_val[i]))
    }
}

/// How [`Dataset::open`] reads a source.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// A separate validation source (same syntax as the training spec). Without it, an image
    /// folder's `ROOT/val` is used when it exists, else a seeded split of the training set.
    pub val: Option<String>,
    /// The fraction of each class held out for validation when there is no validation
    /// source (default 0.1; in [0, 1)).
    pub val_fraction: f64,
    /// Seed of that split.
    pub seed: u64,
    /// Leave out images that cannot be decoded (each is then fully decoded once while
    /// opening) and count them, instead of failing on the first.
    pub skip_bad: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions { val: None, val_fraction: 0.1, seed: 0, skip_bad: false }
    }
}

/// A training and a validation [`Split`] with the same classes.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// The training images.
    pub train: Split,
    /// The validation images (may be empty when `val_fraction` is 0).
    pub val: Split,
    /// Files left out by `skip_bad`.
    pub skipped: Vec<PathBuf>,
    /// Where the data came from, for reports.
    pub origin: String,
}

/// One opened source before splitting.
struct Source {
    split: Split,
    skipped: Vec<PathBuf>,
    is_idx: bool,
    origin: String,
}

fn open_source(spec: &str, skip_bad: bool) -> Result<Source> {
    if let Some(rest) = spec.strip_prefix("idx:") {
        let (images, labels) =
            rest.split_once(',').ok_or_else(|| invalid!("IDX source '{spec}': expected idx:IMAGES,LABELS"))?;
        return open_idx(Path::new(images.trim()), Path::new(labels.trim()));
    }
    let root = Path::new(spec.strip_prefix("folder:").unwrap_or(spec));
    let s = folder::scan(root, skip_bad)?;
    let n = s.files.len();
    Ok(Source {
        split: Split {
            store: Arc::new(Store::Files(s.files)),
            ids: (0..n).collect(),
            labels: s.labels,
            classes: Arc::new(s.classes),
        },
        skipped: s.skipped,
        is_idx: false,
        origin: root.display().to_string(),
    })
}

fn open_idx(images: &Path, labels: &Path) -> Result<Source> {
    let im = idx::read(images)?;
    let lb = idx::read(labels)?;
    let (n, h, w, c) = match im.dims[..] {
        [n, h, w] => (n, h, w, 1),
        [n, h, w, c] if c == 1 || c == 3 => (n, h, w, c),
        _ => {
            return Err(data_err(
                images,
                format!("IDX images must have dimensions [n, h, w] or [n, h, w, 1|3], not {:?}", im.dims),
            ))
        }
    };
    if h == 0 || w == 0 {
        return Err(data_err(images, format!("IDX images of {h}x{w}")));
    }
    if lb.dims.len() != 1 {
        return Err(data_err(labels, format!("IDX labels must have one dimension, not {:?}", lb.dims)));
    }
    if lb.dims[0] != n {
        return Err(data_err(
            labels,
            format!("{} labels for {n} images in {} (the counts must match)", lb.dims[0], images.display()),
        ));
    }
    if n == 0 {
        return Err(data_err(images, "no images"));
    }
    let k = lb.data.iter().copied().max().unwrap_or(0) as usize + 1;
    let fashion = [images, labels].iter().any(|p| p.to_string_lossy().to_lowercase().contains("fashion"));
    let classes: Vec<String> = if fashion && k <= FASHION_MNIST_CLASSES.len() {
        FASHION_MNIST_CLASSES.iter().map(|s| s.to_string()).collect()
    } else {
        (0..k).map(|i| i.to_string()).collect()
    };
    Ok(Source {
        split: Split {
            store: Arc::new(Store::Memory { h, w, c, data: im.data }),
            ids: (0..n).collect(),
            labels: lb.data.iter().map(|&l| l as i64).collect(),
            classes: Arc::new(classes),
        },
        skipped: Vec::new(),
        is_idx: true,
        origin: format!("{} ({n} images of {h}x{w}x{c})", images.display()),
    })
}

impl Dataset {
    /// Opens a source: `idx:IMAGES,LABELS` or an image folder (a path, or `folder:PATH`).
    /// See the [module documentation](self) for the layouts and how validation data is
    /// found.
    pub fn open(spec: &str, opts: &OpenOptions) -> Result<Dataset> {
        ensure!((0.0..1.0).contains(&opts.val_fraction), "val fraction {} must be in [0, 1)", opts.val_fraction);
        let root = Path::new(spec.strip_prefix("folder:").unwrap_or(spec));
        let (train_spec, val_spec) = if !spec.starts_with("idx:") && root.join("train").is_dir() {
            let val = root.join("val");
            let auto_val = val.is_dir().then(|| format!("folder:{}", val.display()));
            (format!("folder:{}", root.join("train").display()), opts.val.clone().or(auto_val))
        } else {
            (spec.to_string(), opts.val.clone())
        };
        let train = open_source(&train_spec, opts.skip_bad)?;
        let mut skipped = train.skipped.clone();
        let (train_split, val_split, origin) = match val_spec {
            Some(vs) => {
                let val = open_source(&vs, opts.skip_bad)?;
                skipped.extend(val.skipped.iter().cloned());
                let k = train.split.classes.len();
                let mut v = val.split;
                if val.is_idx {
                    if let Some(&bad) = v.labels.iter().find(|&&l| l as usize >= k) {
                        return Err(Error::Data {
                            path: vs.clone(),
                            msg: format!("val classes differ from train's: val has label {bad}, train has {k} classes"),
                        });
                    }
                    v.classes = train.split.classes.clone();
                } else if v.classes != train.split.classes {
                    let missing: Vec<&String> = train.split.classes.iter().filter(|c| !v.classes.contains(c)).collect();
                    let extra: Vec<&String> = v.classes.iter().filter(|c| !train.split.classes.contains(c)).collect();
                    return Err(Error::Data {
                        path: vs.strip_prefix("folder:").unwrap_or(&vs).to_string(),
                        msg: format!("val classes differ from train's: missing {missing:?}, not in train {extra:?}"),
                    });
                }
                let origin = format!("train {}, val {}", train.origin, val.origin);
                (train.split, v, origin)
            }
            None => {
                let (t, v) = train.split.split_off(opts.val_fraction, opts.seed);
                let origin = format!("{} (val: {} of each class, seed {})", train.origin, opts.val_fraction, opts.seed);
                (t, v, origin)
            }
        };
        Ok(Dataset { train: train_split, val: val_split, skipped, origin })
    }

    /// Class names, index = label.
    pub fn classes(&self) -> &[String] {
        self.train.classes()
    }

    /// Renames the classes (as many names as classes).
    pub fn set_class_names(&mut self, names: Vec<String>) -> Result<()> {
        ensure!(
            names.len() == self.classes().len(),
            "{} class names for {} classes",
            names.len(),
            self.classes().len()
        );
        let names = Arc::new(names);
        self.train.classes = names.clone();
        self.val.classes = names;
        Ok(())
    }

    /// Keeps the selected classes in both splits, relabelled 0..n-1 in the order of their
    /// original indices.
    pub fn select(&self, sel: &ClassSelection) -> Result<Dataset> {
        let keep = sel.resolve(self.classes())?;
        let counts = self.train.class_counts();
        if let Some(&empty) = keep.iter().find(|&&k| counts[k] == 0) {
            return Err(invalid!("class '{}' has no training images", self.classes()[empty]));
        }
        Ok(Dataset {
            train: self.train.keep_classes(&keep),
            val: self.val.keep_classes(&keep),
            skipped: self.skipped.clone(),
            origin: self.origin.clone(),
        })
    }

    /// Keeps `n` training images per class (see [`Split::per_class`]); validation is
    /// untouched (call `val.per_class` to cap it too).
    pub fn per_class(&self, n: usize, seed: u64) -> Result<Dataset> {
        Ok(Dataset { train: self.train.per_class(n, seed)?, ..self.clone() })
    }

    /// One line: sizes, classes and skipped files.
    pub fn summary(&self) -> String {
        let k = self.classes().len();
        let names = if k <= 12 { format!(" ({})", self.classes().join(", ")) } else { String::new() };
        let mut s = format!(
            "{}: {} train and {} val images, {k} classes{names}",
            self.origin,
            self.train.len(),
            self.val.len()
        );
        if !self.skipped.is_empty() {
            s += &format!("; skipped {} bad files", self.skipped.len());
        }
        s
    }
}

/// A class selection: comma-separated class names (case-insensitive), indices and
/// inclusive index ranges, e.g. `0-4`, `sandal,shirt`, `0,3,7`, `0-2,bag`. A token that
/// names a class is that class; otherwise it is read as an index or a range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassSelection(Vec<String>);

impl FromStr for ClassSelection {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let t: Vec<String> = s.split(',').map(|t| t.trim().to_string()).collect();
        ensure!(t.iter().all(|t| !t.is_empty()), "class selection '{s}' has an empty entry");
        Ok(ClassSelection(t))
    }
}

impl fmt::Display for ClassSelection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

impl ClassSelection {
    /// The selected original class indices, sorted and distinct.
    pub fn resolve(&self, classes: &[String]) -> Result<Vec<usize>> {
        let k = classes.len();
        let check = |i: usize| -> Result<usize> {
            ensure!(i < k, "class index {i} is out of range: there are {k} classes (0-{})", k.saturating_sub(1));
            Ok(i)
        };
        let mut out = Vec::new();
        for t in &self.0 {
            if let Some(i) = classes.iter().position(|c| c.eq_ignore_ascii_case(t)) {
                out.push(i);
            } else if let Ok(i) = t.parse::<usize>() {
                out.push(check(i)?);
            } else if let Some((a, b)) = t
                .split_once('-')
                .and_then(|(a, b)| Some((a.trim().parse::<usize>().ok()?, b.trim().parse::<usize>().ok()?)))
            {
                ensure!(a <= b, "class range {t} is empty");
                check(b)?;
                out.extend(a..=b);
            } else {
                let list = if k <= 20 { classes.join(", ") } else { format!("{k} classes") };
                return Err(invalid!("no class named '{t}' (classes: {list})"));
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }
}
