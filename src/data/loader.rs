//! The batch loader: one producer thread walks the batch sequence and fills each batch in
//! parallel on its own rayon pool (decode, resize, augment, normalize straight into the
//! batch), up to `prefetch` batches ahead of the consumer; batch buffers circulate between
//! the consumer and the producer, so a step allocates nothing.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use rayon::prelude::*;

use super::folder;
use super::transform::{plan, render, resize_shorter, Augment, Img, Normalize, SampleRng, View};
use super::{Split, Store};
use crate::{ensure, invalid, Error, Result};

/// Where a training loader stands: the epoch and the index, within that epoch's shuffled
/// order, of the next image to deliver. Saved with a checkpoint, it restarts the loader
/// bit-identically ([`Loader::train`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Position {
    /// Epoch, from 0.
    pub epoch: u64,
    /// Images of this epoch already delivered.
    pub index: usize,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "epoch {} image {}", self.epoch, self.index)
    }
}

/// How a [`Loader`] builds batches.
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    /// Images per batch.
    pub batch: usize,
    /// Side of the square images a batch holds.
    pub size: usize,
    /// The shorter side every image is resized to before it is cropped (and at which it is
    /// cached); `None` means `size`. `Some(256)` with `size` 224 gives the classic
    /// resize-256 / center-crop-224 evaluation, and random-resized crops from more pixels.
    pub resize: Option<usize>,
    /// Training augmentation (evaluation loaders ignore it).
    pub augment: Augment,
    /// Normalization of the [0, 1] pixel values.
    pub norm: Normalize,
    /// Seed of the shuffles and augmentations.
    pub seed: u64,
    /// Worker threads decoding and augmenting (0: one per core).
    pub threads: usize,
    /// Batches prepared ahead of the consumer (at least 1).
    pub prefetch: usize,
    /// Memory budget in bytes for caching decoded images at the working size (0: no
    /// cache). Images are cached the first time they are loaded, until the budget is used.
    pub cache_bytes: usize,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch: 32,
            size: 32,
            resize: None,
            augment: Augment::CropFlip,
            norm: Normalize::IMAGENET,
            seed: 0,
            threads: 0,
            prefetch: 4,
            cache_bytes: 2 << 30,
        }
    }
}

/// One batch in the layout [`Model::set_batch`](crate::model::Model::set_batch) takes. Get
/// one from [`Loader::new_batch`] and pass it to every [`Loader::next`]: its buffers are
/// swapped with the prepared ones, never reallocated.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// Images, NCHW f32, normalized: `[batch, 3, size, size]`.
    pub images: Vec<f32>,
    /// Class indices, `[batch]`.
    pub targets: Vec<i64>,
    /// How many leading entries are real: all of them in training; in evaluation the last
    /// batch of a pass is padded with images from the start of the split.
    pub valid: usize,
    /// Where this batch starts.
    pub position: Position,
}

enum Msg {
    Batch(Batch),
    EndOfPass,
    Failed(Error),
}

/// The shared, read-only state the workers use (plus the cache).
struct Inner {
    split: Split,
    train: bool,
    size: usize,
    resize: usize,
    augment: Augment,
    seed: u64,
    scale: [f32; 3],
    bias: [f32; 3],
    /// In-memory images already at the working size: sampled in place, nothing cached.
    direct: bool,
    cache: Vec<OnceLock<Img>>,
    budget: usize,
    cached_bytes: AtomicUsize,
    cached: AtomicUsize,
    full: AtomicBool,
}

