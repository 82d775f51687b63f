//! Reference implementations in Rust. Each op has a naive oracle (obviously correct,
//! used by the tests on small shapes) and a fast path (what the CPU device runs).

pub mod conv;
mod gemm;
pub mod layers;
pub mod prune;
