//! A model from a state dict (torchvision's names and layouts) and back: parameters,
//! gradients and the optimizer's momenta.

use super::*;

impl<T: Precision> ResNet<T> {
    /// A model with the weights of `sd` (torchvision's names and layouts), on `dev`.
    pub fn from_state(dev: &Device, sd: &StateDict) -> Result<Self> {
        let arch = Arch::from_state(sd)?;
        let zeros = |n: usize| dev.zeros::<f32>(n);
        let conv = |name: &str, k: usize, c: usize, r: usize, stride: usize, pad: usize| -> Result<Conv<T>> {
            let oihw = dev.upload(f32_of(sd, &format!("{name}.weight"))?.to_vec())?;
            let mut w = dev.uninit::<f32>(k * c * r * r)?;
            conv::oihw_to_krsc(dev, k, c, r, r, &oihw, &mut w)?;
            // The stem (the only conv of 3 input channels) of a bf16 model on a kernel
            // device runs padded.
            let padded = name == "conv1" && T::LOW && T::TENSOR_CORES && !matches!(dev, Device::Cpu);
            let cp = if padded { STEM_PADDED.max(c) } else { c };
            let low = if T::LOW { Some(dev.uninit::<T>(k * r * r * cp)?) } else { None };
            let dw_padded = if cp != c { Some(zeros(k * r * r * cp)?) } else { None };
            let (dw, mom) = (zeros(w.len())?, zeros(w.len())?);
            let mut cv = Conv { name: name.to_string(), k, c, cp, r, stride, pad, dw, dw_padded, mom, w, low };
            cv.refresh_low(dev)?;
            Ok(cv)
        };
        let bn = |name: &str, c: usize| -> Result<Bn> {
            let up = |s: &str| -> Result<Buf<f32>> { dev.upload(f32_of(sd, &format!("{name}.{s}"))?.to_vec()) };
            Ok(Bn {
                name: name.to_string(),
                c,
                gamma: up("weight")?,
                beta: up("bias")?,
                mean: up("running_mean")?,
                var: up("running_var")?,
                dgamma: zeros(c)?,
                dbeta: zeros(c)?,
                mom_gamma: zeros(c)?,
                mom_beta: zeros(c)?,
            })
        };
        let stem = conv("conv1", arch.stem, 3, 7, 2, 3)?;
        let stem_bn = bn("bn1", arch.stem)?;
        let mut blocks = Vec::with_capacity(arch.blocks.len());
        for b in &arch.blocks {
            let p = b.prefix();
            let down = if b.downsample {
                Some((
                    conv(&format!("{p}.downsample.0"), b.cout, b.cin, 1, b.stride, 0)?,
                    bn(&format!("{p}.downsample.1"), b.cout)?,
                ))
            } else {
                None
            };
            blocks.push(BlockParams {
                spec: b.clone(),
                conv1: conv(&format!("{p}.conv1"), b.w1, b.cin, 1, 1, 0)?,
                bn1: bn(&format!("{p}.bn1"), b.w1)?,
                conv2: conv(&format!("{p}.conv2"), b.w2, b.w1, 3, b.stride, 1)?,
                bn2: bn(&format!("{p}.bn2"), b.w2)?,
                conv3: conv(&format!("{p}.conv3"), b.cout, b.w2, 1, 1, 0)?,
                bn3: bn(&format!("{p}.bn3"), b.cout)?,
                down,
            });
        }
        let fc_n = arch.classes * arch.fc_in();
        let mut m = ResNet {
            dev: dev.clone(),
            stem,
            stem_bn,
            blocks,
            fc_w: dev.upload(f32_of(sd, "fc.weight")?.to_vec())?,
            fc_b: dev.upload(f32_of(sd, "fc.bias")?.to_vec())?,
            dfc_w: zeros(fc_n)?,
            dfc_b: zeros(arch.classes)?,
            mom_fc_w: zeros(fc_n)?,
            mom_fc_b: zeros(arch.classes)?,
            arch,
            steps: 0,
            sgd_table: layers::SgdTable::default(),
            bn: BnConfig::default(),
            label_smoothing: 0.0,
            bn_fusion: BnFusion::default(),
        };
        // Made here, so that a training step allocates nothing.
        m.sgd_table = layers::SgdTable::new(&m.dev.clone(), &m.sgd_tensors())?;
        Ok(m)
    }

    /// A fresh model with torchvision's initialisation.
    pub fn new(dev: &Device, arch: &Arch, seed: u64) -> Result<Self> {
        ResNet::from_state(dev, &torchvision_init(arch, seed))
    }

    pub(super) fn conv_oihw(&self, c: &Conv<T>, krsc: &Buf<f32>) -> Result<Vec<f32>> {
        let mut out = self.dev.uninit::<f32>(krsc.len())?;
        conv::krsc_to_oihw(&self.dev, c.k, c.c, c.r, c.r, krsc, &mut out)?;
        out.to_vec()
    }

    /// Visits every conv and BN in torchvision's order.
    pub(super) fn layers(&self) -> (Vec<&Conv<T>>, Vec<&Bn>) {
        let mut convs = vec![&self.stem];
        let mut bns = vec![&self.stem_bn];
        for b in &self.blocks {
            convs.extend([&b.conv1, &b.conv2, &b.conv3]);
            bns.extend([&b.bn1, &b.bn2, &b.bn3]);
            if let Some((c, bn)) = &b.down {
                convs.push(c);
                bns.push(bn);
            }
        }
        (convs, bns)
    }