impl Inner {
    fn with_cache(&self, i: usize, make: impl FnOnce() -> Result<Img>, use_it: impl FnOnce(View<'_>)) -> Result<()> {
        if let Some(img) = self.cache.get(i).and_then(|c| c.get()) {
            use_it(img.view());
            return Ok(());
        }
        let img = make()?;
        let bytes = img.data.len();
        if self.budget > 0 && !self.full.load(Ordering::Relaxed) {
            if self.cached_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes <= self.budget {
                match self.cache[i].set(img) {
                    Ok(()) => {
                        self.cached.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        self.cached_bytes.fetch_sub(bytes, Ordering::Relaxed);
                    }
                }
                use_it(self.cache[i].get().expect("set above").view());
                return Ok(());
            }
            self.cached_bytes.fetch_sub(bytes, Ordering::Relaxed);
            self.full.store(true, Ordering::Relaxed);
        }
        use_it(img.view());
        Ok(())
    }

    /// Renders split image `i` for `epoch` into `out` (3 * size * size values).
    fn render_one(&self, epoch: u64, i: usize, out: &mut [f32]) -> Result<()> {
        let mut rng = SampleRng::new(self.seed, epoch, i as u64);
        let (size, aug, train, scale, bias) = (self.size, self.augment, self.train, self.scale, self.bias);
        let mut draw = |v: View<'_>| {
            let op = plan(v.w, v.h, size, aug, train, &mut rng);
            render(v, op, size, scale, bias, out);
        };
        let sid = self.split.ids[i];
        match &*self.split.store {
            Store::Memory { h, w, c, data } => {
                let n = h * w * c;
                let v = View { w: *w, h: *h, c: *c, data: &data[sid * n..(sid + 1) * n] };
                if self.direct {
                    draw(v);
                    Ok(())
                } else {
                    self.with_cache(
                        i,
                        || {
                            Ok(resize_shorter(v, self.resize).unwrap_or_else(|| Img {
                                w: v.w,
                                h: v.h,
                                c: v.c,
                                data: v.data.to_vec(),
                            }))
                        },
                        draw,
                    )
                }
            }
            Store::Files(files) => self.with_cache(
                i,
                || {
                    let img = folder::decode(&files[sid])?;
                    Ok(resize_shorter(img.view(), self.resize).unwrap_or(img))
                },
                draw,
            ),
        }
    }

    fn fill(&self, epoch: u64, idxs: &[usize], buf: &mut Batch) -> Result<()> {
        let per = 3 * self.size * self.size;
        buf.images.par_chunks_mut(per).zip(buf.targets.par_iter_mut()).zip(idxs.par_iter()).try_for_each(
            |((out, t), &i)| {
                *t = self.split.labels[i];
                self.render_one(epoch, i, out)
            },
        )
    }
}

/// Prepares batches of a [`Split`] ahead of the consumer; see the [module
/// documentation](super) for a training loop.
pub struct Loader {
    inner: Arc<Inner>,
    batch: usize,
    position: Position,
    rx: Option<Receiver<Msg>>,
    free: Option<Sender<Batch>>,
    worker: Option<JoinHandle<()>>,
    failed: bool,
}

fn normalize(p: Position, batch: usize, n: usize) -> Position {
    if p.index + batch > n {
        Position { epoch: p.epoch + 1, index: 0 }
    } else {
        p
    }
}

fn permutation(seed: u64, epoch: u64, n: usize, perm: &mut Vec<usize>) {
    perm.clear();
    perm.extend(0..n);
    SampleRng::new(seed, epoch, u64::MAX).shuffle(perm);
}

impl Loader {
    /// An endless training loader: each epoch is a fresh seeded shuffle of the split, cut
    /// into full batches (the remainder of an epoch is left out), augmented per
    /// `cfg.augment`; it starts at `start` (`Position::default()` for a fresh run).
    pub fn train(split: &Split, cfg: &LoaderConfig, start: Position) -> Result<Loader> {
        ensure!(
            split.len() >= cfg.batch,
            "the training split has {} images, fewer than one batch of {}",
            split.len(),
            cfg.batch
        );
        Loader::start(split, cfg, true, start)
    }

    /// An evaluation loader: the split in order, center-cropped, no augmentation; the last
    /// batch of a pass is padded (see [`Batch::valid`]). [`next`](Loader::next) returns
    /// `false` at the end of each pass, and the following call starts the next pass.
    pub fn eval(split: &Split, cfg: &LoaderConfig) -> Result<Loader> {
        ensure!(!split.is_empty(), "the evaluation split has no images");
        Loader::start(split, cfg, false, Position::default())
    }

