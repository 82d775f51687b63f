//! The data module on small data sets it builds itself: image folders of PNGs (and the
//! other formats), IDX files raw and gzip, every refusal of bad input, determinism across
//! thread counts, resumption, normalization and the augmentations.

use std::io::Write;
use std::path::Path;

use image::{ImageBuffer, Luma, LumaA, Rgb, Rgba};
use prunekit::data::{
    Augment, Batch, ClassSelection, Dataset, Loader, LoaderConfig, Normalize, OpenOptions, Position, Split,
};

fn png(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    ImageBuffer::from_pixel(w, h, Rgb(rgb)).save(path).unwrap();
}

/// An image folder: one folder per (class, count), images w x h of a colour that encodes
/// the class and the image.
fn folder(root: &Path, classes: &[(&str, usize)], w: u32, h: u32) {
    for (ci, (name, n)) in classes.iter().enumerate() {
        for i in 0..*n {
            png(&root.join(name).join(format!("img{i:03}.png")), w, h, [ci as u8 * 40, i as u8, 7]);
        }
    }
}

fn write_idx(path: &Path, dims: &[u32], data: &[u8], gzip: bool) {
    let mut b = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        b.extend(d.to_be_bytes());
    }
    b.extend_from_slice(data);
    if gzip {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&b).unwrap();
        b = e.finish().unwrap();
    }
    std::fs::write(path, b).unwrap();
}

/// n images of h x w whose pixels encode (image, x, y); labels i % classes.
fn idx_pair(dir: &Path, name: &str, n: usize, hw: usize, classes: usize, gzip: bool) -> String {
    let mut img = Vec::with_capacity(n * hw * hw);
    for i in 0..n {
        for y in 0..hw {
            for x in 0..hw {
                img.push(((i * 31 + y * 7 + x * 3) % 251) as u8);
            }
        }
    }
    let labels: Vec<u8> = (0..n).map(|i| (i % classes) as u8).collect();
    let ext = if gzip { ".gz" } else { "" };
    let (ip, lp) = (dir.join(format!("{name}-images{ext}")), dir.join(format!("{name}-labels{ext}")));
    write_idx(&ip, &[n as u32, hw as u32, hw as u32], &img, gzip);
    write_idx(&lp, &[n as u32], &labels, gzip);
    format!("idx:{},{}", ip.display(), lp.display())
}

fn cfg(batch: usize, size: usize) -> LoaderConfig {
    LoaderConfig { batch, size, prefetch: 2, ..LoaderConfig::default() }
}

fn err_of<T: std::fmt::Debug>(r: prunekit::Result<T>) -> String {
    r.unwrap_err().to_string()
}

fn batches(split: &Split, c: &LoaderConfig, start: Position, k: usize) -> Vec<Batch> {
    let mut l = Loader::train(split, c, start).unwrap();
    (0..k)
        .map(|_| {
            let mut b = l.new_batch();
            assert!(l.next(&mut b).unwrap());
            b
        })
        .collect()
}

fn same(a: &[Batch], b: &[Batch]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.targets == y.targets
                && x.position == y.position
                && x.images.iter().map(|v| v.to_bits()).eq(y.images.iter().map(|v| v.to_bits()))
        })
}

#[test]
fn folder_classes_are_sorted_and_split_per_class_with_a_seed() {
    let t = tempfile::tempdir().unwrap();
    folder(t.path(), &[("zebra", 10), ("ant", 10), ("moth", 20)], 6, 5);
    std::fs::write(t.path().join("notes.txt"), "not a class").unwrap();
    std::fs::write(t.path().join("ant").join("readme.txt"), "not an image").unwrap();
    let opts = OpenOptions { val_fraction: 0.2, seed: 3, ..OpenOptions::default() };
    let d = Dataset::open(t.path().to_str().unwrap(), &opts).unwrap();
    assert_eq!(d.classes(), ["ant", "moth", "zebra"]);
    assert_eq!(d.train.class_counts(), [8, 16, 8]);
    assert_eq!(d.val.class_counts(), [2, 4, 2]);
    // Labels follow the folders: every ant file is label 0, etc.
    for (f, &l) in d.train.files().unwrap().iter().zip(d.train.labels()) {
        assert_eq!(f.parent().unwrap().file_name().unwrap().to_str().unwrap(), d.classes()[l as usize]);
    }
    // Same seed, same split; another seed, another split.
    let again = Dataset::open(t.path().to_str().unwrap(), &opts).unwrap();
    assert_eq!(d.val.files(), again.val.files());
    let other = Dataset::open(t.path().to_str().unwrap(), &OpenOptions { seed: 4, ..opts.clone() }).unwrap();
    assert_ne!(d.val.files(), other.val.files());
    // No file in both.
    let tr = d.train.files().unwrap();
    assert!(d.val.files().unwrap().iter().all(|f| !tr.contains(f)));
    assert!(d.summary().contains("32 train and 8 val images, 3 classes (ant, moth, zebra)"), "{}", d.summary());
}

