//! The bottleneck ResNet family (torchvision's `ResNet` with `Bottleneck` blocks, v1.5:
//! the stride sits on the 3x3 conv). Widths are read from the weights, so a pruned
//! model loads as it is; depth is read from the names (blocks per stage); ResNet50 is
//! (3, 4, 6, 3) with base widths 64, 128, 256, 512.

use super::state::{Data, StateDict};
use crate::{ensure, invalid, Result};

/// One bottleneck block: conv1 (1x1, cin -> w1), conv2 (3x3, w1 -> w2, stride), conv3
/// (1x1, w2 -> cout), and a downsample (1x1 conv + BN, cin -> cout, stride) where the
/// residual changes shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    /// 1 to 4.
    pub stage: usize,
    /// Position inside the stage.
    pub index: usize,
    /// Input channels: the width of the residual stream the block reads.
    pub cin: usize,
    /// conv1's output channels (the first inner width).
    pub w1: usize,
    /// conv2's output channels (the second inner width).
    pub w2: usize,
    /// Output channels: conv3's, and the residual stream's after the block.
    pub cout: usize,
    /// conv2's (and the downsample's) stride: 2 for the first block of stages 2 to 4, else 1.
    pub stride: usize,
    /// Whether the block has a downsample branch on the residual.
    pub downsample: bool,
}

impl Block {
    /// `layerS.I`, torchvision's prefix.
    pub fn prefix(&self) -> String {
        format!("layer{}.{}", self.stage, self.index)
    }
}

/// A bottleneck ResNet: the stem (7x7 conv, BN, ReLU, 3x3 max pool), four stages of
/// blocks, global average pooling and a fully connected classifier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arch {
    /// Output channels of the stem's 7x7 conv.
    pub stem: usize,
    /// Every block, stage by stage, in forward order.
    pub blocks: Vec<Block>,
    /// Outputs of the classifier.
    pub classes: usize,
}

/// A convolution of the network, for FLOP counts and benchmarks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvLayer {
    /// torchvision's name of the conv module, e.g. `layer2.0.conv2` or `conv1`.
    pub name: String,
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Kernel height and width (square: 1, 3 or 7).
    pub kernel: usize,
    /// Stride along height and width.
    pub stride: usize,
    /// Zero padding on each side, along height and width.
    pub pad: usize,
    /// Input height (for the image size it was listed for).
    pub h: usize,
    /// Input width (for the image size it was listed for).
    pub w: usize,
}

impl ConvLayer {
    /// Output height.
    pub fn out_h(&self) -> usize {
        (self.h + 2 * self.pad - self.kernel) / self.stride + 1
    }
    /// Output width.
    pub fn out_w(&self) -> usize {
        (self.w + 2 * self.pad - self.kernel) / self.stride + 1
    }
    /// Forward FLOPs per image: 2 x multiply-adds.
    pub fn flops(&self) -> f64 {
        2.0 * (self.cin * self.cout * self.kernel * self.kernel) as f64 * (self.out_h() * self.out_w()) as f64
    }
    /// The convolution's shape for a batch of `n` images.
    pub fn shape(&self, n: usize) -> crate::shape::ConvShape {
        crate::shape::ConvShape {
            n,
            h: self.h,
            w: self.w,
            c: self.cin,
            k: self.cout,
            r: self.kernel,
            s: self.kernel,
            stride: self.stride,
            pad: self.pad,
        }
    }
}

/// What a tensor of the state dict is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A conv's weight, `[out, in, k, k]` (OIHW).
    ConvWeight,
    /// A BN's scale (gamma), one per channel.
    BnWeight,
    /// A BN's shift (beta), one per channel.
    BnBias,
    /// A BN's running mean, one per channel.
    BnRunningMean,
    /// A BN's running variance, one per channel.
    BnRunningVar,
    /// The classifier's weight, `[classes, fc_in]`.
    FcWeight,
    /// The classifier's bias, `[classes]`.
    FcBias,
}

