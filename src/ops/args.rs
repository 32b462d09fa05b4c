//! Argument checks every op's contract uses, on decoded views: device, exact shape, dtype, row
//! indices into a state.

use crate::dlpack::{Device, TensorView};
use crate::error::{Result, device_err, dtype_err, shape_err};

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

pub fn same_dtype(t: &TensorView, like: &TensorView, arg: &str) -> Result<()> {
    if t.dtype != like.dtype {
        return Err(dtype_err(
            arg,
            format!(
                "must have dtype {}; got {}",
                like.dtype.name(),
                t.dtype.name()
            ),
        ));
    }
    Ok(())
}