#[test]
fn train_and_val_folders_are_used_when_present() {
    let t = tempfile::tempdir().unwrap();
    folder(&t.path().join("train"), &[("b", 4), ("a", 3)], 4, 4);
    folder(&t.path().join("val"), &[("a", 2), ("b", 1)], 4, 4);
    let d = Dataset::open(t.path().to_str().unwrap(), &OpenOptions::default()).unwrap();
    assert_eq!(d.classes(), ["a", "b"]);
    assert_eq!(d.train.class_counts(), [3, 4]);
    assert_eq!(d.val.class_counts(), [2, 1]);
    assert!(d.val.files().unwrap().iter().all(|f| f.starts_with(t.path().join("val"))));
    // Val classes that differ from train's.
    folder(&t.path().join("val"), &[("c", 1)], 4, 4);
    let e = err_of(Dataset::open(t.path().to_str().unwrap(), &OpenOptions::default()));
    assert!(e.contains("val classes differ from train's") && e.contains("\"c\""), "{e}");
    assert!(e.contains(&t.path().join("val").display().to_string()), "{e}");
}

#[test]
fn bad_folders_and_images_are_refused_with_their_names() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let e = err_of(Dataset::open(root.to_str().unwrap(), &OpenOptions::default()));
    assert!(e.contains("no class folders") && e.contains("root"), "{e}");
    let e = err_of(Dataset::open(t.path().join("missing").to_str().unwrap(), &OpenOptions::default()));
    assert!(e.contains("not a folder"), "{e}");

    folder(&root, &[("a", 3), ("b", 3)], 4, 4);
    std::fs::create_dir_all(root.join("c")).unwrap();
    std::fs::write(root.join("c").join("x.txt"), "text").unwrap();
    let e = err_of(Dataset::open(root.to_str().unwrap(), &OpenOptions::default()));
    assert!(e.contains("class folder without images") && e.contains(&root.join("c").display().to_string()), "{e}");
    std::fs::remove_dir_all(root.join("c")).unwrap();

    // A file that is no image at all: refused when opening, or skipped and counted.
    let garbage = root.join("a").join("garbage.png");
    std::fs::write(&garbage, b"this is not a png").unwrap();
    let e = err_of(Dataset::open(root.to_str().unwrap(), &OpenOptions::default()));
    assert!(e.contains(&garbage.display().to_string()) && e.contains("unreadable or corrupt image"), "{e}");
    let skip = OpenOptions { skip_bad: true, val_fraction: 0.0, ..OpenOptions::default() };
    let d = Dataset::open(root.to_str().unwrap(), &skip).unwrap();
    assert_eq!(d.skipped, vec![garbage.clone()]);
    assert_eq!(d.train.len(), 6);
    assert!(d.summary().contains("skipped 1 bad files"));
    std::fs::remove_file(&garbage).unwrap();

    // A PNG cut short: its header reads, its pixels do not. Loading names it and leaves
    // the caller's batch alone; skip_bad decodes everything when opening and skips it.
    let good = std::fs::read(root.join("b").join("img000.png")).unwrap();
    let cut = root.join("b").join("cut.png");
    std::fs::write(&cut, &good[..good.len() / 2]).unwrap();
    let d =
        Dataset::open(root.to_str().unwrap(), &OpenOptions { val_fraction: 0.0, ..OpenOptions::default() }).unwrap();
    assert_eq!(d.train.len(), 7);
    let mut l = Loader::eval(&d.train, &cfg(7, 4)).unwrap();
    let mut b = Batch { images: vec![42.0; 7 * 48], targets: vec![9; 7], ..Batch::default() };
    let e = err_of(l.next(&mut b));
    assert!(e.contains(&cut.display().to_string()) && e.contains("unreadable or corrupt image"), "{e}");
    assert!(b.images.iter().all(|&v| v == 42.0) && b.targets == [9; 7]);
    assert!(err_of(l.next(&mut b)).contains("stopped after an earlier error"));
    let d = Dataset::open(root.to_str().unwrap(), &skip).unwrap();
    assert_eq!((d.skipped.len(), d.train.len()), (1, 6));

    // Every image of a class bad and skipped.
    let only = t.path().join("only");
    folder(&only, &[("a", 2)], 4, 4);
    std::fs::create_dir_all(only.join("b")).unwrap();
    std::fs::write(only.join("b").join("x.jpg"), b"nope").unwrap();
    let e = err_of(Dataset::open(only.to_str().unwrap(), &skip));
    assert!(e.contains("without readable images") && e.contains(&only.join("b").display().to_string()), "{e}");
}

