//! Depthwise causal convolution on the CPU, forward, backward and the decoding update, for the
//! contract (semantics, arguments, checks) in `ops::conv1d`. Arithmetic in f32 (f64 for f64
//! tensors); any strides. Work is split over channels and each channel loops over the batch, so
//! the weight and bias gradients are summed in a fixed order: deterministic, no atomics.

use super::Real;
use super::strided::{ld, st};
use crate::dlpack::{DType, Device, TensorView};
use crate::error::Result;
use crate::ops::args::check_row_indices;
use crate::ops::conv1d::{ConvArgs, ConvGrads, check_backward, check_forward, check_update};

fn wide(a: &ConvArgs) -> bool {
    a.x.dtype == DType::F64 || a.weight.dtype == DType::F64
}

/// One channel's padded input row xp (W - 1 + L values) of batch entry `bi`.
unsafe fn padded<R: Real>(a: &ConvArgs, bi: i64, c: i64, l: i64, w: i64, xp: &mut Vec<R>) {
    xp.clear();
    for k in 0..w - 1 {
        xp.push(match a.initial_states {
            // SAFETY: in bounds by `check`.
            Some(h0) => unsafe { ld(h0, bi * h0.stride(0) + c * h0.stride(1) + k * h0.stride(2)) },
            None => R::ZERO,
        });
    }
    let row = bi * a.x.stride(0) + c * a.x.stride(1);
    // SAFETY: in bounds by `check`.
    unsafe { load_row(a.x, row, l, xp) };
}

/// Append the `l` elements of a (…, seqlen) row starting at offset `row` of `t`: one bulk
/// conversion when the steps are contiguous.
///
/// # Safety
/// The row must be in bounds of the live CPU tensor `t`.
unsafe fn load_row<R: Real>(t: &TensorView, row: i64, l: i64, dst: &mut Vec<R>) {
    if l <= 0 {
        return; // (an empty tensor's data pointer may be null)
    }
    let n0 = dst.len();
    if t.stride(2) == 1 || l == 1 {
        dst.resize(n0 + l as usize, R::ZERO);
        // SAFETY: per the contract, `l` contiguous elements at `row`.
        unsafe { R::load(t.dtype, super::addr(t.ptr, row, t.dtype), &mut dst[n0..]) };
    } else {
        for s in 0..l {
            // SAFETY: per the contract.
            dst.push(unsafe { ld(t, row + s * t.stride(2)) });
        }
    }
}

/// Store `src` as the row at offset `row` of `t` (bulk when the steps are contiguous).
///
/// # Safety
/// As for `load_row`, on a writable tensor that no other thread writes in this row.
unsafe fn store_row<R: Real>(t: &TensorView, row: i64, src: &[R]) {
    if src.is_empty() {
        return;
    }
    if t.stride(2) == 1 || src.len() == 1 {
        // SAFETY: per the contract.
        unsafe { R::store(t.dtype, super::addr(t.ptr, row, t.dtype), src) };
    } else {
        for (s, &v) in src.iter().enumerate() {
            // SAFETY: per the contract.
            unsafe { st(t, row + s as i64 * t.stride(2), v) };
        }
    }
}

/// Channel c's taps and bias.
///
/// # Safety
/// `check` must have passed for `a`.
unsafe fn channel_weights<R: Real>(a: &ConvArgs, c: i64, w: i64) -> (Vec<R>, R) {
    // SAFETY: in bounds by `check`.
    unsafe {
        let wk = (0..w)
            .map(|k| ld(a.weight, c * a.weight.stride(0) + k * a.weight.stride(1)))
            .collect();
        (wk, a.bias.map_or(R::ZERO, |t| ld(t, c * t.stride(0))))
    }
}

