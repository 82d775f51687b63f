//! Zero-shot structured pruning by weight magnitude (DESIGN.md, "The method").
//!
//! [`Plan::new`] turns an architecture and a [`PruneConfig`] into channel groups and the
//! widths that survive; [`prune_state`] scores the dense weights, selects the kept
//! channels and compacts every tensor on a device, with the kernels of
//! `kernels/prune.cu` (a handful of launches for the whole network) or on the CPU.

mod pipeline;
mod plan;
mod sparsity;

pub use crate::cpu::prune::Norm;
pub use pipeline::{prune_owned_state, prune_state, prune_state_with, DeviceState, Pruned};
pub use plan::{GroupPlan, Mode, Plan, PruneConfig};
pub use sparsity::{kept_width, Sparsity};
