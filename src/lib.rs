//! The Python module `mamba_scan._native`. Only conversion lives here: capsules become checked
//! views (dlpack.rs, ops/), the kernels (cpu/, cuda/) run with the GIL released, and
//! `ScanError`s become typed Python exceptions.

// Kernel code style, on purpose: lane loops index fixed-size arrays by a counter (that is what
// LLVM turns into SIMD); polynomial coefficients are kept as published (Cephes); clamps are
// explicit selects so NaN flows through; `!(x > t)` is the NaN-aware test; the generic `Real`
// type has no `+=`; the kernels and the flat boundary take many arguments.
#![allow(
    clippy::needless_range_loop,
    clippy::excessive_precision,
    clippy::manual_clamp,
    clippy::neg_cmp_op_on_partial_ord,
    clippy::assign_op_pattern,
    clippy::too_many_arguments
)]

pub mod cpu;
pub mod cuda;
pub mod dlpack;
pub mod error;
pub mod ops;
pub mod params;

use dlpack::{Device, TensorView};
use error::ScanError;
use ops::scan::{BwdArgs, FwdArgs, FwdOut, Plan};
use pyo3::create_exception;
use pyo3::exceptions::{PyNotImplementedError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

create_exception!(
    _native,
    ShapeError,
    PyValueError,
    "A tensor argument has the wrong shape."
);
create_exception!(
    _native,
    DTypeError,
    PyTypeError,
    "A tensor argument has the wrong dtype."
);
create_exception!(
    _native,
    DeviceError,
    PyValueError,
    "Tensors on different or unsupported devices."
);
create_exception!(
    _native,
    LayoutError,
    PyValueError,
    "A tensor's strides cannot be addressed."
);
create_exception!(
    _native,
    CudaError,
    PyRuntimeError,
    "A CUDA driver call failed."
);
create_exception!(
    _native,
    CompileError,
    CudaError,
    "NVRTC could not compile a kernel."
);
create_exception!(
    _native,
    LibraryError,
    PyRuntimeError,
    "libcuda or libnvrtc could not be loaded."
);

impl From<ScanError> for PyErr {
    fn from(e: ScanError) -> PyErr {
        let msg = e.to_string();
        match e {
            ScanError::Shape { .. } => ShapeError::new_err(msg),
            ScanError::DType { .. } => DTypeError::new_err(msg),
            ScanError::Device { .. } => DeviceError::new_err(msg),
            ScanError::Layout { .. } => LayoutError::new_err(msg),
            ScanError::NotImplemented(_) => PyNotImplementedError::new_err(msg),
            ScanError::Cuda { .. } => CudaError::new_err(msg),
            ScanError::Compile { .. } => CompileError::new_err(msg),
            ScanError::Library(_) => LibraryError::new_err(msg),
        }
    }
}

fn view(obj: &Bound<'_, PyAny>, arg: &str) -> PyResult<TensorView> {
    // SAFETY: `obj` is a live object borrowed under the GIL for the duration of this call.
    Ok(unsafe { dlpack::view_from_capsule(obj.as_ptr(), arg) }?)
}

fn opt_view(obj: Option<&Bound<'_, PyAny>>, arg: &str) -> PyResult<Option<TensorView>> {
    match obj {
        None => Ok(None),
        Some(o) if o.is_none() => Ok(None),
        Some(o) => view(o, arg).map(Some),
    }
}

/// The decoded inputs of a scan call (shared by forward and backward).
struct Inputs {
    req: [TensorView; 5],
    opt: [Option<TensorView>; 4],
    seq_idx: Option<dlpack::IntView>,
    num_seqs: i64,
}

impl Inputs {
    fn decode(
        req: [&Bound<'_, PyAny>; 5],
        opt: [Option<&Bound<'_, PyAny>>; 4],
    ) -> PyResult<Inputs> {
        const REQ: [&str; 5] = ["u", "delta", "A", "B", "C"];
        const OPT: [&str; 4] = ["D", "z", "delta_bias", "initial_state"];
        let mut r = Vec::with_capacity(5);
        for (obj, name) in req.into_iter().zip(REQ) {
            r.push(view(obj, name)?);
        }
        let mut o = Vec::with_capacity(4);
        for (obj, name) in opt.into_iter().zip(OPT) {
            o.push(opt_view(obj, name)?);
        }
        let req: [TensorView; 5] = r.try_into().expect("five views");
        let opt: [Option<TensorView>; 4] = o.try_into().expect("four views");
        Ok(Inputs {
            req,
            opt,
            seq_idx: None,
            num_seqs: -1,
        })
    }

    /// Packed sequences: seq_idx (an int32 tensor's capsule, or None) and the rows of the
    /// per-sequence states (-1: none).
    fn with_seq_idx(
        mut self,
        seq_idx: Option<&Bound<'_, PyAny>>,
        num_seqs: i64,
    ) -> PyResult<Inputs> {
        if let Some(o) = seq_idx.filter(|o| !o.is_none()) {
            // SAFETY: `o` is a live object borrowed under the GIL for the duration of this call.
            self.seq_idx = Some(unsafe { dlpack::int_view_from_capsule(o.as_ptr(), "seq_idx") }?);
        }
        self.num_seqs = num_seqs;
        Ok(self)
    }

    fn args(&self, delta_softplus: bool, chunk_size: i32) -> FwdArgs<'_> {
        let [u, delta, a, b, c] = &self.req;
        let [d, z, bias, h0] = &self.opt;
        FwdArgs {
            u,
            delta,
            a,
            b,
            c,
            d: d.as_ref(),
            z: z.as_ref(),
            delta_bias: bias.as_ref(),
            initial_state: h0.as_ref(),
            delta_softplus,
            chunk_size,
            seq_idx: self.seq_idx.as_ref(),
            num_seqs: self.num_seqs,
        }
    }
}

/// Run `f` without the GIL, turning a panic into a RuntimeError (a panic must never reach Python
/// as PanicException, which `except Exception` does not catch).
fn run_detached<F>(py: Python<'_>, f: F) -> PyResult<()>
where
    F: FnOnce() -> Result<(), ScanError> + Send,
{
    let r = py.detach(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(PyRuntimeError::new_err(format!(
                "mamba_scan internal error: {msg}"
            )))
        }
    }
}

fn dispatch_forward(plan: Plan, stream: u64) -> Result<(), ScanError> {
    match plan.device {
        // SAFETY: plan_forward validated every tensor; the shim keeps them alive and gives
        // fresh outputs.
        Device::Cpu => unsafe { cpu::scan_fwd::forward(&plan) },
        Device::Cuda(_) => cuda::forward(&plan, stream)?,
    }
    Ok(())
}

fn dispatch_backward(plan: Plan, stream: u64) -> Result<(), ScanError> {
    match plan.device {
        // SAFETY: as for the forward.
        Device::Cpu => unsafe { cpu::scan_bwd::backward(&plan) },
        Device::Cuda(_) => cuda::backward(&plan, stream)?,
    }
    Ok(())
}

/// Forward selective scan. Every tensor argument is a DLPack capsule (or None for an optional
/// one). Writes `out` (batch, dim, seqlen) and `states` (batch, dim, n_chunks, dstate).
#[pyfunction]
#[pyo3(signature = (u, delta, a, b, c, d, z, delta_bias, initial_state, out, states, delta_softplus, chunk_size, stream=0, seq_idx=None, num_seqs=-1, final_states=None))]
#[allow(clippy::too_many_arguments)]
fn scan_fwd(
    py: Python<'_>,
    u: &Bound<'_, PyAny>,
    delta: &Bound<'_, PyAny>,
    a: &Bound<'_, PyAny>,
    b: &Bound<'_, PyAny>,
    c: &Bound<'_, PyAny>,
    d: Option<&Bound<'_, PyAny>>,
    z: Option<&Bound<'_, PyAny>>,
    delta_bias: Option<&Bound<'_, PyAny>>,
    initial_state: Option<&Bound<'_, PyAny>>,
    out: &Bound<'_, PyAny>,
    states: &Bound<'_, PyAny>,
    delta_softplus: bool,
    chunk_size: i32,
    stream: u64,
    seq_idx: Option<&Bound<'_, PyAny>>,
    num_seqs: i64,
    final_states: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let inputs = Inputs::decode([u, delta, a, b, c], [d, z, delta_bias, initial_state])?
        .with_seq_idx(seq_idx, num_seqs)?;
    let (out, states) = (view(out, "out")?, view(states, "states")?);
    let fin = opt_view(final_states, "final_states")?;
    let args = inputs.args(delta_softplus, chunk_size);
    let plan = ops::scan::plan_forward(
        &args,
        Some(&FwdOut {
            out: &out,
            states: &states,
            final_states: fin.as_ref(),
        }),
    )?;
    run_detached(py, move || dispatch_forward(plan, stream))
}

/// Backward selective scan: recomputes from `states` and writes every gradient.
#[pyfunction]
#[pyo3(signature = (u, delta, a, b, c, d, z, delta_bias, initial_state, states, dout, dlast_state,
                    du, ddelta, da, db, dc, dd, dz, ddelta_bias, dinitial_state,
                    delta_softplus, chunk_size, stream=0, workspace=None, seq_idx=None, num_seqs=-1))]
