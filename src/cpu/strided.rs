//! Helpers of the small strided CPU kernels (state update, causal conv1d): CPU-side argument
//! checks and element access through a view's own strides.

use super::{Real, addr};
use crate::dlpack::{Device, TensorView};
use crate::error::Result;
use crate::ops::args::{expect_on, on_device};

pub fn on_cpu(t: &TensorView, arg: &str) -> Result<()> {
    on_device(t, arg, Device::Cpu)
}

/// `t` is a CPU tensor of exactly shape `want` (described as `what` in the error).
pub fn expect(t: &TensorView, arg: &str, want: &[i64], what: &str) -> Result<()> {
    expect_on(t, arg, want, what, Device::Cpu)
}

/// Element at offset `off` (in elements) of `t`, converted.
///
/// # Safety
/// `off` must be in bounds of the live CPU tensor `t`.
#[inline(always)]
pub unsafe fn ld<R: Real>(t: &TensorView, off: i64) -> R {
    let mut v = [R::ZERO];
    // SAFETY: per the contract above.
    unsafe { R::load(t.dtype, addr(t.ptr, off, t.dtype), &mut v) };
    v[0]
}

/// Store `v` at offset `off` of `t`, converted.
///
/// # Safety
/// As for `ld`, on a writable tensor that no other thread writes at `off`.
#[inline(always)]
pub unsafe fn st<R: Real>(t: &TensorView, off: i64, v: R) {
    // SAFETY: per the contract above.
    unsafe { R::store(t.dtype, addr(t.ptr, off, t.dtype), &[v]) };
}