#[test]
fn formats_decode_to_rgb() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    std::fs::create_dir_all(r.join("c")).unwrap();
    ImageBuffer::from_pixel(4, 4, Rgb([200u8, 100, 50])).save(r.join("c/a_rgb.png")).unwrap();
    ImageBuffer::from_pixel(4, 4, Rgba([200u8, 100, 50, 7])).save(r.join("c/b_rgba.png")).unwrap();
    ImageBuffer::from_pixel(4, 4, Rgb([200u16 * 257, 100 * 257, 50 * 257])).save(r.join("c/c_16bit.png")).unwrap();
    ImageBuffer::from_pixel(4, 4, Luma([90u8])).save(r.join("c/d_gray.png")).unwrap();
    ImageBuffer::from_pixel(4, 4, LumaA([90u8, 3])).save(r.join("c/e_graya.png")).unwrap();
    ImageBuffer::from_pixel(4, 4, Rgb([200u8, 100, 50])).save(r.join("c/f.bmp")).unwrap();
    ImageBuffer::from_pixel(4, 4, Rgba([200u8, 100, 50, 255])).save(r.join("c/g.webp")).unwrap();
    ImageBuffer::from_pixel(16, 16, Rgb([200u8, 100, 50])).save(r.join("c/h.jpg")).unwrap();
    let d = Dataset::open(r.to_str().unwrap(), &OpenOptions { val_fraction: 0.0, ..OpenOptions::default() }).unwrap();
    assert_eq!(d.train.len(), 8);
    let c = LoaderConfig { norm: "0,1".parse().unwrap(), ..cfg(8, 4) };
    let mut l = Loader::eval(&d.train, &c).unwrap();
    let mut b = l.new_batch();
    assert!(l.next(&mut b).unwrap());
    let px = |i: usize, ch: usize| (b.images[i * 48 + ch * 16 + 5] * 255.0).round() as i32;
    for (i, want) in [(0, [200, 100, 50]), (1, [200, 100, 50]), (2, [200, 100, 50]), (3, [90; 3]), (4, [90; 3])] {
        assert_eq!([px(i, 0), px(i, 1), px(i, 2)], want, "image {i}");
    }
    assert_eq!([px(5, 0), px(5, 1), px(5, 2)], [200, 100, 50], "bmp");
    assert_eq!([px(6, 0), px(6, 1), px(6, 2)], [200, 100, 50], "webp");
    for (ch, want) in [200, 100, 50].into_iter().enumerate() {
        assert!((px(7, ch) - want).abs() <= 3, "jpeg channel {ch}: {} vs {want}", px(7, ch));
    }
}

