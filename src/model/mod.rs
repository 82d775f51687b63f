//! The bottleneck ResNet: its architecture (read from the weights), safetensors I/O
//! with torchvision's names, torchvision's initialisation, and the training stack
//! (forward, backward, SGD) on a device.

pub mod arch;
pub mod init;
pub mod resnet;
mod runtime;
pub mod state;

pub use arch::{Arch, Block, ConvLayer, Role, TensorSpec};
pub use resnet::{BnConfig, BnFusion, Precision, ResNet, Sgd, Workspace};
pub use runtime::{AnyWorkspace, Model, PrecisionKind};
pub use state::{Data, StateDict, Tensor};
