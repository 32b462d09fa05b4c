//! Backward selective scan on the CPU. Each channel is recomputed chunk by chunk from its saved
//! start state (the forward kept one state per chunk), then the chunk is scanned in reverse.
//!
//! Determinism: nothing is reduced with atomics or in a thread-dependent order. Channels are cut
//! into fixed sub-blocks (a function of the shapes only); each work item owns its sub-block and
//! writes partial sums of variable dB/dC into its own slice of a workspace; per-channel sums (dA,
//! dD, ddelta_bias, fixed dB/dC) go to per-(batch, channel) slots. A second pass adds the partials
//! in a fixed order. The result is bitwise identical across runs and thread counts.

use super::scan_fwd::{blk, blk_mut, hsum, load_a, load_bc, load_initial, load_scalar, load_steps, padded, state_off};
use super::{Real, W, addr, par_for, sigmoid};
use crate::check::Plan;
use crate::dlpack::DType;
use crate::params::SsmParams;

/// Partial-sum memory we allow for variable dB/dC (elements).
const PARTIAL_BUDGET: usize = 1 << 26;

pub(crate) struct BwdScratch<R> {
    u: Vec<R>,
    x: Vec<R>,
    dt: Vec<R>,
    z: Vec<R>,
    dout: Vec<R>,
    dy: Vec<R>,
    y: Vec<R>,
    du: Vec<R>,
    ddt: Vec<R>,
    dz: Vec<R>,
    row: Vec<R>,
    bt: Vec<R>,
    ct: Vec<R>,
    hs: Vec<R>,
    da: Vec<R>,
    dbt: Vec<R>,
    dct: Vec<R>,
    a: Vec<R>,
    h0: Vec<R>,
    g: Vec<R>,
}

impl<R: Real> BwdScratch<R> {
    fn new(chunk: usize, np: usize) -> Self {
        let z = |n| vec![R::ZERO; n];
        BwdScratch {
            u: z(chunk),
            x: z(chunk),
            dt: z(chunk),
            z: z(chunk),
            dout: z(chunk),
            dy: z(chunk),
            y: z(chunk),
            du: z(chunk),
            ddt: z(chunk),
            dz: z(chunk),
            row: z(chunk),
            bt: z(chunk * np),
            ct: z(chunk * np),
            hs: z(chunk * np),
            da: z(chunk * np),
            dbt: z(chunk * np),
            dct: z(chunk * np),
            a: z(np),
            h0: z(np),
            g: z(np),
        }
    }
}

/// A run of channels [d0, d1) inside one B group and one C group.
#[derive(Clone, Copy, Debug)]
struct Block {
    d0: usize,
    d1: usize,
    gb: usize,
    gc: usize,
}

/// Cut [0, dim) at every B-group and C-group boundary, then each piece into at most `parts`
/// sub-blocks. Depends on the shapes only, never on the thread count.
fn blocks(p: &SsmParams, parts: usize) -> Vec<Block> {
    let dim = p.dim as usize;
    let sb = dim / p.b_ngroups as usize;
    let sc = dim / p.c_ngroups as usize;
    let mut cuts: Vec<usize> = (0..=dim).filter(|d| d % sb == 0 || d % sc == 0 || *d == dim).collect();
    cuts.dedup();
    let mut out = Vec::new();
    for w in cuts.windows(2) {
        let (s0, s1) = (w[0], w[1]);
        let per = (s1 - s0).div_ceil(parts).max(1);
        let mut d = s0;
        while d < s1 {
            let e = (d + per).min(s1);
            out.push(Block { d0: d, d1: e, gb: d / sb, gc: d / sc });
            d = e;
        }
    }
    out
}

/// Slots per (batch, channel) in the per-channel workspace: dA, fixed dB, fixed dC (dstate each),
/// dD, ddelta_bias.
fn chan_slots(n: usize) -> usize {
    3 * n + 2
}