impl Role {
    /// Trained by SGD (as opposed to BN's running statistics).
    pub fn is_param(self) -> bool {
        !matches!(self, Role::BnRunningMean | Role::BnRunningVar)
    }
}

/// Name, shape and role of one tensor of the model, in torchvision's order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// torchvision's name, e.g. `layer1.0.bn2.running_var`.
    pub name: String,
    /// The shape, as in the state dict.
    pub shape: Vec<usize>,
    /// What the tensor is.
    pub role: Role,
}

fn out_size(h: usize, kernel: usize, stride: usize, pad: usize) -> usize {
    (h + 2 * pad - kernel) / stride + 1
}

impl Arch {
    /// torchvision's bottleneck ResNet with `layers` blocks per stage, base widths
    /// 64/128/256/512 (expansion 4) and `classes` outputs.
    pub fn bottleneck(layers: [usize; 4], classes: usize) -> Arch {
        Arch::bottleneck_width(layers, 64, classes)
    }

    /// As [`bottleneck`](Self::bottleneck) with base width `width` instead of 64: the stem
    /// has `width` channels and stage s (from 0) `width << s` inner and `4 * (width << s)`
    /// output channels (`width` 64 is torchvision's).
    pub fn bottleneck_width(layers: [usize; 4], width: usize, classes: usize) -> Arch {
        let mut blocks = Vec::new();
        let mut cin = width;
        for (s, &n) in layers.iter().enumerate() {
            let planes = width << s;
            for i in 0..n {
                let stride = if s > 0 && i == 0 { 2 } else { 1 };
                let downsample = i == 0 && (stride != 1 || cin != planes * 4);
                blocks.push(Block {
                    stage: s + 1,
                    index: i,
                    cin,
                    w1: planes,
                    w2: planes,
                    cout: planes * 4,
                    stride,
                    downsample,
                });
                cin = planes * 4;
            }
        }
        Arch { stem: width, blocks, classes }
    }

    /// ResNet50: (3, 4, 6, 3) blocks, 1000 classes by default.
    pub fn resnet50(classes: usize) -> Arch {
        Arch::bottleneck([3, 4, 6, 3], classes)
    }

    /// Blocks per stage.
    pub fn layers(&self) -> [usize; 4] {
        let mut l = [0; 4];
        for b in &self.blocks {
            l[b.stage - 1] += 1;
        }
        l
    }

    /// Width of the representation that the classifier reads.
    pub fn fc_in(&self) -> usize {
        self.blocks.last().map_or(self.stem, |b| b.cout)
    }

    /// Every tensor of the state dict (without BN's optional `num_batches_tracked`), in
    /// torchvision's order.
    pub fn tensor_specs(&self) -> Vec<TensorSpec> {
        let mut v = Vec::new();
        let conv = |v: &mut Vec<TensorSpec>, name: String, o: usize, i: usize, k: usize| {
            v.push(TensorSpec { name: format!("{name}.weight"), shape: vec![o, i, k, k], role: Role::ConvWeight })
        };
        let bn = |v: &mut Vec<TensorSpec>, name: String, c: usize| {
            for (suffix, role) in [
                ("weight", Role::BnWeight),
                ("bias", Role::BnBias),
                ("running_mean", Role::BnRunningMean),
                ("running_var", Role::BnRunningVar),
            ] {
                v.push(TensorSpec { name: format!("{name}.{suffix}"), shape: vec![c], role });
            }
        };
        conv(&mut v, "conv1".into(), self.stem, 3, 7);
        bn(&mut v, "bn1".into(), self.stem);
        for b in &self.blocks {
            let p = b.prefix();
            conv(&mut v, format!("{p}.conv1"), b.w1, b.cin, 1);
            bn(&mut v, format!("{p}.bn1"), b.w1);
            conv(&mut v, format!("{p}.conv2"), b.w2, b.w1, 3);
            bn(&mut v, format!("{p}.bn2"), b.w2);
            conv(&mut v, format!("{p}.conv3"), b.cout, b.w2, 1);
            bn(&mut v, format!("{p}.bn3"), b.cout);
            if b.downsample {
                conv(&mut v, format!("{p}.downsample.0"), b.cout, b.cin, 1);
                bn(&mut v, format!("{p}.downsample.1"), b.cout);
            }
        }
        v.push(TensorSpec { name: "fc.weight".into(), shape: vec![self.classes, self.fc_in()], role: Role::FcWeight });
        v.push(TensorSpec { name: "fc.bias".into(), shape: vec![self.classes], role: Role::FcBias });
        v
    }

