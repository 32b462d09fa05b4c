//! The causal conv1d contract (causal-conv1d 1.7 semantics), used by both backends: the
//! arguments of the forward, backward and decoding update, their checks and shapes. For channel
//! c and step t, with xp = [initial_states, x] (W - 1 + L inputs) and taps k = 0..W:
//!   pre[t] = bias + sum_k w[k] xp[t + k],  out = pre or silu(pre).
//! With `seq_idx`, tap k reads x[t - (W - 1 - k)] only when that step has the same sequence
//! index as t (packed sequences stay apart); a step with a negative index is padding: its output
//! is 0 (no bias) and no gradient flows from it. The CPU kernels are in `cpu::conv1d`, the CUDA
//! launches in `cuda::conv1d` (kernels: cuda/conv1d.cu).

use super::args::{expect_on, on_device, same_dtype};
use crate::dlpack::{Device, TensorView};
use crate::error::{Result, shape_err};

pub struct ConvArgs<'a> {
    pub x: &'a TensorView,
    pub weight: &'a TensorView,
    pub bias: Option<&'a TensorView>,
    /// (batch * seqlen) sequence indices, row-major.
    pub seq_idx: Option<&'a [i64]>,
    pub initial_states: Option<&'a TensorView>,
    pub silu: bool,
}

/// (batch, dim, seqlen, width) after checking the inputs (all on `dev`).
pub fn check(a: &ConvArgs, dev: Device) -> Result<(i64, i64, i64, i64)> {
    on_device(a.x, "x", dev)?;
    if a.x.ndim() != 3 {
        return Err(shape_err(
            "x",
            format!(
                "must have shape (batch, dim, seqlen); got {}",
                a.x.shape_str()
            ),
        ));
    }
    let (b, d, l) = (a.x.shape[0], a.x.shape[1], a.x.shape[2]);
    if a.weight.ndim() != 2 || a.weight.shape[0] != d || a.weight.shape[1] < 1 {
        return Err(shape_err(
            "weight",
            format!(
                "must have shape (dim, width) = ({d}, width); got {}",
                a.weight.shape_str()
            ),
        ));
    }
    on_device(a.weight, "weight", dev)?;
    let w = a.weight.shape[1];
    if let Some(bias) = a.bias {
        expect_on(bias, "bias", &[d], "(dim,)", dev)?;
    }
    if let Some(h0) = a.initial_states {
        expect_on(
            h0,
            "initial_states",
            &[b, d, w - 1],
            "(batch, dim, width - 1)",
            dev,
        )?;
    }
    if let Some(s) = a.seq_idx {
        if s.len() as i64 != b * l {
            return Err(shape_err(
                "seq_idx",
                format!(
                    "must have shape (batch, seqlen) = ({b}, {l}); got {} entries",
                    s.len()
                ),
            ));
        }
    }
    Ok((b, d, l, w))
}

/// The forward's inputs and outputs, all on `dev`: (batch, dim, seqlen, width).
pub fn check_forward(
    a: &ConvArgs,
    out: &TensorView,
    final_states: Option<&TensorView>,
    dev: Device,
) -> Result<(i64, i64, i64, i64)> {
    let (b, d, l, w) = check(a, dev)?;
    expect_on(out, "out", &[b, d, l], "(batch, dim, seqlen)", dev)?;
    same_dtype(out, a.x, "out")?;
    out.require_writable("out")?;
    if let Some(f) = final_states {
        expect_on(
            f,
            "final_states_out",
            &[b, d, w - 1],
            "(batch, dim, width - 1)",
            dev,
        )?;
        f.require_writable("final_states_out")?;
    }
    Ok((b, d, l, w))
}

/// Gradient outputs of the backward (fresh tensors; dbias / dinitial only when needed).
pub struct ConvGrads<'a> {
    pub dout: &'a TensorView,
    pub dfinal: Option<&'a TensorView>,
    pub dx: &'a TensorView,
    pub dweight: &'a TensorView,
    pub dbias: Option<&'a TensorView>,
    pub dinitial: Option<&'a TensorView>,
}

