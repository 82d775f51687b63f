//! What happens to one image between its source and its slot in a batch: resize (shorter
//! side), a crop (center, padded random, or random-resized), an optional horizontal flip,
//! and normalization into f32 CHW. Every random choice comes from a [`SampleRng`] seeded by
//! (seed, epoch, sample), never from thread order.

use std::fmt;
use std::str::FromStr;

use image::imageops::{self, FilterType};
use image::{ImageBuffer, Luma, Rgb};

use crate::{ensure, invalid, Error, Result};

/// Training augmentation (`none`, `flip`, `crop-flip`). Evaluation never augments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Augment {
    /// Center crop only.
    None,
    /// Center crop, then a horizontal flip with probability 1/2.
    Flip,
    /// A random crop, then a horizontal flip with probability 1/2. The crop is torchvision's
    /// `RandomResizedCrop` (scale 0.08-1, aspect ratio 3/4-4/3, bilinear) for output sizes
    /// above 64 px, and CIFAR's pad-and-crop (the center crop padded with 4 black pixels on
    /// each side, then a random `size` x `size` window) at 64 px and below.
    #[default]
    CropFlip,
}

impl FromStr for Augment {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Ok(Augment::None),
            "flip" => Ok(Augment::Flip),
            "crop-flip" => Ok(Augment::CropFlip),
            _ => Err(invalid!("unknown augmentation '{s}' (expected none, flip or crop-flip)")),
        }
    }
}

impl fmt::Display for Augment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Augment::None => "none",
            Augment::Flip => "flip",
            Augment::CropFlip => "crop-flip",
        })
    }
}

/// Per-channel normalization of pixel values scaled to [0, 1]: `(x / 255 - mean) / std`.
///
/// Parsed from `imagenet` (the default: mean 0.485,0.456,0.406, std 0.229,0.224,0.225),
/// from two numbers `MEAN,STD` used for all three channels (`0.5,0.5`; `0,1` leaves
/// values in [0, 1]), or from six numbers `M_R,M_G,M_B,S_R,S_G,S_B` (three means, then
/// three standard deviations).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Normalize {
    /// Per-channel mean (R, G, B), subtracted from values in [0, 1].
    pub mean: [f32; 3],
    /// Per-channel standard deviation (R, G, B), finite and positive.
    pub std: [f32; 3],
}

impl Normalize {
    /// ImageNet's statistics, torchvision's convention.
    pub const IMAGENET: Normalize = Normalize { mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225] };

    /// Checks that every std is finite and positive and every mean finite.
    pub fn check(&self) -> Result<()> {
        for c in 0..3 {
            ensure!(self.mean[c].is_finite(), "normalization mean {} is not finite", self.mean[c]);
            ensure!(
                self.std[c].is_finite() && self.std[c] > 0.0,
                "normalization std {} must be finite and positive",
                self.std[c]
            );
        }
        Ok(())
    }

    /// The affine map `x * scale + bias` (x the byte value) for each channel.
    pub(crate) fn affine(&self) -> ([f32; 3], [f32; 3]) {
        let mut scale = [0.0; 3];
        let mut bias = [0.0; 3];
        for c in 0..3 {
            scale[c] = 1.0 / (255.0 * self.std[c]);
            bias[c] = -self.mean[c] / self.std[c];
        }
        (scale, bias)
    }
}

impl Default for Normalize {
    fn default() -> Self {
        Normalize::IMAGENET
    }
}

impl FromStr for Normalize {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s.eq_ignore_ascii_case("imagenet") {
            return Ok(Normalize::IMAGENET);
        }
        let v: Vec<f32> = s
            .split(',')
            .map(|t| {
                t.trim().parse::<f32>().map_err(|_| {
                    invalid!("normalization '{s}': '{t}' is not a number (expected imagenet, MEAN,STD or six numbers)")
                })
            })
            .collect::<Result<_>>()?;
        let n = match v.len() {
            2 => Normalize { mean: [v[0]; 3], std: [v[1]; 3] },
            6 => Normalize { mean: [v[0], v[1], v[2]], std: [v[3], v[4], v[5]] },
            k => {
                return Err(invalid!(
                "normalization '{s}' has {k} numbers: expected imagenet, MEAN,STD (2) or M_R,M_G,M_B,S_R,S_G,S_B (6)"
            ))
            }
        };
        n.check()?;
        Ok(n)
    }
}

/// A small counter-based generator (SplitMix64): stable across versions and platforms, so
/// that a seed means the same batches forever.
#[derive(Clone, Debug)]
pub(crate) struct SampleRng(u64);

