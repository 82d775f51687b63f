//! The training step captured as one CUDA graph per workspace and replayed.

use super::*;

impl<T: Precision> ResNet<T> {
    /// [`train_step`](Self::train_step) with the forward and backward as one CUDA graph
    /// ([`forward_backward_graphed`](Self::forward_backward_graphed)), then the SGD step
    /// (whose learning rate may change) launched as usual.
    pub fn train_step_graphed(&mut self, ws: &mut Workspace<T>, sgd: &Sgd) -> Result<()> {
        self.forward_backward_graphed(ws)?;
        self.sgd_step(sgd)
    }

    /// The train-mode forward and the backward as one CUDA graph on the cuda device: the
    /// first call on a workspace runs them as usual (loading every kernel), the second
    /// captures them into a graph kept in the workspace (for this model and its settings),
    /// and every call from then on replays it: one launch instead of several hundred.
    /// Every buffer a step touches is fixed when the workspace is planned, so the replay
    /// does the same work; the launch sequence is that of [`forward`](Self::forward) then
    /// [`backward`](Self::backward). A change of the BN settings, the label smoothing or
    /// the BN fusion captures again. On the CPU, the emulation, inside a profile scope
    /// (which times each op), or with synchronous launches, this is the plain forward and
    /// backward.
    pub fn forward_backward_graphed(&mut self, ws: &mut Workspace<T>) -> Result<()> {
        ensure!(ws.has_targets, "a train-mode forward needs targets (set_batch with targets)");
        let gpu = match &self.dev {
            Device::Gpu(g) if g.can_capture() && !crate::ops::profile::active() => g.clone(),
            _ => {
                self.forward(ws, true)?;
                return self.backward(ws);
            }
        };
        let key = self.graph_key();
        match &ws.graph {
            Some((k, g)) if *k == key => {
                gpu.replay(g)?;
                // What the forward records of itself, as it would for this step.
                ws.bn_on_load = self.bn_fusion.on_load.then_some(self.steps);
                ws.stem_pool_bn = Some(self.steps);
            }
            _ if ws.graph_warm != Some(key) => {
                ws.graph = None;
                self.forward(ws, true)?;
                self.backward(ws)?;
                ws.graph_warm = Some(key);
            }
            _ => {
                let ((), g) = gpu.capture(|| -> Result<()> {
                    self.forward(ws, true)?;
                    self.backward(ws)
                })?;
                gpu.replay(&g)?;
                ws.graph = Some((key, g));
            }
        }
        Ok(())
    }

    /// What a captured step depends on besides the workspace: the device addresses of the
    /// model's parameters (the stem's and the classifier's weights stand for all of them,
    /// which are allocated with the model), and the settings its launches take as values
    /// (BN momentum and epsilon, label smoothing, the BN fusion).
    pub(super) fn graph_key(&self) -> GraphKey {
        let ptr = |b: &Buf<f32>| match b {
            Buf::Gpu(g) => g.ptr(),
            Buf::Host(_) => 0,
        };
        let bits = |a: f32, b: f32| (a.to_bits() as u64) << 32 | b.to_bits() as u64;
        let fusion = (self.bn_fusion.on_load as u64) << 1 | self.bn_fusion.dgrad_sums as u64;
        [
            ptr(&self.stem.w),
            ptr(&self.fc_w),
            bits(self.bn.momentum, self.bn.eps),
            (self.label_smoothing.to_bits() as u64) << 2 | fusion,
        ]
    }
}

/// See [`ResNet::graph_key`].
pub(super) type GraphKey = [u64; 4];
