//! The fully connected layer (kernels/fc.cu): `y = x w^T + b` and its gradients, as
//! tiled f32 GEMMs.

use super::{check_len, dptr, host, host_mut, mul};
use crate::cpu::layers::fc as cpu;
use crate::device::{Buf, Device};
use crate::gpu::{Gpu, Kernel, LaunchConfig};
use crate::ops::params::{FcParams, FC_THREADS, FC_TILE};
use crate::ops::profile::{timed, u, Cost, Family, F32};
use crate::ops::{check_on, i32_of};
use crate::{ensure, Result};

const GEMM: Kernel = Kernel::new("fc", "fc_gemm_f32");
const BIAS_GRAD: Kernel = Kernel::new("fc", "fc_bias_grad_f32");

fn check_shape(n: usize, cin: usize, cout: usize) -> Result<()> {
    for (v, what) in [(n, "n"), (cin, "cin"), (cout, "cout")] {
        i32_of(v, what)?;
    }
    for (a, b, what) in [(n, cin, "x"), (cout, cin, "w"), (n, cout, "y")] {
        ensure!(mul(a, b, what)? <= i32::MAX as usize, "{what} ({a} x {b}) is too large for the FC kernels");
    }
    ensure!(n.div_ceil(FC_TILE) <= 65535 && cout.div_ceil(FC_TILE) <= 65535, "the FC layer is too large");
    Ok(())
}

