//! The DLPack boundary: a capsule in, a checked `TensorView` out.
//!
//! We only borrow the tensor: the capsule is not renamed to `used_dltensor`, so its owner (the
//! Python object that produced it) keeps the memory alive and runs the deleter. The shim holds
//! the source tensors for the duration of the call.

use crate::error::{ScanError, dtype_err, layout_err};
use std::ffi::{CStr, c_void};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F16,
    BF16,
    F32,
    F64,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F32 => "float32",
            DType::F64 => "float64",
        }
    }
    pub fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
            DType::F64 => 8,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(i32),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// A shape as Python prints a tuple: `(2, 3)`, `(4,)`, `()`.
pub fn shape_str(shape: &[i64]) -> String {
    let s: Vec<String> = shape.iter().map(|x| x.to_string()).collect();
    if s.len() == 1 {
        format!("({},)", s[0])
    } else {
        format!("({})", s.join(", "))
    }
}

/// A borrowed strided tensor. Strides in elements.
#[derive(Clone, Debug)]
pub struct TensorView {
    pub ptr: u64,
    pub dtype: DType,
    pub device: Device,
    pub shape: Vec<i64>,
    pub strides: Vec<i64>,
    pub readonly: bool,
}

impl TensorView {
    pub fn ndim(&self) -> usize {
        self.shape.len()
    }
    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }
    pub fn shape_str(&self) -> String {
        shape_str(&self.shape)
    }
    /// Stride of dimension `i`, or 0 when that dimension has size 1 (its stride is meaningless,
    /// and torch reports arbitrary values there).
    pub fn stride(&self, i: usize) -> i64 {
        if self.shape[i] == 1 {
            0
        } else {
            self.strides[i]
        }
    }
    /// Require stride 1 in the last dimension (ignored when it has size <= 1).
    pub fn require_last_contiguous(&self, arg: &str) -> Result<(), ScanError> {
        let n = self.ndim();
        if self.numel() == 0 {
            return Ok(());
        }
        if n > 0 && self.shape[n - 1] > 1 && self.strides[n - 1] != 1 {
            return Err(layout_err(
                arg,
                format!(
                    "last dimension must have stride 1; got strides {:?}",
                    self.strides
                ),
            ));
        }
        Ok(())
    }
    /// Require a dense row-major layout (size-1 dimensions ignored).
    pub fn require_contiguous(&self, arg: &str) -> Result<(), ScanError> {
        if self.numel() == 0 {
            return Ok(());
        }
        let mut expect = 1i64;
        for i in (0..self.ndim()).rev() {
            if self.shape[i] != 1 && self.strides[i] != expect {
                return Err(layout_err(
                    arg,
                    format!(
                        "must be contiguous; got shape {} with strides {:?}",
                        self.shape_str(),
                        self.strides
                    ),
                ));
            }
            expect *= self.shape[i];
        }
        Ok(())
    }
    pub fn require_writable(&self, arg: &str) -> Result<(), ScanError> {
        if self.readonly {
            return Err(layout_err(arg, "output tensor is read-only"));
        }
        Ok(())
    }
}

// DLPack ABI (dlpack.h v0.8 / v1.x).
#[repr(C)]
#[derive(Clone, Copy)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}
#[repr(C)]
#[derive(Clone, Copy)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}
#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *const i64,
    strides: *const i64,
    byte_offset: u64,
}
#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}
#[repr(C)]
struct DLPackVersion {
    major: u32,
    minor: u32,
}
#[repr(C)]
struct DLManagedTensorVersioned {
    version: DLPackVersion,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    flags: u64,
    dl_tensor: DLTensor,
}

const KDL_CPU: i32 = 1;
const KDL_CUDA: i32 = 2;
const KDL_CUDA_HOST: i32 = 3;
const KDL_CUDA_MANAGED: i32 = 13;
const FLAG_READ_ONLY: u64 = 1;

const NAME_LEGACY: &CStr = c"dltensor";
const NAME_VERSIONED: &CStr = c"dltensor_versioned";

/// A borrowed integer tensor (sequence and row indices of the small CUDA kernels).
#[derive(Clone, Debug)]
pub struct IntView {
    pub ptr: u64,
    /// int64 (else int32).
    pub is64: bool,
    pub device: Device,
    pub shape: Vec<i64>,
    pub strides: Vec<i64>,
}

impl IntView {
    pub fn shape_str(&self) -> String {
        shape_str(&self.shape)
    }
}

struct Raw {
    ptr: u64,
    code: u8,
    bits: u8,
    device: Device,
    shape: Vec<i64>,
    strides: Vec<i64>,
    readonly: bool,
}

