//! SGD with momentum and weight decay (kernels/sgd.cu), as `torch.optim.SGD`.

use super::{aligned16, check_len, dptr, host, host_mut, i64_of, stride_blocks, CastElem};
use crate::cpu::layers::sgd as cpu;
pub use crate::cpu::layers::sgd::SgdStep;
use crate::device::{Buf, Device};
use crate::gpu::{Gpu, GpuBuf, Kernel, LaunchConfig};
use crate::ops::params::{SgdMultiParams, SgdParams, SgdSeg};
use crate::ops::profile::{timed, u, Cost, Family, F32};
use crate::ops::{check_on, i32_of, upload_table};
use crate::{ensure, Result};

const KERNEL: Kernel = Kernel::new("sgd", "sgd_step_f32");
const THREADS: u32 = 256;

/// One step of `torch.optim.SGD(lr, momentum, weight_decay)` (dampening 0, no Nesterov)
/// on one parameter tensor, in place, with the gradient first multiplied by
/// `step.grad_scale` (as after `torch.nn.utils.clip_grad_norm_`; 1 is the plain step,
/// bitwise): `d = grad_scale * grad + weight_decay * param`; `buf = d` on the first step
/// (`step.first`), else `buf = momentum * buf + d`; `param -= lr * buf`. As PyTorch, a zero
/// weight decay adds nothing and a zero momentum steps with `d` (the buffer is then set to
/// `d`). On the first step the old contents of `momentum_buf` are not read.
pub fn sgd_step(
    dev: &Device,
    param: &mut Buf<f32>,
    grad: &Buf<f32>,
    momentum_buf: &mut Buf<f32>,
    step: &SgdStep,
) -> Result<()> {
    let SgdStep { lr, momentum, weight_decay, first: first_step, grad_scale } = *step;
    ensure!(grad_scale.is_finite(), "the gradient scale must be finite, not {grad_scale}");
    let n = param.len();
    check_len(grad, n, "grad")?;
    check_len(momentum_buf, n, "momentum_buf")?;
    check_on(param, dev, "param")?;
    check_on(grad, dev, "grad")?;
    check_on(momentum_buf, dev, "momentum_buf")?;
    timed(
        dev,
        Family::Sgd,
        || Cost::sgd(n, first_step),
        || match dev {
            Device::Cpu => {
                cpu::sgd_step(
                    host_mut(param, "param")?,
                    host(grad, "grad")?,
                    host_mut(momentum_buf, "momentum_buf")?,
                    step,
                );
                Ok(())
            }
            Device::Gpu(gpu) => {
                if n == 0 {
                    return Ok(());
                }
                let p = SgdParams {
                    param: dptr(param, gpu, "param")?,
                    grad: dptr(grad, gpu, "grad")?,
                    buf: dptr(momentum_buf, gpu, "momentum_buf")?,
                    n: i64_of(n, "the parameter count")?,
                    lr,
                    momentum,
                    weight_decay,
                    first: first_step as i32,
                    grad_scale,
                    pad0: 0,
                };
                ensure!(aligned16(&[p.param, p.grad, p.buf]), "SGD buffers must be 16-byte aligned");
                // SAFETY: param, grad and momentum_buf hold n f32 each, 16-byte aligned as the
                // kernel's float4 accesses need.
                unsafe {
                    gpu.launch(KERNEL, LaunchConfig::linear(stride_blocks(n.div_ceil(4), THREADS), THREADS), &p)?
                };
                Ok(())
            }
        },
    )
}

/// The profile's counts of this module's ops (see [`crate::ops::profile`]).
impl Cost {
    /// An SGD step on n f32 parameters: reads param and grad, writes param and the
    /// momentum buffer, and reads the buffer except on the first step; 6 FLOPs per
    /// parameter (weight decay, momentum, update: a multiply and an add each).
    pub fn sgd(n: usize, first_step: bool) -> Cost {
        Cost { flops: 6 * u(n), bytes: u(n) * F32 * (4 + !first_step as u64) }
    }
}

