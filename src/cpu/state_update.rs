//! `selective_state_update` on the CPU, for the contract (semantics, shapes, checks) in
//! `ops::state_update`. `out` uses the updated state before it is rounded to the state's dtype,
//! as the Triton kernel does. Any strides (A and dt may be broadcast views with stride 0).

use super::Real;
use super::strided::{ld, st};
use crate::dlpack::{DType, TensorView};
use crate::ops::state_update::UpdateArgs;

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
