//! Launches of the causal conv1d kernels (cuda/conv1d.cu): forward, backward and the decoding
//! update. The contract is `ops::conv1d`'s, run for the tensors' CUDA device; index tensors stay
//! on the device (no host synchronisation).

use super::compile::Program;
use super::strided::{cdiv, cuda_ordinal, entry, i32_of, int_ref, launch, opt_ref, tref};
use crate::dlpack::{DType, IntView, TensorView};
use crate::error::{Result, ScanError, shape_err};
use crate::ops::conv1d::{ConvArgs, ConvGrads, check_backward, check_forward, check_update};
use crate::params::{ConvParams, TensorRef};

const CONV_THREADS: i64 = 256;
/// Steps per thread (kSeg in conv1d.cu).
const CONV_STEPS: i64 = 8;
/// Steps per lane of the fast kernels (`kSegF`): a warp covers 32 x this many steps.
const CONV_FAST_STEPS: i64 = 16;

/// The fast kernels' layout condition for a (batch, dim, seqlen) tensor: steps contiguous and
/// every row starting 16-byte aligned (the kernels then load and store whole 16-byte words).
fn rows_aligned(t: &TensorView) -> bool {
    let v = if t.dtype == DType::F32 { 4 } else { 8 };
    t.stride(2) == 1 && t.ptr % 16 == 0 && t.stride(0) % v == 0 && t.stride(1) % v == 0
}

/// Switches `p` to the fast kernels (tiles of 32 x CONV_FAST_STEPS steps) when none of the
/// options they leave out is set and every (batch, dim, seqlen) tensor is `rows_aligned`.
fn use_fast(p: &mut ConvParams, tensors: &[&TensorView], plain: bool) -> bool {
    let fast = plain && p.l_fast != 0 && tensors.iter().all(|t| rows_aligned(t));
    if fast {
        p.n_ltiles = cdiv(p.seqlen as i64, 32 * CONV_FAST_STEPS).max(1) as i32;
    }
    fast
}

fn conv_width(w: i64) -> Result<i32> {
    if (2..=4).contains(&w) {
        Ok(w as i32)
    } else {
        Err(ScanError::NotImplemented(format!(
            "weight: width {w} is not supported by the CUDA kernels (2 to 4; the shim runs the \
             PyTorch reference for others)"
        )))
    }
}

/// Steps per backward tile along seqlen for x's layout.
fn conv_tile_steps(x: &TensorView) -> i64 {
    if l_fast(x) {
        32 * CONV_STEPS
    } else {
        (CONV_THREADS / 32) * CONV_STEPS
    }
}

fn l_fast(x: &TensorView) -> bool {
    x.stride(2) == 1 || x.stride(1) != 1
}

/// fp32 elements of the backward's workspace.
pub fn conv_bwd_workspace_elems(x: &TensorView, width: i64) -> i64 {
    let (b, d, l) = (x.shape[0], x.shape[1], x.shape[2]);
    b * cdiv(l, conv_tile_steps(x)).max(1) * d * (width + 1)
}

fn conv_params(a: &ConvArgs, seq: Option<&IntView>) -> Result<ConvParams> {
    let (b, d, l) = (a.x.shape[0], a.x.shape[1], a.x.shape[2]);
    let w = a.weight.shape[1];
    if b > 65535 {
        return Err(shape_err("x", format!("batch {b} exceeds 65535")));
    }
    i32_of(d * l, "x")?;
    let mut seq_idx = TensorRef::default();
    if let Some(s) = seq {
        seq_idx = int_ref(s, "seq_idx", &[b, l], a.x.device)?;
    }
    Ok(ConvParams {
        batch: b as i32,
        dim: d as i32,
        seqlen: l as i32,
        width: conv_width(w)?,
        silu: a.silu as i32,
        l_fast: l_fast(a.x) as i32,
        n_ltiles: cdiv(l, conv_tile_steps(a.x)).max(1) as i32,
        x: tref(a.x, "x")?,
        weight: tref(a.weight, "weight")?,
        bias: opt_ref(a.bias, "bias")?,
        seq_idx,
        initial: opt_ref(a.initial_states, "initial_states")?,
        ..Default::default()
    })
}