pub(crate) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SampleRng {
    /// The generator of stream (a, b) under `seed`.
    pub(crate) fn new(seed: u64, a: u64, b: u64) -> Self {
        SampleRng(mix(mix(mix(seed) ^ a) ^ b.rotate_left(17)))
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in 0..n (n > 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Fisher-Yates shuffle.
    pub(crate) fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// A decoded image: 8-bit, HWC, 1 (gray) or 3 (RGB) channels.
#[derive(Clone, Debug)]
pub(crate) struct Img {
    pub w: usize,
    pub h: usize,
    pub c: usize,
    pub data: Vec<u8>,
}

/// A borrowed image, same layout as [`Img`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct View<'a> {
    pub w: usize,
    pub h: usize,
    pub c: usize,
    pub data: &'a [u8],
}

impl Img {
    pub(crate) fn view(&self) -> View<'_> {
        View { w: self.w, h: self.h, c: self.c, data: &self.data }
    }
}

/// The size of an image of w x h once its shorter side is `short`.
pub(crate) fn shorter_side_dims(w: usize, h: usize, short: usize) -> (usize, usize) {
    if w <= h {
        (short, ((h as f64 * short as f64 / w as f64).round() as usize).max(short))
    } else {
        (((w as f64 * short as f64 / h as f64).round() as usize).max(short), short)
    }
}

/// Resizes so that the shorter side is `short` (triangle filter: bilinear, antialiased when
/// shrinking); `None` when it already is.
pub(crate) fn resize_shorter(v: View<'_>, short: usize) -> Option<Img> {
    if v.w.min(v.h) == short {
        return None;
    }
    let (nw, nh) = shorter_side_dims(v.w, v.h, short);
    let (w, h) = (v.w as u32, v.h as u32);
    let data = if v.c == 1 {
        let src: ImageBuffer<Luma<u8>, &[u8]> = ImageBuffer::from_raw(w, h, v.data)?;
        imageops::resize(&src, nw as u32, nh as u32, FilterType::Triangle).into_raw()
    } else {
        let src: ImageBuffer<Rgb<u8>, &[u8]> = ImageBuffer::from_raw(w, h, v.data)?;
        imageops::resize(&src, nw as u32, nh as u32, FilterType::Triangle).into_raw()
    };
    Some(Img { w: nw, h: nh, c: v.c, data })
}

/// How one output image is taken from its (resized) source.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Op {
    /// An integer `size` x `size` window at (x0, y0); source pixels outside `bounds`
    /// (x, y, w, h) are black (the padding of pad-and-crop).
    Window { x0: isize, y0: isize, bounds: [isize; 4], flip: bool },
    /// The box (x, y, w, h) in source pixels, resampled bilinearly to `size` x `size`.
    Resized { bx: [f64; 4], flip: bool },
}

/// Chooses the op for one sample. `train` selects the augmentation; evaluation takes the
/// center crop. The source is at least `size` on both sides.
pub(crate) fn plan(w: usize, h: usize, size: usize, augment: Augment, train: bool, rng: &mut SampleRng) -> Op {
    let (w, h, s) = (w as isize, h as isize, size as isize);
    let (cx, cy) = ((w - s) / 2, (h - s) / 2);
    let center = [cx, cy, s, s];
    let aug = if train { augment } else { Augment::None };
    match aug {
        Augment::None => Op::Window { x0: cx, y0: cy, bounds: center, flip: false },
        Augment::Flip => Op::Window { x0: cx, y0: cy, bounds: center, flip: rng.unit() < 0.5 },
        Augment::CropFlip if size <= 64 => {
            let dx = rng.below(9) as isize - 4;
            let dy = rng.below(9) as isize - 4;
            let flip = rng.unit() < 0.5;
            Op::Window { x0: cx + dx, y0: cy + dy, bounds: center, flip }
        }
        Augment::CropFlip => {
            let bx = random_resized_box(w as f64, h as f64, rng);
            Op::Resized { bx, flip: rng.unit() < 0.5 }
        }
    }
}

/// torchvision's `RandomResizedCrop.get_params` with scale (0.08, 1), ratio (3/4, 4/3).
fn random_resized_box(w: f64, h: f64, rng: &mut SampleRng) -> [f64; 4] {
    let area = w * h;
    let (lo, hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let target = area * (0.08 + rng.unit() * (1.0 - 0.08));
        let ratio = (lo + rng.unit() * (hi - lo)).exp();
        let cw = (target * ratio).sqrt().round();
        let ch = (target / ratio).sqrt().round();
        if cw > 0.0 && cw <= w && ch > 0.0 && ch <= h {
            let y = rng.below((h - ch) as usize + 1) as f64;
            let x = rng.below((w - cw) as usize + 1) as f64;
            return [x, y, cw, ch];
        }
    }
    // Fallback: the central crop with the ratio clamped to the range.
    let r = w / h;
    let (cw, ch) = if r < 3.0 / 4.0 {
        (w, (w / (3.0 / 4.0)).round())
    } else if r > 4.0 / 3.0 {
        ((h * (4.0 / 3.0)).round(), h)
    } else {
        (w, h)
    };
    [((w - cw) / 2.0).floor(), ((h - ch) / 2.0).floor(), cw, ch]
}

