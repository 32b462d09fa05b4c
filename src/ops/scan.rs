//! Validation of every argument of a scan call, and the translation of the checked views into the
//! flat `SsmParams`. Plain Rust: the binding passes views in, the kernels get params out.

use crate::dlpack::{DType, Device, IntView, TensorView};
use crate::error::{Result, device_err, dtype_err, shape_err};
use crate::params::SsmParams;

/// Tensors of a forward call.
pub struct FwdArgs<'a> {
    pub u: &'a TensorView,
    pub delta: &'a TensorView,
    pub a: &'a TensorView,
    pub b: &'a TensorView,
    pub c: &'a TensorView,
    pub d: Option<&'a TensorView>,
    pub z: Option<&'a TensorView>,
    pub delta_bias: Option<&'a TensorView>,
    pub initial_state: Option<&'a TensorView>,
    pub delta_softplus: bool,
    pub chunk_size: i32,
    /// Packed sequences: (batch, seqlen) int32; the state restarts where the value changes along
    /// a row. `initial_state` (and the final states, their gradients) are then per sequence,
    /// (num_seqs, dim, dstate), row s for the steps whose seq_idx is s; negative values mark
    /// padding (no state read or written).
    pub seq_idx: Option<&'a IntView>,
    /// Rows of the per-sequence state tensors (-1: none given).
    pub num_seqs: i64,
}

/// Outputs of a forward call.
pub struct FwdOut<'a> {
    pub out: &'a TensorView,
    pub states: &'a TensorView,
    /// With seq_idx: the state after each sequence's last step, (num_seqs, dim, dstate).
    pub final_states: Option<&'a TensorView>,
}

/// Incoming gradients and gradient outputs of a backward call.
pub struct BwdArgs<'a> {
    pub states: &'a TensorView,
    pub dout: &'a TensorView,
    pub dlast_state: Option<&'a TensorView>,
    pub du: &'a TensorView,
    pub ddelta: &'a TensorView,
    pub da: &'a TensorView,
    pub db: &'a TensorView,
    pub dc: &'a TensorView,
    pub dd: Option<&'a TensorView>,
    pub dz: Option<&'a TensorView>,
    pub ddelta_bias: Option<&'a TensorView>,
    pub dinitial_state: Option<&'a TensorView>,
    /// fp32 scratch for the CUDA backward's two-stage reductions (None on the CPU).
    pub workspace: Option<&'a TensorView>,
}

/// What the kernels need besides the params: where, and in which dtypes.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub params: SsmParams,
    pub device: Device,
    /// dtype of u, delta, z, out, variable B/C and their gradients.
    pub in_dtype: DType,
    /// dtype of A, D, delta_bias, fixed B/C, states (float32, or float64 for float64 inputs).
    pub w_dtype: DType,
}

fn fmt_shape(s: &[i64]) -> String {
    let v: Vec<String> = s.iter().map(|x| x.to_string()).collect();
    if v.len() == 1 {
        format!("({},)", v[0])
    } else {
        format!("({})", v.join(", "))
    }
}

fn expect_shape(t: &TensorView, arg: &str, want: &[i64], what: &str) -> Result<()> {
    if t.shape != want {
        return Err(shape_err(
            arg,
            format!(
                "must have shape {what} = {}; got {}",
                fmt_shape(want),
                t.shape_str()
            ),
        ));
    }
    Ok(())
}

fn expect_dtype(t: &TensorView, arg: &str, want: DType, why: &str) -> Result<()> {
    if t.dtype != want {
        return Err(dtype_err(
            arg,
            format!("must be {} ({why}); got {}", want.name(), t.dtype.name()),
        ));
    }
    Ok(())
}

fn expect_device(t: &TensorView, arg: &str, dev: Device) -> Result<()> {
    if t.device != dev {
        return Err(device_err(
            arg,
            format!(
                "is on {} but u is on {dev}; all tensors must be on one device",
                t.device
            ),
        ));
    }
    Ok(())
}