const MULTI_CHUNK: usize = 4096;
const MULTI_THREADS: u32 = 256;

/// One tensor of [`sgd_step_multi`]: a parameter, its gradient and momentum buffer (f32,
/// of one length), and optionally the parameter's copy in a lower precision `L` (the
/// weights a bf16 step's convolutions read), rewritten from the updated parameter.
pub struct SgdTensor<'a, L: CastElem> {
    /// The f32 parameters, updated.
    pub param: &'a mut Buf<f32>,
    /// Their gradients.
    pub grad: &'a Buf<f32>,
    /// Their momentum buffer, updated.
    pub momentum_buf: &'a mut Buf<f32>,
    /// The copy of the updated parameters in `L` (round to nearest even, as [`cast`]), or
    /// none.
    ///
    /// [`cast`]: super::cast
    pub low: Option<&'a mut Buf<L>>,
}

/// The device's table of a set of [`SgdTensor`]s (their addresses and lengths), made once
/// by [`SgdTable::new`] and used by every [`sgd_step_multi`] on the same buffers: a step
/// then allocates and uploads nothing. On the CPU it holds nothing.
#[derive(Default)]
pub struct SgdTable {
    rows: Vec<SgdSeg>,
    nchunks: usize,
    table: Option<GpuBuf<u8>>,
}

impl SgdTable {
    /// The table of `tensors` on `dev` (checked as [`sgd_step_multi`] checks them).
    pub fn new<L: CastElem>(dev: &Device, tensors: &[SgdTensor<L>]) -> Result<SgdTable> {
        check_tensors(dev, tensors)?;
        match dev {
            Device::Cpu => Ok(SgdTable::default()),
            Device::Gpu(gpu) => {
                let (rows, nchunks) = multi_rows(gpu, tensors)?;
                let table = if rows.is_empty() { None } else { Some(upload_table(gpu, &rows)?) };
                Ok(SgdTable { rows, nchunks, table })
            }
        }
    }

    /// Whether this is the table of `tensors` on `dev` (the same buffers).
    pub fn matches<L: CastElem>(&self, dev: &Device, tensors: &[SgdTensor<L>]) -> bool {
        match dev {
            Device::Cpu => self.table.is_none(),
            Device::Gpu(gpu) => {
                let same_gpu = self.table.as_ref().is_none_or(|t| t.same_gpu(gpu));
                same_gpu
                    && multi_rows(gpu, tensors).is_ok_and(|(r, _)| {
                        bytemuck::cast_slice::<_, u8>(&r) == bytemuck::cast_slice::<_, u8>(&self.rows)
                    })
            }
        }
    }
}

/// Checks that each tensor's buffers have its parameter's length and live on `dev`.
fn check_tensors<L: CastElem>(dev: &Device, tensors: &[SgdTensor<L>]) -> Result<()> {
    for (i, t) in tensors.iter().enumerate() {
        let n = t.param.len();
        check_len(t.grad, n, &format!("grad of tensor {i}"))?;
        check_len(t.momentum_buf, n, &format!("momentum_buf of tensor {i}"))?;
        check_on(t.param, dev, &format!("param of tensor {i}"))?;
        check_on(t.grad, dev, &format!("grad of tensor {i}"))?;
        check_on(t.momentum_buf, dev, &format!("momentum_buf of tensor {i}"))?;
        if let Some(l) = t.low.as_deref() {
            check_len(l, n, &format!("the low-precision copy of tensor {i}"))?;
            check_on(l, dev, &format!("the low-precision copy of tensor {i}"))?;
        }
    }
    Ok(())
}

