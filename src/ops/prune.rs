//! The pruning kernels (kernels/prune.cu) behind one API for the CPU and kernel devices:
//! filter norms, group sums, top-k selection and gathers, each for the whole network in
//! one launch.

use super::params::{
    FilterNormsParams, GatherJob, GatherParams, GroupSumsParams, NormSegment, TopkParams, TopkSegment, TOPK_MAX_WIDTH,
    TOPK_THREADS,
};
use super::{check_on, i32_of, on_gpu, upload_table};
use crate::cpu::prune as cpu;
pub use crate::cpu::prune::Norm;
use crate::device::{Buf, Device};
use crate::gpu::{Elem, Kernel, LaunchConfig};
use crate::{ensure, invalid, Result};
use half::{bf16, f16};

const MODULE: &str = "prune";

/// Weight element types the filter-norm kernels take.
pub trait NormElem: Elem + cpu::NormInput {
    /// The filter-norm kernel for this element type.
    const NORMS: Kernel;
}
impl NormElem for f32 {
    const NORMS: Kernel = Kernel::new(MODULE, "filter_norms_f32");
}
impl NormElem for bf16 {
    const NORMS: Kernel = Kernel::new(MODULE, "filter_norms_bf16");
}
impl NormElem for f16 {
    const NORMS: Kernel = Kernel::new(MODULE, "filter_norms_f16");
}

/// Element types the gather kernels take.
pub trait GatherElem: Elem {
    /// The gather kernel for this element type.
    const GATHER: Kernel;
}
impl GatherElem for f32 {
    const GATHER: Kernel = Kernel::new(MODULE, "gather_f32");
}
impl GatherElem for bf16 {
    const GATHER: Kernel = Kernel::new(MODULE, "gather_bf16");
}
impl GatherElem for f16 {
    const GATHER: Kernel = Kernel::new(MODULE, "gather_f16");
}

/// One weight to score: `k` filters (rows) of `buf.len() / k` elements each (KRSC).
#[derive(Clone, Copy)]
pub struct Weight<'a, T: Elem> {
    /// The weight's elements, filter by filter.
    pub buf: &'a Buf<T>,
    /// The number of filters (output channels); at least 1 and dividing `buf.len()`.
    pub k: usize,
}

/// The norm of every filter of every weight, concatenated in order, followed by `extra`
/// slots (zero on the CPU, undefined on a kernel device) for [`group_sums`].
pub fn filter_norms<T: NormElem>(
    dev: &Device,
    weights: &[Weight<'_, T>],
    norm: Norm,
    extra: usize,
) -> Result<Buf<f64>> {
    let mut total = 0usize;
    for (i, w) in weights.iter().enumerate() {
        check_on(w.buf, dev, &format!("weight {i}"))?;
        ensure!(w.k > 0, "weight {i} has no filters");
        ensure!(
            w.buf.len() % w.k == 0 && !w.buf.is_empty(),
            "weight {i} has {} elements, not a whole number of {} filters",
            w.buf.len(),
            w.k
        );
        total += w.k;
    }
    let len = total.checked_add(extra).ok_or_else(|| invalid!("too many scores"))?;
    match dev {
        Device::Cpu => {
            let mut out = Vec::with_capacity(len);
            for w in weights {
                out.extend(cpu::filter_norms(w.buf.host().expect("checked"), w.k, norm));
            }
            out.resize(len, 0.0);
            Ok(Buf::Host(out))
        }
        Device::Gpu(gpu) => {
            let scores = gpu.alloc::<f64>(len)?;
            if total == 0 {
                return Ok(Buf::Gpu(scores));
            }
            let mut segs = Vec::with_capacity(weights.len());
            let mut off = 0usize;
            for (i, w) in weights.iter().enumerate() {
                let b = on_gpu(w.buf, gpu, "weight")?;
                segs.push(NormSegment {
                    weights: b.ptr(),
                    k: i32_of(w.k, "filters")?,
                    filter_len: i32_of(b.len() / w.k, &format!("filter length of weight {i}"))?,
                    out_offset: i32_of(off, "score offset")?,
                    pad0: 0,
                });
                off += w.k;
            }
            let table = upload_table(gpu, &segs)?;
            let p = FilterNormsParams {
                segments: table.ptr(),
                scores: scores.ptr(),
                num_segments: i32_of(segs.len(), "segments")?,
                total_filters: i32_of(total, "filters")?,
                norm: norm.code(),
                pad0: 0,
            };
            let warps = 8u32; // filters per block of 256 threads
            let blocks = (total as u64).div_ceil(warps as u64);
            ensure!(blocks <= i32::MAX as u64, "too many filters");
            // SAFETY: every segment's weights hold k * filter_len elements and the
            // scores buffer holds total + extra elements.
            unsafe { gpu.launch(T::NORMS, LaunchConfig::linear(blocks as u32, warps * 32), &p)? };
            Ok(Buf::Gpu(scores))
        }
    }
}

/// A channel group: `scores[dst .. dst + width]` becomes the elementwise sum of
/// `scores[m .. m + width]` over the members `m` (offsets of coupled filters' scores).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// Offset of the group's slots in the scores.
    pub dst: usize,
    /// The number of channels in the group (at least 1).
    pub width: usize,
    /// Offsets of the member filters' scores (at least one); none may overlap any group's slots.
    pub members: Vec<usize>,
}