/// B or C: returns (is_variable, ngroups, batch_stride, group_stride, dstate_stride).
fn check_bc(
    t: &TensorView,
    arg: &str,
    batch: i64,
    dim: i64,
    dstate: i64,
    seqlen: i64,
    in_dtype: DType,
    w_dtype: DType,
) -> Result<(bool, i32, i64, i64, i64)> {
    let what = format!(
        "({dim}, {dstate}) [fixed] or (batch, dstate, seqlen) = ({batch}, {dstate}, {seqlen}) or \
         (batch, ngroups, dstate, seqlen) with ngroups dividing dim = {dim}"
    );
    match t.ndim() {
        2 => {
            if t.shape != [dim, dstate] {
                return Err(shape_err(
                    arg,
                    format!("must have shape {what}; got {}", t.shape_str()),
                ));
            }
            expect_dtype(t, arg, w_dtype, "a fixed (dim, dstate) B/C is a weight")?;
            Ok((false, 1, 0, t.stride(0), t.stride(1)))
        }
        3 => {
            if t.shape != [batch, dstate, seqlen] {
                return Err(shape_err(
                    arg,
                    format!("must have shape {what}; got {}", t.shape_str()),
                ));
            }
            expect_dtype(t, arg, in_dtype, "a variable B/C has u's dtype")?;
            t.require_last_contiguous(arg)?;
            Ok((true, 1, t.stride(0), 0, t.stride(1)))
        }
        4 => {
            let g = t.shape[1];
            if t.shape[0] != batch
                || t.shape[2] != dstate
                || t.shape[3] != seqlen
                || g < 1
                || dim % g != 0
            {
                return Err(shape_err(
                    arg,
                    format!("must have shape {what}; got {}", t.shape_str()),
                ));
            }
            expect_dtype(t, arg, in_dtype, "a variable B/C has u's dtype")?;
            t.require_last_contiguous(arg)?;
            Ok((true, g as i32, t.stride(0), t.stride(1), t.stride(2)))
        }
        _ => Err(shape_err(
            arg,
            format!("must have shape {what}; got {}", t.shape_str()),
        )),
    }
}

fn to_i32(v: i64, arg: &str, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| shape_err(arg, format!("{what} = {v} is too large")))
}