/// Writes the normalized `size` x `size` CHW image into `out` (3 * size * size values);
/// gray sources are replicated to 3 channels.
pub(crate) fn render(src: View<'_>, op: Op, size: usize, scale: [f32; 3], bias: [f32; 3], out: &mut [f32]) {
    let plane = size * size;
    let (sw, c) = (src.w, src.c);
    let chan = |k: usize| if c == 1 { 0 } else { k };
    match op {
        Op::Window { x0, y0, bounds: [bx, by, bw, bh], flip } => {
            for y in 0..size {
                let sy = y0 + y as isize;
                let row_ok = sy >= by && sy < by + bh;
                for x in 0..size {
                    let xo = if flip { size - 1 - x } else { x };
                    let sx = x0 + xo as isize;
                    let o = y * size + x;
                    if row_ok && sx >= bx && sx < bx + bw {
                        let p = (sy as usize * sw + sx as usize) * c;
                        for k in 0..3 {
                            out[k * plane + o] = src.data[p + chan(k)] as f32 * scale[k] + bias[k];
                        }
                    } else {
                        for k in 0..3 {
                            out[k * plane + o] = bias[k];
                        }
                    }
                }
            }
        }
        Op::Resized { bx: [x0, y0, bw, bh], flip } => {
            let (fx, fy) = (bw / size as f64, bh / size as f64);
            let (maxx, maxy) = ((src.w - 1) as f64, (src.h - 1) as f64);
            for y in 0..size {
                let sy = (y0 + (y as f64 + 0.5) * fy - 0.5).clamp(0.0, maxy);
                let iy = sy.floor() as usize;
                let iy1 = (iy + 1).min(src.h - 1);
                let wy = (sy - iy as f64) as f32;
                for x in 0..size {
                    let xo = if flip { size - 1 - x } else { x };
                    let sx = (x0 + (xo as f64 + 0.5) * fx - 0.5).clamp(0.0, maxx);
                    let ix = sx.floor() as usize;
                    let ix1 = (ix + 1).min(src.w - 1);
                    let wx = (sx - ix as f64) as f32;
                    let o = y * size + x;
                    let (p00, p01) = ((iy * sw + ix) * c, (iy * sw + ix1) * c);
                    let (p10, p11) = ((iy1 * sw + ix) * c, (iy1 * sw + ix1) * c);
                    for k in 0..3 {
                        let ck = chan(k);
                        let top = src.data[p00 + ck] as f32 * (1.0 - wx) + src.data[p01 + ck] as f32 * wx;
                        let bot = src.data[p10 + ck] as f32 * (1.0 - wx) + src.data[p11 + ck] as f32 * wx;
                        let v = top * (1.0 - wy) + bot * wy;
                        out[k * plane + o] = v * scale[k] + bias[k];
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_parses() {
        assert_eq!("imagenet".parse::<Normalize>().unwrap(), Normalize::IMAGENET);
        let n: Normalize = "0.5,0.25".parse().unwrap();
        assert_eq!(n.mean, [0.5; 3]);
        assert_eq!(n.std, [0.25; 3]);
        let n: Normalize = "0.1,0.2,0.3,1,2,3".parse().unwrap();
        assert_eq!(n.mean, [0.1, 0.2, 0.3]);
        assert_eq!(n.std, [1.0, 2.0, 3.0]);
        assert!("0.5".parse::<Normalize>().is_err());
        assert!("0.5,0".parse::<Normalize>().is_err());
        assert!("a,b".parse::<Normalize>().is_err());
    }

    #[test]
    fn rng_is_uniform_enough_and_in_range() {
        let mut r = SampleRng::new(1, 2, 3);
        let mut hist = [0usize; 9];
        for _ in 0..9000 {
            hist[r.below(9)] += 1;
        }
        assert!(hist.iter().all(|&h| (800..1200).contains(&h)), "{hist:?}");
        let mut v: Vec<usize> = (0..100).collect();
        r.shuffle(&mut v);
        let mut s = v.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        assert_ne!(v, s);
    }

    #[test]
    fn random_resized_box_is_inside() {
        let mut r = SampleRng::new(0, 0, 0);
        for _ in 0..1000 {
            let [x, y, w, h] = random_resized_box(50.0, 80.0, &mut r);
            assert!(x >= 0.0 && y >= 0.0 && w > 0.0 && h > 0.0 && x + w <= 50.0 && y + h <= 80.0);
        }
    }
}