/// Pre-activations of one row: y[t] = bias + sum_k w[k] xp[t + k] over the taps `tap_ok`
/// allows. Without seq_idx the loops run tap-outer over contiguous rows, so they vectorise.
fn pre_row<R: Real>(a: &ConvArgs, bi: i64, l: i64, xp: &[R], wk: &[R], bias: R, y: &mut Vec<R>) {
    let (lu, w) = (l as usize, wk.len() as i64);
    y.clear();
    y.resize(lu, bias);
    if a.seq_idx.is_none() {
        for (k, &wv) in wk.iter().enumerate() {
            for (yt, &xv) in y.iter_mut().zip(&xp[k..k + lu]) {
                *yt = *yt + wv * xv;
            }
        }
        return;
    }
    for t in 0..l {
        if padding(a, bi, l, t) {
            y[t as usize] = R::ZERO; // padding: 0 out (silu(0) = 0), no bias
            continue;
        }
        for k in 0..w {
            if tap_ok(a, bi, l, t, t - (w - 1 - k)) {
                y[t as usize] = y[t as usize] + wk[k as usize] * xp[(t + k) as usize];
            }
        }
    }
}

/// Whether step t of row bi is padding (a negative seq_idx, causal-conv1d's convention): its
/// output is 0 and it separates the sequences around it.
#[inline(always)]
fn padding(a: &ConvArgs, bi: i64, l: i64, t: i64) -> bool {
    a.seq_idx.is_some_and(|s| s[(bi * l + t) as usize] < 0)
}

#[inline(always)]
fn tap_ok(a: &ConvArgs, bi: i64, l: i64, t: i64, src: i64) -> bool {
    match a.seq_idx {
        None => true,
        Some(s) => src >= 0 && s[(bi * l + src) as usize] == s[(bi * l + t) as usize],
    }
}

/// Forward: writes `out` (batch, dim, seqlen) and, if given, `final_states` (batch, dim, W - 1).
///
/// # Safety
/// The tensors must be alive, `out` / `final_states` fresh (not aliasing inputs).
pub unsafe fn forward(
    a: &ConvArgs,
    out: &TensorView,
    final_states: Option<&TensorView>,
) -> Result<()> {
    let (b, d, l, w) = check_forward(a, out, final_states, Device::Cpu)?;
    if wide(a) {
        // SAFETY: forwarded.
        unsafe { fwd_t::<f64>(a, out, final_states, (b, d, l, w)) };
    } else {
        // SAFETY: forwarded.
        unsafe { fwd_t::<f32>(a, out, final_states, (b, d, l, w)) };
    }
    Ok(())
}

unsafe fn fwd_t<R: Real + Send + Sync>(
    a: &ConvArgs,
    out: &TensorView,
    fin: Option<&TensorView>,
    (b, d, l, w): (i64, i64, i64, i64),
) {
    super::par_for(
        d as usize,
        || (Vec::<R>::new(), Vec::<R>::new()),
        |ci, (xp, y)| {
            let c = ci as i64;
            // SAFETY (this closure): offsets from checked shapes and the tensors' strides; each
            // task writes only channel c.
            unsafe {
                let (wk, bias) = channel_weights::<R>(a, c, w);
                for bi in 0..b {
                    padded(a, bi, c, l, w, xp);
                    pre_row(a, bi, l, xp, &wk, bias, y);
                    if a.silu {
                        for v in y.iter_mut() {
                            *v = *v * super::sigmoid(*v);
                        }
                    }
                    store_row(out, bi * out.stride(0) + c * out.stride(1), y);
                    if let Some(f) = fin {
                        let n = xp.len() as i64;
                        for k in 0..w - 1 {
                            let v = xp[(n - (w - 1) + k) as usize];
                            st(f, bi * f.stride(0) + c * f.stride(1) + k * f.stride(2), v);
                        }
                    }
                }
            }
        },
    );
}

/// Backward: dx, dweight, dbias, dinitial_states from dout (and the gradient of final_states).
///
/// # Safety
/// As for `forward`; the gradient outputs must be fresh.
pub unsafe fn backward(a: &ConvArgs, g: &ConvGrads) -> Result<()> {
    let (b, d, l, w) = check_backward(a, g, Device::Cpu)?;
    if wide(a) {
        // SAFETY: forwarded.
        unsafe { bwd_t::<f64>(a, g, (b, d, l, w)) };
    } else {
        // SAFETY: forwarded.
        unsafe { bwd_t::<f32>(a, g, (b, d, l, w)) };
    }
    Ok(())
}

