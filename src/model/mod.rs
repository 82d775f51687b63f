//! The bottleneck ResNet: its architecture (read from the weights), safetensors I/O
//! with torchvision's names.

pub mod arch;
pub mod init;
pub mod state;

pub use arch::{Arch, Block, ConvLayer, Role, TensorSpec};
pub use state::{Data, StateDict, Tensor};