#[test]
fn idx_raw_and_gzip_read_the_same_and_bad_idx_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let raw = idx_pair(t.path(), "raw", 20, 6, 4, false);
    let gz = idx_pair(t.path(), "gz", 20, 6, 4, true);
    let opts = OpenOptions { val_fraction: 0.0, ..OpenOptions::default() };
    let (a, b) = (Dataset::open(&raw, &opts).unwrap(), Dataset::open(&gz, &opts).unwrap());
    assert_eq!(a.classes(), ["0", "1", "2", "3"]);
    assert_eq!(a.train.labels(), b.train.labels());
    let c = cfg(4, 8);
    assert!(same(&batches(&a.train, &c, Position::default(), 6), &batches(&b.train, &c, Position::default(), 6)));

    let img = t.path().join("raw-images");
    let lab = t.path().join("raw-labels");
    let full = std::fs::read(&img).unwrap();
    let cut = t.path().join("cut-images");
    std::fs::write(&cut, &full[..full.len() - 10]).unwrap();
    let e = err_of(Dataset::open(&format!("idx:{},{}", cut.display(), lab.display()), &opts));
    assert!(e.contains(&cut.display().to_string()) && e.contains("truncated IDX file"), "{e}");
    // A gzip stream cut short.
    let gzf = std::fs::read(t.path().join("gz-images.gz")).unwrap();
    let cutgz = t.path().join("cut-images.gz");
    std::fs::write(&cutgz, &gzf[..gzf.len() / 2]).unwrap();
    let e = err_of(Dataset::open(&format!("idx:{},{}", cutgz.display(), lab.display()), &opts));
    assert!(e.contains("cut-images.gz") && (e.contains("truncated") || e.contains("corrupt")), "{e}");
    // Label and image counts that differ.
    let few = t.path().join("few-labels");
    write_idx(&few, &[19], &[0; 19], false);
    let e = err_of(Dataset::open(&format!("idx:{},{}", img.display(), few.display()), &opts));
    assert!(e.contains("few-labels") && e.contains("19 labels for 20 images"), "{e}");
    // Not IDX, a missing file, a bad spec.
    let e = err_of(Dataset::open(&format!("idx:{},{}", t.path().join("nope").display(), lab.display()), &opts));
    assert!(e.contains("nope"), "{e}");
    assert!(err_of(Dataset::open("idx:onlyone", &opts)).contains("expected idx:IMAGES,LABELS"));
    let text = t.path().join("text");
    std::fs::write(&text, "hello world").unwrap();
    let e = err_of(Dataset::open(&format!("idx:{},{}", text.display(), lab.display()), &opts));
    assert!(e.contains("not an IDX file"), "{e}");
    // A validation source whose labels go beyond train's classes.
    let wide = idx_pair(t.path(), "wide", 10, 6, 6, false);
    let e = err_of(Dataset::open(&raw, &OpenOptions { val: Some(wide), ..OpenOptions::default() }));
    assert!(e.contains("val classes differ from train's") && e.contains("wide-images"), "{e}");
}

#[test]
fn class_selection_by_name_index_and_range_and_per_class_carving() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("fashion");
    std::fs::create_dir_all(&dir).unwrap();
    let spec = idx_pair(&dir, "train", 200, 4, 10, true);
    let d = Dataset::open(&spec, &OpenOptions { val_fraction: 0.1, ..OpenOptions::default() }).unwrap();
    assert_eq!(d.classes()[5], "Sandal");
    assert_eq!(d.train.class_counts(), [18; 10]);

    let s = d.select(&"shirt,SANDAL".parse().unwrap()).unwrap();
    assert_eq!(s.classes(), ["Sandal", "Shirt"]);
    assert_eq!(s.train.class_counts(), [18, 18]);
    assert_eq!(s.val.class_counts(), [2, 2]);
    // Relabelled: original 5 -> 0, 6 -> 1.
    for (&old, &new) in d.train.labels().iter().filter(|&&l| l == 5 || l == 6).zip(s.train.labels()) {
        assert_eq!(new, old - 5);
    }
    let r = d.select(&"0-4".parse().unwrap()).unwrap();
    assert_eq!(r.classes(), ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"]);
    let i = d.select(&"7,0,3".parse().unwrap()).unwrap();
    assert_eq!(i.classes(), ["T-shirt/top", "Dress", "Sneaker"]);
    assert!(i.train.labels().iter().all(|&l| (0..3).contains(&l)));
    let m = d.select(&"t-shirt/top,8-9".parse().unwrap()).unwrap();
    assert_eq!(m.classes(), ["T-shirt/top", "Bag", "Ankle boot"]);

    let e = err_of(d.select(&"sandal,boots".parse().unwrap()));
    assert!(e.contains("no class named 'boots'") && e.contains("Ankle boot"), "{e}");
    assert!(err_of(d.select(&"12".parse().unwrap())).contains("class index 12 is out of range"));
    assert!(err_of(d.select(&"3-11".parse().unwrap())).contains("out of range"));
    assert!(err_of("a,,b".parse::<ClassSelection>()).contains("empty entry"));

    let p = s.per_class(5, 1).unwrap();
    assert_eq!(p.train.class_counts(), [5, 5]);
    assert_eq!(p.val.len(), s.val.len());
    assert_eq!(p.train.labels(), s.per_class(5, 1).unwrap().train.labels());
    let p2 = s.per_class(100, 1).unwrap();
    assert_eq!(p2.train.class_counts(), [18, 18]);
    // The seed picks which five of each class.
    let (p1, p2) = (d.train.per_class(5, 1).unwrap(), d.train.per_class(5, 2).unwrap());
    assert_eq!((p1.len(), p1.class_counts()), (50, vec![5; 10]));
    let pixels = |s: &Split| batches(s, &LoaderConfig { augment: Augment::None, ..cfg(50, 4) }, Position::default(), 1);
    assert!(!same(&pixels(&p1), &pixels(&p2)));
    assert!(err_of(s.per_class(0, 1)).contains("positive"));

    // Plain IDX files (no "fashion" in the path) have numbers for names.
    let plain = idx_pair(t.path(), "digits", 30, 4, 10, false);
    let n = Dataset::open(&plain, &OpenOptions::default()).unwrap();
    assert_eq!(n.classes()[3], "3");
    assert!(err_of(n.select(&"sandal".parse().unwrap())).contains("no class named 'sandal'"));
}