#[allow(clippy::too_many_arguments)]
fn scan_bwd(
    py: Python<'_>,
    u: &Bound<'_, PyAny>,
    delta: &Bound<'_, PyAny>,
    a: &Bound<'_, PyAny>,
    b: &Bound<'_, PyAny>,
    c: &Bound<'_, PyAny>,
    d: Option<&Bound<'_, PyAny>>,
    z: Option<&Bound<'_, PyAny>>,
    delta_bias: Option<&Bound<'_, PyAny>>,
    initial_state: Option<&Bound<'_, PyAny>>,
    states: &Bound<'_, PyAny>,
    dout: &Bound<'_, PyAny>,
    dlast_state: Option<&Bound<'_, PyAny>>,
    du: &Bound<'_, PyAny>,
    ddelta: &Bound<'_, PyAny>,
    da: &Bound<'_, PyAny>,
    db: &Bound<'_, PyAny>,
    dc: &Bound<'_, PyAny>,
    dd: Option<&Bound<'_, PyAny>>,
    dz: Option<&Bound<'_, PyAny>>,
    ddelta_bias: Option<&Bound<'_, PyAny>>,
    dinitial_state: Option<&Bound<'_, PyAny>>,
    delta_softplus: bool,
    chunk_size: i32,
    stream: u64,
    workspace: Option<&Bound<'_, PyAny>>,
    seq_idx: Option<&Bound<'_, PyAny>>,
    num_seqs: i64,
) -> PyResult<()> {
    let inputs = Inputs::decode([u, delta, a, b, c], [d, z, delta_bias, initial_state])?
        .with_seq_idx(seq_idx, num_seqs)?;
    let ws = opt_view(workspace, "workspace")?;
    let (states, dout, dlast) = (
        view(states, "states")?,
        view(dout, "dout")?,
        opt_view(dlast_state, "dlast_state")?,
    );
    let (du, ddelta, da, db, dc) = (
        view(du, "du")?,
        view(ddelta, "ddelta")?,
        view(da, "dA")?,
        view(db, "dB")?,
        view(dc, "dC")?,
    );
    let (dd, dz, dbias, dh0) = (
        opt_view(dd, "dD")?,
        opt_view(dz, "dz")?,
        opt_view(ddelta_bias, "ddelta_bias")?,
        opt_view(dinitial_state, "dinitial_state")?,
    );
    let args = inputs.args(delta_softplus, chunk_size);
    let grads = BwdArgs {
        states: &states,
        dout: &dout,
        dlast_state: dlast.as_ref(),
        du: &du,
        ddelta: &ddelta,
        da: &da,
        db: &db,
        dc: &dc,
        dd: dd.as_ref(),
        dz: dz.as_ref(),
        ddelta_bias: dbias.as_ref(),
        dinitial_state: dh0.as_ref(),
        workspace: ws.as_ref(),
    };
    let plan = ops::scan::plan_backward(&args, &grads)?;
    if let (dlpack::Device::Cuda(_), Some(w)) = (plan.device, ws.as_ref()) {
        let need = cuda::bwd_workspace_elems(&plan.params, cuda::in_type(plan.in_dtype, "u")?);
        if w.numel() < need {
            return Err(ScanError::Shape {
                arg: "workspace".into(),
                msg: format!("needs at least {need} float32 elements; got {}", w.numel()),
            }
            .into());
        }
    }
    run_detached(py, move || dispatch_backward(plan, stream))
}