    pub(super) fn collect(&self, what: Collect) -> Result<StateDict> {
        let mut sd = StateDict::default();
        let (convs, bns) = self.layers();
        for c in convs {
            let src = match what {
                Collect::Params => &c.w,
                Collect::Grads => &c.dw,
                Collect::Momentum => &c.mom,
            };
            sd.tensors
                .insert(format!("{}.weight", c.name), Tensor::f32(vec![c.k, c.c, c.r, c.r], self.conv_oihw(c, src)?));
        }
        for b in bns {
            let v = |x: &Buf<f32>| -> Result<Tensor> { Ok(Tensor::f32(vec![b.c], x.to_vec()?)) };
            let (g, bb) = match what {
                Collect::Params => (&b.gamma, &b.beta),
                Collect::Grads => (&b.dgamma, &b.dbeta),
                Collect::Momentum => (&b.mom_gamma, &b.mom_beta),
            };
            sd.tensors.insert(format!("{}.weight", b.name), v(g)?);
            sd.tensors.insert(format!("{}.bias", b.name), v(bb)?);
            if what == Collect::Params {
                sd.tensors.insert(format!("{}.running_mean", b.name), v(&b.mean)?);
                sd.tensors.insert(format!("{}.running_var", b.name), v(&b.var)?);
            }
        }
        let (wsrc, bsrc) = match what {
            Collect::Params => (&self.fc_w, &self.fc_b),
            Collect::Grads => (&self.dfc_w, &self.dfc_b),
            Collect::Momentum => (&self.mom_fc_w, &self.mom_fc_b),
        };
        sd.tensors.insert("fc.weight".into(), Tensor::f32(vec![self.arch.classes, self.arch.fc_in()], wsrc.to_vec()?));
        sd.tensors.insert("fc.bias".into(), Tensor::f32(vec![self.arch.classes], bsrc.to_vec()?));
        Ok(sd)
    }

    /// The model as a state dict with torchvision's names and layouts.
    pub fn to_state(&self) -> Result<StateDict> {
        self.collect(Collect::Params)
    }

    /// The gradients of the last backward, named after their parameters (OIHW for convs).
    pub fn gradients(&self) -> Result<StateDict> {
        self.collect(Collect::Grads)
    }

    /// SGD's momentum buffers, named after their parameters (OIHW for convs): the
    /// optimizer state to prune with the model (`prune::prune_state_with`).
    pub fn momentum_state(&self) -> Result<StateDict> {
        self.collect(Collect::Momentum)
    }

    /// Continues an SGD run: sets every momentum buffer (named and shaped like the
    /// parameters, as [`momentum_state`](Self::momentum_state) gives them) and the number of
    /// steps already taken (0 makes the next step a first step again).
    pub fn set_momentum_state(&mut self, sd: &StateDict, steps: u64) -> Result<()> {
        let want: std::collections::BTreeMap<String, Vec<usize>> =
            self.arch.tensor_specs().into_iter().filter(|s| s.role.is_param()).map(|s| (s.name, s.shape)).collect();
        for (n, t) in &sd.tensors {
            let shape = want.get(n).ok_or_else(|| invalid!("momentum state {n} names no parameter"))?;
            ensure!(&t.shape == shape, "momentum state {n} has shape {:?}, its parameter {shape:?}", t.shape);
            ensure!(t.as_f32().is_some(), "momentum state {n} is not F32");
        }
        for n in want.keys() {
            ensure!(sd.tensors.contains_key(n), "momentum state for {n} is missing");
        }
        let dev = self.dev.clone();
        let get = |n: &str| -> Result<&[f32]> { f32_of(sd, n) };
        let (convs, bns) = self.layers_mut();
        for c in convs {
            let oihw = dev.upload(get(&format!("{}.weight", c.name))?.to_vec())?;
            conv::oihw_to_krsc(&dev, c.k, c.c, c.r, c.r, &oihw, &mut c.mom)?;
        }
        for b in bns {
            b.mom_gamma.write(get(&format!("{}.weight", b.name))?)?;
            b.mom_beta.write(get(&format!("{}.bias", b.name))?)?;
        }
        self.mom_fc_w.write(get("fc.weight")?)?;
        self.mom_fc_b.write(get("fc.bias")?)?;
        self.steps = steps;
        Ok(())
    }

    /// Every conv and BN, mutably, in torchvision's order.
    pub(super) fn layers_mut(&mut self) -> (Vec<&mut Conv<T>>, Vec<&mut Bn>) {
        let mut convs = vec![&mut self.stem];
        let mut bns = vec![&mut self.stem_bn];
        for b in &mut self.blocks {
            convs.extend([&mut b.conv1, &mut b.conv2, &mut b.conv3]);
            bns.extend([&mut b.bn1, &mut b.bn2, &mut b.bn3]);
            if let Some((c, bn)) = &mut b.down {
                convs.push(c);
                bns.push(bn);
            }
        }
        (convs, bns)
    }
}

/// Which tensors [`ResNet::collect`] gathers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Collect {
    Params,
    Grads,
    Momentum,
}