/// The backward's inputs and gradients, all on `dev`: (batch, dim, seqlen, width).
pub fn check_backward(a: &ConvArgs, g: &ConvGrads, dev: Device) -> Result<(i64, i64, i64, i64)> {
    let (b, d, l, w) = check(a, dev)?;
    expect_on(g.dout, "dout", &[b, d, l], "(batch, dim, seqlen)", dev)?;
    expect_on(g.dx, "dx", &[b, d, l], "(batch, dim, seqlen)", dev)?;
    expect_on(g.dweight, "dweight", &[d, w], "(dim, width)", dev)?;
    if let Some(t) = g.dbias {
        expect_on(t, "dbias", &[d], "(dim,)", dev)?;
    }
    for (t, n) in [(g.dfinal, "dfinal_states"), (g.dinitial, "dinitial_states")] {
        if let Some(t) = t {
            expect_on(t, n, &[b, d, w - 1], "(batch, dim, width - 1)", dev)?;
        }
    }
    for (t, n) in [
        (Some(g.dx), "dx"),
        (Some(g.dweight), "dweight"),
        (g.dbias, "dbias"),
        (g.dinitial, "dinitial_states"),
    ] {
        if let Some(t) = t {
            t.require_writable(n)?;
        }
    }
    Ok((b, d, l, w))
}

/// The update's tensors, all on `dev`, and the lengths of cache_seqlens and
/// conv_state_indices when given: (batch, dim, seqlen, width). Without indices the state has
/// x's batch.
pub fn check_update(
    x: &TensorView,
    state: &TensorView,
    weight: &TensorView,
    bias: Option<&TensorView>,
    out: &TensorView,
    dev: Device,
    lens: [Option<i64>; 2],
) -> Result<(i64, i64, i64, i64)> {
    for (t, n) in [
        (x, "x"),
        (state, "conv_state"),
        (weight, "weight"),
        (out, "out"),
    ] {
        on_device(t, n, dev)?;
    }
    if x.ndim() != 3 {
        return Err(shape_err(
            "x",
            format!(
                "must have shape (batch, dim, seqlen); got {}",
                x.shape_str()
            ),
        ));
    }
    let (b, d, l) = (x.shape[0], x.shape[1], x.shape[2]);
    if weight.ndim() != 2 || weight.shape[0] != d {
        return Err(shape_err(
            "weight",
            format!(
                "must have shape (dim, width) = ({d}, width); got {}",
                weight.shape_str()
            ),
        ));
    }
    let w = weight.shape[1];
    if state.ndim() != 3 || state.shape[1] != d || state.shape[2] < w - 1 {
        return Err(shape_err(
            "conv_state",
            format!(
                "must have shape (batch, dim, state_len >= width - 1) = (batch, {d}, >= {}); got {}",
                w - 1,
                state.shape_str()
            ),
        ));
    }
    if let Some(t) = bias {
        expect_on(t, "bias", &[d], "(dim,)", dev)?;
    }
    expect_on(out, "out", &[b, d, l], "(batch, dim, seqlen)", dev)?;
    state.require_writable("conv_state")?;
    out.require_writable("out")?;
    for (v, n) in [lens[0], lens[1]]
        .into_iter()
        .zip(["cache_seqlens", "conv_state_indices"])
    {
        if let Some(v) = v {
            if v != b {
                return Err(shape_err(
                    n,
                    format!("must have shape (batch,) = ({b},); got ({v},)"),
                ));
            }
        }
    }
    if lens[1].is_none() && state.shape[0] != b {
        return Err(shape_err(
            "conv_state",
            format!(
                "batch {} must equal x's batch {b} (or pass conv_state_indices)",
                state.shape[0]
            ),
        ));
    }
    Ok((b, d, l, w))
}
