//! The workspace of a batch size and image size: every activation, gradient and scratch
//! buffer of a step, planned once so that a step allocates nothing; and the batch it holds.

use super::*;

impl<T: Precision> ResNet<T> {
    /// Plans every activation and gradient buffer for batches of `n` images of `h` x `w`.
    pub fn workspace(&self, n: usize, h: usize, w: usize) -> Result<Workspace<T>> {
        ensure!(n >= 1, "the batch must hold at least one image");
        ensure!(h >= 1 && w >= 1, "images must be at least 1x1");
        let dev = &self.dev;
        let stem_sh = self.stem.shape(n, h, w);
        stem_sh.validate()?;
        let (h1, w1) = (stem_sh.p(), stem_sh.q());
        let (hp, wp) = (layers::maxpool_out(h1), layers::maxpool_out(w1));
        ensure!(
            n * h1 * w1 >= 2,
            "images of {h}x{w} at batch {n} leave a single value per channel for the stem's batch norm"
        );
        let act = |len: usize| dev.uninit::<T>(len);
        let saved = |c: usize| -> Result<Saved> { Ok(Saved { mean: dev.zeros(c)?, invstd: dev.zeros(c)? }) };
        let mut needs: std::collections::BTreeMap<usize, usize> = Default::default();
        let mut need = |counts: &[(usize, usize)]| {
            let mut here: std::collections::BTreeMap<usize, usize> = Default::default();
            for &(len, k) in counts {
                *here.entry(len).or_default() += k;
            }
            for (len, k) in here {
                let e = needs.entry(len).or_default();
                *e = (*e).max(k);
            }
        };
        let (mut hh, mut ww) = (hp, wp);
        let mut blocks: Vec<BlockActs<T>> = Vec::with_capacity(self.blocks.len());
        // The backward's dgrads that take BN sums: conv2's and conv3's (bn1, bn2), and in
        // every block but the first the last dgrad into the block input (the previous bn3
        // and downsample BN).
        let mut grad_sums = 0;
        for (bi, bp) in self.blocks.iter().enumerate() {
            let sh1 = bp.conv1.shape(n, hh, ww);
            let sh2 = bp.conv2.shape(n, hh, ww);
            sh2.validate()?;
            let (ho, wo) = (sh2.p(), sh2.q());
            let sh3 = bp.conv3.shape(n, ho, wo);
            let shd = bp.down.as_ref().map(|(c, _)| c.shape(n, hh, ww));
            let (l_in, l1, l2, l_out) = (sh1.x_len(), sh1.y_len(), sh2.y_len(), sh3.y_len());
            for sh in [sh2, sh3] {
                grad_sums = grad_sums.max(fused::grad_sums_workspace_len::<T>(&sh, None));
            }
            if let Some(prev) = blocks.last() {
                // The previous block's bn3 and, with a downsample, its BN: twice the sums.
                let bns = 1 + prev.shd.is_some() as usize;
                grad_sums = grad_sums.max(bns * fused::grad_sums_workspace_len::<T>(&shd.unwrap_or(sh1), None));
            }
            ensure!(n * ho * wo >= 2, "the feature map of {} is too small for batch norm", bp.spec.prefix());
            // The eval forward: b3 and the downsample's BN output. The backward (see
            // `backward`): a downsample block holds dsum, dt3 and dtd at once for the pair
            // backward of bn3 and its BN.
            need(&[(l_out, 2)]);
            need(&[(l_out, 2 + shd.is_some() as usize), (l_in, 2), (l1, 2), (l2, 2)]);
            blocks.push(BlockActs {
                sh1,
                sh2,
                sh3,
                shd,
                t1: act(l1)?,
                a1: act(l1)?,
                t2: act(l2)?,
                a2: act(l2)?,
                t3: act(l_out)?,
                td: if shd.is_some() { Some(act(l_out)?) } else { None },
                out: act(l_out)?,
                // The next block's dgrad reads them; the network's last block has none.
                out_bits: if matches!(dev, Device::Cpu) || bi + 1 == self.blocks.len() {
                    None
                } else {
                    Some(dev.uninit::<u8>(layers::relu_bits_len(l_out))?)
                },
                s1: saved(bp.spec.w1)?,
                s2: saved(bp.spec.w2)?,
                s3: saved(bp.spec.cout)?,
                sd: if shd.is_some() { Some(saved(bp.spec.cout)?) } else { None },
            });
            (hh, ww) = (ho, wo);
        }
        let (l_stem, l_pool) = (stem_sh.y_len(), n * hp * wp * self.arch.stem);
        need(&[(l_stem, 2), (l_pool, 1)]);
        let last = blocks.last().map_or(l_pool, |b| b.out.len());
        need(&[(last, 1)]);
        let mut bufs = Vec::new();
        for (&len, &k) in &needs {
            for _ in 0..k {
                bufs.push(act(len)?);
            }
        }
        let (c, k) = (self.arch.fc_in(), self.arch.classes);
        Ok(Workspace {
            n,
            h,
            w,
            classes: k,
            input: dev.zeros(n * 3 * h * w)?,
            input_nhwc: if self.stem.cp == self.stem.c { Some(dev.zeros(n * 3 * h * w)?) } else { None },
            input_low: if T::LOW { Some(act(n * self.stem.cp * h * w)?) } else { None },
            stem_sh,
            t0: act(l_stem)?,
            a0: act(l_stem)?,
            p0: act(l_pool)?,
            taps0: if matches!(dev, Device::Cpu) { None } else { Some(dev.uninit::<u8>(l_pool)?) },
            s0: saved(self.arch.stem)?,
            stem_h: h1,
            stem_w: w1,
            blocks,
            feat: dev.zeros(n * c)?,
            logits: dev.zeros(n * k)?,
            dlogits: dev.zeros(n * k)?,
            dfeat: dev.zeros(n * c)?,
            loss: dev.zeros(1)?,
            targets: dev.zeros(n)?,
            scratch: Scratch { busy: vec![false; bufs.len()], bufs },
            grad_sums: dev.zeros(grad_sums.max(1))?,
            has_targets: false,
            bn_on_load: None,
            stem_pool_bn: None,
            graph_warm: None,
            graph: None,
        })
    }

