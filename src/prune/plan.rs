//! Pruning plans: which channels form a group, how wide each group stays, and which
//! dimension of which tensor each group indexes.

use super::sparsity::{kept_width, Sparsity};
use crate::cpu::prune::Norm;
use crate::model::{Arch, Role};
use crate::{ensure, invalid, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// What pruning removes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// "Convolutional pruning" (the paper's winner): the output filters of every block's
    /// conv1 and conv2, with the matching inputs of conv2 and conv3 and BN entries.
    Filters,
    /// "Channel pruning": also the residual stream of each stage (downsample and every
    /// conv3 scored together) and the stem's channels; the classifier's input shrinks.
    Channels,
}

impl std::str::FromStr for Mode {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Mode> {
        match s {
            "filters" => Ok(Mode::Filters),
            "channels" => Ok(Mode::Channels),
            _ => Err(invalid!("unknown pruning mode {s:?}: expected filters or channels")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Filters => "filters",
            Mode::Channels => "channels",
        })
    }
}

/// How to prune.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PruneConfig {
    /// What is pruned: filters only, or also the residual streams and the stem.
    pub mode: Mode,
    /// The fraction of each pruned group's channels to remove.
    pub sparsity: Sparsity,
    /// Kept widths are rounded up to a multiple of this (at least 1; 8 keeps tiles full).
    pub round_to: usize,
    /// The filter score: L1 (the default) or L2 norm.
    pub criterion: Norm,
}

impl PruneConfig {
    /// A config; fails if `round_to` is 0.
    pub fn new(mode: Mode, sparsity: Sparsity, round_to: usize, criterion: Norm) -> Result<PruneConfig> {
        ensure!(round_to > 0, "round_to must be at least 1");
        Ok(PruneConfig { mode, sparsity, round_to, criterion })
    }
}

/// A set of channels kept or removed together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupPlan {
    /// `conv1` (the stem's output), `layerS` (stage S's residual stream), or
    /// `layerS.I.conv1` / `layerS.I.conv2` (a block's inner widths).
    pub name: String,
    /// The number of channels before pruning.
    pub width: usize,
    /// The number of channels kept: `width` at the config's sparsity, rounded up to a
    /// multiple of `round_to` and never above `width`.
    pub kept: usize,
    /// The convs (torchvision module names) whose output filters make up the group; the
    /// group's score per channel is the sum of their filter scores.
    pub producers: Vec<String>,
}

/// A channel space of the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Space {
    Stem,
    Stage(usize),
    Inner1(usize),
    Inner2(usize),
}

/// The plan of one pruning: groups, widths before and after, and for every tensor the
/// groups that index its output (dim 0) and input (dim 1) dimensions.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The settings the plan was made with.
    pub config: PruneConfig,
    /// The dense architecture.
    pub before: Arch,
    /// The pruned architecture: every group at its kept width.
    pub after: Arch,
    /// The pruned groups in network order: the stem, then per stage its blocks' inner
    /// widths followed by the stage's residual stream. [`Mode::Filters`] has only the
    /// inner widths.
    pub groups: Vec<GroupPlan>,
    dims: BTreeMap<String, (Option<usize>, Option<usize>)>,
}

