//! Helpers of the small strided CPU kernels (state update, causal conv1d): argument checks on
//! decoded views, element access through a view's own strides, row-index validation.

use super::{Real, addr};
use crate::dlpack::{Device, TensorView};
use crate::error::{Result, device_err, shape_err};

pub fn on_cpu(t: &TensorView, arg: &str) -> Result<()> {
    on_device(t, arg, Device::Cpu)
}

/// `t` lives on `dev` (the device of the call's first tensor).
pub fn on_device(t: &TensorView, arg: &str, dev: Device) -> Result<()> {
    if t.device != dev {
        return Err(device_err(
            arg,
            format!(
                "expected a tensor on {dev} like the others; got {}",
                t.device
            ),
        ));
    }
    Ok(())
}

/// `t` is a CPU tensor of exactly shape `want` (described as `what` in the error).
pub fn expect(t: &TensorView, arg: &str, want: &[i64], what: &str) -> Result<()> {
    expect_on(t, arg, want, what, Device::Cpu)
}

/// `t` is a tensor on `dev` of exactly shape `want`.
pub fn expect_on(t: &TensorView, arg: &str, want: &[i64], what: &str, dev: Device) -> Result<()> {
    on_device(t, arg, dev)?;
    if t.shape != want {
        return Err(shape_err(
            arg,
            format!("must have shape {what} = {want:?}; got {}", t.shape_str()),
        ));
    }
    Ok(())
}

/// Row indices into a state of `rows` rows: each below `rows`, and no row named twice (two
/// batch entries updating one state row would race). Negative entries mark padding.
pub fn check_row_indices(ix: &[i64], rows: i64, arg: &str, state: &str) -> Result<()> {
    if let Some(bad) = ix.iter().find(|&&i| i >= rows) {
        return Err(shape_err(
            arg,
            format!("entry {bad} is out of range for a {state} of batch {rows}"),
        ));
    }
    let mut used: Vec<i64> = ix.iter().copied().filter(|&i| i >= 0).collect();
    used.sort_unstable();
    if let Some(p) = used.windows(2).find(|p| p[0] == p[1]) {
        return Err(shape_err(
            arg,
            format!(
                "entry {} appears twice: two rows would update one state",
                p[0]
            ),
        ));
    }
    Ok(())
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
