//! The pruning pipeline on a device: filter scores of every producer conv in one launch,
//! group sums in one, the top-k of every group in one, and the compaction of every
//! tensor in one (per element type). On the CPU device, the same steps in Rust.

use super::plan::{Plan, PruneConfig};
use crate::device::{Buf, Device};
use crate::model::{Arch, Data, StateDict, Tensor};
use crate::ops::prune::{filter_norms, gather, group_sums, topk, Gather, Group, Keep, Selection, Weight};
use crate::{ensure, invalid, Result};
use std::borrow::Cow;
use std::collections::BTreeMap;

/// Named device buffers.
pub type NamedBufs = Vec<(String, Buf<f32>)>;

/// Tensors of a model on a device, in torchvision's layouts (OIHW), for pruning.
pub struct DeviceState {
    dev: Device,
    index: BTreeMap<String, (Vec<usize>, Buf<f32>)>,
}

impl DeviceState {
    /// Uploads the f32 tensors `names` of `sd`.
    pub fn upload<'a>(dev: &Device, sd: &StateDict, names: impl IntoIterator<Item = &'a str>) -> Result<DeviceState> {
        let mut index = BTreeMap::new();
        for n in names {
            let t = sd.get(n)?;
            let v = t.as_f32().ok_or_else(|| invalid!("tensor {n} is not F32"))?;
            index.insert(n.to_string(), (t.shape.clone(), dev.upload(v.to_vec())?));
        }
        Ok(DeviceState { dev: dev.clone(), index })
    }

    /// As [`DeviceState::upload`], taking the tensors out of `sd` (no copy on the CPU).
    pub fn upload_taken<'a>(
        dev: &Device,
        sd: &mut StateDict,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<DeviceState> {
        let mut index = BTreeMap::new();
        for n in names {
            let t = sd.tensors.remove(n).ok_or_else(|| invalid!("missing tensor {n}"))?;
            let Data::F32(v) = t.data else { return Err(invalid!("tensor {n} is not F32")) };
            index.insert(n.to_string(), (t.shape, dev.upload(v)?));
        }
        Ok(DeviceState { dev: dev.clone(), index })
    }

    fn get(&self, name: &str) -> Result<&(Vec<usize>, Buf<f32>)> {
        self.index.get(name).ok_or_else(|| invalid!("tensor {name} was not uploaded"))
    }

    /// Scores every group and selects its kept channels (selection g of the result is
    /// group g of the plan).
    pub fn select(&self, plan: &Plan) -> Result<Keep> {
        let dev = &self.dev;
        // One score segment per producer conv, in group order; groups of several
        // producers get a slot after them that holds the sums.
        let mut weights = Vec::new();
        let mut seg_offset = Vec::new();
        let mut total = 0usize;
        for g in &plan.groups {
            let mut offs = Vec::new();
            for p in &g.producers {
                let (shape, buf) = self.get(&format!("{p}.weight"))?;
                ensure!(shape[0] == g.width, "{p} has {} filters, group {} has {}", shape[0], g.name, g.width);
                weights.push(Weight { buf, k: shape[0] });
                offs.push(total);
                total += shape[0];
            }
            seg_offset.push(offs);
        }
        let extra: usize = plan.groups.iter().filter(|g| g.producers.len() > 1).map(|g| g.width).sum();
        let mut scores = filter_norms(dev, &weights, plan.config.criterion, extra)?;
        let mut sums = Vec::new();
        let mut sels = Vec::new();
        let mut slot = total;
        for (g, offs) in plan.groups.iter().zip(&seg_offset) {
            let offset = if offs.len() == 1 {
                offs[0]
            } else {
                sums.push(Group { dst: slot, width: g.width, members: offs.clone() });
                slot += g.width;
                slot - g.width
            };
            sels.push(Selection { offset, width: g.width, n: g.kept });
        }
        group_sums(dev, &mut scores, &sums)?;
        topk(dev, &scores, &sels)
    }

    /// Compacts the tensors `names` (parameters of the dense model, or optimizer state
    /// named and shaped like them) with the kept channels of `keep`.
    pub fn compact(&self, plan: &Plan, keep: &Keep, names: &[(&str, &str)]) -> Result<Vec<Buf<f32>>> {
        let mut jobs = Vec::with_capacity(names.len());
        for &(stored, param) in names {
            let (shape, buf) = self.get(stored)?;
            let (og, ig) = plan.tensor_groups(param);
            let three = match shape.len() {
                4 => (shape[0], shape[1], shape[2] * shape[3]),
                2 => (shape[0], shape[1], 1),
                1 => (shape[0], 1, 1),
                _ => return Err(invalid!("tensor {stored} has an unexpected shape {shape:?}")),
            };
            jobs.push(Gather {
                src: buf,
                shape: three,
                rows: og.map(|g| (keep, g)),
                mids: ig.map(|g| (keep, g)),
                cols: None,
            });
        }
        gather(&self.dev, &jobs)
    }
}