/// Backward of one channel: writes du, ddelta, dz, dinitial_state rows; adds variable dB/dC into
/// this block's partial rows (`pb`, `pc`: dstate x seqlen, or null); writes per-channel sums.
///
/// # Safety
/// `p` from `plan_backward`; `pb`/`pc`/`chan` address this item's own workspace slices.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn bwd_channel<R: Real, const VB: bool, const VC: bool>(
    p: &SsmParams,
    ind: DType,
    wd: DType,
    b: usize,
    d: usize,
    pb: *mut R,
    pc: *mut R,
    chan: *mut R,
    s: &mut BwdScratch<R>,
) {
    let n_state = p.dstate as usize;
    let np = padded(n_state);
    let nblk = np / W;
    let k = p.chunk_size as usize;
    let seqlen = p.seqlen as usize;
    let has_z = p.has_z != 0;
    // SAFETY: tensors checked by plan_backward; (b, d) in range; workspace slices are this
    // item's own.
    unsafe {
        load_a(p, wd, d, &mut s.a);
        let dval: R = load_scalar(p.has_d != 0, p.d_ptr, wd, d);
        let bias: R = load_scalar(p.has_delta_bias != 0, p.delta_bias_ptr, wd, d);
        if !VB {
            load_bc::<R, false>(p, ind, wd, p.b_ptr, (0, p.b_group_stride, p.b_dstate_stride), 1, b, d, 0, 0, np, &mut s.row, &mut s.bt);
        }
        if !VC {
            load_bc::<R, false>(p, ind, wd, p.c_ptr, (0, p.c_group_stride, p.c_dstate_stride), 1, b, d, 0, 0, np, &mut s.row, &mut s.ct);
        }
        s.g.fill(R::ZERO);
        if p.has_dlast_state != 0 {
            let off = ((b * p.dim as usize + d) * n_state) as i64;
            R::load(wd, addr(p.dlast_state_ptr, off, wd), &mut s.g[..n_state]);
        }
        let mut da_acc = [R::ZERO; 64 * 4];
        let mut dbf = [R::ZERO; 64 * 4];
        let mut dcf = [R::ZERO; 64 * 4];
        debug_assert!(np <= da_acc.len());
        let mut dd_acc = R::ZERO;
        let mut dbias_acc = R::ZERO;
        let (bi, di) = (b as i64, d as i64);

        for c in (0..p.n_chunks as usize).rev() {
            let t0 = c * k;
            let len = k.min(seqlen.saturating_sub(t0));
            load_steps(p, ind, b, d, t0, len, bias, &mut s.u, &mut s.x, &mut s.dt, &mut s.z);
            R::load(ind, addr(p.dout_ptr, bi * p.dout_batch_stride + di * p.dout_d_stride + t0 as i64, ind), &mut s.dout[..len]);
            if VB {
                load_bc::<R, true>(p, ind, wd, p.b_ptr, (p.b_batch_stride, p.b_group_stride, p.b_dstate_stride), p.b_ngroups, b, d, t0, len, np, &mut s.row, &mut s.bt);
            }
            if VC {
                load_bc::<R, true>(p, ind, wd, p.c_ptr, (p.c_batch_stride, p.c_group_stride, p.c_dstate_stride), p.c_ngroups, b, d, t0, len, np, &mut s.row, &mut s.ct);
            }
            // The state before this chunk.
            if c == 0 {
                load_initial(p, wd, b, d, &mut s.h0);
            } else {
                s.h0.fill(R::ZERO);
                R::load(wd, addr(p.states_ptr, state_off(p, b, d, c - 1), wd), &mut s.h0[..n_state]);
            }
            // Recompute the chunk: h_t, exp(dt_t A) and y_t.
            {
                let mut h = [R::ZERO; 64 * 4];
                h[..np].copy_from_slice(&s.h0[..np]);
                for t in 0..len {
                    let dtv = s.dt[t];
                    let dtu = dtv * s.u[t];
                    let bo = if VB { t * np } else { 0 };
                    let co = if VC { t * np } else { 0 };
                    let mut acc = [R::ZERO; W];
                    for kb in 0..nblk {
                        let o = kb * W;
                        let (ab, bb, cb) = (blk(&s.a, o), blk(&s.bt, bo + o), blk(&s.ct, co + o));
                        let hb = blk_mut(&mut h, o);
                        let dab = blk_mut(&mut s.da, t * np + o);
                        for l in 0..W {
                            let e = (dtv * ab[l]).fexp();
                            dab[l] = e;
                            hb[l] = e * hb[l] + dtu * bb[l];
                            acc[l] = acc[l] + cb[l] * hb[l];
                        }
                        blk_mut(&mut s.hs, t * np + o).copy_from_slice(hb);
                    }
                    s.y[t] = hsum(&acc);
                }
            }
            // Pointwise: gating, D skip.
            for t in 0..len {
                let mut dy = s.dout[t];
                if has_z {
                    let zt = s.z[t];
                    let sz = sigmoid(zt);
                    let out = s.y[t] + dval * s.u[t];
                    s.dz[t] = dy * out * sz * (R::ONE + zt * (R::ONE - sz));
                    dy = dy * zt * sz;
                }
                s.dy[t] = dy;
                dd_acc = dd_acc + dy * s.u[t];
                s.du[t] = dval * dy;
            }
            // Reverse scan. On entry to step t, g holds a_{t+1} g_{t+1} (the gradient reaching
            // h_t from the future); adding C_t dy_t makes it dL/dh_t.
            for t in (0..len).rev() {
                let (dyt, dtv, ut) = (s.dy[t], s.dt[t], s.u[t]);
                let bo = if VB { t * np } else { 0 };
                let co = if VC { t * np } else { 0 };
                let mut sdu = [R::ZERO; W];
                let mut sdt = [R::ZERO; W];
                for kb in 0..nblk {
                    let o = kb * W;
                    let (ab, bb, cb) = (blk(&s.a, o), blk(&s.bt, bo + o), blk(&s.ct, co + o));
                    let dab = blk(&s.da, t * np + o);
                    let hcur = blk(&s.hs, t * np + o);
                    let hprev: &[R; W] = if t > 0 { blk(&s.hs, (t - 1) * np + o) } else { blk(&s.h0, o) };
                    let gb = blk_mut(&mut s.g, o);
                    let mut dbv = [R::ZERO; W];
                    let mut dcv = [R::ZERO; W];
                    let daa = blk_mut(&mut da_acc, o);
                    for l in 0..W {
                        let gl = gb[l] + cb[l] * dyt;
                        dcv[l] = dyt * hcur[l];
                        dbv[l] = gl * dtv * ut;
                        sdu[l] = sdu[l] + gl * bb[l];
                        let gah = gl * dab[l] * hprev[l];
                        sdt[l] = sdt[l] + gl * bb[l] * ut + ab[l] * gah;
                        daa[l] = daa[l] + dtv * gah;
                        gb[l] = gl * dab[l];
                    }
                    if VB {
                        blk_mut(&mut s.dbt, t * np + o).copy_from_slice(&dbv);
                    } else {
                        let x = blk_mut(&mut dbf, o);
                        for l in 0..W {
                            x[l] = x[l] + dbv[l];
                        }
                    }
                    if VC {
                        blk_mut(&mut s.dct, t * np + o).copy_from_slice(&dcv);
                    } else {
                        let x = blk_mut(&mut dcf, o);
                        for l in 0..W {
                            x[l] = x[l] + dcv[l];
                        }
                    }
                }
                s.du[t] = s.du[t] + dtv * hsum(&sdu);
                s.ddt[t] = hsum(&sdt);
            }
            // delta's gradient through bias and softplus.
            for t in 0..len {
                let mut g = s.ddt[t];
                if p.delta_softplus != 0 && !(s.x[t] > R::from_f64(20.0)) {
                    g = g * sigmoid(s.x[t]);
                }
                s.ddt[t] = g;
                dbias_acc = dbias_acc + g;
            }
            let t0i = t0 as i64;
            R::store(ind, addr(p.du_ptr, bi * p.du_batch_stride + di * p.du_d_stride + t0i, ind), &s.du[..len]);
            R::store(ind, addr(p.ddelta_ptr, bi * p.ddelta_batch_stride + di * p.ddelta_d_stride + t0i, ind), &s.ddt[..len]);
            if has_z {
                R::store(ind, addr(p.dz_ptr, bi * p.dz_batch_stride + di * p.dz_d_stride + t0i, ind), &s.dz[..len]);
            }
            if VB {
                for n in 0..n_state {
                    let row = std::slice::from_raw_parts_mut(pb.add(n * seqlen + t0), len);
                    for (t, r) in row.iter_mut().enumerate() {
                        *r = *r + s.dbt[t * np + n];
                    }
                }
            }
            if VC {
                for n in 0..n_state {
                    let row = std::slice::from_raw_parts_mut(pc.add(n * seqlen + t0), len);
                    for (t, r) in row.iter_mut().enumerate() {
                        *r = *r + s.dct[t * np + n];
                    }
                }
            }
        }
        if p.dinitial_state_ptr != 0 {
            let off = ((b * p.dim as usize + d) * n_state) as i64;
            R::store(wd, addr(p.dinitial_state_ptr, off, wd), &s.g[..n_state]);
        }
        let ch = std::slice::from_raw_parts_mut(chan, chan_slots(n_state));
        ch[..n_state].copy_from_slice(&da_acc[..n_state]);
        ch[n_state..2 * n_state].copy_from_slice(&dbf[..n_state]);
        ch[2 * n_state..3 * n_state].copy_from_slice(&dcf[..n_state]);
        ch[3 * n_state] = dd_acc;
        ch[3 * n_state + 1] = dbias_acc;
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn bwd_block<R: Real, const VB: bool, const VC: bool>(
    p: &SsmParams,
    ind: DType,
    wd: DType,
    b: usize,
    blk: (usize, usize, u64, u64, u64),
    s: &mut BwdScratch<R>,
) {
    let (d0, d1, pb, pc, chan) = blk;
    let (pb, pc, chan) = (pb as *mut R, pc as *mut R, chan as *mut R);
    let ns = chan_slots(p.dstate as usize);
    for d in d0..d1 {
        // SAFETY: forwarded; each channel's `chan` slot is its own.
        unsafe { bwd_channel::<R, VB, VC>(p, ind, wd, b, d, pb, pc, chan.add((b * p.dim as usize + d) * ns), s) };
    }
}

type BlockFn<R> = unsafe fn(&SsmParams, DType, DType, usize, (usize, usize, u64, u64, u64), &mut BwdScratch<R>);

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn avx512<R: Real, const VB: bool, const VC: bool>(p: &SsmParams, ind: DType, wd: DType, b: usize, k: (usize, usize, u64, u64, u64), s: &mut BwdScratch<R>) {
    // SAFETY: forwarded contract; features checked by isa().
    unsafe { bwd_block::<R, VB, VC>(p, ind, wd, b, k, s) }
}
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2<R: Real, const VB: bool, const VC: bool>(p: &SsmParams, ind: DType, wd: DType, b: usize, k: (usize, usize, u64, u64, u64), s: &mut BwdScratch<R>) {
    // SAFETY: as above.
    unsafe { bwd_block::<R, VB, VC>(p, ind, wd, b, k, s) }
}
unsafe fn baseline<R: Real, const VB: bool, const VC: bool>(p: &SsmParams, ind: DType, wd: DType, b: usize, k: (usize, usize, u64, u64, u64), s: &mut BwdScratch<R>) {
    // SAFETY: forwarded contract.
    unsafe { bwd_block::<R, VB, VC>(p, ind, wd, b, k, s) }
}

fn pick<R: Real>(vb: bool, vc: bool) -> BlockFn<R> {
    use super::{Isa, isa};
    macro_rules! by_isa {
        ($vb:literal, $vc:literal) => {
            match isa() {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => avx512::<R, $vb, $vc>,
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => avx2::<R, $vb, $vc>,
                _ => baseline::<R, $vb, $vc>,
            }
        };
    }
    match (vb, vc) {
        (true, true) => by_isa!(true, true),
        (true, false) => by_isa!(true, false),
        (false, true) => by_isa!(false, true),
        (false, false) => by_isa!(false, false),
    }
}

fn run<R: Real>(plan: &Plan) {
    let p = plan.params;
    let (ind, wd) = (plan.in_dtype, plan.w_dtype);
    let (vb, vc) = (p.is_variable_b != 0, p.is_variable_c != 0);
    let (batch, dim, n, seqlen) = (p.batch as usize, p.dim as usize, p.dstate as usize, p.seqlen as usize);
    let nseg = {
        let all = blocks(&p, 1);
        all.len()
    };
    let per_part = (vb as usize + vc as usize) * n * seqlen;
    let parts = if per_part == 0 { 8 } else { (PARTIAL_BUDGET / (batch * nseg * per_part).max(1)).clamp(1, 8) };
    let blks = blocks(&p, parts);
    let nb = blks.len();
    let rows = n * seqlen;
    let mut part_b = vec![R::ZERO; if vb { batch * nb * rows } else { 0 }];
    let mut part_c = vec![R::ZERO; if vc { batch * nb * rows } else { 0 }];
    let ns = chan_slots(n);
    let mut chan = vec![R::ZERO; batch * dim * ns];
    let (pb0, pc0, ch0) = (part_b.as_mut_ptr() as u64, part_c.as_mut_ptr() as u64, chan.as_mut_ptr() as u64);
    let f = pick::<R>(vb, vc);
    let np = padded(n);
    let chunk = p.chunk_size as usize;
    let esz = std::mem::size_of::<R>() as u64;
    par_for(
        batch * nb,
        || BwdScratch::<R>::new(chunk, np),
        |i, s| {
            let (b, j) = (i / nb, i % nb);
            let k = blks[j];
            let slot = ((b * nb + j) * rows) as u64 * esz;
            let pb = if vb { pb0 + slot } else { 0 };
            let pc = if vc { pc0 + slot } else { 0 };
            // SAFETY: plan_backward validated the tensors; item (b, j) writes only its own
            // channels' rows, its own partial slices and its channels' slots.
            unsafe { f(&p, ind, wd, b, (k.d0, k.d1, pb, pc, ch0), s) }
        },
    );
    // Second pass: fixed-order sums.
    // SAFETY: output tensors validated by plan_backward; each (d) or (b, g, n) row is written by
    // exactly one item below.
    unsafe {
        let sum_chan = |slot: usize, d: usize| -> R {
            let mut acc = R::ZERO;
            for b in 0..batch {
                acc = acc + chan[(b * dim + d) * ns + slot];
            }
            acc
        };
        let mut tmp = vec![R::ZERO; n];
        for d in 0..dim {
            for (nn, t) in tmp.iter_mut().enumerate() {
                *t = sum_chan(nn, d);
            }
            R::store(wd, addr(p.da_ptr, (d * n) as i64, wd), &tmp);
            if !vb {
                for (nn, t) in tmp.iter_mut().enumerate() {
                    *t = sum_chan(n + nn, d);
                }
                for (nn, t) in tmp.iter().enumerate() {
                    R::store(wd, addr(p.db_ptr, d as i64 * p.db_group_stride + nn as i64 * p.db_dstate_stride, wd), &[*t]);
                }
            }
            if !vc {
                for (nn, t) in tmp.iter_mut().enumerate() {
                    *t = sum_chan(2 * n + nn, d);
                }
                for (nn, t) in tmp.iter().enumerate() {
                    R::store(wd, addr(p.dc_ptr, d as i64 * p.dc_group_stride + nn as i64 * p.dc_dstate_stride, wd), &[*t]);
                }
            }
            if p.has_d != 0 {
                R::store(wd, addr(p.dd_ptr, d as i64, wd), &[sum_chan(3 * n, d)]);
            }
            if p.has_delta_bias != 0 {
                R::store(wd, addr(p.ddelta_bias_ptr, d as i64, wd), &[sum_chan(3 * n + 1, d)]);
            }
        }
        let reduce = |part: &Vec<R>, ngroups: usize, is_b: bool| {
            let (ptr, bs, gs, nst) = if is_b {
                (p.db_ptr, p.db_batch_stride, p.db_group_stride, p.db_dstate_stride)
            } else {
                (p.dc_ptr, p.dc_batch_stride, p.dc_group_stride, p.dc_dstate_stride)
            };
            let pp = part.as_ptr() as u64;
            par_for(
                batch * ngroups * n,
                || vec![R::ZERO; seqlen],
                |i, acc| {
                    let (b, g, nn) = (i / (ngroups * n), (i / n) % ngroups, i % n);
                    acc.fill(R::ZERO);
                    for (j, k) in blks.iter().enumerate() {
                        let kg = if is_b { k.gb } else { k.gc };
                        if kg != g {
                            continue;
                        }
                        let src = std::slice::from_raw_parts(
                            (pp as *const R).add((b * nb + j) * rows + nn * seqlen),
                            seqlen,
                        );
                        for (a, s) in acc.iter_mut().zip(src) {
                            *a = *a + *s;
                        }
                    }
                    let off = b as i64 * bs + g as i64 * gs + nn as i64 * nst;
                    R::store(ind, addr(ptr, off, ind), acc);
                },
            );
        };
        if vb {
            reduce(&part_b, p.b_ngroups as usize, true);
        }
        if vc {
            reduce(&part_c, p.c_ngroups as usize, false);
        }
    }
    drop(part_b);
    drop(part_c);
}

/// Backward selective scan on the CPU.
///
/// # Safety
/// `plan` must come from `plan_backward`; every tensor alive, outputs distinct from inputs.
pub unsafe fn backward(plan: &Plan) {
    let p = &plan.params;
    if p.batch == 0 || p.dim == 0 {
        // Zero-size: weight gradients are zero-filled so the caller gets defined values.
        // SAFETY: validated outputs of (dim, ...) size, possibly empty.
        unsafe { zero_weight_grads(plan) };
        return;
    }
    if plan.w_dtype == DType::F64 { run::<f64>(plan) } else { run::<f32>(plan) }
}

unsafe fn zero_weight_grads(plan: &Plan) {
    let p = &plan.params;
    let wd = plan.w_dtype;
    let (dim, n) = (p.dim as usize, p.dstate as usize);
    let zeros = vec![0.0f32; dim * n];
    // SAFETY: contiguous (dim, dstate) / (dim,) outputs.
    unsafe {
        f32::store(wd, addr(p.da_ptr, 0, wd), &zeros);
        if p.has_d != 0 {
            f32::store(wd, addr(p.dd_ptr, 0, wd), &zeros[..dim]);
        }
        if p.has_delta_bias != 0 {
            f32::store(wd, addr(p.ddelta_bias_ptr, 0, wd), &zeros[..dim]);
        }
        if p.is_variable_b == 0 {
            for d in 0..dim {
                for nn in 0..n {
                    f32::store(wd, addr(p.db_ptr, d as i64 * p.db_group_stride + nn as i64 * p.db_dstate_stride, wd), &[0.0]);
                }
            }
        }
        if p.is_variable_c == 0 {
            for d in 0..dim {
                for nn in 0..n {
                    f32::store(wd, addr(p.dc_ptr, d as i64 * p.dc_group_stride + nn as i64 * p.dc_dstate_stride, wd), &[0.0]);
                }
            }
        }
    }
}