/// Fills the groups' slots of `scores` (see [`Group`]), in one launch.
pub fn group_sums(dev: &Device, scores: &mut Buf<f64>, groups: &[Group]) -> Result<()> {
    check_on(scores, dev, "scores")?;
    let len = scores.len();
    let mut dsts: Vec<(usize, usize)> = Vec::new();
    for (g, gr) in groups.iter().enumerate() {
        ensure!(gr.width > 0 && !gr.members.is_empty(), "group {g} is empty");
        ensure!(gr.dst + gr.width <= len, "group {g} writes past the end of {len} scores");
        for &m in &gr.members {
            ensure!(m + gr.width <= len, "a member of group {g} reads past the end of {len} scores");
        }
        dsts.push((gr.dst, gr.dst + gr.width));
    }
    // Destinations must not overlap each other or any member (the launch is parallel).
    let mut sorted = dsts.clone();
    sorted.sort_unstable();
    for w in sorted.windows(2) {
        ensure!(w[0].1 <= w[1].0, "group destinations overlap");
    }
    for (g, gr) in groups.iter().enumerate() {
        for &m in &gr.members {
            for &(a, b) in &dsts {
                ensure!(m + gr.width <= a || m >= b, "a member of group {g} overlaps a group's destination");
            }
        }
    }
    if groups.is_empty() {
        return Ok(());
    }
    match (dev, scores) {
        (Device::Cpu, Buf::Host(s)) => {
            for gr in groups {
                for c in 0..gr.width {
                    let mut acc = 0.0f64;
                    for &m in &gr.members {
                        acc += s[m + c];
                    }
                    s[gr.dst + c] = acc;
                }
            }
            Ok(())
        }
        (Device::Gpu(gpu), Buf::Gpu(s)) => {
            ensure!(groups.len() <= 65535, "at most 65535 groups per launch");
            let mut dst = Vec::new();
            let mut width = Vec::new();
            let mut start = vec![0i32];
            let mut members = Vec::new();
            for gr in groups {
                dst.push(i32_of(gr.dst, "group offset")?);
                width.push(i32_of(gr.width, "group width")?);
                for &m in &gr.members {
                    members.push(i32_of(m, "member offset")?);
                }
                start.push(i32_of(members.len(), "members")?);
            }
            let max_width = groups.iter().map(|g| g.width).max().unwrap_or(0);
            let (d, w, st, me) = (gpu.upload(&dst)?, gpu.upload(&width)?, gpu.upload(&start)?, gpu.upload(&members)?);
            let p = GroupSumsParams {
                scores: s.ptr(),
                dst_offset: d.ptr(),
                width: w.ptr(),
                member_start: st.ptr(),
                member_offset: me.ptr(),
                num_groups: groups.len() as i32,
                max_width: i32_of(max_width, "group width")?,
            };
            let cfg = LaunchConfig {
                grid: ((max_width as u32).div_ceil(256), groups.len() as u32, 1),
                block: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: all ranges were checked against the scores buffer above.
            unsafe { gpu.launch(Kernel::new(MODULE, "group_sums_f64"), cfg, &p)? };
            Ok(())
        }
        _ => Err(invalid!("scores are not on the device {}", dev.name())),
    }
}

/// One top-k selection: keep the `n` best of `scores[offset .. offset + width]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selection {
    /// Offset of the first candidate score.
    pub offset: usize,
    /// The number of candidates (at most 4096).
    pub width: usize,
    /// The number to keep (at most `width`).
    pub n: usize,
}

/// Kept indices of several selections, concatenated on a device. Every index is below
/// its selection's width: [`topk`] makes them so, and [`Keep::from_lists`] checks it.
#[derive(Debug)]
pub struct Keep {
    buf: Buf<i32>,
    /// (offset into buf, n, width) per selection.
    segs: Vec<(usize, usize, usize)>,
}