/// Blocks per batch entry: tiles of 8 channels x 256 steps (channel-first x) or 32 x 64.
fn conv_blocks(p: &ConvParams) -> Result<u32> {
    let td = if p.l_fast != 0 { 8 } else { 32 };
    Ok(i32_of(cdiv(p.dim as i64, td) * p.n_ltiles as i64, "x")? as u32)
}

/// The entry point `conv_{kind}_t{dtype}_w{width}` of the conv1d module, by name (a
/// missing one is an error, never another kernel).
fn conv_entry(kind: &str, p: &ConvParams) -> Result<&'static str> {
    let want = format!("conv_{kind}_t{}_w{}", p.x.dtype, p.width);
    entry(Program::Conv1d, &want)
}

/// Causal conv1d forward on CUDA.
pub fn conv_forward(
    a: &ConvArgs,
    seq: Option<&IntView>,
    out: &TensorView,
    final_states: Option<&TensorView>,
    stream: u64,
) -> Result<()> {
    let ordinal = cuda_ordinal(a.x, "x")?;
    check_forward(a, out, final_states, a.x.device)?;
    let mut p = conv_params(a, seq)?;
    p.out = tref(out, "out")?;
    p.final_states = opt_ref(final_states, "final_states_out")?;
    let plain = seq.is_none() && a.initial_states.is_none() && final_states.is_none();
    let kind = if use_fast(&mut p, &[a.x, out], plain) {
        "fwdf"
    } else {
        "fwd"
    };
    launch_tiles(kind, &p, ordinal, stream)
}

/// The forward or backward kernel `kind` over (channel tiles x length tiles, batch).
fn launch_tiles(kind: &str, p: &ConvParams, ordinal: i32, stream: u64) -> Result<()> {
    launch(
        Program::Conv1d,
        ordinal,
        conv_entry(kind, p)?,
        (conv_blocks(p)?, p.batch as u32, 1),
        CONV_THREADS as u32,
        p,
        stream,
    )
}

/// Causal conv1d backward on CUDA: `workspace` holds `conv_bwd_workspace_elems` fp32 values.
pub fn conv_backward(
    a: &ConvArgs,
    seq: Option<&IntView>,
    g: &ConvGrads,
    workspace: &TensorView,
    stream: u64,
) -> Result<()> {
    let ordinal = cuda_ordinal(a.x, "x")?;
    check_backward(a, g, a.x.device)?;
    let mut p = conv_params(a, seq)?;
    let need = conv_bwd_workspace_elems(a.x, a.weight.shape[1]);
    if workspace.dtype != DType::F32
        || workspace.device != a.x.device
        || workspace.numel() < need
        || workspace.ndim() != 1
        || workspace.stride(0) > 1
    {
        return Err(shape_err(
            "workspace",
            format!("must be a contiguous float32 tensor of >= {need} elements on x's device"),
        ));
    }
    workspace.require_writable("workspace")?;
    if p.dim == 0 {
        return Ok(());
    }
    p.dout = tref(g.dout, "dout")?;
    p.dfinal = opt_ref(g.dfinal, "dfinal_states")?;
    p.dx = tref(g.dx, "dx")?;
    p.dweight = tref(g.dweight, "dweight")?;
    p.dbias = opt_ref(g.dbias, "dbias")?;
    p.dinitial = opt_ref(g.dinitial, "dinitial_states")?;
    p.workspace_ptr = workspace.ptr;
    let plain =
        seq.is_none() && a.initial_states.is_none() && g.dfinal.is_none() && g.dinitial.is_none();
    // The fast tiles are longer, so the workspace sized for the general kernel holds them.
    let kind = if use_fast(&mut p, &[a.x, g.dout, g.dx], plain) {
        "bwdf"
    } else {
        "bwd"
    };
    // With batch 0 only the reduce runs: it writes the zero weight and bias gradients.
    if p.batch > 0 {
        launch_tiles(kind, &p, ordinal, stream)?;
    }
    let total = p.dim as i64 * (p.width as i64 + 1);
    launch(
        Program::Conv1d,
        ordinal,
        "conv_bwd_reduce",
        (cdiv(total, 256) as u32, 1, 1),
        256,
        &p,
        stream,
    )
}