/// An index argument: a list of ints for CPU calls (checked on the host), a DLPack capsule of an
/// int32 / int64 tensor for CUDA calls (stays on the device).
type IndexArg = (Option<Vec<i64>>, Option<dlpack::IntView>);

fn index_arg(obj: Option<&Bound<'_, PyAny>>, arg: &str, cuda: bool) -> PyResult<IndexArg> {
    match obj {
        None => Ok((None, None)),
        Some(o) if o.is_none() => Ok((None, None)),
        // SAFETY: `o` is a live object borrowed under the GIL for the duration of this call.
        Some(o) if cuda => Ok((
            None,
            Some(unsafe { dlpack::int_view_from_capsule(o.as_ptr(), arg) }?),
        )),
        Some(o) => Ok((
            Some(o.extract::<Vec<i64>>().map_err(|_| {
                PyErr::from(ScanError::DType {
                    arg: arg.into(),
                    msg: "expected a list of ints for CPU tensors".into(),
                })
            })?),
            None,
        )),
    }
}

fn is_cuda(t: &TensorView) -> bool {
    matches!(t.device, dlpack::Device::Cuda(_))
}

/// One decoding step, `selective_state_update`: updates `state` in place and writes `out`.
/// Tensors are DLPack capsules with the heads axis present (see ops::state_update);
/// `state_batch_indices`: a list of ints (CPU) or an int tensor's capsule (CUDA), negative for
/// padding rows; `stream`: the CUDA stream to launch on.
#[pyfunction]
#[pyo3(signature = (state, x, dt, a, b, c, d, z, dt_bias, out, dt_softplus, state_batch_indices=None, stream=0))]
#[allow(clippy::too_many_arguments)]
fn state_update(
    py: Python<'_>,
    state: &Bound<'_, PyAny>,
    x: &Bound<'_, PyAny>,
    dt: &Bound<'_, PyAny>,
    a: &Bound<'_, PyAny>,
    b: &Bound<'_, PyAny>,
    c: &Bound<'_, PyAny>,
    d: Option<&Bound<'_, PyAny>>,
    z: Option<&Bound<'_, PyAny>>,
    dt_bias: Option<&Bound<'_, PyAny>>,
    out: &Bound<'_, PyAny>,
    dt_softplus: bool,
    state_batch_indices: Option<&Bound<'_, PyAny>>,
    stream: u64,
) -> PyResult<()> {
    let views = [
        view(state, "state")?,
        view(x, "x")?,
        view(dt, "dt")?,
        view(a, "A")?,
        view(b, "B")?,
        view(c, "C")?,
        view(out, "out")?,
    ];
    let (dv, zv, biasv) = (
        opt_view(d, "D")?,
        opt_view(z, "z")?,
        opt_view(dt_bias, "dt_bias")?,
    );
    let cuda = is_cuda(&views[0]);
    let (host_ix, dev_ix) = index_arg(state_batch_indices, "state_batch_indices", cuda)?;
    let args = ops::state_update::UpdateArgs {
        state: &views[0],
        x: &views[1],
        dt: &views[2],
        a: &views[3],
        b: &views[4],
        c: &views[5],
        d: dv.as_ref(),
        z: zv.as_ref(),
        dt_bias: biasv.as_ref(),
        out: &views[6],
        indices: host_ix.as_deref(),
        device_indices: dev_ix.as_ref(),
        dt_softplus,
    };
    if cuda {
        return run_detached(py, move || cuda::state_update::state_update(&args, stream));
    }
    ops::state_update::check(&args, dlpack::Device::Cpu)?;
    run_detached(py, move || {
        // SAFETY: checked above; the shim holds the tensors for the call and gives a fresh `out`.
        unsafe { cpu::state_update::run(&args) };
        Ok(())
    })
}