impl Keep {
    /// Kept indices given by the caller: each list ascending, without repeats, below its width.
    pub fn from_lists(dev: &Device, lists: &[(Vec<i32>, usize)]) -> Result<Keep> {
        let mut flat = Vec::new();
        let mut segs = Vec::new();
        for (s, (list, width)) in lists.iter().enumerate() {
            ensure!(
                list.windows(2).all(|w| w[0] < w[1]) && list.iter().all(|&i| i >= 0 && (i as usize) < *width),
                "kept indices of selection {s} must be ascending, distinct and below {width}"
            );
            segs.push((flat.len(), list.len(), *width));
            flat.extend_from_slice(list);
        }
        Ok(Keep { buf: dev.upload(flat)?, segs })
    }

    /// The number of selections.
    pub fn len(&self) -> usize {
        self.segs.len()
    }
    /// True if there are no selections.
    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }
    /// (n, width) of selection `s`.
    pub fn shape(&self, s: usize) -> (usize, usize) {
        (self.segs[s].1, self.segs[s].2)
    }
    /// Every selection's kept indices, on the host.
    pub fn lists(&self) -> Result<Vec<Vec<i32>>> {
        let flat = self.buf.to_vec()?;
        Ok(self.segs.iter().map(|&(o, n, _)| flat[o..o + n].to_vec()).collect())
    }
}

/// For every selection, the indices of the `n` best scores (larger first, NaN last,
/// ties to the lower index), ascending. One launch; widths up to 4096.
pub fn topk(dev: &Device, scores: &Buf<f64>, sels: &[Selection]) -> Result<Keep> {
    check_on(scores, dev, "scores")?;
    let mut segs = Vec::with_capacity(sels.len());
    let mut total = 0usize;
    for (i, s) in sels.iter().enumerate() {
        ensure!(
            s.width <= TOPK_MAX_WIDTH,
            "selection {i} has width {}, more than the {TOPK_MAX_WIDTH} one top-k block handles",
            s.width
        );
        ensure!(s.n <= s.width, "selection {i} keeps {} of {}", s.n, s.width);
        ensure!(s.offset + s.width <= scores.len(), "selection {i} reads past the end of {} scores", scores.len());
        segs.push((total, s.n, s.width));
        total += s.n;
    }
    match (dev, scores) {
        (Device::Cpu, Buf::Host(sc)) => {
            let mut flat = Vec::with_capacity(total);
            for s in sels {
                flat.extend(cpu::topk(&sc[s.offset..s.offset + s.width], s.n));
            }
            Ok(Keep { buf: Buf::Host(flat), segs })
        }
        (Device::Gpu(gpu), Buf::Gpu(sc)) => {
            let keep = gpu.alloc::<i32>(total)?;
            if !sels.is_empty() {
                ensure!(sels.len() <= i32::MAX as usize, "too many selections");
                let table: Vec<TopkSegment> = sels
                    .iter()
                    .zip(&segs)
                    .map(|(s, &(ko, _, _))| TopkSegment {
                        offset: s.offset as i32,
                        width: s.width as i32,
                        n: s.n as i32,
                        keep_offset: ko as i32,
                    })
                    .collect();
                ensure!(scores.len() <= i32::MAX as usize && total <= i32::MAX as usize, "too many scores");
                let t = upload_table(gpu, &table)?;
                let p = TopkParams {
                    scores: sc.ptr(),
                    segments: t.ptr(),
                    keep: keep.ptr(),
                    num_segments: sels.len() as i32,
                    pad0: 0,
                };
                // SAFETY: every selection lies inside scores and writes n indices at its
                // keep offset, inside keep.
                unsafe {
                    gpu.launch(
                        Kernel::new(MODULE, "topk_f64"),
                        LaunchConfig::linear(sels.len() as u32, TOPK_THREADS),
                        &p,
                    )?
                };
            }
            Ok(Keep { buf: Buf::Gpu(keep), segs })
        }
        _ => Err(invalid!("scores are not on the device {}", dev.name())),
    }
}