#[test]
fn loaders_refuse_bad_settings_and_small_splits() {
    let t = tempfile::tempdir().unwrap();
    let spec = idx_pair(t.path(), "s", 10, 8, 2, false);
    let d = Dataset::open(&spec, &OpenOptions { val_fraction: 0.0, ..OpenOptions::default() }).unwrap();
    let e = err_of(Loader::train(&d.train, &cfg(16, 8), Position::default()));
    assert!(e.contains("the training split has 10 images, fewer than one batch of 16"), "{e}");
    assert!(err_of(Loader::eval(&d.val, &cfg(4, 8))).contains("no images"));
    let bad = LoaderConfig { resize: Some(4), ..cfg(2, 8) };
    assert!(err_of(Loader::train(&d.train, &bad, Position::default())).contains("smaller than the crop size"));
    assert!(err_of("sideways".parse::<Augment>()).contains("none, flip or crop-flip"));
    assert!(err_of("1,2,3".parse::<Normalize>()).contains("has 3 numbers"));
    assert!(err_of("0.5,-1".parse::<Normalize>()).contains("positive"));
    let e = err_of(Dataset::open(&spec, &OpenOptions { val_fraction: 1.0, ..OpenOptions::default() }));
    assert!(e.contains("[0, 1)"), "{e}");
}

#[test]
fn batches_have_the_model_layout_and_eval_pads_the_last_batch() {
    let t = tempfile::tempdir().unwrap();
    let spec = idx_pair(t.path(), "s", 10, 28, 3, false);
    let d = Dataset::open(&spec, &OpenOptions { val_fraction: 0.0, ..OpenOptions::default() }).unwrap();
    let c = cfg(4, 32);
    let mut l = Loader::train(&d.train, &c, Position::default()).unwrap();
    assert_eq!(l.steps_per_epoch(), 2);
    let mut b = l.new_batch();
    for step in 0..5usize {
        assert!(l.next(&mut b).unwrap());
        assert_eq!((b.images.len(), b.targets.len(), b.valid), (4 * 3 * 32 * 32, 4, 4));
        assert_eq!(b.position, Position { epoch: step as u64 / 2, index: (step % 2) * 4 });
        assert!(b.images.iter().all(|v| v.is_finite()));
        // Gray replicated to three channels: channel k = (x/255 - mean_k)/std_k of one x.
        let n = Normalize::IMAGENET;
        for p in [0, 100, 1023] {
            let x0 = b.images[p] * n.std[0] + n.mean[0];
            let x1 = b.images[1024 + p] * n.std[1] + n.mean[1];
            assert!((x0 - x1).abs() < 1e-5);
        }
    }
    // Every target matches the image's label in some epoch order: each epoch is a permutation.
    let mut seen = vec![];
    let mut l =
        Loader::train(&d.train, &LoaderConfig { augment: Augment::None, ..c.clone() }, Position::default()).unwrap();
    for _ in 0..2 {
        l.next(&mut b).unwrap();
        seen.extend(b.targets.iter().copied());
    }
    assert_eq!(seen.len(), 8);
    // The producer works up to `prefetch` batches ahead, so it may have cached the next
    // epoch's images too: at least the 8 consumed, at most all 10.
    let report = l.cache_report();
    let cached: usize = report
        .strip_prefix("cached ")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected report: {report}"));
    assert!((8..=10).contains(&cached) && report.contains(" of 10 images"), "{report}");

    let mut e = Loader::eval(&d.train, &c).unwrap();
    assert_eq!(e.steps_per_epoch(), 3);
    let mut order = vec![];
    for pass in 0..2 {
        let mut valid = vec![];
        while e.next(&mut b).unwrap() {
            valid.push(b.valid);
            order.extend(b.targets[..b.valid].iter().copied());
            if b.valid < 4 {
                // Padded with the first images of the split.
                assert_eq!(&b.targets[b.valid..], &d.train.labels()[..4 - b.valid]);
            }
        }
        assert_eq!(valid, [4, 4, 2], "pass {pass}");
    }
    assert_eq!(order[..10], *d.train.labels());
    assert_eq!(order[10..], *d.train.labels());
}