fn conv_args<'a>(
    x: &'a TensorView,
    weight: &'a TensorView,
    bias: &'a Option<TensorView>,
    seq_idx: &'a Option<Vec<i64>>,
    initial: &'a Option<TensorView>,
    silu: bool,
) -> ops::conv1d::ConvArgs<'a> {
    ops::conv1d::ConvArgs {
        x,
        weight,
        bias: bias.as_ref(),
        seq_idx: seq_idx.as_deref(),
        initial_states: initial.as_ref(),
        silu,
    }
}

/// Causal depthwise convolution forward: writes `out` and, if given, `final_states`.
/// `seq_idx`: a list of ints (CPU, row-major (batch, seqlen)) or an int tensor's capsule (CUDA).
#[pyfunction]
#[pyo3(signature = (x, weight, bias, seq_idx, initial_states, out, final_states, silu, stream=0))]
#[allow(clippy::too_many_arguments)]
fn conv1d_fwd(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    weight: &Bound<'_, PyAny>,
    bias: Option<&Bound<'_, PyAny>>,
    seq_idx: Option<&Bound<'_, PyAny>>,
    initial_states: Option<&Bound<'_, PyAny>>,
    out: &Bound<'_, PyAny>,
    final_states: Option<&Bound<'_, PyAny>>,
    silu: bool,
    stream: u64,
) -> PyResult<()> {
    let (xv, wv) = (view(x, "x")?, view(weight, "weight")?);
    let (bv, hv) = (
        opt_view(bias, "bias")?,
        opt_view(initial_states, "initial_states")?,
    );
    let (ov, fv) = (
        view(out, "out")?,
        opt_view(final_states, "final_states_out")?,
    );
    let cuda = is_cuda(&xv);
    let (seq, seq_dev) = index_arg(seq_idx, "seq_idx", cuda)?;
    let a = conv_args(&xv, &wv, &bv, &seq, &hv, silu);
    if cuda {
        return run_detached(py, move || {
            cuda::conv1d::conv_forward(&a, seq_dev.as_ref(), &ov, fv.as_ref(), stream)
        });
    }
    // SAFETY: `forward` checks the arguments; the shim holds the tensors for the call and
    // passes fresh outputs.
    run_detached(py, move || unsafe {
        cpu::conv1d::forward(&a, &ov, fv.as_ref())
    })
}

