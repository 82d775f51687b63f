//! Where the model and the pruning pipeline run: the CPU, or a kernel device (cuda or
//! emu). Code above `ops` holds [`Buf`]s and never asks which kind it has.

use crate::gpu::{BackendKind, Elem, Gpu, GpuBuf};
use crate::{invalid, Result};

/// A device that holds buffers and runs the model's and the pruning pipeline's work;
/// cheap to clone.
#[derive(Clone, Debug)]
pub enum Device {
    /// Rust on the host: the fast paths of `crate::cpu`.
    Cpu,
    /// The CUDA kernels, on a GPU or in the host emulation.
    Gpu(Gpu),
}

impl Device {
    /// `cpu`, `emu`, `cuda`, `cuda:N`, or `auto` (cuda where a GPU and the kernels are
    /// there, else cpu).
    pub fn parse(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "emu" => Ok(Device::Gpu(Gpu::emu()?)),
            "emu:count" => Err(invalid!(
                "emu:count counts a step's FLOPs and bytes and computes nothing (every result is zero): \
                 only `prunekit bench` takes it"
            )),
            "cuda" => Ok(Device::Gpu(Gpu::cuda(0)?)),
            "auto" => Ok(Device::auto()),
            _ => match s.strip_prefix("cuda:").map(|n| n.parse::<usize>()) {
                Some(Ok(n)) => Ok(Device::Gpu(Gpu::cuda(n)?)),
                _ => Err(invalid!("unknown device {s:?}: expected cpu, emu, cuda, cuda:N or auto")),
            },
        }
    }

    /// As [`Device::parse`], and also `emu:count`: the emulation's counting mode, in which
    /// no kernel runs and every result is zero, but the ops layer's FLOP and byte counts
    /// (and so a profile's) are those of the cuda device, for any batch and image size.
    /// For measuring bytes and FLOPs only.
    pub fn parse_counting(s: &str) -> Result<Device> {
        match s {
            "emu:count" => Ok(Device::Gpu(Gpu::emu_count()?)),
            _ => Device::parse(s),
        }
    }

    /// cuda if it can be used, else the CPU. Where there is a GPU that cannot be used
    /// (kernels built without nvcc, a driver error), says why on stderr.
    pub fn auto() -> Device {
        match Gpu::cuda(0) {
            Ok(g) => Device::Gpu(g),
            Err(crate::gpu::GpuError::NoDriver | crate::gpu::GpuError::NoDevice(_)) => Device::Cpu,
            Err(e) => {
                eprintln!("note: running on the CPU: the GPU cannot be used: {e}");
                Device::Cpu
            }
        }
    }

    /// A human-readable name: `cpu (N threads)`, the GPU's name, or the emulation's.
    pub fn name(&self) -> String {
        match self {
            Device::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
            Device::Gpu(g) => g.name(),
        }
    }

    /// "cpu", "cuda" or "emu".
    pub fn kind(&self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Gpu(g) => match g.kind() {
                BackendKind::Cuda => "cuda",
                BackendKind::Emu => "emu",
            },
        }
    }

    /// Whether this is the emulation's counting mode (`emu:count`): ops are counted, not run.
    pub fn counts_only(&self) -> bool {
        self.gpu().is_some_and(Gpu::counts_only)
    }

    /// The kernel device, or `None` on the CPU.
    pub fn gpu(&self) -> Option<&Gpu> {
        match self {
            Device::Cpu => None,
            Device::Gpu(g) => Some(g),
        }
    }

    /// A buffer holding `data`.
    pub fn upload<T: Elem>(&self, data: Vec<T>) -> Result<Buf<T>> {
        Ok(match self {
            Device::Cpu => Buf::Host(data),
            Device::Gpu(g) => Buf::Gpu(g.upload(&data)?),
        })
    }

    /// A buffer of `len` zeros.
    pub fn zeros<T: Elem>(&self, len: usize) -> Result<Buf<T>> {
        Ok(match self {
            Device::Cpu => Buf::Host(vec![T::zeroed(); len]),
            Device::Gpu(g) => Buf::Gpu(g.zeros(len)?),
        })
    }

    /// A buffer of `len` elements that the caller will overwrite before reading.
    pub fn uninit<T: Elem>(&self, len: usize) -> Result<Buf<T>> {
        Ok(match self {
            Device::Cpu => Buf::Host(vec![T::zeroed(); len]),
            Device::Gpu(g) => Buf::Gpu(g.alloc(len)?),
        })
    }

    /// A point in time on the device's stream (a CUDA event; the wall clock on the CPU and
    /// in the emulation, whose work is synchronous).
    pub fn mark(&self) -> Result<Mark> {
        Ok(match self {
            Device::Cpu => Mark::Host(std::time::Instant::now()),
            Device::Gpu(g) => Mark::Gpu(g.record()?),
        })
    }

    /// Milliseconds from `a` to `b` (waits for `b`).
    pub fn elapsed_ms(&self, a: &Mark, b: &Mark) -> Result<f64> {
        match (self, a, b) {
            (Device::Cpu, Mark::Host(a), Mark::Host(b)) => Ok(b.duration_since(*a).as_secs_f64() * 1e3),
            (Device::Gpu(g), Mark::Gpu(a), Mark::Gpu(b)) => Ok(g.elapsed_ms(a, b)?),
            _ => Err(invalid!("timing marks from another device")),
        }
    }

    /// Waits for all queued work (a no-op on the CPU).
    pub fn synchronize(&self) -> Result<()> {
        if let Device::Gpu(g) = self {
            g.synchronize()?;
        }
        Ok(())
    }
}