#[test]
fn normalization_values() {
    let t = tempfile::tempdir().unwrap();
    folder(t.path(), &[("a", 1)], 3, 3);
    png(&t.path().join("a").join("img000.png"), 3, 3, [255, 0, 128]);
    let d = Dataset::open(t.path().to_str().unwrap(), &OpenOptions { val_fraction: 0.0, ..OpenOptions::default() })
        .unwrap();
    let check = |norm: Normalize, want: [f32; 3]| {
        let mut l = Loader::eval(&d.train, &LoaderConfig { norm, ..cfg(1, 3) }).unwrap();
        let mut b = l.new_batch();
        assert!(l.next(&mut b).unwrap());
        for (ch, w) in want.iter().enumerate() {
            for v in &b.images[ch * 9..(ch + 1) * 9] {
                assert!((v - w).abs() < 1e-5, "channel {ch}: {v} vs {w}");
            }
        }
    };
    check(Normalize::default(), [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (128.0 / 255.0 - 0.406) / 0.225]);
    check("0.5,0.5".parse().unwrap(), [1.0, -1.0, (128.0 / 255.0 - 0.5) / 0.5]);
    check("0,0,0,1,2,4".parse().unwrap(), [1.0, 0.0, 128.0 / 255.0 / 4.0]);
}

/// 16 copies of one asymmetric 8x8 gray image (pixel = 1 + 16x + y), loaded at 8x8 with
/// values x/255.
fn asymmetric(t: &Path, augment: Augment) -> (Vec<Batch>, Vec<u8>) {
    let img: Vec<u8> = (0..64).map(|p| (1 + 16 * (p % 8) + p / 8) as u8).collect();
    let all: Vec<u8> = (0..16).flat_map(|_| img.iter().copied()).collect();
    let (ip, lp) = (t.join("asym-images"), t.join("asym-labels"));
    write_idx(&ip, &[16, 8, 8], &all, false);
    write_idx(&lp, &[16], &[0; 16], false);
    let d = Dataset::open(
        &format!("idx:{},{}", ip.display(), lp.display()),
        &OpenOptions { val_fraction: 0.0, ..OpenOptions::default() },
    )
    .unwrap();
    let c = LoaderConfig { augment, norm: "0,1".parse().unwrap(), ..cfg(16, 8) };
    (batches(&d.train, &c, Position::default(), 2), img)
}

fn as_bytes(b: &Batch, i: usize) -> Vec<u8> {
    let img = &b.images[i * 192..i * 192 + 64];
    // Gray: the three channels agree.
    assert_eq!(img, &b.images[i * 192 + 64..i * 192 + 128]);
    img.iter().map(|v| (v * 255.0).round() as u8).collect()
}

#[test]
fn flip_mirrors_some_images_and_keeps_the_others() {
    let t = tempfile::tempdir().unwrap();
    let (bs, img) = asymmetric(t.path(), Augment::Flip);
    let mirror: Vec<u8> = (0..64).map(|p| img[(p / 8) * 8 + 7 - p % 8]).collect();
    let (mut kept, mut flipped) = (0, 0);
    for b in &bs {
        for i in 0..16 {
            let o = as_bytes(b, i);
            if o == img {
                kept += 1;
            } else if o == mirror {
                flipped += 1;
            } else {
                panic!("image {i} is neither the original nor its mirror: {o:?}");
            }
        }
    }
    assert!(kept > 0 && flipped > 0, "kept {kept}, flipped {flipped}");
    let (none, _) = asymmetric(t.path(), Augment::None);
    assert!(none.iter().all(|b| (0..16).all(|i| as_bytes(b, i) == img)));
}