/// Causal depthwise convolution backward; CUDA calls also take `workspace` (float32,
/// `cuda_conv1d_workspace_size` elements) for the deterministic two-stage weight sums.
#[pyfunction]
#[pyo3(signature = (x, weight, bias, seq_idx, initial_states, dout, dfinal, dx, dweight, dbias, dinitial, silu, workspace=None, stream=0))]
#[allow(clippy::too_many_arguments)]
fn conv1d_bwd(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    weight: &Bound<'_, PyAny>,
    bias: Option<&Bound<'_, PyAny>>,
    seq_idx: Option<&Bound<'_, PyAny>>,
    initial_states: Option<&Bound<'_, PyAny>>,
    dout: &Bound<'_, PyAny>,
    dfinal: Option<&Bound<'_, PyAny>>,
    dx: &Bound<'_, PyAny>,
    dweight: &Bound<'_, PyAny>,
    dbias: Option<&Bound<'_, PyAny>>,
    dinitial: Option<&Bound<'_, PyAny>>,
    silu: bool,
    workspace: Option<&Bound<'_, PyAny>>,
    stream: u64,
) -> PyResult<()> {
    let (xv, wv) = (view(x, "x")?, view(weight, "weight")?);
    let (bv, hv) = (
        opt_view(bias, "bias")?,
        opt_view(initial_states, "initial_states")?,
    );
    let (gov, gfv) = (view(dout, "dout")?, opt_view(dfinal, "dfinal_states")?);
    let (dxv, dwv) = (view(dx, "dx")?, view(dweight, "dweight")?);
    let (dbv, dhv) = (
        opt_view(dbias, "dbias")?,
        opt_view(dinitial, "dinitial_states")?,
    );
    let cuda = is_cuda(&xv);
    let (seq, seq_dev) = index_arg(seq_idx, "seq_idx", cuda)?;
    let wsv = opt_view(workspace, "workspace")?;
    let a = conv_args(&xv, &wv, &bv, &seq, &hv, silu);
    let g = ops::conv1d::ConvGrads {
        dout: &gov,
        dfinal: gfv.as_ref(),
        dx: &dxv,
        dweight: &dwv,
        dbias: dbv.as_ref(),
        dinitial: dhv.as_ref(),
    };
    if cuda {
        let ws = wsv.ok_or_else(|| ScanError::Shape {
            arg: "workspace".into(),
            msg: "required by the CUDA backward".into(),
        })?;
        return run_detached(py, move || {
            cuda::conv1d::conv_backward(&a, seq_dev.as_ref(), &g, &ws, stream)
        });
    }
    // SAFETY: as for the forward.
    run_detached(py, move || unsafe { cpu::conv1d::backward(&a, &g) })
}

