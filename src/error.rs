//! One error type for the whole crate. The CPU and CUDA code return `ScanError`; the binding maps
//! each variant onto its own Python exception class (see `lib.rs`), so a caller can catch shape
//! problems as `ValueError`, dtype problems as `TypeError` and driver failures as `RuntimeError`.

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum ScanError {
    /// A tensor has the wrong rank or size. `arg` names the argument.
    Shape { arg: String, msg: String },
    /// A tensor has the wrong dtype.
    DType { arg: String, msg: String },
    /// Tensors on different devices, or on a device this build cannot use.
    Device { arg: String, msg: String },
    /// Strides the kernels cannot address (last dimension not contiguous, read-only output...).
    Layout { arg: String, msg: String },
    /// A valid input that this version does not support yet (complex A).
    NotImplemented(String),
    /// A CUDA driver call failed: the driver's error name and what we were doing.
    Cuda { name: String, msg: String },
    /// NVRTC failed to compile a kernel: the compile log.
    Compile { msg: String, log: String },
    /// libcuda / libnvrtc could not be found or loaded.
    Library(String),
}

impl fmt::Display for ScanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScanError::Shape { arg, msg }
            | ScanError::DType { arg, msg }
            | ScanError::Device { arg, msg }
            | ScanError::Layout { arg, msg } => write!(f, "{arg}: {msg}"),
            ScanError::NotImplemented(m) => write!(f, "{m}"),
            ScanError::Cuda { name, msg } => write!(f, "CUDA error {name}: {msg}"),
            ScanError::Compile { msg, log } => write!(f, "NVRTC compile failed: {msg}\n{log}"),
            ScanError::Library(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for ScanError {}

pub type Result<T> = std::result::Result<T, ScanError>;

pub fn shape_err(arg: &str, msg: impl Into<String>) -> ScanError {
    ScanError::Shape {
        arg: arg.to_string(),
        msg: msg.into(),
    }
}
pub fn dtype_err(arg: &str, msg: impl Into<String>) -> ScanError {
    ScanError::DType {
        arg: arg.to_string(),
        msg: msg.into(),
    }
}
pub fn device_err(arg: &str, msg: impl Into<String>) -> ScanError {
    ScanError::Device {
        arg: arg.to_string(),
        msg: msg.into(),
    }
}
pub fn layout_err(arg: &str, msg: impl Into<String>) -> ScanError {
    ScanError::Layout {
        arg: arg.to_string(),
        msg: msg.into(),
    }
}