/// Validate a forward call and build its params.
pub fn plan_forward(a: &FwdArgs, o: Option<&FwdOut>) -> Result<Plan> {
    let u = a.u;
    if u.ndim() != 3 {
        return Err(shape_err(
            "u",
            format!(
                "must have shape (batch, dim, seqlen); got {}",
                u.shape_str()
            ),
        ));
    }
    let (batch, dim, seqlen) = (u.shape[0], u.shape[1], u.shape[2]);
    let dev = u.device;
    let in_dtype = u.dtype;
    let w_dtype = if in_dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    if in_dtype == DType::F64 && dev != Device::Cpu {
        return Err(dtype_err(
            "u",
            "float64 is supported on the CPU only (for gradcheck)",
        ));
    }
    u.require_last_contiguous("u")?;

    if a.a.ndim() != 2 || a.a.shape[0] != dim {
        return Err(shape_err(
            "A",
            format!(
                "must have shape (dim, dstate) with dim = {dim}; got {}",
                a.a.shape_str()
            ),
        ));
    }
    let dstate = a.a.shape[1];
    if dstate < 1 {
        return Err(shape_err("A", "dstate must be at least 1"));
    }
    if dstate > 256 {
        return Err(shape_err(
            "A",
            format!("dstate must be at most 256; got {dstate}"),
        ));
    }
    expect_dtype(a.a, "A", w_dtype, "A is a float32 weight")?;
    expect_device(a.a, "A", dev)?;

    expect_shape(a.delta, "delta", &u.shape, "u.shape")?;
    expect_dtype(a.delta, "delta", in_dtype, "delta has u's dtype")?;
    expect_device(a.delta, "delta", dev)?;
    a.delta.require_last_contiguous("delta")?;

    expect_device(a.b, "B", dev)?;
    expect_device(a.c, "C", dev)?;
    let (vb, gb, bbs, bgs, bns) =
        check_bc(a.b, "B", batch, dim, dstate, seqlen, in_dtype, w_dtype)?;
    let (vc, gc, cbs, cgs, cns) =
        check_bc(a.c, "C", batch, dim, dstate, seqlen, in_dtype, w_dtype)?;

    let mut p = SsmParams {
        batch: to_i32(batch, "u", "batch")?,
        dim: to_i32(dim, "u", "dim")?,
        seqlen: to_i32(seqlen, "u", "seqlen")?,
        dstate: dstate as i32,
        b_ngroups: gb,
        c_ngroups: gc,
        is_variable_b: vb as i32,
        is_variable_c: vc as i32,
        delta_softplus: a.delta_softplus as i32,
        u_ptr: u.ptr,
        u_batch_stride: u.stride(0),
        u_d_stride: u.stride(1),
        delta_ptr: a.delta.ptr,
        delta_batch_stride: a.delta.stride(0),
        delta_d_stride: a.delta.stride(1),
        a_ptr: a.a.ptr,
        a_d_stride: a.a.stride(0),
        a_dstate_stride: a.a.stride(1),
        b_ptr: a.b.ptr,
        b_batch_stride: bbs,
        b_group_stride: bgs,
        b_dstate_stride: bns,
        c_ptr: a.c.ptr,
        c_batch_stride: cbs,
        c_group_stride: cgs,
        c_dstate_stride: cns,
        ..Default::default()
    };
    if let Some(d) = a.d {
        expect_shape(d, "D", &[dim], "(dim,)")?;
        expect_dtype(d, "D", w_dtype, "D is a float32 weight")?;
        expect_device(d, "D", dev)?;
        if d.stride(0) != 1 && dim > 1 {
            d.require_contiguous("D")?;
        }
        p.has_d = 1;
        p.d_ptr = d.ptr;
    }
    if let Some(bias) = a.delta_bias {
        expect_shape(bias, "delta_bias", &[dim], "(dim,)")?;
        expect_dtype(
            bias,
            "delta_bias",
            w_dtype,
            "delta_bias is a float32 weight",
        )?;
        expect_device(bias, "delta_bias", dev)?;
        bias.require_contiguous("delta_bias")?;
        p.has_delta_bias = 1;
        p.delta_bias_ptr = bias.ptr;
    }
    if let Some(z) = a.z {
        expect_shape(z, "z", &u.shape, "u.shape")?;
        expect_dtype(z, "z", in_dtype, "z has u's dtype")?;
        expect_device(z, "z", dev)?;
        z.require_last_contiguous("z")?;
        p.has_z = 1;
        p.z_ptr = z.ptr;
        p.z_batch_stride = z.stride(0);
        p.z_d_stride = z.stride(1);
    }
    let rows = check_seq_idx(a, &mut p, dev)?;
    if let Some(h0) = a.initial_state {
        expect_shape(h0, "initial_state", &[rows, dim, dstate], state_what(&p))?;
        expect_dtype(h0, "initial_state", w_dtype, "the state is float32")?;
        expect_device(h0, "initial_state", dev)?;
        h0.require_contiguous("initial_state")?;
        p.has_initial_state = 1;
        p.initial_state_ptr = h0.ptr;
    }
    if a.chunk_size < 1 {
        return Err(shape_err("chunk_size", "must be positive"));
    }
    p.chunk_size = a.chunk_size;
    p.n_chunks = ((seqlen + a.chunk_size as i64 - 1) / a.chunk_size as i64).max(1) as i32;
    if let Some(o) = o {
        expect_shape(o.out, "out", &u.shape, "u.shape")?;
        expect_dtype(o.out, "out", in_dtype, "out has u's dtype")?;
        expect_device(o.out, "out", dev)?;
        o.out.require_last_contiguous("out")?;
        o.out.require_writable("out")?;
        p.out_ptr = o.out.ptr;
        p.out_batch_stride = o.out.stride(0);
        p.out_d_stride = o.out.stride(1);
        check_states(o.states, &p, w_dtype, dev)?;
        o.states.require_writable("states")?;
        p.states_ptr = o.states.ptr;
        if let Some(f) = o.final_states {
            if p.has_seq_idx == 0 {
                return Err(shape_err(
                    "final_states",
                    "per-sequence final states need seq_idx",
                ));
            }
            expect_shape(f, "final_states", &[rows, dim, dstate], state_what(&p))?;
            expect_dtype(f, "final_states", w_dtype, "the state is float32")?;
            expect_device(f, "final_states", dev)?;
            f.require_contiguous("final_states")?;
            f.require_writable("final_states")?;
            p.final_states_ptr = f.ptr;
        }
    }
    Ok(Plan {
        params: p,
        device: dev,
        in_dtype,
        w_dtype,
    })
}

/// What a state argument's shape is, for messages.
fn state_what(p: &SsmParams) -> &'static str {
    if p.has_seq_idx != 0 {
        "(num_seqs, dim, dstate) [one state per sequence of seq_idx]"
    } else {
        "(batch, dim, dstate)"
    }
}

