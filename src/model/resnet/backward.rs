//! The backward pass and the SGD step.

use super::*;

impl<T: Precision> ResNet<T> {
    /// The backward pass after a train-mode [`forward`](Self::forward): every parameter's
    /// gradient (conv weights in KRSC, f32).
    pub fn backward(&mut self, ws: &mut Workspace<T>) -> Result<()> {
        let dev = self.dev.clone();
        let bnc = self.bn;
        let n = ws.n;
        let (c, k) = (self.arch.fc_in(), ws.classes);
        layers::fc_backward(
            &dev,
            n,
            c,
            k,
            &ws.feat,
            &self.fc_w,
            &ws.dlogits,
            &mut ws.dfeat,
            &mut self.dfc_w,
            &mut self.dfc_b,
        )?;
        let last_len = ws.blocks.last().map_or(ws.p0.len(), |b| b.out.len());
        let mut g = ws.scratch.take(last_len)?;
        layers::avgpool_backward(&dev, n, last_len / (n * c), c, &ws.dfeat, &mut ws.scratch.bufs[g])?;
        let (scratch, part) = (&mut ws.scratch, &mut ws.grad_sums);
        // On a kernel device (bn_fusion.dgrad_sums) the BN backwards take their sums from
        // the dgrad epilogues that store their output gradients
        // (fused::conv2d_dgrad_bn_sums): conv3's dgrad for bn2, conv2's for bn1, and the
        // last dgrad into a block's input for the previous block's bn3; each BN backward is
        // then its dx pass alone (bn_backward_dx). The wgrads of conv2 and conv3 apply bn1
        // and bn2 as they load t1 and t2 when the forward did (bn_fusion.on_load: their
        // outputs a1, a2 were not written); the BN backwards through their ReLUs never read
        // those outputs on a kernel device.
        let on_load = ws.bn_on_load.is_some();
        let sums = self.bn_fusion.dgrad_sums && !matches!(dev, Device::Cpu);
        let nblocks = self.blocks.len();
        for bi in (0..nblocks).rev() {
            let (before, rest) = ws.blocks.split_at_mut(bi);
            let acts = &mut rest[0];
            // The block input and, from the second block on, the inputs and statistics of the
            // previous block's bn3 and downsample BN, whose output gradient this block's
            // input gradient is (their sums are taken here).
            type Prev<'a, T> = (&'a Buf<T>, &'a mut Saved, Option<(&'a Buf<T>, &'a mut Saved)>);
            let (x, x_bits, prev): (&Buf<T>, Option<&Buf<u8>>, Option<Prev<'_, T>>) = match before.last_mut() {
                Some(p) => (&p.out, p.out_bits.as_ref(), Some((&p.t3, &mut p.s3, p.td.as_ref().zip(p.sd.as_mut())))),
                None => (&ws.p0, None, None),
            };
            let (bps_before, bps) = self.blocks.split_at_mut(bi);
            let bp = &mut bps[0];
            let mut prev_bns = match (sums, prev, bps_before.last_mut()) {
                (true, Some((t3, s3, down)), Some(pb)) => {
                    let second = match (down, pb.down.as_mut()) {
                        (Some((td, sd)), Some((_, dbn))) => Some((td, dbn.layer(sd, bnc))),
                        (None, None) => None,
                        _ => return Err(invalid!("internal: downsample buffers out of step")),
                    };
                    Some((t3, pb.bn3.layer(s3, bnc), second))
                }
                _ => None,
            };
            let (l_in, l1, l2, l_out) = (acts.sh1.x_len(), acts.sh1.y_len(), acts.sh2.y_len(), acts.sh3.y_len());
            let m1 = acts.sh1.n * acts.sh1.p() * acts.sh1.q();
            let m2 = acts.sh2.n * acts.sh2.p() * acts.sh2.q();
            // Through the final ReLU to bn3 and conv3, which leaves dsum, the gradient of both
            // branches of the sum. The next block's dgrad masked g by this ReLU as it stored
            // it (and took the sums of bn3 and the downsample BN on a kernel device); the last
            // block's g (from the pooling) is masked by bn3's backward, in place.
            let dsum = g;
            let dt3 = scratch.take(l_out)?;
            // A downsample block (but the network's last) takes the backward of bn3 and of the
            // shortcut BN from dsum in one pair of passes (bn_backward_pair, or its dx pass
            // alone after the sums): dsum is free after it, the shortcut's gradient dtd is
            // kept for its conv below.
            let mut dtd = None;
            let down_bn = match (bp.down.as_mut(), acts.td.as_ref(), acts.sd.as_mut()) {
                (Some((_, dbn)), Some(td), Some(sd)) if bi + 1 < nblocks => Some((td, dbn.layer(sd, bnc))),
                _ => None,
            };
            if let Some((td, mut dbn)) = down_bn {
                let d = scratch.take(l_out)?;
                let [ds, d3, dd] = scratch.bufs.get_disjoint_mut([dsum, dt3, d]).expect("distinct");
                let bn3 = layers::BnSide { x: &acts.t3, bn: &mut bp.bn3.layer(&mut acts.s3, bnc), dx: d3 };
                let short = layers::BnSide { x: td, bn: &mut dbn, dx: dd };
                if sums {
                    layers::bn_backward_dx_pair(&dev, m2, ds, bn3, short)?;
                } else {
                    layers::bn_backward_pair(&dev, m2, ds, bn3, short)?;
                }
                scratch.give(dsum);
                dtd = Some(d);
            } else {
                let [ds, d3] = scratch.bufs.get_disjoint_mut([dsum, dt3]).expect("distinct");
                let bn = &mut bp.bn3.layer(&mut acts.s3, bnc);
                if bi + 1 == nblocks {
                    layers::bn_backward_masking_dy(&dev, m2, &acts.t3, &acts.out, ds, bn, d3)?;
                } else if sums {
                    layers::bn_backward_dx(&dev, m2, &acts.t3, ds, bn, false, d3)?;
                } else {
                    layers::bn_backward(&dev, m2, &acts.t3, None, ds, bn, d3)?;
                }
            }
            let da2 = scratch.take(l2)?;
            {
                let [d3, da] = scratch.bufs.get_disjoint_mut([dt3, da2]).expect("distinct");
                if on_load {
                    let in2 = bp.bn2.input(&acts.s2, true);
                    fused::conv2d_wgrad_bn_input(&dev, &acts.sh3, &acts.t2, &in2, d3, &mut bp.conv3.dw)?;
                } else {
                    conv::conv2d_wgrad(&dev, &acts.sh3, &acts.a2, d3, &mut bp.conv3.dw)?;
                }
                if sums {
                    let bn = &mut bp.bn2.layer(&mut acts.s2, bnc);
                    let grad = fused::GradBn { x: &acts.t2, bn, relu: true, second: None, workspace: &mut *part };
                    fused::conv2d_dgrad_bn_sums(&dev, &acts.sh3, d3, bp.conv3.weight()?, da, grad)?;
                } else {
                    conv::conv2d_dgrad(&dev, &acts.sh3, d3, bp.conv3.weight()?, da)?;
                }
            }
            scratch.give(dt3);
            // conv2 and bn2 (with its ReLU).
            let dt2 = scratch.take(l2)?;
            {
                let [da, d2] = scratch.bufs.get_disjoint_mut([da2, dt2]).expect("distinct");
                let bn = &mut bp.bn2.layer(&mut acts.s2, bnc);
                if sums {
                    layers::bn_backward_dx(&dev, m2, &acts.t2, da, bn, true, d2)?;
                } else {
                    layers::bn_backward_through_relu(&dev, m2, &acts.t2, &acts.a2, da, bn, d2)?;
                }
            }
            scratch.give(da2);
            let da1 = scratch.take(l1)?;
            {
                let [d2, da] = scratch.bufs.get_disjoint_mut([dt2, da1]).expect("distinct");
                if on_load {
                    let in1 = bp.bn1.input(&acts.s1, true);
                    fused::conv2d_wgrad_bn_input(&dev, &acts.sh2, &acts.t1, &in1, d2, &mut bp.conv2.dw)?;
                } else {
                    conv::conv2d_wgrad(&dev, &acts.sh2, &acts.a1, d2, &mut bp.conv2.dw)?;
                }
                if sums {
                    let bn = &mut bp.bn1.layer(&mut acts.s1, bnc);
                    let grad = fused::GradBn { x: &acts.t1, bn, relu: true, second: None, workspace: &mut *part };
                    fused::conv2d_dgrad_bn_sums(&dev, &acts.sh2, d2, bp.conv2.weight()?, da, grad)?;
                } else {
                    conv::conv2d_dgrad(&dev, &acts.sh2, d2, bp.conv2.weight()?, da)?;
                }
            }
            scratch.give(dt2);
            // conv1 and bn1 (with its ReLU).
            let dt1 = scratch.take(l1)?;
            {
                let [da, d1] = scratch.bufs.get_disjoint_mut([da1, dt1]).expect("distinct");
                let bn = &mut bp.bn1.layer(&mut acts.s1, bnc);
                if sums {
                    layers::bn_backward_dx(&dev, m1, &acts.t1, da, bn, true, d1)?;
                } else {
                    layers::bn_backward_through_relu(&dev, m1, &acts.t1, &acts.a1, da, bn, d1)?;
                }
            }
            scratch.give(da1);
            // The block input's gradient is conv1's plus the shortcut's, summed as the dgrads
            // store: with an identity shortcut conv1's dgrad adds into dsum, which becomes
            // dx; with a downsample conv, that conv's dgrad adds into conv1's. The input is
            // the previous block's final ReLU's output, and the sum is masked by it there;
            // the dgrad that completes it takes the previous block's bn3 sums.
            let identity = acts.shd.is_none();
            // The previous block's ReLU masks the sum: its decisions as bits where the forward
            // wrote them, else its output.
            let relu_out = (bi > 0).then_some(match x_bits {
                Some(b) => conv::ReluMask::Bits(b),
                None => conv::ReluMask::Output(x),
            });
            let dx = if identity { dsum } else { scratch.take(l_in)? };
            // The last dgrad into dx: with the previous bn3's (and downsample BN's) sums when
            // there is one.
            let mut into_input = |sh: &ConvShape, dy: &Buf<T>, w: &Buf<T>, dxb: &mut Buf<T>| -> Result<()> {
                match prev_bns.as_mut() {
                    Some((t3, bn, second)) => {
                        let second = second.as_mut().map(|(td, l)| (*td, l));
                        let grad = fused::GradBn { x: *t3, bn, relu: false, second, workspace: &mut *part };
                        fused::conv2d_dgrad_accumulate_bn_sums(&dev, sh, dy, w, relu_out, dxb, grad)
                    }
                    None => conv::conv2d_dgrad_accumulate(&dev, sh, dy, w, relu_out, dxb),
                }
            };
            {
                let [d1, dxb] = scratch.bufs.get_disjoint_mut([dt1, dx]).expect("distinct");
                conv::conv2d_wgrad(&dev, &acts.sh1, x, d1, &mut bp.conv1.dw)?;
                if identity {
                    into_input(&acts.sh1, d1, bp.conv1.weight()?, dxb)?;
                } else {
                    conv::conv2d_dgrad(&dev, &acts.sh1, d1, bp.conv1.weight()?, dxb)?;
                }
            }
            scratch.give(dt1);
            match (&mut bp.down, acts.shd, acts.td.as_ref(), acts.sd.as_mut()) {
                (Some((dconv, dbn)), Some(shd), Some(td), Some(sd)) => {
                    // The network's last block: the shortcut BN's backward from the masked
                    // dsum on its own.
                    let dtd = match dtd {
                        Some(d) => d,
                        None => {
                            let d = scratch.take(l_out)?;
                            let [ds, dd] = scratch.bufs.get_disjoint_mut([dsum, d]).expect("distinct");
                            layers::bn_backward(&dev, m2, td, None, ds, &mut dbn.layer(sd, bnc), dd)?;
                            scratch.give(dsum);
                            d
                        }
                    };
                    {
                        let [dd, dxb] = scratch.bufs.get_disjoint_mut([dtd, dx]).expect("distinct");
                        conv::conv2d_wgrad(&dev, &shd, x, dd, &mut dconv.dw)?;
                        into_input(&shd, dd, dconv.weight()?, dxb)?;
                    }
                    scratch.give(dtd);
                }
                (None, None, None, None) => {}
                _ => return Err(invalid!("internal: downsample buffers out of step")),
            }
            g = dx;
        }
        // The stem: max pool, BN + ReLU, conv (no input gradient). After a forward that
        // pooled through the BN (kernel devices), the BN backward gathers the pool's
        // gradient from its taps as it loads, and the pool's input gradient is not stored.
        let (h0, w0, c0) = (ws.stem_h, ws.stem_w, self.arch.stem);
        let dt0 = scratch.take(ws.t0.len())?;
        match (ws.stem_pool_bn, &ws.taps0) {
            (Some(_), Some(taps)) => {
                let [gb, d0] = scratch.bufs.get_disjoint_mut([g, dt0]).expect("distinct");
                let bn = &mut self.stem_bn.layer(&mut ws.s0, bnc);
                layers::bn_backward_through_relu_maxpool(&dev, (n, h0, w0), &ws.t0, taps, gb, bn, d0)?;
                scratch.give(g);
            }
            _ => {
                let da0 = scratch.take(ws.a0.len())?;
                let [gb, da, d0] = scratch.bufs.get_disjoint_mut([g, da0, dt0]).expect("distinct");
                layers::maxpool_backward(&dev, n, h0, w0, c0, &ws.a0, gb, da)?;
                let bn = &mut self.stem_bn.layer(&mut ws.s0, bnc);
                layers::bn_backward_through_relu(&dev, n * h0 * w0, &ws.t0, &ws.a0, da, bn, d0)?;
                scratch.give(g);
                scratch.give(da0);
            }
        }
        self.stem.wgrad(
            &dev,
            &ws.stem_sh,
            stem_input(&ws.input_nhwc, &ws.input, &ws.input_low)?,
            &scratch.bufs[dt0],
        )?;
        scratch.give(dt0);
        Ok(())
    }

