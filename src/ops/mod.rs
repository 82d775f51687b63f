//! One typed wrapper per kernel family. Each checks shapes, devices and alignment,
//! picks the launch configuration, and runs the kernel on a kernel device or the CPU
//! fast path on the CPU. Nothing a caller passes can make a launch read or write outside
//! its buffers.

pub mod conv;
pub mod fused;
pub mod layers;
pub mod params;
pub mod profile;
pub mod prune;

use crate::device::{Buf, Device};
use crate::gpu::{Elem, Gpu, GpuBuf};
use crate::{invalid, Result};

/// The device buffer of `b`, which must live on `gpu`.
pub(crate) fn on_gpu<'a, T: Elem>(b: &'a Buf<T>, gpu: &Gpu, what: &str) -> Result<&'a GpuBuf<T>> {
    match b {
        Buf::Gpu(g) if g.same_gpu(gpu) => Ok(g),
        _ => Err(invalid!("{what} is not on the device {}", gpu.name())),
    }
}

/// Uploads a table of `#[repr(C)]` records for a launch.
pub(crate) fn upload_table<R: bytemuck::Pod>(gpu: &Gpu, rows: &[R]) -> Result<GpuBuf<u8>> {
    Ok(gpu.upload(bytemuck::cast_slice::<R, u8>(rows))?)
}

/// Checks that `b` is on `dev` (for messages: `what`).
pub(crate) fn check_on<T: Elem>(b: &Buf<T>, dev: &Device, what: &str) -> Result<()> {
    if b.is_on(dev) {
        Ok(())
    } else {
        Err(invalid!("{what} is not on the device {}", dev.name()))
    }
}

/// Checks that `b` holds exactly `len` elements.
pub(crate) fn check_len<T: Elem>(b: &Buf<T>, len: usize, what: &str) -> Result<()> {
    crate::ensure!(b.len() == len, "{what} has {} elements, expected {len}", b.len());
    Ok(())
}

/// [`check_len`] and [`check_on`] for each buffer, in order.
pub(crate) fn check_bufs<T: Elem>(dev: &Device, len: usize, bufs: &[(&Buf<T>, &str)]) -> Result<()> {
    for &(b, what) in bufs {
        check_len(b, len, what)?;
        check_on(b, dev, what)?;
    }
    Ok(())
}

/// A count as the i32 the kernels take.
pub(crate) fn i32_of(x: usize, what: &str) -> Result<i32> {
    i32::try_from(x).map_err(|_| invalid!("{what} = {x} is too large for the kernels (at most {})", i32::MAX))
}
