//! What the small ops' launches share: strided tensor references (any float dtype, read by
//! cuda/strided.cuh), device checks, entry lookup and the launch of a module's kernel with one
//! params struct by value.

use super::compile::Program;
use super::{device_state, driver_err, function, registry};
use crate::dlpack::{Device, IntView, TensorView};
use crate::error::{Result, ScanError, device_err, shape_err};
use crate::params::TensorRef;
use cudarc::driver::{result as drv, sys};
use std::ffi::c_void;

/// Ceiling division of non-negative sizes (i64::div_ceil is unstable).
pub fn cdiv(a: i64, b: i64) -> i64 {
    (a + b - 1) / b
}

pub fn tref(t: &TensorView, arg: &str) -> Result<TensorRef> {
    let mut r = TensorRef {
        ptr: t.ptr,
        dtype: super::in_type(t.dtype, arg)? as i32,
        ndim: t.ndim() as i32,
        stride: [0; 4],
    };
    for i in 0..t.ndim().min(4) {
        r.stride[i] = t.stride(i);
    }
    Ok(r)
}

pub fn opt_ref(t: Option<&TensorView>, arg: &str) -> Result<TensorRef> {
    t.map_or(Ok(TensorRef::default()), |t| tref(t, arg))
}

pub fn int_ref(v: &IntView, arg: &str, want: &[i64], dev: Device) -> Result<TensorRef> {
    if v.device != dev || v.shape != want {
        return Err(shape_err(
            arg,
            format!(
                "must be an int32 / int64 tensor of shape {want:?} on {dev}; got {} on {}",
                v.shape_str(),
                v.device
            ),
        ));
    }
    let mut r = TensorRef {
        ptr: v.ptr,
        dtype: if v.is64 { 5 } else { 4 },
        ndim: v.shape.len() as i32,
        stride: [0; 4],
    };
    for i in 0..v.shape.len().min(4) {
        r.stride[i] = if v.shape[i] == 1 { 0 } else { v.strides[i] };
    }
    Ok(r)
}

pub fn cuda_ordinal(t: &TensorView, arg: &str) -> Result<i32> {
    match t.device {
        Device::Cuda(i) => Ok(i),
        Device::Cpu => Err(device_err(arg, "expected a CUDA tensor")),
    }
}

pub fn i32_of(v: i64, arg: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| shape_err(arg, format!("size {v} exceeds 2^31 - 1")))
}

/// Launch `name` of `prog` (a small op's module) with one params struct by value.
pub fn launch<P>(
    prog: Program,
    ordinal: i32,
    name: &'static str,
    grid: (u32, u32, u32),
    block: u32,
    params: &P,
    stream: u64,
) -> Result<()> {
    if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
        return Ok(());
    }
    let mut map = registry().lock().unwrap_or_else(|e| e.into_inner());
    let st = device_state(&mut map, ordinal)?;
    let f = function(st, prog, name)?;
    // The kernels take the struct by value: the driver wants a pointer to the argument's bytes.
    let mut args = [params as *const P as *mut c_void];
    // SAFETY: `f` belongs to the current context; `params` outlives the call (the driver copies
    // the argument bytes at launch); the stream is the caller's live stream on this device; the
    // pointers inside `params` were checked against their tensors' shapes by the callers.
    unsafe {
        drv::launch_kernel(
            f,
            grid,
            (block, 1, 1),
            0,
            stream as sys::CUstream,
            &mut args,
        )
    }
    .map_err(driver_err(name))
}

/// The entry point `want` of `prog`'s module, by name (a missing one is an error, never another
/// kernel).
pub fn entry(prog: Program, want: &str) -> Result<&'static str> {
    prog.entries()
        .iter()
        .copied()
        .find(|e| *e == want)
        .ok_or_else(|| ScanError::Cuda {
            name: "CUDA_ERROR_NOT_FOUND".into(),
            msg: format!("kernel {want} missing from the {} module", prog.name()),
        })
}
