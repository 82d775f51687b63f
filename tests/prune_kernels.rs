//! The pruning kernels (kernels/prune.cu) against the CPU: filter norms, group sums,
//! top-k and gathers give the CPU's bits on every device, and the CPU fast path agrees
//! with the naive oracle.

mod common;

use common::{cuda_device, emu_devices, Rng};
use half::{bf16, f16};
use prunekit::cpu::prune as cpu;
use prunekit::ops::prune::{
    filter_norms, gather, group_sums, topk, Gather, Group, Keep, Norm, NormElem, Selection, Weight,
};
use prunekit::{Buf, Device};

/// (filters, elements per filter): widths 1, 7, 13, 2048 and 4096 (and 64) with odd
/// filter lengths.
const SHAPES: &[(usize, usize)] = &[(1, 27), (7, 1), (13, 33), (2048, 9), (4096, 3), (64, 147)];

fn weights<T: Copy>(conv: impl Fn(f32) -> T, seed: u64) -> Vec<(Vec<T>, usize)> {
    let mut rng = Rng::new(seed);
    SHAPES.iter().map(|&(k, len)| (rng.vec(k * len).into_iter().map(&conv).collect(), k)).collect()
}

fn check_norms<T: NormElem>(dev: &Device, ws: &[(Vec<T>, usize)], rel: f64) {
    for norm in [Norm::L1, Norm::L2] {
        let host: Vec<Buf<T>> = ws.iter().map(|(w, _)| Buf::Host(w.clone())).collect();
        let bufs: Vec<Buf<T>> = ws.iter().map(|(w, _)| dev.upload(w.clone()).unwrap()).collect();
        let args: Vec<Weight<T>> = bufs.iter().zip(ws).map(|(b, (_, k))| Weight { buf: b, k: *k }).collect();
        let hargs: Vec<Weight<T>> = host.iter().zip(ws).map(|(b, (_, k))| Weight { buf: b, k: *k }).collect();
        let got = filter_norms(dev, &args, norm, 5).unwrap().to_vec().unwrap();
        let cpu_fast = filter_norms(&Device::Cpu, &hargs, norm, 5).unwrap().to_vec().unwrap();
        assert_eq!(got.len(), cpu_fast.len());
        // The kernel and the CPU fast path sum in the same order: the same bits.
        for (i, (g, c)) in got.iter().zip(&cpu_fast).enumerate().take(cpu_fast.len() - 5) {
            assert_eq!(g.to_bits(), c.to_bits(), "{} {norm:?} score {i}: {g} vs {c}", dev.name());
        }
        // The fast path agrees with the sequential f64 oracle.
        let oracle: Vec<f64> = ws.iter().flat_map(|(w, k)| cpu::filter_norms_oracle(w, *k, norm)).collect();
        for (i, (c, o)) in cpu_fast.iter().zip(&oracle).enumerate() {
            assert!((c - o).abs() <= rel * o.abs() + 1e-30, "{norm:?} score {i}: {c} vs oracle {o}");
        }
    }
}

fn norms_all_dtypes(dev: &Device) {
    check_norms::<f32>(dev, &weights(|x| x, 1), 1e-12);
    check_norms::<bf16>(dev, &weights(bf16::from_f32, 2), 1e-5);
    check_norms::<f16>(dev, &weights(f16::from_f32, 3), 1e-5);
}

#[test]
fn filter_norms_match_cpu_bitwise_and_the_oracle() {
    for dev in emu_devices() {
        norms_all_dtypes(&dev);
    }
    norms_all_dtypes(&Device::Cpu);
}