/// seq_idx and num_seqs: sets the varlen fields of `p`; returns the rows of a state argument
/// (num_seqs with seq_idx, else batch). On the CPU the values are checked too: below num_seqs
/// where per-sequence states are given, and each sequence one contiguous run (two runs of one
/// sequence would both write its final state). On CUDA they stay on the device (no host sync):
/// values at or above num_seqs are then treated as padding.
fn check_seq_idx(a: &FwdArgs, p: &mut SsmParams, dev: Device) -> Result<i64> {
    let (batch, seqlen) = (p.batch as i64, p.seqlen as i64);
    let Some(s) = a.seq_idx else {
        return Ok(batch);
    };
    if s.device != dev {
        return Err(device_err(
            "seq_idx",
            format!("is on {} but u is on {dev}", s.device),
        ));
    }
    if s.is64 {
        return Err(dtype_err("seq_idx", "must be int32; got int64"));
    }
    if s.shape != [batch, seqlen] {
        return Err(shape_err(
            "seq_idx",
            format!(
                "must have shape (batch, seqlen) = ({batch}, {seqlen}); got {}",
                s.shape_str()
            ),
        ));
    }
    if seqlen > 1 && s.strides[1] != 1 {
        return Err(shape_err(
            "seq_idx",
            "must be contiguous along seqlen (stride 1)",
        ));
    }
    let rows = a.num_seqs.max(0);
    p.has_seq_idx = 1;
    p.num_seqs = to_i32(rows, "num_seqs", "num_seqs")?;
    p.seq_idx_ptr = s.ptr;
    p.seq_idx_batch_stride = if batch > 1 { s.strides[0] } else { seqlen };
    if dev == Device::Cpu && batch > 0 && seqlen > 0 && a.num_seqs >= 0 {
        check_seq_values(p, a.num_seqs)?;
    }
    Ok(rows)
}

/// The CPU side of the seq_idx checks (see `check_seq_idx`), where per-sequence states are
/// involved (without them seq_idx only marks restarts, and rows may reuse numbers).
fn check_seq_values(p: &SsmParams, num_seqs: i64) -> Result<()> {
    let mut last_row: Vec<i64> = Vec::new();
    for b in 0..p.batch as i64 {
        // SAFETY: a live int32 host tensor of shape (batch, seqlen), last stride 1 (checked).
        let row = unsafe {
            std::slice::from_raw_parts(
                (p.seq_idx_ptr as *const i32).offset((b * p.seq_idx_batch_stride) as isize),
                p.seqlen as usize,
            )
        };
        for (t, &v) in row.iter().enumerate() {
            if v < 0 || (t > 0 && row[t - 1] == v) {
                continue;
            }
            if v as i64 >= num_seqs {
                return Err(shape_err(
                    "seq_idx",
                    format!(
                        "value {v} at ({b}, {t}) is out of range for {num_seqs} sequences \
                         (the rows of initial_state / the final states)"
                    ),
                ));
            }
            let v = v as usize;
            if last_row.len() <= v {
                last_row.resize(v + 1, -1);
            }
            if last_row[v] >= 0 {
                return Err(shape_err(
                    "seq_idx",
                    format!(
                        "sequence {v} starts again at ({b}, {t}): each sequence must be one \
                         contiguous run of one row"
                    ),
                ));
            }
            last_row[v] = b;
        }
    }
    Ok(())
}

fn check_states(s: &TensorView, p: &SsmParams, w_dtype: DType, dev: Device) -> Result<()> {
    let want = [
        p.batch as i64,
        p.dim as i64,
        p.n_chunks as i64,
        p.dstate as i64,
    ];
    expect_shape(s, "states", &want, "(batch, dim, n_chunks, dstate)")?;
    expect_dtype(s, "states", w_dtype, "states are float32")?;
    expect_device(s, "states", dev)?;
    s.require_contiguous("states")
}