/// float32 elements of workspace the CUDA conv1d backward needs for this x and width.
#[pyfunction]
fn cuda_conv1d_workspace_size(x: &Bound<'_, PyAny>, width: i64) -> PyResult<i64> {
    let xv = view(x, "x")?;
    if xv.ndim() != 3 {
        return Err(ScanError::Shape {
            arg: "x".into(),
            msg: format!(
                "must have shape (batch, dim, seqlen); got {}",
                xv.shape_str()
            ),
        }
        .into());
    }
    Ok(cuda::conv1d::conv_bwd_workspace_elems(&xv, width))
}

/// Decoding update of the causal convolution: `conv_state` updated in place. `cache_seqlens` /
/// `conv_state_indices`: lists of ints (CPU) or int tensors' capsules (CUDA).
#[pyfunction]
#[pyo3(signature = (x, conv_state, weight, bias, silu, cache_seqlens, conv_state_indices, out, stream=0))]
#[allow(clippy::too_many_arguments)]
fn conv1d_update(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    conv_state: &Bound<'_, PyAny>,
    weight: &Bound<'_, PyAny>,
    bias: Option<&Bound<'_, PyAny>>,
    silu: bool,
    cache_seqlens: Option<&Bound<'_, PyAny>>,
    conv_state_indices: Option<&Bound<'_, PyAny>>,
    out: &Bound<'_, PyAny>,
    stream: u64,
) -> PyResult<()> {
    let (xv, sv, wv) = (
        view(x, "x")?,
        view(conv_state, "conv_state")?,
        view(weight, "weight")?,
    );
    let (bv, ov) = (opt_view(bias, "bias")?, view(out, "out")?);
    let cuda = is_cuda(&xv);
    let (cs, cs_dev) = index_arg(cache_seqlens, "cache_seqlens", cuda)?;
    let (ix, ix_dev) = index_arg(conv_state_indices, "conv_state_indices", cuda)?;
    run_detached(py, move || {
        if cuda {
            return cuda::conv1d::conv_update(
                &xv,
                &sv,
                &wv,
                bv.as_ref(),
                silu,
                cs_dev.as_ref(),
                ix_dev.as_ref(),
                &ov,
                stream,
            );
        }
        // SAFETY: the shim holds the tensors and passes a fresh `out`.
        unsafe {
            cpu::conv1d::update(
                &xv,
                &sv,
                &wv,
                bv.as_ref(),
                silu,
                cs.as_deref(),
                ix.as_deref(),
                &ov,
            )
        }
    })
}

/// Steps per saved state on the CPU path.
#[pyfunction]
fn cpu_chunk_size() -> i32 {
    cpu::CPU_CHUNK
}

/// The instruction set the CPU kernels dispatched to ("avx512", "avx2" or "baseline").
#[pyfunction]
fn cpu_isa() -> &'static str {
    match cpu::isa() {
        cpu::Isa::Avx512 => "avx512",
        cpu::Isa::Avx2 => "avx2",
        cpu::Isa::Baseline => "baseline",
    }
}

/// Steps per saved state on CUDA for a given dstate.
#[pyfunction]
fn cuda_chunk_size(dstate: i32) -> i32 {
    cuda::chunk_size(dstate)
}