    /// Reads the architecture from a state dict with torchvision's names and checks every
    /// tensor: a missing, extra, mis-shaped or wrongly typed tensor is an error that names it.
    /// BN's `num_batches_tracked` (an I64 scalar) may be present or not, and so may the
    /// `keep.<group>` indices (I64 vectors) that `prunekit prune` writes beside a pruned
    /// model.
    pub fn from_state(sd: &StateDict) -> Result<Arch> {
        let dims = |name: &str, rank: usize| -> Result<Vec<usize>> {
            let t = sd.tensors.get(name).ok_or_else(|| invalid!("not a bottleneck ResNet: missing tensor {name}"))?;
            ensure!(t.shape.len() == rank, "tensor {name} has shape {:?}, expected {rank} dimensions", t.shape);
            Ok(t.shape.clone())
        };
        let stem = dims("conv1.weight", 4)?[0];
        let mut blocks = Vec::new();
        let mut cin = stem;
        for stage in 1..=4 {
            let mut index = 0;
            while sd.tensors.contains_key(&format!("layer{stage}.{index}.conv1.weight")) {
                let p = format!("layer{stage}.{index}");
                let c1 = dims(&format!("{p}.conv1.weight"), 4)?;
                let c2 = dims(&format!("{p}.conv2.weight"), 4)?;
                let c3 = dims(&format!("{p}.conv3.weight"), 4)?;
                let downsample = sd.tensors.contains_key(&format!("{p}.downsample.0.weight"));
                let stride = if stage > 1 && index == 0 { 2 } else { 1 };
                blocks.push(Block { stage, index, cin, w1: c1[0], w2: c2[0], cout: c3[0], stride, downsample });
                cin = c3[0];
                index += 1;
            }
            ensure!(
                index > 0,
                "not a bottleneck ResNet: stage {stage} has no blocks (missing layer{stage}.0.conv1.weight)"
            );
        }
        let fc = dims("fc.weight", 2)?;
        let arch = Arch { stem, blocks, classes: fc[0] };
        for b in &arch.blocks {
            if !b.downsample {
                ensure!(
                    b.cin == b.cout && b.stride == 1,
                    "block {} has no downsample but changes the shape of the residual ({} -> {} channels, stride {})",
                    b.prefix(),
                    b.cin,
                    b.cout,
                    b.stride
                );
            }
        }
        // Every expected tensor with the right shape and dtype, and nothing else.
        let specs = arch.tensor_specs();
        for s in &specs {
            let t = sd.tensors.get(&s.name).ok_or_else(|| invalid!("missing tensor {}", s.name))?;
            ensure!(t.shape == s.shape, "tensor {} has shape {:?}, expected {:?}", s.name, t.shape, s.shape);
            ensure!(matches!(t.data, Data::F32(_)), "tensor {} has dtype {}, expected F32", s.name, t.dtype_name());
        }
        let known: std::collections::HashSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        for (name, t) in &sd.tensors {
            if known.contains(name.as_str()) {
                continue;
            }
            if let Some(bn) = name.strip_suffix(".num_batches_tracked") {
                if known.contains(format!("{bn}.running_mean").as_str()) {
                    ensure!(matches!(t.data, Data::I64(_)) && t.numel() == 1, "tensor {name} must be an I64 scalar");
                    continue;
                }
            }
            if name.starts_with("keep.") {
                ensure!(matches!(t.data, Data::I64(_)) && t.shape.len() == 1, "tensor {name} must be an I64 vector");
                continue;
            }
            return Err(invalid!("unexpected tensor {name} for a bottleneck ResNet of this shape"));
        }
        ensure!(arch.classes > 0 && arch.stem > 0, "empty model");
        Ok(arch)
    }