/// Decode a DLPack capsule (legacy `dltensor` or versioned `dltensor_versioned`).
///
/// # Safety
/// `capsule` must be a valid, live Python object pointer and the GIL must be held.
pub unsafe fn view_from_capsule(
    capsule: *mut pyo3::ffi::PyObject,
    arg: &str,
) -> Result<TensorView, ScanError> {
    // SAFETY: forwarded.
    let r = unsafe { raw_from_capsule(capsule, arg) }?;
    let dtype = match (r.code, r.bits) {
        (2, 16) => DType::F16,
        (2, 32) => DType::F32,
        (2, 64) => DType::F64,
        (4, 16) => DType::BF16,
        (5, _) => {
            return Err(ScanError::NotImplemented(format!(
                "{arg}: complex tensors are not supported yet (complex A / B / C is planned)"
            )));
        }
        (c, b) => {
            return Err(dtype_err(
                arg,
                format!(
                    "expected float32, float16, bfloat16 or float64; got {}{b}",
                    code_name(c)
                ),
            ));
        }
    };
    Ok(TensorView {
        ptr: r.ptr,
        dtype,
        device: r.device,
        shape: r.shape,
        strides: r.strides,
        readonly: r.readonly,
    })
}

/// Decode a DLPack capsule of an int32 or int64 tensor.
///
/// # Safety
/// As for `view_from_capsule`.
pub unsafe fn int_view_from_capsule(
    capsule: *mut pyo3::ffi::PyObject,
    arg: &str,
) -> Result<IntView, ScanError> {
    // SAFETY: forwarded.
    let r = unsafe { raw_from_capsule(capsule, arg) }?;
    let is64 = match (r.code, r.bits) {
        (0, 32) => false,
        (0, 64) => true,
        (c, b) => {
            return Err(dtype_err(
                arg,
                format!("expected int32 or int64; got {}{b}", code_name(c)),
            ));
        }
    };
    Ok(IntView {
        ptr: r.ptr,
        is64,
        device: r.device,
        shape: r.shape,
        strides: r.strides,
    })
}

fn code_name(c: u8) -> &'static str {
    match c {
        0 => "int",
        1 => "uint",
        2 => "float",
        4 => "bfloat",
        5 => "complex",
        6 => "bool",
        _ => "unknown",
    }
}

/// # Safety
/// As for `view_from_capsule`.
unsafe fn raw_from_capsule(capsule: *mut pyo3::ffi::PyObject, arg: &str) -> Result<Raw, ScanError> {
    use pyo3::ffi;
    // SAFETY: the caller guarantees a live object and the GIL; PyCapsule_IsValid accepts any
    // object and only returns 1 for a capsule with exactly this name and a non-null pointer.
    let (t, readonly) = unsafe {
        if ffi::PyCapsule_IsValid(capsule, NAME_LEGACY.as_ptr()) == 1 {
            let m =
                ffi::PyCapsule_GetPointer(capsule, NAME_LEGACY.as_ptr()) as *const DLManagedTensor;
            (&(*m).dl_tensor, false)
        } else if ffi::PyCapsule_IsValid(capsule, NAME_VERSIONED.as_ptr()) == 1 {
            let m = ffi::PyCapsule_GetPointer(capsule, NAME_VERSIONED.as_ptr())
                as *const DLManagedTensorVersioned;
            if (*m).version.major != 1 {
                return Err(layout_err(
                    arg,
                    format!("unsupported DLPack major version {}", (*m).version.major),
                ));
            }
            (&(*m).dl_tensor, (*m).flags & FLAG_READ_ONLY != 0)
        } else {
            return Err(dtype_err(
                arg,
                "expected a DLPack capsule (a torch.Tensor or numpy array)",
            ));
        }
    };
    let ndim = t.ndim.max(0) as usize;
    // SAFETY: DLPack guarantees `shape` has `ndim` entries, and `strides` either null (dense
    // row-major) or `ndim` entries, valid while the capsule lives.
    let shape: Vec<i64> = if ndim == 0 {
        vec![]
    } else {
        unsafe { std::slice::from_raw_parts(t.shape, ndim) }.to_vec()
    };
    let strides: Vec<i64> = if t.strides.is_null() {
        let mut s = vec![1i64; ndim];
        for i in (0..ndim.saturating_sub(1)).rev() {
            s[i] = s[i + 1] * shape[i + 1];
        }
        s
    } else if ndim == 0 {
        vec![]
    } else {
        // SAFETY: see above.
        unsafe { std::slice::from_raw_parts(t.strides, ndim) }.to_vec()
    };
    if t.dtype.lanes != 1 {
        return Err(dtype_err(
            arg,
            "vector dtypes (lanes != 1) are not supported",
        ));
    }
    let device = match t.device.device_type {
        KDL_CPU | KDL_CUDA_HOST => Device::Cpu,
        KDL_CUDA | KDL_CUDA_MANAGED => Device::Cuda(t.device.device_id),
        other => {
            return Err(crate::error::device_err(
                arg,
                format!("unsupported DLPack device type {other} (expected CPU or CUDA)"),
            ));
        }
    };
    let ptr = (t.data as u64).wrapping_add(t.byte_offset);
    Ok(Raw {
        ptr,
        code: t.dtype.code,
        bits: t.dtype.bits,
        device,
        shape,
        strides,
        readonly,
    })
}