/// Decoding update of the causal convolution on CUDA.
#[allow(clippy::too_many_arguments)]
pub fn conv_update(
    x: &TensorView,
    state: &TensorView,
    weight: &TensorView,
    bias: Option<&TensorView>,
    silu: bool,
    cache_seqlens: Option<&IntView>,
    indices: Option<&IntView>,
    out: &TensorView,
    stream: u64,
) -> Result<()> {
    let ordinal = cuda_ordinal(x, "x")?;
    let dev = x.device;
    let lens = [
        cache_seqlens.map(|v| v.shape.iter().product::<i64>()),
        indices.map(|v| v.shape.iter().product::<i64>()),
    ];
    let (b, d, l, w) = check_update(x, state, weight, bias, out, dev, lens)?;
    if state.shape[2] == 0 {
        return Err(shape_err("conv_state", "state_len must be >= 1 on CUDA"));
    }
    let mut p = ConvParams {
        batch: i32_of(b, "x")?,
        dim: i32_of(d, "x")?,
        seqlen: i32_of(l, "x")?,
        width: i32_of(w, "weight")?,
        silu: silu as i32,
        state_len: i32_of(state.shape[2], "conv_state")?,
        state_rows: i32_of(state.shape[0], "conv_state")?,
        x: tref(x, "x")?,
        weight: tref(weight, "weight")?,
        bias: opt_ref(bias, "bias")?,
        out: tref(out, "out")?,
        conv_state: tref(state, "conv_state")?,
        ..Default::default()
    };
    if let Some(v) = cache_seqlens {
        p.cache_seqlens = int_ref(v, "cache_seqlens", &[b], dev)?;
    }
    if let Some(v) = indices {
        p.state_idx = int_ref(v, "conv_state_indices", &[b], dev)?;
    }
    if b > 65535 {
        return Err(shape_err("x", format!("batch {b} exceeds 65535")));
    }
    launch(
        Program::Conv1d,
        ordinal,
        "conv_update",
        (cdiv(d, 128) as u32, b as u32, 1),
        128,
        &p,
        stream,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every (direction, dtype, width) the launcher can ask for names a compiled entry, and
    /// each entry of the two small modules is defined in its source.
    #[test]
    fn conv_entries_resolve_by_name() {
        for kind in ["fwd", "bwd"] {
            for dtype in 0..3 {
                for width in 2..=4 {
                    let p = ConvParams {
                        width,
                        x: TensorRef {
                            dtype,
                            ..Default::default()
                        },
                        ..Default::default()
                    };
                    let e = conv_entry(kind, &p).unwrap();
                    assert_eq!(e, format!("conv_{kind}_t{dtype}_w{width}"));
                }
            }
        }
        let conv = include_str!("../../cuda/conv1d.cu");
        for e in super::super::compile::CONV1D_ENTRIES {
            let parts: Vec<&str> = e.split('_').collect();
            let defined = conv.contains(&format!("void {e}("))
                || (parts.len() == 4 && {
                    // CONV_ENTRIES(T, W) defines conv_{fwd,bwd}_t{T}_w{W}.
                    let (t, w) = (&parts[2][1..], &parts[3][1..]);
                    conv.contains(&format!("CONV_ENTRIES({t}, {w})"))
                });
            assert!(defined, "{e} is not defined in conv1d.cu");
        }
        let su = include_str!("../../cuda/state_update.cu");
        for e in super::super::compile::STATE_UPDATE_ENTRIES {
            let st = e
                .strip_prefix("state_update_s")
                .and_then(|r| r.split('_').next());
            assert!(
                st.is_some_and(|st| su.contains(&format!("SU_ENTRIES({st})"))),
                "{e} is not defined in state_update.cu"
            );
        }
    }
}