    fn start(split: &Split, cfg: &LoaderConfig, train: bool, start: Position) -> Result<Loader> {
        ensure!(cfg.batch > 0, "batch size must be positive");
        ensure!(cfg.size > 0, "image size must be positive");
        ensure!(cfg.prefetch > 0, "prefetch must be at least 1 batch");
        let resize = cfg.resize.unwrap_or(cfg.size);
        ensure!(resize >= cfg.size, "resize {resize} is smaller than the crop size {}", cfg.size);
        cfg.norm.check()?;
        let n = split.len();
        let direct = matches!(&*split.store, Store::Memory { h, w, .. } if (*h).min(*w) == resize);
        let (scale, bias) = cfg.norm.affine();
        let inner = Arc::new(Inner {
            split: split.clone(),
            train,
            size: cfg.size,
            resize,
            augment: cfg.augment,
            seed: cfg.seed,
            scale,
            bias,
            direct,
            cache: if direct || cfg.cache_bytes == 0 { Vec::new() } else { (0..n).map(|_| OnceLock::new()).collect() },
            budget: if direct { 0 } else { cfg.cache_bytes },
            cached_bytes: AtomicUsize::new(0),
            cached: AtomicUsize::new(0),
            full: AtomicBool::new(false),
        });
        let threads = if cfg.threads == 0 {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        } else {
            cfg.threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("prunekit-data-{i}"))
            .build()
            .map_err(|e| invalid!("cannot start {threads} data threads: {e}"))?;
        let (tx, rx) = mpsc::sync_channel(cfg.prefetch);
        let (free_tx, free_rx) = mpsc::channel();
        let position = if train { normalize(start, cfg.batch, n) } else { start };
        let (batch, per, prefetch) = (cfg.batch, 3 * cfg.size * cfg.size, cfg.prefetch);
        let w = inner.clone();
        let worker = std::thread::Builder::new()
            .name("prunekit-data".into())
            .spawn(move || produce(&w, &pool, position, batch, per, prefetch + 2, &tx, &free_rx))
            .map_err(|e| invalid!("cannot start the data loader thread: {e}"))?;
        Ok(Loader { inner, batch, position, rx: Some(rx), free: Some(free_tx), worker: Some(worker), failed: false })
    }

    /// A batch with buffers of the right size, to pass to [`next`](Loader::next).
    pub fn new_batch(&self) -> Batch {
        Batch {
            images: vec![0.0; self.batch * 3 * self.inner.size * self.inner.size],
            targets: vec![0; self.batch],
            valid: 0,
            position: Position::default(),
        }
    }

    /// Replaces `batch` with the next prepared batch and returns `true`; an evaluation
    /// loader returns `false` (leaving `batch` alone) at the end of each pass. On an error
    /// (an image that cannot be decoded, which it names) `batch` is left alone too, and the
    /// loader stops.
    pub fn next(&mut self, batch: &mut Batch) -> Result<bool> {
        ensure!(!self.failed, "the data loader stopped after an earlier error");
        let msg = self.rx.as_ref().and_then(|rx| rx.recv().ok());
        match msg {
            Some(Msg::Batch(mut b)) => {
                std::mem::swap(batch, &mut b);
                if b.images.len() == batch.images.len() && b.targets.len() == batch.targets.len() {
                    if let Some(free) = &self.free {
                        let _ = free.send(b);
                    }
                }
                let p = batch.position;
                let after = Position { epoch: p.epoch, index: p.index + self.batch };
                self.position = if self.inner.train { normalize(after, self.batch, self.len()) } else { after };
                Ok(true)
            }
            Some(Msg::EndOfPass) => {
                self.position = Position { epoch: self.position.epoch + 1, index: 0 };
                Ok(false)
            }
            Some(Msg::Failed(e)) => {
                self.failed = true;
                Err(e)
            }
            None => {
                self.failed = true;
                Err(invalid!("the data loader's worker thread stopped unexpectedly"))
            }
        }
    }

    /// Where the next batch starts: save it with a checkpoint, and pass it to
    /// [`Loader::train`] to continue with the same batches.
    pub fn position(&self) -> Position {
        self.position
    }