impl DeviceState {
    /// The tensors of the dense model that pruning reads or compacts, uploaded.
    pub fn for_plan(dev: &Device, sd: &StateDict, plan: &Plan) -> Result<DeviceState> {
        let specs = plan.before.tensor_specs();
        DeviceState::upload(dev, sd, specs.iter().map(|s| s.name.as_str()).filter(|n| touched(plan, n)))
    }

    /// Scores, selects and compacts: the whole pipeline on the device, for the model's
    /// tensors. Returns the kept indices and the compacted tensors in torchvision order.
    pub fn run(&self, plan: &Plan) -> Result<(Keep, NamedBufs)> {
        let keep = self.select(plan)?;
        let names: Vec<String> =
            plan.before.tensor_specs().into_iter().map(|s| s.name).filter(|n| touched(plan, n)).collect();
        let pairs: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), n.as_str())).collect();
        let out = self.compact(plan, &keep, &pairs)?;
        Ok((keep, names.into_iter().zip(out).collect()))
    }
}

/// True if a pruning group indexes some dimension of the tensor.
fn touched(plan: &Plan, name: &str) -> bool {
    plan.tensor_groups(name) != (None, None)
}

/// The result of pruning a state dict.
pub struct Pruned {
    /// The plan that was applied: groups, kept widths, architectures before and after.
    pub plan: Plan,
    /// The compacted model, torchvision's names (and the input's `num_batches_tracked`).
    pub state: StateDict,
    /// Kept indices per group (`conv1`, `layerS`, `layerS.I.conv1`, `layerS.I.conv2`).
    pub keep: BTreeMap<String, Vec<i64>>,
    /// The compacted optimizer state, when one was given.
    pub optimizer: Option<StateDict>,
}

impl Pruned {
    /// The state dict to write: the model, one i64 tensor `keep.<group>` per group, and
    /// the settings as metadata.
    pub fn to_file_state(&self) -> StateDict {
        let mut sd = self.state.clone();
        for (g, idx) in &self.keep {
            sd.tensors.insert(format!("keep.{g}"), Tensor::i64(vec![idx.len()], idx.clone()));
        }
        let c = &self.plan.config;
        sd.metadata.insert("format".into(), "prunekit-pruned/1".into());
        sd.metadata.insert("mode".into(), c.mode.to_string());
        sd.metadata.insert("sparsity".into(), c.sparsity.to_string());
        sd.metadata.insert("round_to".into(), c.round_to.to_string());
        sd.metadata.insert(
            "criterion".into(),
            match c.criterion {
                crate::cpu::prune::Norm::L1 => "l1".into(),
                crate::cpu::prune::Norm::L2 => "l2".into(),
            },
        );
        sd
    }
}

/// Prunes a model given as a state dict with torchvision's names, on `dev`.
pub fn prune_state(dev: &Device, sd: &StateDict, config: &PruneConfig) -> Result<Pruned> {
    prune_cow(dev, Cow::Borrowed(sd), None, config)
}

/// As [`prune_state`], taking the state: its tensors move into the result (on the CPU
/// device the dense weights are read where they are and the untouched tensors are not
/// copied), which saves copying the model twice.
pub fn prune_owned_state(dev: &Device, sd: StateDict, config: &PruneConfig) -> Result<Pruned> {
    prune_cow(dev, Cow::Owned(sd), None, config)
}

/// As [`prune_state`], and compacts `optimizer` (tensors named and shaped like the
/// model's parameters, e.g. SGD's momentum buffers) the same way.
pub fn prune_state_with(
    dev: &Device,
    sd: &StateDict,
    optimizer: Option<&StateDict>,
    config: &PruneConfig,
) -> Result<Pruned> {
    prune_cow(dev, Cow::Borrowed(sd), optimizer, config)
}

