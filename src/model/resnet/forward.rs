//! The forward pass (train mode: conv + BN fused, statistics saved for backward; eval mode:
//! running statistics) and what it leaves to read: loss, logits, ReLU outputs.

use super::*;

impl<T: Precision> ResNet<T> {
    /// The forward pass: train mode (batch statistics, running statistics updated, loss
    /// and its gradient computed) or eval mode (running statistics).
    pub fn forward(&mut self, ws: &mut Workspace<T>, train: bool) -> Result<()> {
        ensure!(!train || ws.has_targets, "a train-mode forward needs targets (set_batch with targets)");
        let dev = self.dev.clone();
        let bnc = self.bn;
        let n = ws.n;
        match (ws.input_nhwc.as_mut(), ws.input_low.as_mut()) {
            (None, Some(low)) => {
                conv::nchw_to_nhwc_padded(&dev, n, 3, ws.h, ws.w, self.stem.cp, &ws.input, low)?;
            }
            (Some(nhwc), low) => {
                conv::nchw_to_nhwc(&dev, n, 3, ws.h, ws.w, &ws.input, nhwc)?;
                if let Some(low) = low {
                    layers::cast(&dev, nhwc, low)?;
                }
            }
            (None, None) => return Err(invalid!("internal: the workspace holds no NHWC input")),
        }
        let x0: &Buf<T> = stem_input(&ws.input_nhwc, &ws.input, &ws.input_low)?;
        // With bn_fusion.on_load (off by default), a train step on a kernel device applies
        // bn1 and bn2 as the next conv loads its input, and never writes their outputs. The
        // CPU always writes them: its BN backward reads the ReLU's output, and its BN on load
        // would be a pass of its own.
        let on_load = train && self.bn_fusion.on_load && !matches!(dev, Device::Cpu);
        ws.bn_on_load = on_load.then_some(self.steps);
        // A train step on a kernel device applies the stem's BN + ReLU as the max pool loads
        // the conv output, and the pool writes where each maximum is (`taps0`) for the
        // backward: the BN's output `a0` is not written (it holds the statistics' partials).
        let pool_bn = train && !matches!(dev, Device::Cpu);
        ws.stem_pool_bn = pool_bn.then_some(self.steps);
        let (sh0, (h0, w0), c0) = (ws.stem_sh, (ws.stem_h, ws.stem_w), self.arch.stem);
        match (train, ws.taps0.as_mut()) {
            (true, Some(taps)) if pool_bn => {
                let bn = &mut self.stem_bn.layer(&mut ws.s0, bnc);
                fused::conv2d_fprop_bn_stats(&dev, &sh0, x0, self.stem.weight()?, &mut ws.t0, &mut ws.a0, bn)?;
                let bn = self.stem_bn.input(&ws.s0, true);
                layers::maxpool_forward_bn(&dev, n, h0, w0, c0, &ws.t0, Some(&bn), &mut ws.p0, Some(taps))?;
            }
            (true, _) => {
                let bn = &mut self.stem_bn.layer(&mut ws.s0, bnc);
                conv_bn_train(&dev, &sh0, (x0, None), &self.stem, bn, &mut ws.t0, None, true, &mut ws.a0)?;
                layers::maxpool_forward(&dev, n, h0, w0, c0, &ws.a0, &mut ws.p0)?;
            }
            (false, _) => {
                conv::conv2d_fprop(&dev, &sh0, x0, self.stem.weight()?, &mut ws.t0)?;
                bn_fwd(&dev, &mut self.stem_bn.layer(&mut ws.s0, bnc), n * h0 * w0, &ws.t0, &mut ws.a0, train, true)?;
                layers::maxpool_forward(&dev, n, h0, w0, c0, &ws.a0, &mut ws.p0)?;
            }
        }
        for bi in 0..self.blocks.len() {
            let (before, rest) = ws.blocks.split_at_mut(bi);
            let acts = &mut rest[0];
            let x: &Buf<T> = if bi == 0 { &ws.p0 } else { &before[bi - 1].out };
            let bp = &mut self.blocks[bi];
            if train {
                // Fused (ops::fused): BN statistics in the conv epilogues, the last BN, the
                // residual add and the ReLU in one pass.
                let (a, t, bn) = (&mut acts.a1, &mut acts.t1, &mut bp.bn1.layer(&mut acts.s1, bnc));
                if on_load {
                    // a1: the statistics' workspace only.
                    fused::conv2d_fprop_bn_stats(&dev, &acts.sh1, x, bp.conv1.weight()?, t, a, bn)?;
                } else {
                    conv_bn_train(&dev, &acts.sh1, (x, None), &bp.conv1, bn, t, None, true, a)?;
                }
                let (a, t, bn) = (&mut acts.a2, &mut acts.t2, &mut bp.bn2.layer(&mut acts.s2, bnc));
                if on_load {
                    let in1 = bp.bn1.input(&acts.s1, true);
                    fused::conv2d_fprop_bn_input_stats(&dev, &acts.sh2, &acts.t1, &in1, bp.conv2.weight()?, t, a, bn)?;
                } else {
                    conv_bn_train(&dev, &acts.sh2, (&acts.a1, None), &bp.conv2, bn, t, None, true, a)?;
                }
                let in2 = bp.bn2.input(&acts.s2, true);
                let x3 = if on_load { (&acts.t2, Some(&in2)) } else { (&acts.a2, None) };
                // conv3 and the shortcut's conv with their statistics (the block output holds
                // each one's partials until its finalize), then one pass applies bn3 (and the
                // shortcut's BN), adds, takes the ReLU and writes its decisions as bits for the
                // backward: the shortcut BN's output is never stored.
                let o = &mut acts.out;
                let short_bn = match (&mut bp.down, acts.shd, acts.td.as_mut(), acts.sd.as_mut()) {
                    (Some((dconv, dbn)), Some(shd), Some(td), Some(sd)) => {
                        fused::conv2d_fprop_bn_stats(&dev, &shd, x, dconv.weight()?, td, o, &mut dbn.layer(sd, bnc))?;
                        Some((&*td, dbn.input(sd, false)))
                    }
                    (None, None, None, None) => None,
                    _ => return Err(invalid!("internal: downsample buffers out of step")),
                };
                let (t, bn) = (&mut acts.t3, &mut bp.bn3.layer(&mut acts.s3, bnc));
                match x3 {
                    (x3, Some(bn_in)) => {
                        let w = bp.conv3.weight()?;
                        fused::conv2d_fprop_bn_input_stats(&dev, &acts.sh3, x3, bn_in, w, t, o, bn)?;
                    }
                    (x3, None) => fused::conv2d_fprop_bn_stats(&dev, &acts.sh3, x3, bp.conv3.weight()?, t, o, bn)?,
                }
                let residual = match &short_bn {
                    Some((td, dbn)) => layers::Residual::Bn(td, dbn),
                    None => layers::Residual::Plain(x),
                };
                let (bn3, m2) = (bp.bn3.input(&acts.s3, true), acts.sh3.n * acts.sh3.p() * acts.sh3.q());
                layers::bn_apply_residual(&dev, m2, &acts.t3, &bn3, residual, o, acts.out_bits.as_mut())?;
                continue;
            }
            let m1 = acts.sh1.n * acts.sh1.p() * acts.sh1.q();
            let m2 = acts.sh2.n * acts.sh2.p() * acts.sh2.q();
            conv::conv2d_fprop(&dev, &acts.sh1, x, bp.conv1.weight()?, &mut acts.t1)?;
            bn_fwd(&dev, &mut bp.bn1.layer(&mut acts.s1, bnc), m1, &acts.t1, &mut acts.a1, train, true)?;
            conv::conv2d_fprop(&dev, &acts.sh2, &acts.a1, bp.conv2.weight()?, &mut acts.t2)?;
            bn_fwd(&dev, &mut bp.bn2.layer(&mut acts.s2, bnc), m2, &acts.t2, &mut acts.a2, train, true)?;
            conv::conv2d_fprop(&dev, &acts.sh3, &acts.a2, bp.conv3.weight()?, &mut acts.t3)?;
            let b3 = ws.scratch.take(acts.out.len())?;
            let bn = &mut bp.bn3.layer(&mut acts.s3, bnc);
            bn_fwd(&dev, bn, m2, &acts.t3, &mut ws.scratch.bufs[b3], train, false)?;
            match (&mut bp.down, acts.shd, acts.td.as_mut(), acts.sd.as_mut()) {
                (Some((dconv, dbn)), Some(shd), Some(td), Some(sd)) => {
                    conv::conv2d_fprop(&dev, &shd, x, dconv.weight()?, td)?;
                    let bd = ws.scratch.take(acts.out.len())?;
                    bn_fwd(&dev, &mut dbn.layer(sd, bnc), m2, td, &mut ws.scratch.bufs[bd], train, false)?;
                    let [b3b, bdb] = ws.scratch.bufs.get_disjoint_mut([b3, bd]).expect("distinct");
                    layers::add_relu(&dev, b3b, bdb, &mut acts.out)?;
                    ws.scratch.give(bd);
                }
                (None, None, None, None) => layers::add_relu(&dev, &ws.scratch.bufs[b3], x, &mut acts.out)?,
                _ => return Err(invalid!("internal: downsample buffers out of step")),
            }
            ws.scratch.give(b3);
        }
        let last = ws.blocks.last().map_or(&ws.p0, |b| &b.out);
        let hw = last.len() / (n * self.arch.fc_in());
        layers::avgpool_forward(&dev, n, hw, self.arch.fc_in(), last, &mut ws.feat)?;
        layers::fc_forward(&dev, n, self.arch.fc_in(), ws.classes, &ws.feat, &self.fc_w, &self.fc_b, &mut ws.logits)?;
        if train {
            let (z, t, e) = (&ws.logits, &ws.targets, self.label_smoothing);
            layers::softmax_cross_entropy_smoothed(&dev, n, ws.classes, z, t, e, &mut ws.loss, &mut ws.dlogits)?;
        }
        Ok(())
    }