    /// Images in the split.
    pub fn len(&self) -> usize {
        self.inner.split.len()
    }

    /// Whether the split is empty (never, for a loader that started).
    pub fn is_empty(&self) -> bool {
        self.inner.split.is_empty()
    }

    /// Batches per epoch (training: full batches only; evaluation: the last one padded).
    pub fn steps_per_epoch(&self) -> usize {
        if self.inner.train {
            self.len() / self.batch
        } else {
            self.len().div_ceil(self.batch)
        }
    }

    /// What the cache holds, e.g. "cached 600 of 600 images, 1.8 MiB in memory (budget 2048
    /// MiB)", or why there is none.
    pub fn cache_report(&self) -> String {
        let i = &self.inner;
        let n = i.split.len();
        let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
        if i.direct {
            let bytes = match &*i.split.store {
                Store::Memory { h, w, c, .. } => n * h * w * c,
                Store::Files(_) => 0,
            };
            return format!(
                "no cache needed: {n} images already in memory at the working size ({:.1} MiB)",
                mib(bytes)
            );
        }
        if i.budget == 0 {
            return "cache off (budget 0): every image is decoded and resized each time it is used".into();
        }
        let (c, b) = (i.cached.load(Ordering::Relaxed), i.cached_bytes.load(Ordering::Relaxed));
        let mut s = format!("cached {c} of {n} images, {:.1} MiB in memory (budget {:.0} MiB)", mib(b), mib(i.budget));
        if i.full.load(Ordering::Relaxed) {
            s += &format!("; the budget is full, the other {} are decoded each time they are used", n - c);
        }
        s
    }
}

impl fmt::Debug for Loader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Loader")
            .field("train", &self.inner.train)
            .field("images", &self.len())
            .field("batch", &self.batch)
            .field("size", &self.inner.size)
            .field("position", &self.position)
            .finish_non_exhaustive()
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.rx.take();
        self.free.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn produce(
    inner: &Inner,
    pool: &rayon::ThreadPool,
    start: Position,
    batch: usize,
    per: usize,
    max_buffers: usize,
    tx: &SyncSender<Msg>,
    free: &Receiver<Batch>,
) {
    let n = inner.split.len();
    let mut pos = start;
    let mut perm = Vec::with_capacity(n);
    let mut perm_epoch = None;
    let mut idxs = vec![0usize; batch];
    let mut allocated = 0;
    loop {
        let valid;
        if inner.train {
            pos = normalize(pos, batch, n);
            if perm_epoch != Some(pos.epoch) {
                permutation(inner.seed, pos.epoch, n, &mut perm);
                perm_epoch = Some(pos.epoch);
            }
            idxs.copy_from_slice(&perm[pos.index..pos.index + batch]);
            valid = batch;
        } else {
            if pos.index >= n {
                if tx.send(Msg::EndOfPass).is_err() {
                    return;
                }
                pos = Position { epoch: pos.epoch + 1, index: 0 };
                continue;
            }
            valid = batch.min(n - pos.index);
            for (k, slot) in idxs.iter_mut().enumerate() {
                *slot = if k < valid { pos.index + k } else { (k - valid) % n };
            }
        }
        let mut buf = match free.try_recv() {
            Ok(b) => b,
            Err(TryRecvError::Empty) if allocated < max_buffers => {
                allocated += 1;
                Batch { images: vec![0.0; batch * per], targets: vec![0; batch], ..Batch::default() }
            }
            Err(TryRecvError::Empty) => match free.recv() {
                Ok(b) => b,
                Err(_) => return,
            },
            Err(TryRecvError::Disconnected) => return,
        };
        buf.valid = valid;
        buf.position = pos;
        let r = pool.install(|| inner.fill(pos.epoch, &idxs, &mut buf));
        pos.index += batch;
        let msg = match r {
            Ok(()) => Msg::Batch(buf),
            Err(e) => Msg::Failed(e),
        };
        let stop = matches!(msg, Msg::Failed(_));
        if tx.send(msg).is_err() || stop {
            return;
        }
    }
}
