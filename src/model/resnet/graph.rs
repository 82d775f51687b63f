//! The training step captured as one CUDA graph per workspace and replayed.

use super::*;

impl<T: Precision> ResNet<T> {
    /// [`train_step`](Self::train_step) with the forward and backward as one CUDA graph on
    /// the cuda device: the first call on a workspace runs them as usual (loading every
    /// kernel), the second captures them into a graph kept in the workspace (for this
    /// model), and every call from then on replays it: one launch instead of several
    /// hundred. The SGD step (whose learning rate may change) is launched as usual. Every
    /// buffer a step touches is fixed when the workspace is planned, so the replay does
    /// the same work; the launch sequence is the same as [`train_step`](Self::train_step)'s. On the CPU, the
    /// emulation, inside a profile scope (which times each op), or with synchronous
    /// launches, this is [`train_step`](Self::train_step).
    pub fn train_step_graphed(&mut self, ws: &mut Workspace<T>, sgd: &Sgd) -> Result<()> {
        ensure!(ws.has_targets, "a train-mode forward needs targets (set_batch with targets)");
        let gpu = match &self.dev {
            Device::Gpu(g) if g.can_capture() && !crate::ops::profile::active() => g.clone(),
            _ => return self.train_step(ws, sgd),
        };
        let key = self.graph_key();
        match &ws.graph {
            Some((k, g)) if *k == key => gpu.replay(g)?,
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
        self.sgd_step(sgd)
    }

    /// What a captured step depends on besides the workspace: the device addresses of the
    /// model's parameters (the stem's and the classifier's weights stand for all of them,
    /// which are allocated with the model).
    pub(super) fn graph_key(&self) -> (u64, u64) {
        let ptr = |b: &Buf<f32>| match b {
            Buf::Gpu(g) => g.ptr(),
            Buf::Host(_) => 0,
        };
        (ptr(&self.stem.w), ptr(&self.fc_w))
    }
}