impl Plan {
    /// The plan for pruning `arch` with `config`; fails if `round_to` is 0.
    pub fn new(arch: &Arch, config: &PruneConfig) -> Result<Plan> {
        ensure!(config.round_to > 0, "round_to must be at least 1");
        let blocks = &arch.blocks;
        let first_of_stage = |s: usize| blocks.iter().position(|b| b.stage == s && b.index == 0).expect("4 stages");
        let stage_space = |s: usize| -> Space {
            let b = &blocks[first_of_stage(s)];
            if b.downsample {
                Space::Stage(s)
            } else if s == 1 {
                Space::Stem // an identity residual: the stage's stream is the stem's
            } else {
                Space::Stage(s - 1)
            }
        };
        let input_space = |bi: usize| -> Space {
            let b = &blocks[bi];
            match (b.index, b.stage) {
                (0, 1) => Space::Stem,
                (0, s) => stage_space(s - 1),
                (_, s) => stage_space(s),
            }
        };
        // Tensor -> (output space, input space).
        let mut spaces: BTreeMap<String, (Option<Space>, Option<Space>)> = BTreeMap::new();
        let bn = |spaces: &mut BTreeMap<_, _>, name: &str, sp: Space| {
            for suffix in ["weight", "bias", "running_mean", "running_var"] {
                spaces.insert(format!("{name}.{suffix}"), (Some(sp), None));
            }
        };
        spaces.insert("conv1.weight".into(), (Some(Space::Stem), None));
        bn(&mut spaces, "bn1", Space::Stem);
        let mut producers: BTreeMap<Space, Vec<String>> = BTreeMap::new();
        producers.entry(Space::Stem).or_default().push("conv1".into());
        for (bi, b) in blocks.iter().enumerate() {
            let p = b.prefix();
            let (inp, out) = (input_space(bi), stage_space(b.stage));
            spaces.insert(format!("{p}.conv1.weight"), (Some(Space::Inner1(bi)), Some(inp)));
            bn(&mut spaces, &format!("{p}.bn1"), Space::Inner1(bi));
            spaces.insert(format!("{p}.conv2.weight"), (Some(Space::Inner2(bi)), Some(Space::Inner1(bi))));
            bn(&mut spaces, &format!("{p}.bn2"), Space::Inner2(bi));
            spaces.insert(format!("{p}.conv3.weight"), (Some(out), Some(Space::Inner2(bi))));
            bn(&mut spaces, &format!("{p}.bn3"), out);
            producers.entry(Space::Inner1(bi)).or_default().push(format!("{p}.conv1"));
            producers.entry(Space::Inner2(bi)).or_default().push(format!("{p}.conv2"));
            producers.entry(out).or_default().push(format!("{p}.conv3"));
            if b.downsample {
                spaces.insert(format!("{p}.downsample.0.weight"), (Some(out), Some(inp)));
                bn(&mut spaces, &format!("{p}.downsample.1"), out);
                producers.entry(out).or_default().push(format!("{p}.downsample.0"));
            }
        }
        spaces.insert("fc.weight".into(), (None, Some(stage_space(4))));
        spaces.insert("fc.bias".into(), (None, None));

        let width = |sp: Space| -> usize {
            match sp {
                Space::Stem => arch.stem,
                Space::Stage(s) => blocks[first_of_stage(s)].cout,
                Space::Inner1(bi) => blocks[bi].w1,
                Space::Inner2(bi) => blocks[bi].w2,
            }
        };
        let name = |sp: Space| -> String {
            match sp {
                Space::Stem => "conv1".into(),
                Space::Stage(s) => format!("layer{s}"),
                Space::Inner1(bi) => format!("{}.conv1", blocks[bi].prefix()),
                Space::Inner2(bi) => format!("{}.conv2", blocks[bi].prefix()),
            }
        };
        let pruned = |sp: Space| match config.mode {
            Mode::Filters => matches!(sp, Space::Inner1(_) | Space::Inner2(_)),
            Mode::Channels => true,
        };
        // Groups in network order: stem, then per stage its blocks' inner widths and the
        // stage's stream.
        let mut order: Vec<Space> = vec![Space::Stem];
        for (bi, b) in blocks.iter().enumerate() {
            order.push(Space::Inner1(bi));
            order.push(Space::Inner2(bi));
            let last_of_stage = blocks.get(bi + 1).is_none_or(|n| n.stage != b.stage);
            if last_of_stage && stage_space(b.stage) == Space::Stage(b.stage) {
                order.push(Space::Stage(b.stage));
            }
        }
        let mut group_of: BTreeMap<Space, usize> = BTreeMap::new();
        let mut groups = Vec::new();
        for sp in order.into_iter().filter(|&sp| pruned(sp)) {
            let w = width(sp);
            group_of.insert(sp, groups.len());
            groups.push(GroupPlan {
                name: name(sp),
                width: w,
                kept: kept_width(w, config.sparsity, config.round_to)?,
                producers: producers[&sp].clone(),
            });
        }
        let kept = |sp: Space| group_of.get(&sp).map_or(width(sp), |&g| groups[g].kept);
        let mut after = arch.clone();
        after.stem = kept(Space::Stem);
        for (bi, b) in after.blocks.iter_mut().enumerate() {
            b.cin = kept(input_space(bi));
            b.w1 = kept(Space::Inner1(bi));
            b.w2 = kept(Space::Inner2(bi));
            b.cout = kept(stage_space(b.stage));
        }
        let dims = spaces
            .into_iter()
            .map(|(n, (o, i))| {
                (n, (o.and_then(|s| group_of.get(&s).copied()), i.and_then(|s| group_of.get(&s).copied())))
            })
            .collect();
        Ok(Plan { config: *config, before: arch.clone(), after, groups, dims })
    }