unsafe fn bwd_t<R: Real + Send + Sync>(
    a: &ConvArgs,
    g: &ConvGrads,
    (b, d, l, w): (i64, i64, i64, i64),
) {
    super::par_for(
        d as usize,
        || {
            (
                Vec::<R>::new(),
                Vec::<R>::new(),
                Vec::<R>::new(),
                Vec::<R>::new(),
            )
        },
        |ci, (xp, gp, dxp, pre)| {
            let c = ci as i64;
            // SAFETY (this closure): as in the forward; this task writes channel c only.
            unsafe {
                let (wk, bias) = channel_weights::<R>(a, c, w);
                let mut dw = vec![R::ZERO; w as usize];
                let mut db = R::ZERO;
                for bi in 0..b {
                    padded(a, bi, c, l, w, xp);
                    // g = dout * act'(pre), recomputing pre.
                    gp.clear();
                    load_row(g.dout, bi * g.dout.stride(0) + c * g.dout.stride(1), l, gp);
                    if a.silu {
                        pre_row(a, bi, l, xp, &wk, bias, pre);
                        for (gv, &p) in gp.iter_mut().zip(pre.iter()) {
                            let s = super::sigmoid(p);
                            *gv = *gv * s * (R::ONE + p * (R::ONE - s));
                        }
                    }
                    // Padding outputs are the constant 0: no gradient flows from them.
                    for t in 0..l {
                        if padding(a, bi, l, t) {
                            gp[t as usize] = R::ZERO;
                        }
                    }
                    dxp.clear();
                    dxp.resize(xp.len(), R::ZERO);
                    if let Some(f) = g.dfinal {
                        let n = xp.len() as i64;
                        for k in 0..w - 1 {
                            let i = (n - (w - 1) + k) as usize;
                            dxp[i] = dxp[i]
                                + ld(f, bi * f.stride(0) + c * f.stride(1) + k * f.stride(2));
                        }
                    }
                    for &gv in gp.iter() {
                        db = db + gv;
                    }
                    if a.seq_idx.is_none() {
                        // Tap-outer loops over contiguous rows (they vectorise).
                        for (k, &wv) in wk.iter().enumerate() {
                            let mut acc = R::ZERO;
                            for (t, &gv) in gp.iter().enumerate() {
                                acc = acc + gv * xp[t + k];
                                dxp[t + k] = dxp[t + k] + gv * wv;
                            }
                            dw[k] = dw[k] + acc;
                        }
                    } else {
                        for t in 0..l {
                            let gv = gp[t as usize];
                            for k in 0..w {
                                if tap_ok(a, bi, l, t, t - (w - 1 - k)) {
                                    let j = (t + k) as usize;
                                    dw[k as usize] = dw[k as usize] + gv * xp[j];
                                    dxp[j] = dxp[j] + gv * wk[k as usize];
                                }
                            }
                        }
                    }
                    store_row(
                        g.dx,
                        bi * g.dx.stride(0) + c * g.dx.stride(1),
                        &dxp[(w - 1) as usize..],
                    );
                    if let Some(h) = g.dinitial {
                        for k in 0..w - 1 {
                            st(
                                h,
                                bi * h.stride(0) + c * h.stride(1) + k * h.stride(2),
                                dxp[k as usize],
                            );
                        }
                    }
                }
                for k in 0..w {
                    st(
                        g.dweight,
                        c * g.dweight.stride(0) + k * g.dweight.stride(1),
                        dw[k as usize],
                    );
                }
                if let Some(t) = g.dbias {
                    st(t, c * t.stride(0), db);
                }
            }
        },
    );
}