/// float32 elements of scratch the CUDA backward needs for these shapes, `dtype` of u
/// ("float32", "float16" or "bfloat16") and whether z is given (they pick the kernel's layout,
/// which sets how many partial sums of dB / dC it keeps).
#[pyfunction]
#[pyo3(signature = (batch, dim, dstate, seqlen, b_ngroups, c_ngroups, dtype, has_z))]
#[allow(clippy::too_many_arguments)]
fn cuda_bwd_workspace_size(
    batch: i32,
    dim: i32,
    dstate: i32,
    seqlen: i32,
    b_ngroups: i32,
    c_ngroups: i32,
    dtype: &str,
    has_z: bool,
) -> PyResult<i64> {
    let in_type = match dtype {
        "float32" => 0,
        "float16" => 1,
        "bfloat16" => 2,
        _ => {
            return Err(ScanError::DType {
                arg: "dtype".into(),
                msg: format!("expected float32, float16 or bfloat16; got {dtype}"),
            }
            .into());
        }
    };
    // ngroups 0 marks a fixed (dim, dstate) B / C.
    let p = params::SsmParams {
        batch,
        dim,
        dstate,
        seqlen,
        b_ngroups: b_ngroups.max(1),
        c_ngroups: c_ngroups.max(1),
        is_variable_b: (b_ngroups > 0) as i32,
        is_variable_c: (c_ngroups > 0) as i32,
        has_z: has_z as i32,
        ..Default::default()
    };
    Ok(if dim == 0 {
        0
    } else {
        cuda::bwd_workspace_elems(&p, in_type)
    })
}

/// The names of the kernel programs (specialisations) that `cuda_compile_program` takes, in
/// index order.
#[pyfunction]
fn cuda_program_names() -> Vec<String> {
    cuda::program_names()
}

/// Compile kernel program `index` (an index into `cuda_program_names()`) for `arch` (e.g.
/// "sm_90"). Returns (name, registers, spill bytes, cubin digest); with `use_cache` it goes
/// through the disk cache and reports no resources. Releases the GIL: call it from several
/// threads at once. Needs libnvrtc only, no GPU.
#[pyfunction]
#[pyo3(signature = (arch, index, use_cache=false))]
fn cuda_compile_program(
    py: Python<'_>,
    arch: String,
    index: usize,
    use_cache: bool,
) -> PyResult<(String, Option<u32>, u32, u64)> {
    let r = py.detach(move || cuda::compile_program(index, &arch, use_cache))?;
    Ok((r.name, r.registers, r.spill_bytes, r.digest))
}

/// NVRTC in this process: (cubin, log) of `source` compiled with `options`. The body of the
/// compile worker (src/cuda/compile.rs); raises CompileError with the log when NVRTC fails.
#[pyfunction]
fn nvrtc_compile_in_process<'py>(
    py: Python<'py>,
    source: String,
    name: String,
    options: Vec<String>,
) -> PyResult<(Bound<'py, pyo3::types::PyBytes>, String)> {
    let c = py.detach(move || cuda::compile::compile_source(&source, &name, &options))?;
    Ok((pyo3::types::PyBytes::new(py, &c.cubin), c.log))
}

/// Run kernel compiles in a worker process (`python` loading this module from `module`, after
/// loading `nvrtc` if given), so that one source gives one cubin (src/cuda/compile.rs, Worker).
/// Returns False when a worker was set already.
#[pyfunction]
#[pyo3(signature = (python, module, nvrtc=None))]
fn set_compile_worker(python: String, module: String, nvrtc: Option<String>) -> bool {
    cuda::compile::set_worker(python.into(), module.into(), nvrtc.map(Into::into))
}

/// Whether kernel compiles run in the worker process (set and able to run).
#[pyfunction]
fn compile_worker_active() -> bool {
    cuda::compile::worker_active()
}

/// Why kernel compiles left the compile server for in-process NVRTC, if they did.
#[pyfunction]
fn compile_worker_error() -> Option<String> {
    cuda::compile::worker_error()
}

/// The disk cache directory of compiled kernels (None: no cache; see MAMBA_SCAN_CACHE_DIR).
#[pyfunction]
fn cuda_cache_dir() -> Option<String> {
    cuda::compile::cache_dir().map(|d| d.display().to_string())
}

/// Logs the first compile that the disk cache could not serve in this process (INFO, logger
/// "mamba_scan"), the rest at DEBUG.
fn log_cold_compile(label: &str, arch: &str, dir: Option<&std::path::Path>) {
    static FIRST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);
    let first = FIRST.swap(false, std::sync::atomic::Ordering::Relaxed);
    let dir = dir.map_or("no disk cache".to_string(), |d| d.display().to_string());
    Python::attach(|py| {
        let msg = if first {
            format!(
                "compiling CUDA kernel {label} for {arch} with NVRTC: the first use of each \
                 kernel specialisation takes 1-4 s, later runs load it from the cache ({dir}); \
                 `python -m mamba_scan warmup` compiles all of them ahead of time"
            )
        } else {
            format!("compiling CUDA kernel {label} for {arch} (cache: {dir})")
        };
        let level = if first { 20 } else { 10 };
        // Logging is best effort: a failure here must not fail the kernel call.
        let _ = py
            .import("logging")
            .and_then(|m| m.call_method1("getLogger", ("mamba_scan",)))
            .and_then(|l| l.call_method1("log", (level, msg)));
    });
}

