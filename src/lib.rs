#![deny(missing_docs)]
//! prunekit: zero-shot structured pruning of ResNet50 with hand-written CUDA kernels
//! that turn removed FLOPs into measured time.
//!
//! Layers, from the bottom: [`gpu`] (the executor: cuda or the host emulation),
//! [`cpu`] (reference implementations: naive oracles and fast paths), [`ops`] (one typed
//! wrapper per kernel family, dispatching between the CPU and a kernel device). Beside
//! them, [`data`] feeds training: image folders and IDX files, augmentation, batches;
//! [`train`] trains and evaluates models on it (`prunekit train`, `prunekit eval`),
//! [`transfer`] runs the paper's experiment on top (`prunekit transfer`), [`measure`]
//! holds the measurements of `prunekit bench` and `prunekit conv-bench`, and [`limits`]
//! checks memory and output paths before a command starts its work.

pub mod cpu;
pub mod data;
pub mod device;
pub mod error;
pub mod gpu;
pub mod limits;
pub mod measure;
pub mod model;
pub mod ops;
pub mod plot;
pub mod prune;
pub mod shape;
pub mod train;
pub mod transfer;
pub mod verify;

pub use device::{Buf, Device};
pub use error::{Error, Result};