/// The table rows of `tensors` (empty tensors have none) and the chunks they cover.
fn multi_rows<L: CastElem>(gpu: &Gpu, tensors: &[SgdTensor<L>]) -> Result<(Vec<SgdSeg>, usize)> {
    let mut rows = Vec::with_capacity(tensors.len());
    let mut chunk0 = 0usize;
    for t in tensors {
        let n = t.param.len();
        let low = match t.low.as_deref() {
            Some(l) => dptr(l, gpu, "the low-precision copy")?,
            None => 0,
        };
        let seg = SgdSeg {
            param: dptr(t.param, gpu, "param")?,
            grad: dptr(t.grad, gpu, "grad")?,
            buf: dptr(t.momentum_buf, gpu, "momentum_buf")?,
            low,
            n: i64_of(n, "the parameter count")?,
            chunk0: i64_of(chunk0, "the chunk count")?,
        };
        ensure!(aligned16(&[seg.param, seg.grad, seg.buf, seg.low]), "SGD buffers must be 16-byte aligned");
        if n > 0 {
            rows.push(seg);
            chunk0 += n.div_ceil(MULTI_CHUNK);
        }
    }
    ensure!(i32::try_from(chunk0).is_ok(), "{chunk0} chunks of SGD are too many for the kernel");
    Ok((rows, chunk0))
}

/// [`sgd_step`] with `step` on every tensor of `tensors`, and each updated parameter's
/// low-precision copy where the tensor has one, in one launch on a kernel device through
/// `table` (which must be [`SgdTable::new`]'s of these tensors). Bitwise [`sgd_step`]
/// then [`cast`](super::cast) on each tensor.
pub fn sgd_step_multi<L: CastElem>(
    dev: &Device,
    table: &SgdTable,
    tensors: &mut [SgdTensor<L>],
    step: &SgdStep,
) -> Result<()> {
    let SgdStep { lr, momentum, weight_decay, first, grad_scale } = *step;
    ensure!(grad_scale.is_finite(), "the gradient scale must be finite, not {grad_scale}");
    check_tensors(dev, tensors)?;
    ensure!(table.matches(dev, tensors), "the SGD table was made for other tensors");
    let cost = tensors.iter().fold(Cost { flops: 0, bytes: 0 }, |c, t| {
        let n = t.param.len();
        let low = if t.low.is_some() { u(n) * u(std::mem::size_of::<L>()) } else { 0 };
        let s = Cost::sgd(n, first);
        Cost { flops: c.flops + s.flops, bytes: c.bytes + s.bytes + low }
    });
    timed(
        dev,
        Family::Sgd,
        || cost,
        || match dev {
            Device::Cpu => {
                for t in tensors.iter_mut() {
                    cpu::sgd_step(
                        host_mut(t.param, "param")?,
                        host(t.grad, "grad")?,
                        host_mut(t.momentum_buf, "momentum_buf")?,
                        step,
                    );
                    if let Some(l) = t.low.as_deref_mut() {
                        crate::cpu::layers::elementwise::cast(host(t.param, "param")?, host_mut(l, "low")?);
                    }
                }
                Ok(())
            }
            Device::Gpu(gpu) => {
                let Some(segs) = table.table.as_ref() else { return Ok(()) };
                let p = SgdMultiParams {
                    segs: segs.ptr(),
                    nseg: i32_of(table.rows.len(), "SGD tensors")?,
                    nchunks: i32_of(table.nchunks, "SGD chunks")?,
                    lr,
                    momentum,
                    weight_decay,
                    first: first as i32,
                    grad_scale,
                    chunk: MULTI_CHUNK as i32,
                };
                let kernel = Kernel::new("sgd", if L::DTYPE == "bf16" { "sgd_multi_bf16" } else { "sgd_multi_f32" });
                let blocks = table.nchunks.min(super::MAX_STRIDE_BLOCKS) as u32;
                // SAFETY: the table matches the tensors (checked above): each row's buffers hold
                // n f32 (the copy n elements of L), 16-byte aligned, and the chunks cover them.
                unsafe { gpu.launch(kernel, LaunchConfig::linear(blocks, MULTI_THREADS), &p)? };
                Ok(())
            }
        },
    )
}
