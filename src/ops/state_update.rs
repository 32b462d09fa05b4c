//! The `selective_state_update` contract (mamba_ssm 2.3.2's Triton op), used by both backends:
//! arguments, checks and shapes. Per (batch, head, channel):
//!   dt = softplus(dt + dt_bias)  (softplus only with dt_softplus; x for x > 20)
//!   h = exp(A dt) h + B dt x;  out = C . h + D x;  out *= silu(z)
//! in fp32 (fp64 when the state is fp64); a negative `state_batch_indices` entry marks a padding
//! row: its state is left untouched and its output is 0. Shapes (the shim adds the heads axis
//! when the caller has none): state (S, H, P, N), x / dt / z / out (Bt, H, P), A (H, P, N),
//! B / C (Bt, G, N) with H % G == 0, D / dt_bias (H, P); any strides. The CPU kernel is in
//! `cpu::state_update`, the CUDA launch in `cuda::state_update` (kernel: cuda/state_update.cu).

use super::args::{check_row_indices, expect_on, on_device};
use crate::dlpack::{Device, IntView, TensorView};
use crate::error::{Result, dtype_err, shape_err};

pub struct UpdateArgs<'a> {
    pub state: &'a TensorView,
    pub x: &'a TensorView,
    pub dt: &'a TensorView,
    pub a: &'a TensorView,
    pub b: &'a TensorView,
    pub c: &'a TensorView,
    pub d: Option<&'a TensorView>,
    pub z: Option<&'a TensorView>,
    pub dt_bias: Option<&'a TensorView>,
    pub out: &'a TensorView,
    /// Host row indices (CPU calls; checked here)...
    pub indices: Option<&'a [i64]>,
    /// ...or a device tensor of them (CUDA calls: checked by the kernel, see cuda/state_update.cu).
    pub device_indices: Option<&'a IntView>,
    pub dt_softplus: bool,
}

/// Validate every argument (shapes, all on `dev`, writable outputs, host indices in range).
pub fn check(a: &UpdateArgs, dev: Device) -> Result<()> {
    let s = a.state;
    if s.ndim() != 4 {
        return Err(shape_err(
            "state",
            format!(
                "must have shape (batch, dim, dstate) or (batch, nheads, dim, dstate); got {}",
                s.shape_str()
            ),
        ));
    }
    let (h, p, n) = (s.shape[1], s.shape[2], s.shape[3]);
    if a.x.ndim() != 3 || a.x.shape[1] != h || a.x.shape[2] != p {
        return Err(shape_err(
            "x",
            format!(
                "must have shape (batch, nheads, dim) = (batch, {h}, {p}); got {}",
                a.x.shape_str()
            ),
        ));
    }
    let bt = a.x.shape[0];
    let row = [bt, h, p];
    expect_on(a.dt, "dt", &row, "(batch, nheads, dim)", dev)?;
    expect_on(a.out, "out", &row, "(batch, nheads, dim)", dev)?;
    if let Some(z) = a.z {
        expect_on(z, "z", &row, "(batch, nheads, dim)", dev)?;
    }
    expect_on(a.a, "A", &[h, p, n], "(nheads, dim, dstate)", dev)?;
    if a.b.ndim() != 3 || a.b.shape[0] != bt || a.b.shape[2] != n {
        return Err(shape_err(
            "B",
            format!(
                "must have shape (batch, ngroups, dstate) = ({bt}, ngroups, {n}); got {}",
                a.b.shape_str()
            ),
        ));
    }
    let g = a.b.shape[1];
    if g == 0 || h % g != 0 {
        return Err(shape_err(
            "B",
            format!("ngroups ({g}) must divide nheads ({h})"),
        ));
    }
    expect_on(a.c, "C", &a.b.shape, "B's shape", dev)?;
    if let Some(d) = a.d {
        expect_on(d, "D", &[h, p], "(nheads, dim)", dev)?;
    }
    if let Some(d) = a.dt_bias {
        expect_on(d, "dt_bias", &[h, p], "(nheads, dim)", dev)?;
    }
    for (t, name) in [
        (Some(a.state), "state"),
        (Some(a.x), "x"),
        (Some(a.dt), "dt"),
        (Some(a.a), "A"),
        (Some(a.b), "B"),
        (Some(a.c), "C"),
        (a.d, "D"),
        (a.z, "z"),
        (a.dt_bias, "dt_bias"),
        (Some(a.out), "out"),
    ] {
        if let Some(t) = t {
            on_device(t, name, dev)?;
        }
    }
    if a.out.dtype != a.x.dtype {
        return Err(dtype_err(
            "out",
            format!(
                "must have x's dtype {}; got {}",
                a.x.dtype.name(),
                a.out.dtype.name()
            ),
        ));
    }
    a.state.require_writable("state")?;
    a.out.require_writable("out")?;
    if let Some(iv) = a.device_indices {
        if iv.device != dev || iv.shape != [bt] {
            return Err(shape_err(
                "state_batch_indices",
                format!(
                    "must be a tensor of shape (batch,) = ({bt},) on {dev}; got {} on {}",
                    iv.shape_str(),
                    iv.device
                ),
            ));
        }
        return Ok(());
    }
    match a.indices {
        Some(ix) => {
            if ix.len() as i64 != bt {
                return Err(shape_err(
                    "state_batch_indices",
                    format!("must have shape (batch,) = ({bt},); got ({},)", ix.len()),
                ));
            }
            check_row_indices(ix, s.shape[0], "state_batch_indices", "state")?;
        }
        None => {
            if s.shape[0] != bt {
                return Err(shape_err(
                    "state",
                    format!(
                        "batch {} must equal x's batch {bt} (or pass state_batch_indices)",
                        s.shape[0]
                    ),
                ));
            }
        }
    }
    Ok(())
}