/// One compaction: `dst[i, j, l] = src[rows[i], mids[j], cols[l]]` where `src` has the
/// shape `[shape.0, shape.1, shape.2]` and each index set is the kept indices of one
/// selection of a [`Keep`] (None keeps the whole dimension). An OIHW weight is
/// `[O, I, H*W]` (rows and mids), a KRSC weight `[K, R*S, C]` (rows and cols), a vector
/// `[n, 1, 1]`.
#[derive(Clone, Copy)]
pub struct Gather<'a, T: Elem> {
    /// The tensor to compact, `shape.0 * shape.1 * shape.2` elements.
    pub src: &'a Buf<T>,
    /// The source's shape, viewed as three dimensions.
    pub shape: (usize, usize, usize),
    /// The kept indices of dimension 0: a [`Keep`] and the index of its selection.
    pub rows: Option<(&'a Keep, usize)>,
    /// The kept indices of dimension 1: a [`Keep`] and the index of its selection.
    pub mids: Option<(&'a Keep, usize)>,
    /// The kept indices of dimension 2: a [`Keep`] and the index of its selection.
    pub cols: Option<(&'a Keep, usize)>,
}

/// Runs every gather (one launch per 65535 of them on a kernel device) and returns the
/// new buffers.
pub fn gather<T: GatherElem>(dev: &Device, jobs: &[Gather<'_, T>]) -> Result<Vec<Buf<T>>> {
    let mut dims = Vec::with_capacity(jobs.len());
    for (i, j) in jobs.iter().enumerate() {
        check_on(j.src, dev, &format!("source {i}"))?;
        let (a, m, c) = j.shape;
        ensure!(
            a.checked_mul(m).and_then(|x| x.checked_mul(c)) == Some(j.src.len()),
            "source {i} has {} elements, not {a}x{m}x{c}",
            j.src.len()
        );
        let sel = |k: Option<(&Keep, usize)>, full: usize, what: &str| -> Result<usize> {
            match k {
                None => Ok(full),
                Some((keep, s)) => {
                    ensure!(s < keep.len(), "gather {i}: no selection {s} for its {what}");
                    check_on(&keep.buf, dev, "kept indices")?;
                    let (n, width) = keep.shape(s);
                    ensure!(width == full, "gather {i}: {what} selection of width {width} for a dimension of {full}");
                    Ok(n)
                }
            }
        };
        dims.push((sel(j.rows, a, "row")?, sel(j.mids, m, "middle")?, sel(j.cols, c, "column")?));
    }
    match dev {
        Device::Cpu => jobs
            .iter()
            .map(|j| {
                let idx = |k: Option<(&Keep, usize)>, full: usize| -> Vec<usize> {
                    match k {
                        None => (0..full).collect(),
                        Some((keep, s)) => {
                            let (o, n, _) = keep.segs[s];
                            keep.buf.host().expect("on cpu")[o..o + n].iter().map(|&i| i as usize).collect()
                        }
                    }
                };
                let src = j.src.host().expect("checked");
                let (a, m, c) = j.shape;
                Ok(Buf::Host(cpu::gather(src, m, c, &idx(j.rows, a), &idx(j.mids, m), &idx(j.cols, c))))
            })
            .collect(),
        Device::Gpu(gpu) => {
            let mut out = Vec::with_capacity(jobs.len());
            for &(r, m, c) in &dims {
                out.push(gpu.alloc::<T>(r * m * c)?);
            }
            for (chunk_jobs, (chunk_out, chunk_dims)) in
                jobs.chunks(65535).zip(out.chunks(65535).zip(dims.chunks(65535)))
            {
                let mut table = Vec::with_capacity(chunk_jobs.len());
                let mut max_elems = 0usize;
                for ((j, dst), &(r, m, c)) in chunk_jobs.iter().zip(chunk_out).zip(chunk_dims) {
                    let index_ptr = |k: Option<(&Keep, usize)>| -> Result<u64> {
                        match k {
                            None => Ok(0),
                            Some((keep, s)) => Ok(on_gpu(&keep.buf, gpu, "kept indices")?.ptr_at(keep.segs[s].0)?),
                        }
                    };
                    table.push(GatherJob {
                        src: on_gpu(j.src, gpu, "source")?.ptr(),
                        dst: dst.ptr(),
                        rows: index_ptr(j.rows)?,
                        mids: index_ptr(j.mids)?,
                        cols: index_ptr(j.cols)?,
                        n_rows: i32_of(r, "rows")?,
                        n_mid: i32_of(m, "middle dimension")?,
                        n_cols: i32_of(c, "columns")?,
                        src_mid: i32_of(j.shape.1, "middle dimension")?,
                        src_cols: i32_of(j.shape.2, "columns")?,
                        pad0: 0,
                    });
                    max_elems = max_elems.max(r * m * c);
                }
                if max_elems == 0 {
                    continue;
                }
                let t = upload_table(gpu, &table)?;
                let p = GatherParams { jobs: t.ptr(), num_jobs: table.len() as i32, pad0: 0 };
                let cfg = LaunchConfig {
                    grid: (max_elems.div_ceil(256).min(4096) as u32, table.len() as u32, 1),
                    block: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: every source holds shape elements, every destination r*m*c,
                // and every kept index is below its dimension (a Keep invariant).
                unsafe { gpu.launch(T::GATHER, cfg, &p)? };
            }
            Ok(out.into_iter().map(Buf::Gpu).collect())
        }
    }
}