fn check_group_sums(dev: &Device) {
    let mut rng = Rng::new(9);
    let mut scores: Vec<f64> = rng.vec(100).into_iter().map(|x| x as f64).collect();
    scores.extend([0.0; 20]);
    let groups =
        vec![Group { dst: 100, width: 13, members: vec![0, 13, 26] }, Group { dst: 113, width: 7, members: vec![50] }];
    let mut want = scores.clone();
    for g in &groups {
        for c in 0..g.width {
            want[g.dst + c] = g.members.iter().fold(0.0, |a, &m| a + scores[m + c]);
        }
    }
    let mut buf = dev.upload(scores.clone()).unwrap();
    group_sums(dev, &mut buf, &groups).unwrap();
    let got = buf.to_vec().unwrap();
    assert_eq!(&got[100..120], &want[100..120]);
    // Overlapping destinations and members reading a destination are refused.
    let bad = [Group { dst: 100, width: 13, members: vec![105] }];
    assert!(group_sums(dev, &mut buf, &bad).is_err());
    let bad = [Group { dst: 110, width: 5, members: vec![0] }, Group { dst: 112, width: 5, members: vec![0] }];
    assert!(group_sums(dev, &mut buf, &bad).is_err());
    let bad = [Group { dst: 118, width: 5, members: vec![0] }];
    assert!(group_sums(dev, &mut buf, &bad).is_err());
}

#[test]
fn group_sums_match_cpu() {
    for dev in emu_devices() {
        check_group_sums(&dev);
    }
    check_group_sums(&Device::Cpu);
}

/// Independent of any implementation: n indices, ascending, and no dropped element
/// ranks before a kept one.
fn assert_valid_selection(scores: &[f64], n: usize, kept: &[i32]) {
    assert_eq!(kept.len(), n);
    assert!(kept.windows(2).all(|w| w[0] < w[1]));
    let is_kept: Vec<bool> = (0..scores.len()).map(|i| kept.contains(&(i as i32))).collect();
    for (k, &kk) in is_kept.iter().enumerate() {
        if !kk {
            continue;
        }
        for (d, &dk) in is_kept.iter().enumerate() {
            if !dk {
                assert_eq!(
                    cpu::rank_order(scores[k], k, scores[d], d),
                    std::cmp::Ordering::Less,
                    "kept {k} ({}) ranks after dropped {d} ({})",
                    scores[k],
                    scores[d]
                );
            }
        }
    }
}

fn check_topk(dev: &Device) {
    let mut rng = Rng::new(4);
    let mut scores = Vec::new();
    let mut sels = Vec::new();
    for &(width, n) in &[(1, 1), (7, 3), (13, 13), (13, 1), (2048, 1024), (4096, 1), (4096, 4096), (5, 0)] {
        sels.push(Selection { offset: scores.len(), width, n });
        scores.extend((0..width).map(|_| (rng.uniform() as f64).abs()));
    }
    // Ties: all equal (keeps the lowest indices), and a few repeated values.
    sels.push(Selection { offset: scores.len(), width: 100, n: 37 });
    scores.extend(std::iter::repeat_n(0.25, 100));
    sels.push(Selection { offset: scores.len(), width: 64, n: 10 });
    scores.extend((0..64).map(|i| (i % 4) as f64));
    // NaN ranks last.
    sels.push(Selection { offset: scores.len(), width: 6, n: 4 });
    scores.extend([1.0, f64::NAN, 3.0, f64::NAN, 0.5, 2.0]);

    let buf = dev.upload(scores.clone()).unwrap();
    let keep = topk(dev, &buf, &sels).unwrap();
    let lists = keep.lists().unwrap();
    for (s, list) in sels.iter().zip(&lists) {
        let seg = &scores[s.offset..s.offset + s.width];
        assert_eq!(list, &cpu::topk(seg, s.n), "{} width {} n {}", dev.name(), s.width, s.n);
        assert_valid_selection(seg, s.n, list);
    }
    assert_eq!(lists[8], (0..37).collect::<Vec<i32>>(), "ties go to the lower index");
    assert_eq!(lists[10], vec![0, 2, 4, 5], "NaN ranks last");
    // Too wide, too many, out of range.
    let wide = dev.upload(vec![0.0f64; 4097]).unwrap();
    let err = topk(dev, &wide, &[Selection { offset: 0, width: 4097, n: 1 }]).unwrap_err();
    assert!(err.to_string().contains("4096"), "{err}");
    assert!(topk(dev, &buf, &[Selection { offset: 0, width: 3, n: 4 }]).is_err());
    assert!(topk(dev, &buf, &[Selection { offset: scores.len() - 2, width: 3, n: 1 }]).is_err());
}

#[test]
fn topk_matches_cpu_on_odd_widths_ties_and_nan() {
    for dev in emu_devices() {
        check_topk(&dev);
    }
    check_topk(&Device::Cpu);
}