/// Validate a backward call (the forward's inputs plus gradients) and build its params.
pub fn plan_backward(a: &FwdArgs, g: &BwdArgs) -> Result<Plan> {
    let mut plan = plan_forward(a, None)?;
    let (dev, ind, wd) = (plan.device, plan.in_dtype, plan.w_dtype);
    let p = &mut plan.params;
    let u = a.u;
    let (batch, dim, dstate) = (p.batch as i64, p.dim as i64, p.dstate as i64);
    check_states(g.states, p, wd, dev)?;
    p.states_ptr = g.states.ptr;

    let seq3 = |t: &TensorView, arg: &str| -> Result<(i64, i64)> {
        expect_shape(t, arg, &u.shape, "u.shape")?;
        expect_dtype(t, arg, ind, "same dtype as u")?;
        expect_device(t, arg, dev)?;
        t.require_last_contiguous(arg)?;
        Ok((t.stride(0), t.stride(1)))
    };
    (p.dout_batch_stride, p.dout_d_stride) = seq3(g.dout, "dout")?;
    p.dout_ptr = g.dout.ptr;
    (p.du_batch_stride, p.du_d_stride) = seq3(g.du, "du")?;
    g.du.require_writable("du")?;
    p.du_ptr = g.du.ptr;
    (p.ddelta_batch_stride, p.ddelta_d_stride) = seq3(g.ddelta, "ddelta")?;
    g.ddelta.require_writable("ddelta")?;
    p.ddelta_ptr = g.ddelta.ptr;

    let small = |t: &TensorView, arg: &str, want: &[i64], what: &str| -> Result<()> {
        expect_shape(t, arg, want, what)?;
        expect_dtype(t, arg, wd, "gradients of weights are float32")?;
        expect_device(t, arg, dev)?;
        t.require_contiguous(arg)?;
        t.require_writable(arg)
    };
    small(g.da, "dA", &[dim, dstate], "(dim, dstate)")?;
    p.da_ptr = g.da.ptr;

    // dB / dC mirror B / C: same shape, dtype and layout rules.
    for (t, src, arg, is_b) in [(g.db, a.b, "dB", true), (g.dc, a.c, "dC", false)] {
        expect_shape(t, arg, &src.shape, if is_b { "B.shape" } else { "C.shape" })?;
        expect_device(t, arg, dev)?;
        t.require_writable(arg)?;
        let (_, _, bs, gs, ns) = check_bc(t, arg, batch, dim, dstate, u.shape[2], ind, wd)?;
        if is_b {
            (
                p.db_ptr,
                p.db_batch_stride,
                p.db_group_stride,
                p.db_dstate_stride,
            ) = (t.ptr, bs, gs, ns);
        } else {
            (
                p.dc_ptr,
                p.dc_batch_stride,
                p.dc_group_stride,
                p.dc_dstate_stride,
            ) = (t.ptr, bs, gs, ns);
        }
    }
    match (p.has_d != 0, g.dd) {
        (true, Some(t)) => {
            small(t, "dD", &[dim], "(dim,)")?;
            p.dd_ptr = t.ptr;
        }
        (true, None) => return Err(shape_err("dD", "required when D is given")),
        _ => {}
    }
    match (p.has_z != 0, g.dz) {
        (true, Some(t)) => {
            (p.dz_batch_stride, p.dz_d_stride) = seq3(t, "dz")?;
            t.require_writable("dz")?;
            p.dz_ptr = t.ptr;
        }
        (true, None) => return Err(shape_err("dz", "required when z is given")),
        _ => {}
    }
    match (p.has_delta_bias != 0, g.ddelta_bias) {
        (true, Some(t)) => {
            small(t, "ddelta_bias", &[dim], "(dim,)")?;
            p.ddelta_bias_ptr = t.ptr;
        }
        (true, None) => {
            return Err(shape_err(
                "ddelta_bias",
                "required when delta_bias is given",
            ));
        }
        _ => {}
    }
    let rows = if p.has_seq_idx != 0 {
        p.num_seqs as i64
    } else {
        batch
    };
    if let Some(t) = g.dinitial_state {
        small(t, "dinitial_state", &[rows, dim, dstate], state_what(p))?;
        p.dinitial_state_ptr = t.ptr;
    }
    if let Some(t) = g.workspace {
        expect_dtype(t, "workspace", DType::F32, "scratch is float32")?;
        expect_device(t, "workspace", dev)?;
        t.require_contiguous("workspace")?;
        t.require_writable("workspace")?;
        p.workspace_ptr = t.ptr;
    }
    if let Some(t) = g.dlast_state {
        expect_shape(t, "dlast_state", &[rows, dim, dstate], state_what(p))?;
        expect_dtype(t, "dlast_state", wd, "the state is float32")?;
        expect_device(t, "dlast_state", dev)?;
        t.require_contiguous("dlast_state")?;
        p.has_dlast_state = 1;
        p.dlast_state_ptr = t.ptr;
    }
    Ok(plan)
}