fn prune_cow(
    dev: &Device,
    sd: Cow<'_, StateDict>,
    optimizer: Option<&StateDict>,
    config: &PruneConfig,
) -> Result<Pruned> {
    let arch = Arch::from_state(&sd)?;
    let plan = Plan::new(&arch, config)?;
    let specs = arch.tensor_specs();
    let shape_of: BTreeMap<&str, &Vec<usize>> = specs.iter().map(|s| (s.name.as_str(), &s.shape)).collect();
    if let Some(opt) = optimizer {
        for (n, t) in &opt.tensors {
            let want = shape_of.get(n.as_str()).ok_or_else(|| invalid!("optimizer state {n} names no parameter"))?;
            ensure!(&t.shape == *want, "optimizer state {n} has shape {:?}, its parameter {:?}", t.shape, want);
            ensure!(matches!(t.data, Data::F32(_)), "optimizer state {n} is not F32");
        }
    }
    // Upload what is scored or compacted: every tensor with a pruned dimension (which
    // includes every producer's weight). The model's tensors are read in place; with an
    // optimizer's, both go into one state under distinct names.
    let touched = |n: &str| touched(&plan, n);
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).filter(|n| touched(n)).collect();
    let mut combined = sd;
    let mut jobs: Vec<(String, String)> = names.iter().map(|n| (n.clone(), n.clone())).collect();
    if let Some(opt) = optimizer {
        for n in opt.tensors.keys().filter(|n| touched(n)) {
            let stored = format!("optimizer.{n}");
            combined.to_mut().tensors.insert(stored.clone(), opt.tensors[n].clone());
            jobs.push((stored, n.clone()));
        }
    }
    let upload_names: Vec<&str> = jobs.iter().map(|(s, _)| s.as_str()).collect();
    let (ds, rest) = match combined {
        Cow::Borrowed(sd) => (DeviceState::upload(dev, sd, upload_names)?, Cow::Borrowed(sd)),
        Cow::Owned(mut sd) => {
            let ds = DeviceState::upload_taken(dev, &mut sd, upload_names)?;
            (ds, Cow::Owned(sd))
        }
    };
    let keep = ds.select(&plan)?;
    let job_refs: Vec<(&str, &str)> =
        jobs.iter().filter(|(_, p)| touched(p)).map(|(s, p)| (s.as_str(), p.as_str())).collect();
    let out = ds.compact(&plan, &keep, &job_refs)?;
    drop(ds);

    let after: BTreeMap<String, Vec<usize>> =
        plan.after.tensor_specs().into_iter().map(|s| (s.name, s.shape)).collect();
    let mut state = StateDict { tensors: BTreeMap::new(), metadata: BTreeMap::new() };
    let mut opt_out = optimizer.map(|o| StateDict { tensors: o.tensors.clone(), metadata: o.metadata.clone() });
    for ((stored, param), buf) in job_refs.iter().zip(out) {
        let t = Tensor::f32(after[*param].clone(), buf.into_vec()?);
        match stored.strip_prefix("optimizer.") {
            Some(p) => {
                opt_out.as_mut().expect("optimizer given").tensors.insert(p.to_string(), t);
            }
            None => {
                state.tensors.insert(param.to_string(), t);
            }
        }
    }
    // The untouched tensors (and num_batches_tracked), moved when the state was given.
    match rest {
        Cow::Borrowed(sd) => {
            for (n, t) in &sd.tensors {
                if !state.tensors.contains_key(n) {
                    state.tensors.insert(n.clone(), t.clone());
                }
            }
        }
        Cow::Owned(sd) => {
            // The optimizer's tensors were all uploaded, so taken out: what is left is the model's.
            for (n, t) in sd.tensors {
                state.tensors.entry(n).or_insert(t);
            }
        }
    }
    let lists = keep.lists()?;
    let keep_map =
        plan.groups.iter().zip(lists).map(|(g, l)| (g.name.clone(), l.into_iter().map(i64::from).collect())).collect();
    Ok(Pruned { plan, state, keep: keep_map, optimizer: opt_out })
}
