//! The fully connected layer (`prunekit::ops::layers::fc_*`) on every device against the
//! f64 oracles of `prunekit::cpu::layers::fc`: the CUDA kernels through the host emulation
//! in forward, reverse and shuffled fiber order (outputs start as poison there, so every
//! element must be written), and the CPU fast path; the oracles' gradients by finite
//! differences; bad inputs. `mod cuda` runs the kernel checks on a real GPU.

use prunekit::cpu::layers::fc as cfc;
use prunekit::gpu::{Gpu, Schedule};
use prunekit::ops::layers;
use prunekit::Device;

mod common;

use common::layers::{all_devices, check, down, fresh, numeric_grad, up};
use common::{d64, SplitMix};

const FC_SHAPES: &[(usize, usize, usize)] =
    &[(1, 1, 1), (2, 3, 5), (3, 70, 13), (65, 130, 67), (4, 33, 129), (1, 515, 37), (64, 517, 1001)];

fn check_fc(dev: &Device) {
    for (si, &(n, cin, cout)) in FC_SHAPES.iter().enumerate() {
        let mut r = SplitMix::for_layers(70 + si as u64);
        let (x, w, b, dy) = (
            r.vec(n * cin, -1.0, 1.0),
            r.vec(cout * cin, -1.0, 1.0),
            r.vec(cout, -1.0, 1.0),
            r.vec(n * cout, -1.0, 1.0),
        );
        let (xb, wb) = (up(dev, x.clone()), up(dev, w.clone()));
        let mut y = fresh::<f32>(dev, n * cout);
        layers::fc_forward(dev, n, cin, cout, &xb, &wb, &up(dev, b.clone()), &mut y).unwrap();
        let want = cfc::fc_forward_oracle(n, cin, cout, &d64(&x), &d64(&w), &d64(&b));
        // f32 sums of cin products of magnitude <= 1.
        let what = |s: &str| format!("fc {s} ({n}x{cin}x{cout})");
        check(&what("forward"), dev, &down(&y), &want, 1e-6 * (cin as f64 + 1.0), 1e-6);
        let (mut dx, mut dw, mut db) = (fresh::<f32>(dev, n * cin), fresh(dev, cout * cin), fresh(dev, cout));
        layers::fc_backward(dev, n, cin, cout, &xb, &wb, &up(dev, dy.clone()), &mut dx, &mut dw, &mut db).unwrap();
        let (wdx, wdw, wdb) = cfc::fc_backward_oracle(n, cin, cout, &d64(&x), &d64(&w), &d64(&dy));
        check(&what("dx"), dev, &down(&dx), &wdx, 1e-6 * cout as f64, 1e-6);
        check(&what("dw"), dev, &down(&dw), &wdw, 1e-6 * n as f64, 1e-6);
        check(&what("db"), dev, &down(&db), &wdb, 1e-6 * n as f64, 1e-6);
    }
}

#[test]
fn fc_matches_oracle_on_every_device() {
    for dev in all_devices() {
        check_fc(&dev);
    }
}

#[test]
fn fc_oracle_gradients_match_finite_differences() {
    let (n, cin, cout) = (3, 4, 5);
    let mut r = SplitMix::for_layers(8);
    let (x, w, b, g) =
        (d64(&r.vec(n * cin, -1.0, 1.0)), d64(&r.vec(cout * cin, -1.0, 1.0)), d64(&r.vec(cout, -1.0, 1.0)), {
            d64(&r.vec(n * cout, -1.0, 1.0))
        });
    let f = |x: &[f64], w: &[f64], b: &[f64]| -> f64 {
        cfc::fc_forward_oracle(n, cin, cout, x, w, b).iter().zip(&g).map(|(a, b)| a * b).sum()
    };
    let (dx, dw, db) = cfc::fc_backward_oracle(n, cin, cout, &x, &w, &g);
    let dev = Device::Cpu;
    check("fd fc dx", &dev, &dx, &numeric_grad(&x, &|x| f(x, &w, &b)), 1e-8, 1e-6);
    check("fd fc dw", &dev, &dw, &numeric_grad(&w, &|w| f(&x, w, &b)), 1e-8, 1e-6);
    check("fd fc db", &dev, &db, &numeric_grad(&b, &|b| f(&x, &w, b)), 1e-8, 1e-6);
}
#[test]
fn bad_inputs_are_errors() {
    let gpu = Gpu::emu_with(Schedule::Forward);
    let emu = Device::Gpu(gpu);
    let other = Device::Gpu(Gpu::emu_with(Schedule::Forward));
    let cpu = Device::Cpu;
    for dev in [&cpu, &emu] {
        let b = |n: usize| fresh::<f32>(dev, n);
        assert!(layers::fc_forward(dev, 2, 3, 4, &b(6), &b(11), &b(4), &mut b(8)).is_err());
        assert!(layers::fc_backward(dev, 2, 3, 4, &b(6), &b(12), &b(8), &mut b(6), &mut b(12), &mut b(3)).is_err());
    }
    // Buffers on the wrong device: host buffers on emu, emu buffers on the CPU, buffers
    // of another emu instance.
    for (dev, wrong) in [(&emu, &cpu), (&cpu, &emu), (&emu, &other)] {
        let ok = |n: usize| up(dev, vec![1.0f32; n]);
        let bad = |n: usize| up(wrong, vec![1.0f32; n]);
        assert!(layers::fc_forward(dev, 1, 2, 2, &ok(2), &bad(4), &ok(2), &mut ok(2)).is_err());
        assert!(layers::fc_backward(dev, 1, 2, 2, &ok(2), &ok(4), &ok(2), &mut ok(2), &mut ok(4), &mut bad(2)).is_err());
    }
}

mod cuda {
    use super::*;

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_fc() {
        check_fc(&common::cuda_device());
    }
}
