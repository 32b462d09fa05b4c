//! `selective_state_update` on the CPU: one decoding step of the scan, the state updated in
//! place (mamba_ssm 2.3.2's Triton op). Per (batch, head, channel):
//!   dt = softplus(dt + dt_bias)  (softplus only with dt_softplus; x for x > 20)
//!   h = exp(A dt) h + B dt x;  out = C . h + D x;  out *= silu(z)
//! in fp32 (fp64 when the state is fp64). `out` uses the updated state before it is rounded to
//! the state's dtype, as the Triton kernel does. A negative `state_batch_indices` entry marks a
//! padding row: its state is left untouched and its output is 0.
//!
//! Shapes (the shim adds the heads axis when the caller has none): state (S, H, P, N),
//! x / dt / z / out (Bt, H, P), A (H, P, N), B / C (Bt, G, N) with H % G == 0, D / dt_bias (H, P).
//! Any strides (A and dt may be broadcast views with stride 0).

use super::Real;
use super::strided::{check_row_indices, expect_on, ld, on_device, st};
use crate::dlpack::{DType, Device, IntView, TensorView};
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
    /// ...or a device tensor of them (CUDA calls: checked by the kernel, see cuda/small.cu).
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

/// Run the update.
///
/// # Safety
/// `check(a)` must have passed and the tensors must stay alive for the call; `state` and `out`
/// must not alias any input.
pub unsafe fn run(a: &UpdateArgs) {
    if a.state.dtype == DType::F64 || a.x.dtype == DType::F64 {
        // SAFETY: forwarded.
        unsafe { run_t::<f64>(a) }
    } else {
        // SAFETY: forwarded.
        unsafe { run_t::<f32>(a) }
    }
}

unsafe fn run_t<R: Real + Send + Sync>(a: &UpdateArgs) {
    let (h, p, n) = (a.state.shape[1], a.state.shape[2], a.state.shape[3]);
    let bt = a.x.shape[0];
    let ratio = h / a.b.shape[1];
    let rows = (bt * h) as usize;
    let work = (bt * h * p * n) as usize;
    let body = |r: usize, _: &mut ()| {
        let (bi, hi) = ((r as i64) / h, (r as i64) % h);
        let si = match a.indices {
            Some(ix) => ix[bi as usize],
            None => bi,
        };
        let gi = hi / ratio;
        for pi in 0..p {
            let o3 = |t: &TensorView| bi * t.stride(0) + hi * t.stride(1) + pi * t.stride(2);
            if si < 0 {
                // SAFETY: in-bounds offset of the checked out tensor.
                unsafe { st::<R>(a.out, o3(a.out), R::ZERO) };
                continue;
            }
            // SAFETY (this block): every offset below is built from checked shapes and the
            // tensors' own strides; rows r are disjoint, so no two threads write one element.
            unsafe {
                let x: R = ld(a.x, o3(a.x));
                let mut dt: R = ld(a.dt, o3(a.dt));
                if let Some(bias) = a.dt_bias {
                    dt = dt + ld(bias, hi * bias.stride(0) + pi * bias.stride(1));
                }
                if a.dt_softplus {
                    dt = dt.softplus();
                }
                let dtx = dt * x;
                let mut acc = R::ZERO;
                let so = si * a.state.stride(0) + hi * a.state.stride(1) + pi * a.state.stride(2);
                let ao = hi * a.a.stride(0) + pi * a.a.stride(1);
                let bo = bi * a.b.stride(0) + gi * a.b.stride(1);
                let co = bi * a.c.stride(0) + gi * a.c.stride(1);
                for ni in 0..n {
                    let av: R = ld(a.a, ao + ni * a.a.stride(2));
                    let bv: R = ld(a.b, bo + ni * a.b.stride(2));
                    let cv: R = ld(a.c, co + ni * a.c.stride(2));
                    let off = so + ni * a.state.stride(3);
                    let hv: R = ld(a.state, off);
                    let hn = (av * dt).exp() * hv + bv * dtx;
                    st(a.state, off, hn);
                    acc = acc + cv * hn;
                }
                if let Some(d) = a.d {
                    acc = acc + x * ld(d, hi * d.stride(0) + pi * d.stride(1));
                }
                if let Some(z) = a.z {
                    let zv: R = ld(z, o3(z));
                    acc = acc * zv * super::sigmoid(zv);
                }
                st(a.out, o3(a.out), acc);
            }
        }
    };
    if work < 1 << 16 {
        // A decode step of a small model: threads cost more than they save.
        for r in 0..rows {
            body(r, &mut ());
        }
    } else {
        super::par_for(rows, || (), body);
    }
}