    /// The loss of the last train-mode forward (waits for the device).
    pub fn loss(&self, ws: &Workspace<T>) -> Result<f32> {
        Ok(ws.loss.to_vec()?[0])
    }

    /// The logits of the last forward, `[n, classes]` (waits for the device).
    pub fn logits(&self, ws: &Workspace<T>) -> Result<Vec<f32>> {
        ws.logits.to_vec()
    }

    /// The output of every ReLU of the last forward pass, as f32 NHWC, in forward order and
    /// named as `verify`'s gates: `relu` (the stem's), then per block `layerS.I.bn1`,
    /// `layerS.I.bn2` and `layerS.I.out` (after the residual add). `verify` reads the
    /// device's ReLU and max-pool decisions off them. After a train forward on a kernel
    /// device, until the next SGD step (the stem's, and with the BN on load bn1's and bn2's,
    /// are made from the saved statistics and the parameters; after a step this is an
    /// error).
    pub fn relu_outputs(&self, ws: &Workspace<T>) -> Result<Vec<(String, Vec<f32>)>> {
        let f = |b: &Buf<T>| -> Result<Vec<f32>> { Ok(b.to_vec()?.into_iter().map(ConvElem::to_f32).collect()) };
        // With the BN on load, bn1's and bn2's outputs were never written: they are made
        // here from the conv outputs and the saved statistics (the values the convs loaded),
        // with the parameters of that forward, so not after an SGD step.
        if ws.bn_on_load.or(ws.stem_pool_bn).is_some_and(|s| s != self.steps) {
            return Err(invalid!(
                "the ReLU outputs of the last train forward are gone: the model took an SGD step since (run the \
                 forward again)"
            ));
        }
        let bn_relu = |a: &Buf<T>, t: &Buf<T>, bn: &Bn, s: &Saved| -> Result<Vec<f32>> {
            if ws.bn_on_load.is_none() {
                return f(a);
            }
            let mut y = self.dev.zeros::<T>(t.len())?;
            layers::bn_apply_saved(&self.dev, t.len() / bn.c, t, &bn.input(s, true), None, &mut y)?;
            f(&y)
        };
        let stem = match ws.stem_pool_bn {
            None => f(&ws.a0)?,
            Some(_) => {
                let mut y = self.dev.zeros::<T>(ws.t0.len())?;
                let bn = self.stem_bn.input(&ws.s0, true);
                layers::bn_apply_saved(&self.dev, ws.t0.len() / bn.c, &ws.t0, &bn, None, &mut y)?;
                f(&y)?
            }
        };
        let mut out = vec![("relu".to_string(), stem)];
        for (bp, acts) in self.blocks.iter().zip(&ws.blocks) {
            let p = bp.spec.prefix();
            out.push((format!("{p}.bn1"), bn_relu(&acts.a1, &acts.t1, &bp.bn1, &acts.s1)?));
            out.push((format!("{p}.bn2"), bn_relu(&acts.a2, &acts.t2, &bp.bn2, &acts.s2)?));
            out.push((format!("{p}.out"), f(&acts.out)?));
        }
        Ok(out)
    }
}