    /// Copies a batch into the workspace: `images` NCHW f32 `[n, 3, h, w]`, and for
    /// training the class of each image (checked against the classifier's size).
    pub fn set_batch(&self, ws: &mut Workspace<T>, images: &[f32], targets: Option<&[i64]>) -> Result<()> {
        ensure!(
            images.len() == ws.input.len(),
            "the batch holds {} values, the workspace expects {}x3x{}x{} = {}",
            images.len(),
            ws.n,
            ws.h,
            ws.w,
            ws.input.len()
        );
        ws.input.write(images)?;
        if let Some(t) = targets {
            ensure!(t.len() == ws.n, "{} targets for a batch of {}", t.len(), ws.n);
            let t32: Vec<i32> = t
                .iter()
                .map(|&x| i32::try_from(x).map_err(|_| invalid!("target {x} is not a class index")))
                .collect::<Result<_>>()?;
            layers::check_targets(&t32, ws.classes)?;
            ws.targets.write(&t32)?;
            ws.has_targets = true;
        }
        Ok(())
    }
}

impl<T: Precision> Workspace<T> {
    /// The number of images per batch it was planned for.
    pub fn batch(&self) -> usize {
        self.n
    }
    /// The image height and width it was planned for.
    pub fn image_size(&self) -> (usize, usize) {
        (self.h, self.w)
    }
}

impl<T: Elem> Scratch<T> {
    pub(super) fn take(&mut self, len: usize) -> Result<usize> {
        let i = (0..self.bufs.len())
            .find(|&i| !self.busy[i] && self.bufs[i].len() == len)
            .ok_or_else(|| invalid!("internal: the workspace has no free scratch buffer of {len} elements"))?;
        self.busy[i] = true;
        Ok(i)
    }
    pub(super) fn give(&mut self, i: usize) {
        self.busy[i] = false;
    }
}