/// A point in time recorded by [`Device::mark`].
pub enum Mark {
    /// The wall-clock time (CPU).
    Host(std::time::Instant),
    /// An event on a kernel device's stream.
    Gpu(crate::gpu::Event),
}

/// A flat buffer of elements on a device.
#[derive(Debug)]
pub enum Buf<T: Elem> {
    /// In host memory, for [`Device::Cpu`].
    Host(Vec<T>),
    /// In a kernel device's memory, for [`Device::Gpu`].
    Gpu(GpuBuf<T>),
}

impl<T: Elem> Buf<T> {
    /// The number of elements.
    pub fn len(&self) -> usize {
        match self {
            Buf::Host(v) => v.len(),
            Buf::Gpu(b) => b.len(),
        }
    }
    /// True if the buffer has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A copy on the host.
    pub fn to_vec(&self) -> Result<Vec<T>> {
        match self {
            Buf::Host(v) => Ok(v.clone()),
            Buf::Gpu(b) => Ok(b.gpu().download(b)?),
        }
    }
    /// The elements on the host: the buffer's own memory on the CPU (no copy), a
    /// download from a kernel device.
    pub fn into_vec(self) -> Result<Vec<T>> {
        match self {
            Buf::Host(v) => Ok(v),
            Buf::Gpu(b) => Ok(b.gpu().download(&b)?),
        }
    }
    /// The elements, if the buffer is in host memory.
    pub fn host(&self) -> Option<&[T]> {
        match self {
            Buf::Host(v) => Some(v),
            Buf::Gpu(_) => None,
        }
    }
    /// The elements, mutably, if the buffer is in host memory.
    pub fn host_mut(&mut self) -> Option<&mut [T]> {
        match self {
            Buf::Host(v) => Some(v),
            Buf::Gpu(_) => None,
        }
    }
    /// The device buffer, if the buffer is on a kernel device.
    pub fn gpu_buf(&self) -> Option<&GpuBuf<T>> {
        match self {
            Buf::Host(_) => None,
            Buf::Gpu(b) => Some(b),
        }
    }
    /// Overwrites the buffer with `data` (of the same length); allocates nothing.
    pub fn write(&mut self, data: &[T]) -> Result<()> {
        if data.len() != self.len() {
            return Err(invalid!("writing {} elements into a buffer of {}", data.len(), self.len()));
        }
        match self {
            Buf::Host(v) => v.copy_from_slice(data),
            Buf::Gpu(b) => b.gpu().clone().write(b, 0, data)?,
        }
        Ok(())
    }

    /// True if the buffer lives on `dev` (the CPU, or that very kernel device).
    pub fn is_on(&self, dev: &Device) -> bool {
        match (self, dev) {
            (Buf::Host(_), Device::Cpu) => true,
            (Buf::Gpu(b), Device::Gpu(g)) => b.same_gpu(g),
            _ => false,
        }
    }
}