/// A BN (+ ReLU) forward in train or eval mode.
pub(super) fn bn_fwd<T: Precision>(
    dev: &Device,
    bn: &mut layers::BnLayer<'_>,
    m: usize,
    x: &Buf<T>,
    y: &mut Buf<T>,
    train: bool,
    relu: bool,
) -> Result<()> {
    if train {
        layers::bn_forward_train(dev, m, x, bn, relu, y)
    } else {
        layers::bn_forward_eval(dev, m, x, bn, relu, y)
    }
}

/// Train-mode conv + BN (+ residual) (+ ReLU) through [`fused::conv_bn_forward_train`]:
/// `t` = the conv output (kept for backward), `out` = the BN output; `x` is the input and
/// the batch norm the conv applies as it loads it, if any.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv_bn_train<T: Precision>(
    dev: &Device,
    sh: &ConvShape,
    (x, bn_in): (&Buf<T>, Option<&layers::BnInput<'_>>),
    cv: &Conv<T>,
    bn: &mut layers::BnLayer<'_>,
    t: &mut Buf<T>,
    residual: Option<&Buf<T>>,
    relu: bool,
    out: &mut Buf<T>,
) -> Result<()> {
    fused::conv_bn_forward_train(dev, sh, x, bn_in, cv.weight()?, t, bn, residual, relu, out)
}