fn check_gather(dev: &Device) {
    let mut rng = Rng::new(5);
    // An OIHW weight [11, 6, 3*3] pruned on rows and mids; a KRSC weight [11, 9, 6] on
    // rows and cols; a vector [11]; one with no index at all.
    let (o, i, hw) = (11, 6, 9);
    let w: Vec<f32> = rng.vec(o * i * hw);
    let v: Vec<f32> = rng.vec(o);
    let keep = Keep::from_lists(dev, &[(vec![0, 3, 4, 10], o), (vec![1, 5], i)]).unwrap();
    let (dw, dv) = (dev.upload(w.clone()).unwrap(), dev.upload(v.clone()).unwrap());
    let jobs = [
        Gather { src: &dw, shape: (o, i, hw), rows: Some((&keep, 0)), mids: Some((&keep, 1)), cols: None },
        Gather { src: &dw, shape: (o, hw, i), rows: Some((&keep, 0)), mids: None, cols: Some((&keep, 1)) },
        Gather { src: &dv, shape: (o, 1, 1), rows: Some((&keep, 0)), mids: None, cols: None },
        Gather { src: &dv, shape: (1, o, 1), rows: None, mids: None, cols: None },
    ];
    let got: Vec<Vec<f32>> = gather(dev, &jobs).unwrap().iter().map(|b| b.to_vec().unwrap()).collect();
    let rows = [0usize, 3, 4, 10];
    let sub = [1usize, 5];
    let all_hw: Vec<usize> = (0..hw).collect();
    assert_eq!(got[0], cpu::gather(&w, i, hw, &rows, &sub, &all_hw));
    assert_eq!(got[1], cpu::gather(&w, hw, i, &rows, &all_hw, &sub));
    assert_eq!(got[2], rows.iter().map(|&r| v[r]).collect::<Vec<_>>());
    assert_eq!(got[3], v);
    // Spot check the meaning of the OIHW gather.
    assert_eq!(got[0][(2 * 2 + 1) * hw + 4], w[(4 * i + 5) * hw + 4]);
    // Bad jobs: wrong shape, a selection of the wrong width.
    let bad = [Gather { src: &dw, shape: (o, i, hw + 1), rows: None, mids: None, cols: None }];
    assert!(gather(dev, &bad).is_err());
    let bad = [Gather { src: &dw, shape: (o, i, hw), rows: Some((&keep, 1)), mids: None, cols: None }];
    assert!(gather(dev, &bad).is_err());
}

#[test]
fn gather_matches_cpu() {
    for dev in emu_devices() {
        check_gather(&dev);
    }
    check_gather(&Device::Cpu);
}

#[test]
fn kept_index_lists_are_validated() {
    let dev = &emu_devices()[0];
    assert!(Keep::from_lists(dev, &[(vec![0, 4], 4)]).is_err());
    assert!(Keep::from_lists(dev, &[(vec![2, 1], 4)]).is_err());
    assert!(Keep::from_lists(dev, &[(vec![1, 1], 4)]).is_err());
    assert!(Keep::from_lists(dev, &[(vec![-1], 4)]).is_err());
    assert!(Keep::from_lists(dev, &[(vec![0, 3], 4)]).is_ok());
}

#[test]
fn buffers_on_another_device_are_refused() {
    let emu = &emu_devices()[0];
    let host = Buf::Host(vec![1.0f32; 8]);
    let err = filter_norms(emu, &[Weight { buf: &host, k: 2 }], Norm::L1, 0).unwrap_err();
    assert!(err.to_string().contains("not on the device"), "{err}");
    let other_emu = &emu_devices()[1];
    let buf = other_emu.upload(vec![1.0f32; 8]).unwrap();
    assert!(filter_norms(emu, &[Weight { buf: &buf, k: 2 }], Norm::L1, 0).is_err());
    assert!(filter_norms(&Device::Cpu, &[Weight { buf: &host, k: 3 }], Norm::L1, 0).is_err());
}

mod cuda {
    use super::*;
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_filter_norms() {
        norms_all_dtypes(&cuda_device());
    }
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_group_sums() {
        check_group_sums(&cuda_device());
    }
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_topk() {
        check_topk(&cuda_device());
    }
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_gather() {
        check_gather(&cuda_device());
    }
}