#[test]
fn crop_flip_shifts_within_four_pixels_with_black_padding() {
    let t = tempfile::tempdir().unwrap();
    let (bs, img) = asymmetric(t.path(), Augment::CropFlip);
    let shifted = |dx: i32, dy: i32, flip: bool| -> Vec<u8> {
        (0..64)
            .map(|p| {
                let (x, y) = (p % 8, p / 8);
                let xo = if flip { 7 - x } else { x };
                let (sx, sy) = (xo + dx, y + dy);
                if (0..8).contains(&sx) && (0..8).contains(&sy) {
                    img[(sy * 8 + sx) as usize]
                } else {
                    0
                }
            })
            .collect()
    };
    let (mut moved, mut flips) = (0, 0);
    for b in &bs {
        for i in 0..16 {
            let o = as_bytes(b, i);
            let hit = (-4..=4)
                .flat_map(|dx| (-4..=4).flat_map(move |dy| [(dx, dy, false), (dx, dy, true)]))
                .find(|&(dx, dy, f)| shifted(dx, dy, f) == o);
            let (dx, dy, f) = hit.unwrap_or_else(|| panic!("image {i} is no shift of at most 4 pixels: {o:?}"));
            moved += usize::from(dx != 0 || dy != 0);
            flips += usize::from(f);
        }
    }
    assert!(moved > 16 && flips > 0 && flips < 32, "moved {moved}, flipped {flips}");
}