    /// One SGD step on every parameter with the gradients of the last backward (the
    /// first step sets the momentum buffers to the gradients, as PyTorch).
    pub fn sgd_step(&mut self, sgd: &Sgd) -> Result<()> {
        self.sgd_step_scaled(sgd, 1.0)
    }

    /// [`sgd_step`](Self::sgd_step) on the gradients multiplied by `grad_scale` (gradient
    /// clipping; 1 is the plain step, bitwise). One multi-tensor launch on a kernel device,
    /// which also rewrites the convolutions' low-precision weights (but the padded stem's,
    /// padded after it).
    pub fn sgd_step_scaled(&mut self, sgd: &Sgd, grad_scale: f32) -> Result<()> {
        let dev = self.dev.clone();
        let first = self.steps == 0;
        let settings = layers::SgdStep::new(sgd.lr, sgd.momentum, sgd.weight_decay, first).scaled(grad_scale);
        // The table is made with the model, whose buffers never move.
        let table = std::mem::take(&mut self.sgd_table);
        let stepped = layers::sgd_step_multi(&dev, &table, &mut self.sgd_tensors(), &settings);
        self.sgd_table = table;
        stepped?;
        if self.stem.cp != self.stem.c {
            self.stem.refresh_low(&dev)?;
        }
        self.steps += 1;
        Ok(())
    }