/// C `[m, n]` = A(i, k) B(k, j) (+ bias) with the strides of `p`.
fn gemm(gpu: &Gpu, p: &FcParams) -> Result<()> {
    if p.m == 0 || p.n == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig {
        grid: ((p.n as usize).div_ceil(FC_TILE) as u32, (p.m as usize).div_ceil(FC_TILE) as u32, 1),
        block: (FC_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the callers checked that A covers every (i < m, k < k) and B every (k, j < n)
    // with these strides, and that C holds m * n elements.
    unsafe { gpu.launch(GEMM, cfg, p)? };
    Ok(())
}

/// `y[n, o] = sum_i x[n, i] * w[o, i] + b[o]`: x `[n, cin]`, w `[cout, cin]`
/// (torchvision's `fc.weight`), b `[cout]`, y `[n, cout]`.
#[allow(clippy::too_many_arguments)]
pub fn fc_forward(
    dev: &Device,
    n: usize,
    cin: usize,
    cout: usize,
    x: &Buf<f32>,
    w: &Buf<f32>,
    b: &Buf<f32>,
    y: &mut Buf<f32>,
) -> Result<()> {
    check_shape(n, cin, cout)?;
    for (buf, len, what) in [(x, n * cin, "x"), (w, cout * cin, "w"), (b, cout, "b"), (&*y, n * cout, "y")] {
        check_len(buf, len, what)?;
        check_on(buf, dev, what)?;
    }
    timed(
        dev,
        Family::Fc,
        || Cost::fc_forward(n, cin, cout),
        || match dev {
            Device::Cpu => {
                cpu::fc_forward(n, cin, cout, host(x, "x")?, host(w, "w")?, host(b, "b")?, host_mut(y, "y")?);
                Ok(())
            }
            Device::Gpu(gpu) => gemm(
                gpu,
                &FcParams {
                    a: dptr(x, gpu, "x")?,
                    b: dptr(w, gpu, "w")?,
                    bias: dptr(b, gpu, "b")?,
                    c: dptr(y, gpu, "y")?,
                    a_si: cin as i64,
                    a_sk: 1,
                    b_sk: 1,
                    b_sj: cin as i64,
                    m: n as i32,
                    n: cout as i32,
                    k: cin as i32,
                    pad0: 0,
                },
            ),
        },
    )
}

/// Gradients of [`fc_forward`]: `dx = dy w` (`[n, cin]`), `dw = dy^T x` (`[cout, cin]`),
/// `db = sum over the batch of dy` (`[cout]`), all overwritten. Four launches on a kernel
/// device (three GEMMs, one column sum).
#[allow(clippy::too_many_arguments)]
pub fn fc_backward(
    dev: &Device,
    n: usize,
    cin: usize,
    cout: usize,
    x: &Buf<f32>,
    w: &Buf<f32>,
    dy: &Buf<f32>,
    dx: &mut Buf<f32>,
    dw: &mut Buf<f32>,
    db: &mut Buf<f32>,
) -> Result<()> {
    check_shape(n, cin, cout)?;
    for (buf, len, what) in [
        (x, n * cin, "x"),
        (w, cout * cin, "w"),
        (dy, n * cout, "dy"),
        (&*dx, n * cin, "dx"),
        (&*dw, cout * cin, "dw"),
        (&*db, cout, "db"),
    ] {
        check_len(buf, len, what)?;
        check_on(buf, dev, what)?;
    }
    timed(
        dev,
        Family::Fc,
        || Cost::fc_backward(n, cin, cout),
        || match dev {
            Device::Cpu => {
                cpu::fc_backward(
                    n,
                    cin,
                    cout,
                    host(x, "x")?,
                    host(w, "w")?,
                    host(dy, "dy")?,
                    host_mut(dx, "dx")?,
                    host_mut(dw, "dw")?,
                    host_mut(db, "db")?,
                );
                Ok(())
            }
            Device::Gpu(gpu) => {
                let (xp, wp, dyp) = (dptr(x, gpu, "x")?, dptr(w, gpu, "w")?, dptr(dy, gpu, "dy")?);
                let (dxp, dwp, dbp) = (dptr(dx, gpu, "dx")?, dptr(dw, gpu, "dw")?, dptr(db, gpu, "db")?);
                let (n32, cin32, cout32) = (n as i32, cin as i32, cout as i32);
                // dx[n, i] = sum_o dy[n, o] w[o, i]
                let p = FcParams {
                    a: dyp,
                    b: wp,
                    bias: 0,
                    c: dxp,
                    a_si: cout as i64,
                    a_sk: 1,
                    b_sk: cin as i64,
                    b_sj: 1,
                    m: n32,
                    n: cin32,
                    k: cout32,
                    pad0: 0,
                };
                gemm(gpu, &p)?;
                // dw[o, i] = sum_n dy[n, o] x[n, i]
                let p = FcParams {
                    a: dyp,
                    b: xp,
                    bias: 0,
                    c: dwp,
                    a_si: 1,
                    a_sk: cout as i64,
                    b_sk: cin as i64,
                    b_sj: 1,
                    m: cout32,
                    n: cin32,
                    k: n32,
                    pad0: 0,
                };
                gemm(gpu, &p)?;
                if cout > 0 {
                    let p = FcParams { a: dyp, c: dbp, m: n32, n: cout32, ..FcParams::default() };
                    // SAFETY: dy holds n * cout elements and db cout.
                    unsafe { gpu.launch(BIAS_GRAD, LaunchConfig::linear(cout.div_ceil(256) as u32, 256), &p)? };
                }
                Ok(())
            }
        },
    )
}

/// The profile's counts of this module's ops (see [`crate::ops::profile`]).
impl Cost {
    /// The fc forward `[n, cin] x [cout, cin]^T + b` (f32): `2 n cin cout` FLOPs (the bias
    /// add is not counted, as in `Arch`); reads x, w and b, writes y.
    pub fn fc_forward(n: usize, cin: usize, cout: usize) -> Cost {
        let (n, cin, cout) = (u(n), u(cin), u(cout));
        Cost { flops: 2 * n * cin * cout, bytes: (n * cin + cout * cin + cout + n * cout) * F32 }
    }

    /// The fc backward: dx and dw are two GEMMs, `4 n cin cout` FLOPs (the bias gradient is
    /// not counted); reads x, w and dy, writes dx, dw and db.
    pub fn fc_backward(n: usize, cin: usize, cout: usize) -> Cost {
        let (n, cin, cout) = (u(n), u(cin), u(cout));
        Cost { flops: 4 * n * cin * cout, bytes: (2 * n * cin + 2 * cout * cin + n * cout + cout) * F32 }
    }
}