    /// The groups indexing dimension 0 (outputs) and dimension 1 (inputs) of a tensor of
    /// the dense model, by name. BN vectors have only an output group.
    pub fn tensor_groups(&self, name: &str) -> (Option<usize>, Option<usize>) {
        self.dims.get(name).copied().unwrap_or((None, None))
    }

    /// The role of each tensor name of the dense model.
    pub fn roles(&self) -> BTreeMap<String, Role> {
        self.before.tensor_specs().into_iter().map(|s| (s.name, s.role)).collect()
    }

    /// A table of the pruned convolutions: widths and forward FLOPs per image before and
    /// after, for `h` x `w` images, with totals.
    pub fn table(&self, h: usize, w: usize) -> String {
        let (b, a) = (self.before.convs(h, w), self.after.convs(h, w));
        let mut s = format!("{:<24} {:>12} {:>12} {:>12} {:>12}\n", "layer", "in", "out", "MFLOPs", "MFLOPs after");
        for (x, y) in b.iter().zip(&a) {
            let _ = writeln!(
                s,
                "{:<24} {:>5} -> {:<4} {:>5} -> {:<4} {:>12.1} {:>12.1}",
                x.name,
                x.cin,
                y.cin,
                x.cout,
                y.cout,
                x.flops() / 1e6,
                y.flops() / 1e6
            );
        }
        let _ = writeln!(
            s,
            "{:<24} {:>5} -> {:<4} {:>26} {:>12.1}",
            "fc",
            self.before.fc_in(),
            self.after.fc_in(),
            format!("{:.1}", 2.0 * (self.before.fc_in() * self.before.classes) as f64 / 1e6),
            2.0 * (self.after.fc_in() * self.after.classes) as f64 / 1e6
        );
        let _ = writeln!(
            s,
            "total: {:.3} -> {:.3} GFLOPs forward per image, {} -> {} parameters",
            self.before.flops_forward(h, w) / 1e9,
            self.after.flops_forward(h, w) / 1e9,
            self.before.params(),
            self.after.params()
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(mode: Mode, s: &str, r: usize) -> PruneConfig {
        PruneConfig::new(mode, s.parse().unwrap(), r, Norm::L1).unwrap()
    }

    #[test]
    fn filters_mode_prunes_inner_widths_only() {
        let arch = Arch::resnet50(1000);
        let p = Plan::new(&arch, &cfg(Mode::Filters, "0.5", 8)).unwrap();
        assert_eq!(p.groups.len(), 32);
        assert_eq!(p.after.stem, 64);
        assert_eq!(p.after.blocks[0].w1, 32);
        assert_eq!(p.after.blocks[15].w2, 256);
        assert_eq!(p.after.fc_in(), 2048);
        assert_eq!(p.tensor_groups("layer1.0.conv2.weight"), (Some(1), Some(0)));
        assert_eq!(p.tensor_groups("layer1.0.conv3.weight"), (None, Some(1)));
        assert_eq!(p.tensor_groups("layer1.0.bn1.running_var"), (Some(0), None));
        assert_eq!(p.tensor_groups("fc.weight"), (None, None));
        let r = p.after.flops_forward(224, 224) / p.before.flops_forward(224, 224);
        assert!(r > 0.3 && r < 0.6, "{r}");
    }

    #[test]
    fn channels_mode_couples_the_residual_stream() {
        let arch = Arch::resnet50(10);
        let p = Plan::new(&arch, &cfg(Mode::Channels, "0.5", 8)).unwrap();
        assert_eq!(p.groups.len(), 1 + 32 + 4);
        let l1 = p.groups.iter().find(|g| g.name == "layer1").unwrap();
        assert_eq!(l1.producers, ["layer1.0.conv3", "layer1.0.downsample.0", "layer1.1.conv3", "layer1.2.conv3"]);
        assert_eq!((l1.width, l1.kept), (256, 128));
        assert_eq!(p.after.fc_in(), 1024);
        assert_eq!(p.after.stem, 32);
        assert_eq!(p.after.blocks[3].cin, 128); // layer2.0 reads layer1's stream
        let (o, i) = p.tensor_groups("layer2.0.downsample.0.weight");
        assert_eq!(p.groups[o.unwrap()].name, "layer2");
        assert_eq!(p.groups[i.unwrap()].name, "layer1");
        assert_eq!(p.groups[p.tensor_groups("fc.weight").1.unwrap()].name, "layer4");
        assert_eq!(p.groups[p.tensor_groups("layer1.0.conv1.weight").1.unwrap()].name, "conv1");
    }
}