    /// Every parameter with its gradient, momentum and low-precision copy, for the SGD
    /// step: the convolutions and BNs in network order, then the classifier.
    pub(super) fn sgd_tensors(&mut self) -> Vec<layers::SgdTensor<'_, T>> {
        fn conv<T: Precision>(c: &mut Conv<T>) -> layers::SgdTensor<'_, T> {
            let low = if c.cp == c.c { c.low.as_mut() } else { None };
            layers::SgdTensor { param: &mut c.w, grad: &c.dw, momentum_buf: &mut c.mom, low }
        }
        fn bn<T: Precision>(b: &mut Bn) -> [layers::SgdTensor<'_, T>; 2] {
            [
                layers::SgdTensor { param: &mut b.gamma, grad: &b.dgamma, momentum_buf: &mut b.mom_gamma, low: None },
                layers::SgdTensor { param: &mut b.beta, grad: &b.dbeta, momentum_buf: &mut b.mom_beta, low: None },
            ]
        }
        let mut t = vec![conv(&mut self.stem)];
        t.extend(bn(&mut self.stem_bn));
        for b in &mut self.blocks {
            t.push(conv(&mut b.conv1));
            t.extend(bn(&mut b.bn1));
            t.push(conv(&mut b.conv2));
            t.extend(bn(&mut b.bn2));
            t.push(conv(&mut b.conv3));
            t.extend(bn(&mut b.bn3));
            if let Some((c, n)) = b.down.as_mut() {
                t.push(conv(c));
                t.extend(bn(n));
            }
        }
        t.push(layers::SgdTensor {
            param: &mut self.fc_w,
            grad: &self.dfc_w,
            momentum_buf: &mut self.mom_fc_w,
            low: None,
        });
        t.push(layers::SgdTensor {
            param: &mut self.fc_b,
            grad: &self.dfc_b,
            momentum_buf: &mut self.mom_fc_b,
            low: None,
        });
        t
    }

    /// Forward (train mode), backward and one SGD step on the batch in `ws`.
    pub fn train_step(&mut self, ws: &mut Workspace<T>, sgd: &Sgd) -> Result<()> {
        self.forward(ws, true)?;
        self.backward(ws)?;
        self.sgd_step(sgd)
    }
}