/// The disk cache could not take a kernel: warn once per process (RuntimeWarning), naming the
/// directory and the error; the kernels stay in memory.
fn warn_cache_write(dir: &std::path::Path, err: &str) {
    static FIRST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);
    if !FIRST.swap(false, std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let msg = format!(
        "mamba_scan: cannot write the CUDA kernel cache in {} ({err}); compiled kernels stay in \
         this process's memory only (set MAMBA_SCAN_CACHE_DIR to a writable directory)",
        dir.display()
    );
    Python::attach(|py| {
        // Best effort, as the logging: a failure here must not fail the kernel call.
        let _ = py.import("warnings").and_then(|w| {
            let category = py.get_type::<pyo3::exceptions::PyRuntimeWarning>();
            w.call_method1("warn", (msg, category, 2))
        });
    });
}

/// The cubin and ptxas log of one specialisation (for inspecting SASS with cuobjdump/nvdisasm).
#[pyfunction]
#[pyo3(signature = (arch, backward, in_type, dstate, var_b, var_c, has_z, wide=false))]
#[allow(clippy::too_many_arguments)]
fn cuda_cubin<'py>(
    py: Python<'py>,
    arch: String,
    backward: bool,
    in_type: u8,
    dstate: i32,
    var_b: bool,
    var_c: bool,
    has_z: bool,
    wide: bool,
) -> PyResult<(Bound<'py, pyo3::types::PyBytes>, String)> {
    let spec = cuda::compile::KernelSpec::new(backward, in_type, dstate, wide, var_b, var_c, has_z);
    let c =
        py.detach(move || cuda::compile::compile(&cuda::compile::Program::Scan(spec), &arch))?;
    Ok((pyo3::types::PyBytes::new(py, &c.cubin), c.log))
}

/// NVRTC's (major, minor) version.
#[pyfunction]
fn nvrtc_version() -> PyResult<(i32, i32)> {
    Ok(cuda::compile::nvrtc_version()?)
}

#[pyfunction]
fn cpu_threads() -> usize {
    rayon::current_num_threads()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    cpu::install_fork_handler();
    m.add_function(wrap_pyfunction!(scan_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(scan_bwd, m)?)?;
    m.add_function(wrap_pyfunction!(state_update, m)?)?;
    m.add_function(wrap_pyfunction!(conv1d_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(conv1d_bwd, m)?)?;
    m.add_function(wrap_pyfunction!(conv1d_update, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_conv1d_workspace_size, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_chunk_size, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_isa, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_threads, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_chunk_size, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_bwd_workspace_size, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_program_names, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_cache_dir, m)?)?;
    m.add_function(wrap_pyfunction!(nvrtc_compile_in_process, m)?)?;
    m.add_function(wrap_pyfunction!(set_compile_worker, m)?)?;
    m.add_function(wrap_pyfunction!(compile_worker_active, m)?)?;
    m.add_function(wrap_pyfunction!(compile_worker_error, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_compile_program, m)?)?;
    let _ = cuda::compile::COLD_COMPILE_HOOK.set(log_cold_compile);
    let _ = cuda::compile::CACHE_WRITE_HOOK.set(warn_cache_write);
    m.add_function(wrap_pyfunction!(nvrtc_version, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_cubin, m)?)?;
    let py = m.py();
    m.add("ShapeError", py.get_type::<ShapeError>())?;
    m.add("DTypeError", py.get_type::<DTypeError>())?;
    m.add("DeviceError", py.get_type::<DeviceError>())?;
    m.add("LayoutError", py.get_type::<LayoutError>())?;
    m.add("CudaError", py.get_type::<CudaError>())?;
    m.add("CompileError", py.get_type::<CompileError>())?;
    m.add("LibraryError", py.get_type::<LibraryError>())?;
    Ok(())
}