#[test]
fn random_resized_crop_above_64_pixels() {
    let t = tempfile::tempdir().unwrap();
    // Left half black, right half white: crops and flips change the balance.
    let root = t.path();
    for i in 0..4 {
        let p = root.join("a").join(format!("{i}.png"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        ImageBuffer::from_fn(100, 80, |x, _| Rgb(if x < 50 { [0u8; 3] } else { [255u8; 3] })).save(&p).unwrap();
    }
    let d =
        Dataset::open(root.to_str().unwrap(), &OpenOptions { val_fraction: 0.0, ..OpenOptions::default() }).unwrap();
    let c = LoaderConfig { norm: "0,1".parse().unwrap(), resize: Some(80), ..cfg(4, 72) };
    let bs = batches(&d.train, &c, Position::default(), 8);
    let mut means = vec![];
    for b in &bs {
        assert_eq!(b.images.len(), 4 * 3 * 72 * 72);
        assert!(b.images.iter().all(|&v| (-1e-6..=1.0 + 1e-6).contains(&v)));
        for i in 0..4 {
            let img = &b.images[i * 3 * 5184..i * 3 * 5184 + 5184];
            means.push(img.iter().sum::<f32>() / 5184.0);
        }
    }
    let distinct = means.iter().map(|m| (m * 1000.0) as i64).collect::<std::collections::BTreeSet<_>>();
    assert!(distinct.len() > 8, "random-resized crops look alike: {means:?}");
    // Evaluation: resize 80 (already), center crop 72 of 100x80: columns 14..86, half and half.
    let mut e = Loader::eval(&d.train, &c).unwrap();
    let mut b = e.new_batch();
    assert!(e.next(&mut b).unwrap());
    let mean = b.images[..5184].iter().sum::<f32>() / 5184.0;
    assert!((mean - 0.5).abs() < 1e-6, "{mean}");
}

#[test]
fn same_batches_with_one_or_two_threads_cached_or_not() {
    let t = tempfile::tempdir().unwrap();
    let spec = idx_pair(t.path(), "s", 40, 28, 5, true);
    let d = Dataset::open(&spec, &OpenOptions { val_fraction: 0.0, ..OpenOptions::default() }).unwrap();
    let base = LoaderConfig { seed: 11, ..cfg(8, 32) };
    let one = batches(&d.train, &LoaderConfig { threads: 1, ..base.clone() }, Position::default(), 12);
    let two = batches(&d.train, &LoaderConfig { threads: 2, ..base.clone() }, Position::default(), 12);
    let nocache =
        batches(&d.train, &LoaderConfig { threads: 2, cache_bytes: 0, ..base.clone() }, Position::default(), 12);
    let tiny_cache =
        batches(&d.train, &LoaderConfig { threads: 2, cache_bytes: 5000, ..base.clone() }, Position::default(), 12);
    assert!(same(&one, &two) && same(&one, &nocache) && same(&one, &tiny_cache));
    // Different epochs differ (reshuffled and re-augmented); a different seed differs.
    assert_ne!(
        one[0].targets.iter().chain(&one[1].targets).collect::<Vec<_>>(),
        one[5].targets.iter().chain(&one[6].targets).collect::<Vec<_>>()
    );
    let other = batches(&d.train, &LoaderConfig { seed: 12, ..base.clone() }, Position::default(), 2);
    assert!(!same(&one[..2], &other));

    // Image folders too.
    let f = t.path().join("folder");
    folder(&f, &[("a", 9), ("b", 7)], 12, 9);
    let d = Dataset::open(f.to_str().unwrap(), &OpenOptions { val_fraction: 0.0, ..OpenOptions::default() }).unwrap();
    let c = LoaderConfig { seed: 5, ..cfg(4, 8) };
    let one = batches(&d.train, &LoaderConfig { threads: 1, ..c.clone() }, Position::default(), 9);
    let two = batches(&d.train, &LoaderConfig { threads: 2, cache_bytes: 0, ..c.clone() }, Position::default(), 9);
    assert!(same(&one, &two));

    let mut l = Loader::train(&d.train, &c, Position::default()).unwrap();
    let mut b = l.new_batch();
    for _ in 0..4 {
        l.next(&mut b).unwrap();
    }
    let r = l.cache_report();
    assert!(r.starts_with("cached 16 of 16 images, 0.0 MiB in memory (budget 2048 MiB)"), "{r}");
    let l = Loader::train(&d.train, &LoaderConfig { cache_bytes: 0, ..c }, Position::default()).unwrap();
    assert!(l.cache_report().contains("cache off"));
}

#[test]
fn a_loader_started_at_a_saved_position_continues_bit_identically() {
    let t = tempfile::tempdir().unwrap();
    let spec = idx_pair(t.path(), "s", 30, 28, 3, false);
    let d = Dataset::open(&spec, &OpenOptions { val_fraction: 0.0, ..OpenOptions::default() }).unwrap();
    let c = LoaderConfig { seed: 2, ..cfg(7, 32) };
    // 30 images, batches of 7: 4 per epoch, 2 images left out each epoch.
    let mut l = Loader::train(&d.train, &c, Position::default()).unwrap();
    let mut b = l.new_batch();
    let mut all = vec![];
    let mut saved = vec![];
    for _ in 0..11 {
        saved.push(l.position());
        l.next(&mut b).unwrap();
        all.push(b.clone());
    }
    assert_eq!(saved[4], Position { epoch: 1, index: 0 });
    assert_eq!(saved[6], Position { epoch: 1, index: 14 });
    for k in [0, 3, 4, 6, 9] {
        let resumed = batches(&d.train, &c, saved[k], 11 - k);
        assert!(same(&resumed, &all[k..]), "resuming at {}", saved[k]);
    }
    // A position at the end of an epoch rolls over.
    let r = Loader::train(&d.train, &c, Position { epoch: 0, index: 28 }).unwrap();
    assert_eq!(r.position(), Position { epoch: 1, index: 0 });
    // Positions round-trip through JSON for checkpoints.
    let j = serde_json::to_string(&saved[6]).unwrap();
    assert_eq!(serde_json::from_str::<Position>(&j).unwrap(), saved[6]);
}

#[test]
fn batches_feed_the_model_as_they_are() {
    use prunekit::model::{init::torchvision_init, Arch, Model, PrecisionKind, Sgd};
    let t = tempfile::tempdir().unwrap();
    let spec = idx_pair(t.path(), "s", 24, 28, 3, true);
    let d = Dataset::open(&spec, &OpenOptions { val_fraction: 0.25, ..OpenOptions::default() }).unwrap();
    let dev = prunekit::Device::Cpu;
    let state = torchvision_init(&Arch::bottleneck([1, 1, 1, 1], d.classes().len()), 0);
    let mut model = Model::from_state(&dev, &state, PrecisionKind::F32).unwrap();
    let c = cfg(4, 32);
    let mut ws = model.workspace(c.batch, c.size, c.size).unwrap();
    let mut train = Loader::train(&d.train, &c, Position::default()).unwrap();
    let mut b = train.new_batch();
    let sgd = Sgd { lr: 0.01, momentum: 0.9, weight_decay: 0.0 };
    for _ in 0..2 {
        train.next(&mut b).unwrap();
        model.set_batch(&mut ws, &b.images, Some(&b.targets)).unwrap();
        model.train_step(&mut ws, &sgd).unwrap();
        assert!(model.loss(&ws).unwrap().is_finite());
    }
    let mut val = Loader::eval(&d.val, &c).unwrap();
    let mut seen = 0;
    while val.next(&mut b).unwrap() {
        model.set_batch(&mut ws, &b.images, Some(&b.targets)).unwrap();
        model.forward(&mut ws, false).unwrap();
        seen += b.valid;
    }
    assert_eq!(seen, d.val.len());
}
