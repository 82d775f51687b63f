//! What the fine-tuning recipes of [`crate::train`] need besides a training step.

use super::*;

/// What the fine-tuning recipes of [`crate::train`] need besides a training step: the
/// gradients' global norm (gradient clipping) and the classifier-only step (a head-only
/// phase before the full fine-tune).
impl<T: Precision> ResNet<T> {
    /// Every parameter's gradient of the last backward, each with its number of rows
    /// (filters; 1 for a BN's vectors and the classifier's bias); the classifier's two
    /// last, or only them (`head_only`).
    fn grad_rows(&self, head_only: bool) -> Vec<(&Buf<f32>, usize)> {
        let mut v = Vec::new();
        if !head_only {
            let (convs, bns) = self.layers();
            v.extend(convs.into_iter().map(|c| (&c.dw, c.k)));
            v.extend(bns.into_iter().flat_map(|b| [(&b.dgamma, 1), (&b.dbeta, 1)]));
        }
        v.extend([(&self.dfc_w, self.arch.classes), (&self.dfc_b, 1)]);
        v
    }

    /// The L2 norm of all the gradients of the last backward taken together (of the
    /// classifier's only, `head_only`): `torch.nn.utils.clip_grad_norm_`'s total norm. On
    /// the device ([`crate::ops::prune::filter_norms`] gives the L2 norm of every row in
    /// one launch, accumulated in f64); the host adds the rows' squares in f64.
    pub fn grad_norm(&self, head_only: bool) -> Result<f64> {
        let rows = self.grad_rows(head_only);
        let weights: Vec<crate::ops::prune::Weight<'_, f32>> =
            rows.iter().filter(|(b, _)| !b.is_empty()).map(|&(buf, k)| crate::ops::prune::Weight { buf, k }).collect();
        let norms = crate::ops::prune::filter_norms(&self.dev, &weights, crate::ops::prune::Norm::L2, 0)?.to_vec()?;
        Ok(norms.iter().map(|n| n * n).sum::<f64>().sqrt())
    }

    /// The classifier-only forward and backward on the batch in `ws`: an eval-mode forward
    /// (BN with its running statistics, which stay as they are), the training loss and the
    /// classifier's gradients; nothing of the backbone is written. Then
    /// [`sgd_step_head`](Self::sgd_step_head).
    pub fn head_forward_backward(&mut self, ws: &mut Workspace<T>) -> Result<()> {
        ensure!(ws.has_targets, "a training step needs targets (set_batch with targets)");
        self.forward(ws, false)?;
        let dev = self.dev.clone();
        let (n, c, k) = (ws.n, self.arch.fc_in(), ws.classes);
        let (z, t, e) = (&ws.logits, &ws.targets, self.label_smoothing);
        layers::softmax_cross_entropy_smoothed(&dev, n, k, z, t, e, &mut ws.loss, &mut ws.dlogits)?;
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
        )
    }

    /// An SGD step on the classifier only (weight decay included), its gradients multiplied
    /// by `grad_scale`; it counts as a step, so the backbone's momentum buffers (still zero)
    /// make its first full step a plain `buf = d`, as PyTorch's for a parameter unfrozen then.
    pub fn sgd_step_head(&mut self, sgd: &Sgd, grad_scale: f32) -> Result<()> {
        let first = self.steps == 0;
        let step = layers::SgdStep::new(sgd.lr, sgd.momentum, sgd.weight_decay, first).scaled(grad_scale);
        layers::sgd_step(&self.dev, &mut self.fc_w, &self.dfc_w, &mut self.mom_fc_w, &step)?;
        layers::sgd_step(&self.dev, &mut self.fc_b, &self.dfc_b, &mut self.mom_fc_b, &step)?;
        self.steps += 1;
        Ok(())
    }
}