    /// Every convolution in forward order (stem, then each block's conv1, conv2, conv3
    /// and downsample) with its input size for `h` x `w` images.
    pub fn convs(&self, h: usize, w: usize) -> Vec<ConvLayer> {
        let mut v =
            vec![ConvLayer { name: "conv1".into(), cin: 3, cout: self.stem, kernel: 7, stride: 2, pad: 3, h, w }];
        let (mut h, mut w) = (out_size(h, 7, 2, 3), out_size(w, 7, 2, 3));
        (h, w) = (out_size(h, 3, 2, 1), out_size(w, 3, 2, 1)); // max pool
        for b in &self.blocks {
            let p = b.prefix();
            let c = |name: &str, cin, cout, kernel, stride, pad, h, w| ConvLayer {
                name: format!("{p}.{name}"),
                cin,
                cout,
                kernel,
                stride,
                pad,
                h,
                w,
            };
            v.push(c("conv1", b.cin, b.w1, 1, 1, 0, h, w));
            v.push(c("conv2", b.w1, b.w2, 3, b.stride, 1, h, w));
            let (ho, wo) = (out_size(h, 3, b.stride, 1), out_size(w, 3, b.stride, 1));
            v.push(c("conv3", b.w2, b.cout, 1, 1, 0, ho, wo));
            if b.downsample {
                v.push(c("downsample.0", b.cin, b.cout, 1, b.stride, 0, h, w));
            }
            (h, w) = (ho, wo);
        }
        v
    }

    /// Forward FLOPs per image (2 x multiply-adds of the convolutions and the classifier).
    pub fn flops_forward(&self, h: usize, w: usize) -> f64 {
        self.convs(h, w).iter().map(ConvLayer::flops).sum::<f64>() + 2.0 * (self.fc_in() * self.classes) as f64
    }

    /// Training FLOPs per image: forward, and backward at twice the forward, less the
    /// stem's input gradient, which nobody needs.
    pub fn flops_train(&self, h: usize, w: usize) -> f64 {
        let stem = self.convs(h, w)[0].flops();
        3.0 * self.flops_forward(h, w) - stem
    }

    /// Trainable parameters (conv and fc weights, BN affine parameters, fc bias).
    pub fn params(&self) -> usize {
        self.tensor_specs().iter().filter(|s| s.role.is_param()).map(|s| s.shape.iter().product::<usize>()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resnet50_counts() {
        let a = Arch::resnet50(1000);
        assert_eq!(a.convs(224, 224).len(), 53);
        assert_eq!(a.params(), 25_557_032); // torchvision's resnet50
        let gf = a.flops_forward(224, 224) / 1e9;
        assert!((gf - 8.18).abs() < 0.01, "{gf} GFLOPs");
        assert_eq!(a.layers(), [3, 4, 6, 3]);
        assert_eq!(a.fc_in(), 2048);
        let convs = a.convs(224, 224);
        let ds = convs.iter().find(|c| c.name == "layer4.0.downsample.0").unwrap();
        assert_eq!((ds.h, ds.w, ds.out_h(), ds.stride), (14, 14, 7, 2));
        let last = convs.last().unwrap();
        assert_eq!((last.name.as_str(), last.h, last.out_h()), ("layer4.2.conv3", 7, 7));
    }
}
