//! Picking the compute device at run time; which ones exist depends on the build's features.

use anyhow::{Result, bail};
use burn::tensor::Device;
use clap::ValueEnum;

/// The devices a user can ask for with `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// The CPU, through burn's Flex backend (always compiled in by default).
    Cpu,
    /// A GPU through wgpu (build with `--features wgpu`).
    Wgpu,
    /// An NVIDIA GPU through CUDA (build with `--features cuda`; see the README).
    Cuda,
}

impl DeviceChoice {
    /// The burn device, or an error saying which cargo feature is missing.
    pub fn device(self) -> Result<Device> {
        match self {
            #[cfg(feature = "flex")]
            Self::Cpu => Ok(Device::flex()),
            #[cfg(feature = "wgpu")]
            Self::Wgpu => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
            #[cfg(feature = "cuda")]
            Self::Cuda => Ok(Device::cuda(0)),
            #[allow(unreachable_patterns)] // reachable exactly when a feature is off
            other => bail!(
                "device `{other:?}` is not compiled into this binary; rebuild with \
                 `--features {}`",
                match other {
                    Self::Cpu => "flex",
                    Self::Wgpu => "wgpu",
                    Self::Cuda => "cuda",
                }
            ),
        }
    }
}
