//! torchvision's initialisation of a ResNet: conv weights kaiming-normal (fan_out, ReLU
//! gain: std = sqrt(2 / (out_channels * kh * kw))), BN weight 1 and bias 0, running mean 0
//! and variance 1, the classifier as PyTorch's Linear (uniform in +-1/sqrt(fan_in) for
//! weight and bias). Seeded and reproducible; tensors are filled in parallel.

use super::arch::{Arch, Role};
use super::state::{StateDict, Tensor};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Normal, Uniform};
use rayon::prelude::*;

/// A fresh model of architecture `arch`, as torchvision would make it.
pub fn torchvision_init(arch: &Arch, seed: u64) -> StateDict {
    let specs = arch.tensor_specs();
    let fc_in = arch.fc_in() as f32;
    let tensors: Vec<(String, Tensor)> = specs
        .par_iter()
        .enumerate()
        .map(|(i, s)| {
            let n: usize = s.shape.iter().product();
            let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(i as u64));
            let data: Vec<f32> = match s.role {
                Role::ConvWeight => {
                    let fan_out = (s.shape[0] * s.shape[2] * s.shape[3]) as f32;
                    let d = Normal::new(0.0f32, (2.0 / fan_out).sqrt()).expect("finite std");
                    (0..n).map(|_| d.sample(&mut rng)).collect()
                }
                Role::BnWeight | Role::BnRunningVar => vec![1.0; n],
                Role::BnBias | Role::BnRunningMean => vec![0.0; n],
                Role::FcWeight | Role::FcBias => {
                    let b = 1.0 / fc_in.sqrt();
                    let d = Uniform::new(-b, b).expect("non-empty range");
                    (0..n).map(|_| rng.sample(d)).collect()
                }
            };
            (s.name.clone(), Tensor::f32(s.shape.clone(), data))
        })
        .collect();
    StateDict { tensors: tensors.into_iter().collect(), metadata: Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_and_shapes() {
        let arch = Arch::bottleneck([1, 1, 1, 1], 10);
        let sd = torchvision_init(&arch, 1);
        assert_eq!(Arch::from_state(&sd).unwrap(), arch);
        let w = sd.tensors["layer3.0.conv2.weight"].as_f32().unwrap();
        let var = w.iter().map(|x| (x * x) as f64).sum::<f64>() / w.len() as f64;
        let want = 2.0 / (256.0 * 9.0);
        assert!((var / want - 1.0).abs() < 0.05, "{var} vs {want}");
        assert!(sd.tensors["fc.weight"].as_f32().unwrap().iter().all(|x| x.abs() <= 1.0 / (2048f32).sqrt()));
        assert_eq!(torchvision_init(&arch, 1), sd, "seeded");
        assert_ne!(torchvision_init(&arch, 2), sd);
    }
}