/// Decoding update: x (batch, dim, seqlen) new inputs, conv_state (S, dim, state_len) updated in
/// place; `cache_seqlens` makes the state a circular buffer; `indices` pick state rows
/// (negative: padding, state untouched and out 0).
///
/// # Safety
/// As for `forward`; `conv_state` must not alias the inputs.
#[allow(clippy::too_many_arguments)]
pub unsafe fn update(
    x: &TensorView,
    state: &TensorView,
    weight: &TensorView,
    bias: Option<&TensorView>,
    silu: bool,
    cache_seqlens: Option<&[i64]>,
    indices: Option<&[i64]>,
    out: &TensorView,
) -> Result<()> {
    let (b, d, l, w) = check_update(
        x,
        state,
        weight,
        bias,
        out,
        Device::Cpu,
        [
            cache_seqlens.map(|v| v.len() as i64),
            indices.map(|v| v.len() as i64),
        ],
    )?;
    if let Some(ix) = indices {
        check_row_indices(ix, state.shape[0], "conv_state_indices", "conv_state")?;
    }
    let wide = x.dtype == DType::F64 || weight.dtype == DType::F64;
    let args = (x, state, weight, bias, silu, cache_seqlens, indices, out);
    if wide {
        // SAFETY: checked above.
        unsafe { upd_t::<f64>(args, (b, d, l, w)) };
    } else {
        // SAFETY: checked above.
        unsafe { upd_t::<f32>(args, (b, d, l, w)) };
    }
    Ok(())
}

type UpdArgs<'a> = (
    &'a TensorView,
    &'a TensorView,
    &'a TensorView,
    Option<&'a TensorView>,
    bool,
    Option<&'a [i64]>,
    Option<&'a [i64]>,
    &'a TensorView,
);

unsafe fn upd_t<R: Real + Send + Sync>(a: UpdArgs, (b, d, l, w): (i64, i64, i64, i64)) {
    let (x, state, weight, bias, silu, seqlens, indices, out) = a;
    let sl = state.shape[2];
    super::par_for((b * d) as usize, Vec::<R>::new, |r, win| {
        let (bi, c) = ((r as i64) / d, (r as i64) % d);
        // SAFETY (this closure): offsets from checked shapes and strides; rows (bi, c) are
        // disjoint and state rows are distinct (checked), so no element is written twice.
        unsafe {
            let si = indices.map_or(bi, |ix| ix[bi as usize]);
            let o = |t: i64| bi * out.stride(0) + c * out.stride(1) + t * out.stride(2);
            if si < 0 {
                for t in 0..l {
                    st(out, o(t), R::ZERO);
                }
                return;
            }
            let so = |k: i64| si * state.stride(0) + c * state.stride(1) + k * state.stride(2);
            let xo = |t: i64| bi * x.stride(0) + c * x.stride(1) + t * x.stride(2);
            // The window: the W - 1 inputs before the new ones, then the new ones.
            win.clear();
            match seqlens {
                None => {
                    for k in sl - (w - 1)..sl {
                        win.push(ld(state, so(k)));
                    }
                }
                Some(cs) => {
                    let start = cs[bi as usize];
                    for k in -(w - 1)..0 {
                        win.push(ld(state, so((start + k).rem_euclid(sl))));
                    }
                }
            }
            for t in 0..l {
                win.push(ld(x, xo(t)));
            }
            // New state.
            match seqlens {
                None => {
                    // Shift left by l and append x (keeping the last state_len inputs).
                    let mut all: Vec<R> = (0..sl).map(|k| ld(state, so(k))).collect();
                    for t in 0..l {
                        all.push(ld(x, xo(t)));
                    }
                    let n = all.len();
                    for k in 0..sl {
                        st(state, so(k), all[n - sl as usize + k as usize]);
                    }
                }
                Some(cs) => {
                    let start = cs[bi as usize];
                    for t in 0..l {
                        st(state, so((start + t).rem_euclid(sl)), ld::<R>(x, xo(t)));
                    }
                }
            }
            let bv: R = bias.map_or(R::ZERO, |t| ld(t, c * t.stride(0)));
            for t in 0..l {
                let mut acc = bv;
                for k in 0..w {
                    let wv: R = ld(weight, c * weight.stride(0) + k * weight.stride(1));
                    acc = acc + wv * win[(t + k) as usize];
                }
                if silu {
                    acc = acc * super::sigmoid(acc);
                }
                st(out, o(t), acc);
            }
        }
    });
}
