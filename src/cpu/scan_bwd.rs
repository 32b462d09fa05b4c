//! Backward selective scan on the CPU. Each channel is recomputed chunk by chunk from its saved
//! start state (the forward kept one state per chunk), then the chunk is scanned in reverse.
//!
//! Determinism: nothing is reduced with atomics or in a thread-dependent order. Channels are cut
//! into fixed sub-blocks (a function of the shapes only); each work item owns its sub-block and
//! writes partial sums of variable dB/dC into its own slice of a workspace; per-channel sums (dA,
//! dD, ddelta_bias, fixed dB/dC) go to per-(batch, channel) slots. A second pass adds the partials
//! in a fixed order. The result is bitwise identical across runs and thread counts.

use super::scan_fwd::{
    Block, CB, ChanState, MAX_NB, blk, blk_mut, blocks, hsum, isa_variants, load_bc, load_initial,
    load_seq, load_seq_state, load_steps, padded, state_off, store_seq_state,
};
use super::{Real, W, addr, madd, par_for, sigmoid};
use crate::dlpack::DType;
use crate::ops::scan::Plan;
use crate::params::SsmParams;

/// Steps per first-level block of the sums over time (dA, fixed dB / dC, dD, ddelta_bias).
const SUM_BLOCK: usize = 16;

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
    h0: Vec<R>,
    cs: ChanState<R>,
    g: Vec<R>,
    acc_a: Vec<R>,
    acc_b: Vec<R>,
    acc_c: Vec<R>,
    dd: [R; CB],
    dbias: [R; CB],
    /// Packed sequences: seq_idx of the chunk (the step before first), which steps start a
    /// sequence, and at those steps the new sequence's initial state (`rh0`), the previous
    /// sequence's final-state gradient (`rdf`) and the gradient of the initial state (`rdh0`).
    seq: Vec<i32>,
    bnd: Vec<bool>,
    rh0: Vec<R>,
    rdf: Vec<R>,
    rdh0: Vec<R>,
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
            h0: z(np),
            cs: ChanState::new(np),
            g: z(CB * np),
            acc_a: z(CB * np),
            acc_b: z(CB * np),
            acc_c: z(CB * np),
            dd: [R::ZERO; CB],
            dbias: [R::ZERO; CB],
            seq: vec![0; chunk + 1],
            bnd: vec![false; chunk],
            rh0: z(chunk * np),
            rdf: z(chunk * np),
            rdh0: z(chunk * np),
        }
    }
}

/// Slots per (batch, channel) in the per-channel workspace: dA, fixed dB, fixed dC (dstate each),
/// dD, ddelta_bias.
fn chan_slots(n: usize) -> usize {
    3 * n + 2
}

/// Recompute one chunk of channel j from its start state `s.h0`: h_t (into `hs`), the decays
/// exp(dt_t A) (into `da`) and y_t. Then run the chunk in reverse, accumulating every gradient.
#[inline(always)]
fn chan_chunk<
    R: Real,
    const NB: usize,
    const VB: bool,
    const VC: bool,
    const FMA: bool,
    const VL: bool,
>(
    nb: usize,
    len: usize,
    j: usize,
    s: &mut BwdScratch<R>,
    has_z: bool,
) {
    let nb = if NB <= 2 { NB } else { nb.min(NB) };
    let np = nb * W;
    let o = j * np;
    let ln2 = R::from_f64(std::f64::consts::LN_2);
    let mut ar = [[R::ZERO; W]; NB];
    let mut au = [[R::ZERO; W]; NB];
    let mut bfr = [[R::ZERO; W]; NB];
    let mut cfr = [[R::ZERO; W]; NB];
    let mut hr = [[R::ZERO; W]; NB];
    for k in 0..nb {
        ar[k] = *blk(&s.cs.a2, o + k * W);
        for l in 0..W {
            au[k][l] = ar[k][l] * ln2;
        }
        bfr[k] = *blk(&s.cs.bf, o + k * W);
        cfr[k] = *blk(&s.cs.cf, o + k * W);
        hr[k] = *blk(&s.h0, k * W);
    }
    // Recompute.
    for t in 0..len {
        if VL && s.bnd[t] {
            for k in 0..nb {
                hr[k] = *blk(&s.rh0, t * np + k * W);
            }
        }
        let dtv = s.dt[t];
        let dtu = dtv * s.u[t];
        let mut acc = [R::ZERO; W];
        for k in 0..nb {
            let bb = if VB {
                blk(&s.bt, t * np + k * W)
            } else {
                &bfr[k]
            };
            let cb = if VC {
                blk(&s.ct, t * np + k * W)
            } else {
                &cfr[k]
            };
            let dab = blk_mut(&mut s.da, t * np + k * W);
            for l in 0..W {
                let e = (dtv * ar[k][l]).fexp2::<FMA>();
                dab[l] = e;
                hr[k][l] = madd::<R, FMA>(e, hr[k][l], dtu * bb[l]);
                acc[l] = madd::<R, FMA>(cb[l], hr[k][l], acc[l]);
            }
            *blk_mut(&mut s.hs, t * np + k * W) = hr[k];
        }
        s.y[t] = hsum(&acc);
    }
    // Gating and the D skip.
    let dval = s.cs.dval[j];
    // Sums over time are taken per SUM_BLOCK steps, added to the chunk's sum, which is added to
    // the running total (three levels): their rounding error stays near that of torch's pairwise
    // sums (with whole 256-step chunks summed step by step, the fp32 dA / ddelta_bias errors
    // exceeded twice the fp32 reference's in about 1 of 170 random inputs).
    let mut dd = R::ZERO;
    if has_z {
        for t in 0..len {
            let (zt, go) = (s.z[t], s.dout[t]);
            let sz = sigmoid(zt);
            let out = madd::<R, FMA>(dval, s.u[t], s.y[t]);
            s.dz[t] = go * out * sz * (R::ONE + zt * (R::ONE - sz));
            s.dy[t] = go * zt * sz;
        }
    } else {
        s.dy[..len].copy_from_slice(&s.dout[..len]);
    }
    for t0 in (0..len).step_by(SUM_BLOCK) {
        let mut part = R::ZERO;
        for t in t0..len.min(t0 + SUM_BLOCK) {
            let dy = s.dy[t];
            part = madd::<R, FMA>(dy, s.u[t], part);
            s.du[t] = dval * dy;
        }
        dd = dd + part;
    }
    s.dd[j] = s.dd[j] + dd;
    // Reverse scan. On entry to step t, g holds a_{t+1} g_{t+1} (the gradient reaching h_t from
    // the future); adding C_t dy_t makes it dL/dh_t.
    let mut gr = [[R::ZERO; W]; NB];
    let mut daa = [[R::ZERO; W]; NB];
    let mut dbf = [[R::ZERO; W]; NB];
    let mut dcf = [[R::ZERO; W]; NB];
    for k in 0..nb {
        gr[k] = *blk(&s.g, o + k * W);
    }
    for t in (0..len).rev() {
        let (dyt, dtv, ut) = (s.dy[t], s.dt[t], s.u[t]);
        let dtu = dtv * ut;
        let mut sdu = [R::ZERO; W];
        let mut sdt = [R::ZERO; W];
        for k in 0..nb {
            let bb = if VB {
                blk(&s.bt, t * np + k * W)
            } else {
                &bfr[k]
            };
            let cb = if VC {
                blk(&s.ct, t * np + k * W)
            } else {
                &cfr[k]
            };
            let dab = blk(&s.da, t * np + k * W);
            let hcur = blk(&s.hs, t * np + k * W);
            let hprev: &[R; W] = if VL && s.bnd[t] {
                blk(&s.rh0, t * np + k * W)
            } else if t > 0 {
                blk(&s.hs, (t - 1) * np + k * W)
            } else {
                blk(&s.h0, k * W)
            };
            let mut dbv = [R::ZERO; W];
            let mut dcv = [R::ZERO; W];
            for l in 0..W {
                let gl = madd::<R, FMA>(cb[l], dyt, gr[k][l]);
                dcv[l] = dyt * hcur[l];
                dbv[l] = gl * dtu;
                sdu[l] = madd::<R, FMA>(gl, bb[l], sdu[l]);
                let gah = gl * dab[l] * hprev[l];
                sdt[l] = madd::<R, FMA>(au[k][l], gah, madd::<R, FMA>(gl * bb[l], ut, sdt[l]));
                daa[k][l] = madd::<R, FMA>(dtv, gah, daa[k][l]);
                gr[k][l] = gl * dab[l];
            }
            if VB {
                let x = blk_mut(&mut s.dbt, t * np + k * W);
                for l in 0..W {
                    x[l] = x[l] + dbv[l];
                }
            } else {
                for l in 0..W {
                    dbf[k][l] = dbf[k][l] + dbv[l];
                }
            }
            if VC {
                let x = blk_mut(&mut s.dct, t * np + k * W);
                for l in 0..W {
                    x[l] = x[l] + dcv[l];
                }
            } else {
                for l in 0..W {
                    dcf[k][l] = dcf[k][l] + dcv[l];
                }
            }
        }
        s.du[t] = madd::<R, FMA>(dtv, hsum(&sdu), s.du[t]);
        s.ddt[t] = hsum(&sdt);
        if VL && s.bnd[t] {
            // A sequence starts at t: g is the gradient of its initial state; before t lies
            // the previous sequence, whose final state gets its own gradient.
            for k in 0..nb {
                *blk_mut(&mut s.rdh0, t * np + k * W) = gr[k];
                gr[k] = *blk(&s.rdf, t * np + k * W);
            }
        }
        if t % SUM_BLOCK == 0 {
            // The block's sums into the chunk's (the last block's at the end, below).
            for k in 0..nb {
                for (acc, part) in [
                    (&mut s.acc_a, &mut daa[k]),
                    (&mut s.acc_b, &mut dbf[k]),
                    (&mut s.acc_c, &mut dcf[k]),
                ] {
                    let x = blk_mut(acc, o + k * W);
                    for l in 0..W {
                        x[l] = x[l] + part[l];
                    }
                    *part = [R::ZERO; W];
                }
            }
        }
    }
    for k in 0..nb {
        *blk_mut(&mut s.g, o + k * W) = gr[k];
        for (acc, part) in [
            (&mut s.acc_a, &daa[k]),
            (&mut s.acc_b, &dbf[k]),
            (&mut s.acc_c, &dcf[k]),
        ] {
            let x = blk_mut(acc, o + k * W);
            for l in 0..W {
                x[l] = x[l] + part[l];
            }
        }
    }
}

/// Backward of a block of channels [d0, d1) (one B group, one C group): writes du, ddelta, dz,
/// dinitial_state rows; adds variable dB/dC into the block's partial rows (`pb`, `pc`: dstate x
/// seqlen each, or 0); writes per-channel sums into `chan` slots.
///
/// # Safety
/// `p` from `plan_backward`; `pb`/`pc` address this item's own workspace slices, and `chan` the
/// per-channel workspace.
#[inline(always)]
unsafe fn bwd_block<R: Real, const VB: bool, const VC: bool, const FMA: bool>(
    p: &SsmParams,
    ind: DType,
    wd: DType,
    b: usize,
    (d0, d1, pb, pc, chan): (usize, usize, u64, u64, u64),
    s: &mut BwdScratch<R>,
) {
    let n_state = p.dstate as usize;
    let np = padded(n_state);
    let nblk = np / W;
    let k = p.chunk_size as usize;
    let seqlen = p.seqlen as usize;
    let has_z = p.has_z != 0;
    let (pb, pc, chan) = (pb as *mut R, pc as *mut R, chan as *mut R);
    let ns = chan_slots(n_state);
    let (bi, dim) = (b as i64, p.dim as usize);
    let varlen = p.has_seq_idx != 0;
    let h0_ptr = if p.has_initial_state != 0 {
        p.initial_state_ptr
    } else {
        0
    };
    let dlast_ptr = if p.has_dlast_state != 0 {
        p.dlast_state_ptr
    } else {
        0
    };
    // SAFETY: tensors checked by plan_backward; (b, d) in range; workspace slices are this
    // item's own.
    unsafe {
        let mut sd0 = d0;
        while sd0 < d1 {
            let nch = CB.min(d1 - sd0);
            s.cs.load(p, ind, wd, b, sd0, nch, np, &mut s.row);
            s.g.fill(R::ZERO);
            s.acc_a.fill(R::ZERO);
            s.acc_b.fill(R::ZERO);
            s.acc_c.fill(R::ZERO);
            s.dd = [R::ZERO; CB];
            s.dbias = [R::ZERO; CB];
            if varlen && seqlen > 0 {
                // The last sequence of the row: its final-state gradient enters at the end.
                load_seq(p, b, seqlen - 1, 1, &mut s.seq);
                for j in 0..nch {
                    let o = j * np;
                    load_seq_state(p, wd, dlast_ptr, s.seq[1], sd0 + j, &mut s.g[o..o + np]);
                }
            } else if p.has_dlast_state != 0 {
                for j in 0..nch {
                    let off = ((b * dim + sd0 + j) * n_state) as i64;
                    R::load(
                        wd,
                        addr(p.dlast_state_ptr, off, wd),
                        &mut s.g[j * np..j * np + n_state],
                    );
                }
            }
            for c in (0..p.n_chunks as usize).rev() {
                let t0 = c * k;
                let len = k.min(seqlen.saturating_sub(t0));
                if VB {
                    load_bc::<R, true>(
                        p,
                        ind,
                        wd,
                        p.b_ptr,
                        (p.b_batch_stride, p.b_group_stride, p.b_dstate_stride),
                        p.b_ngroups,
                        b,
                        sd0,
                        t0,
                        len,
                        np,
                        &mut s.row,
                        &mut s.bt,
                    );
                    s.dbt[..len * np].fill(R::ZERO);
                }
                if VC {
                    load_bc::<R, true>(
                        p,
                        ind,
                        wd,
                        p.c_ptr,
                        (p.c_batch_stride, p.c_group_stride, p.c_dstate_stride),
                        p.c_ngroups,
                        b,
                        sd0,
                        t0,
                        len,
                        np,
                        &mut s.row,
                        &mut s.ct,
                    );
                    s.dct[..len * np].fill(R::ZERO);
                }
                if varlen {
                    load_seq(p, b, t0, len, &mut s.seq);
                    for t in 0..len {
                        s.bnd[t] = s.seq[t + 1] != s.seq[t];
                    }
                }
                for j in 0..nch {
                    let d = sd0 + j;
                    let di = d as i64;
                    let bias = s.cs.bias[j];
                    load_steps(
                        p, ind, b, d, t0, len, bias, &mut s.u, &mut s.x, &mut s.dt, &mut s.z,
                    );
                    R::load(
                        ind,
                        addr(
                            p.dout_ptr,
                            bi * p.dout_batch_stride + di * p.dout_d_stride + t0 as i64,
                            ind,
                        ),
                        &mut s.dout[..len],
                    );
                    if c == 0 {
                        load_initial(p, wd, b, d, &mut s.h0);
                    } else {
                        s.h0.fill(R::ZERO);
                        R::load(
                            wd,
                            addr(p.states_ptr, state_off(p, b, d, c - 1), wd),
                            &mut s.h0[..n_state],
                        );
                    }
                    if varlen {
                        // Each sequence start: the new sequence's initial state and the
                        // previous one's final-state gradient.
                        for t in 0..len {
                            if !s.bnd[t] {
                                continue;
                            }
                            let (prev, cur) = (s.seq[t], s.seq[t + 1]);
                            let o = t * np;
                            load_seq_state(p, wd, h0_ptr, cur, d, &mut s.rh0[o..o + np]);
                            let dfp = if t0 + t > 0 { dlast_ptr } else { 0 };
                            load_seq_state(p, wd, dfp, prev, d, &mut s.rdf[o..o + np]);
                        }
                        match nblk {
                            1 => chan_chunk::<R, 1, VB, VC, FMA, true>(1, len, j, s, has_z),
                            2 => chan_chunk::<R, 2, VB, VC, FMA, true>(2, len, j, s, has_z),
                            3 | 4 => chan_chunk::<R, 4, VB, VC, FMA, true>(nblk, len, j, s, has_z),
                            _ => chan_chunk::<R, MAX_NB, VB, VC, FMA, true>(nblk, len, j, s, has_z),
                        }
                        for t in 0..len {
                            if s.bnd[t] {
                                let o = t * np;
                                let v = s.seq[t + 1];
                                store_seq_state(
                                    p,
                                    wd,
                                    p.dinitial_state_ptr,
                                    v,
                                    d,
                                    &s.rdh0[o..o + np],
                                );
                            }
                        }
                    } else {
                        match nblk {
                            1 => chan_chunk::<R, 1, VB, VC, FMA, false>(1, len, j, s, has_z),
                            2 => chan_chunk::<R, 2, VB, VC, FMA, false>(2, len, j, s, has_z),
                            3 | 4 => chan_chunk::<R, 4, VB, VC, FMA, false>(nblk, len, j, s, has_z),
                            _ => {
                                chan_chunk::<R, MAX_NB, VB, VC, FMA, false>(nblk, len, j, s, has_z)
                            }
                        }
                    }
                    // delta's gradient through the bias and softplus.
                    if p.delta_softplus != 0 {
                        let thr = R::from_f64(20.0);
                        for (g, x) in s.ddt[..len].iter_mut().zip(&s.x[..len]) {
                            let sg = sigmoid(*x);
                            *g = *g * if *x > thr { R::ONE } else { sg };
                        }
                    }
                    let mut dbias = R::ZERO;
                    for block in s.ddt[..len].chunks(SUM_BLOCK) {
                        dbias = dbias + block.iter().fold(R::ZERO, |a, g| a + *g);
                    }
                    s.dbias[j] = s.dbias[j] + dbias;
                    let t0i = t0 as i64;
                    R::store(
                        ind,
                        addr(
                            p.du_ptr,
                            bi * p.du_batch_stride + di * p.du_d_stride + t0i,
                            ind,
                        ),
                        &s.du[..len],
                    );
                    R::store(
                        ind,
                        addr(
                            p.ddelta_ptr,
                            bi * p.ddelta_batch_stride + di * p.ddelta_d_stride + t0i,
                            ind,
                        ),
                        &s.ddt[..len],
                    );
                    if has_z {
                        R::store(
                            ind,
                            addr(
                                p.dz_ptr,
                                bi * p.dz_batch_stride + di * p.dz_d_stride + t0i,
                                ind,
                            ),
                            &s.dz[..len],
                        );
                    }
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
            for j in 0..nch {
                let d = sd0 + j;
                let o = j * np;
                if p.dinitial_state_ptr != 0 && !varlen {
                    let off = ((b * dim + d) * n_state) as i64;
                    R::store(
                        wd,
                        addr(p.dinitial_state_ptr, off, wd),
                        &s.g[o..o + n_state],
                    );
                }
                let ch = std::slice::from_raw_parts_mut(chan.add((b * dim + d) * ns), ns);
                ch[..n_state].copy_from_slice(&s.acc_a[o..o + n_state]);
                ch[n_state..2 * n_state].copy_from_slice(&s.acc_b[o..o + n_state]);
                ch[2 * n_state..3 * n_state].copy_from_slice(&s.acc_c[o..o + n_state]);
                ch[3 * n_state] = s.dd[j];
                ch[3 * n_state + 1] = s.dbias[j];
            }
            sd0 += nch;
        }
    }
}

isa_variants!(
    bwd_block,
    BwdScratch<R>,
    (usize, usize, u64, u64, u64),
    pick_bwd
);

fn run<R: Real>(plan: &Plan) {
    let p = plan.params;
    let (ind, wd) = (plan.in_dtype, plan.w_dtype);
    let (vb, vc) = (p.is_variable_b != 0, p.is_variable_c != 0);
    let (batch, dim, n, seqlen) = (
        p.batch as usize,
        p.dim as usize,
        p.dstate as usize,
        p.seqlen as usize,
    );
    let nseg = blocks(&p, usize::MAX).len();
    let per_part = (vb as usize + vc as usize) * n * seqlen;
    // Without variable B/C there are no partials: cut finely for parallelism. With them, each
    // block owns dstate x seqlen partial rows: cut into at most 8 blocks per segment, fewer when
    // memory is short.
    let max_len = if per_part == 0 {
        CB
    } else {
        let parts = (PARTIAL_BUDGET / (batch * nseg * per_part).max(1)).clamp(1, 8);
        (dim / nseg).div_ceil(parts).max(CB)
    };
    let blks: Vec<Block> = blocks(&p, max_len);
    let nb = blks.len();
    let rows = n * seqlen;
    let mut part_b = vec![R::ZERO; if vb { batch * nb * rows } else { 0 }];
    let mut part_c = vec![R::ZERO; if vc { batch * nb * rows } else { 0 }];
    let ns = chan_slots(n);
    let mut chan = vec![R::ZERO; batch * dim * ns];
    let (pb0, pc0, ch0) = (
        part_b.as_mut_ptr() as u64,
        part_c.as_mut_ptr() as u64,
        chan.as_mut_ptr() as u64,
    );
    let f = pick_bwd::<R>(vb, vc);
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
                    R::store(
                        wd,
                        addr(
                            p.db_ptr,
                            d as i64 * p.db_group_stride + nn as i64 * p.db_dstate_stride,
                            wd,
                        ),
                        &[*t],
                    );
                }
            }
            if !vc {
                for (nn, t) in tmp.iter_mut().enumerate() {
                    *t = sum_chan(2 * n + nn, d);
                }
                for (nn, t) in tmp.iter().enumerate() {
                    R::store(
                        wd,
                        addr(
                            p.dc_ptr,
                            d as i64 * p.dc_group_stride + nn as i64 * p.dc_dstate_stride,
                            wd,
                        ),
                        &[*t],
                    );
                }
            }
            if p.has_d != 0 {
                R::store(wd, addr(p.dd_ptr, d as i64, wd), &[sum_chan(3 * n, d)]);
            }
            if p.has_delta_bias != 0 {
                R::store(
                    wd,
                    addr(p.ddelta_bias_ptr, d as i64, wd),
                    &[sum_chan(3 * n + 1, d)],
                );
            }
        }
        let reduce = |part: &Vec<R>, ngroups: usize, is_b: bool| {
            let (ptr, bs, gs, nst) = if is_b {
                (
                    p.db_ptr,
                    p.db_batch_stride,
                    p.db_group_stride,
                    p.db_dstate_stride,
                )
            } else {
                (
                    p.dc_ptr,
                    p.dc_batch_stride,
                    p.dc_group_stride,
                    p.dc_dstate_stride,
                )
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
    if plan.w_dtype == DType::F64 {
        run::<f64>(plan)
    } else {
        run::<f32>(plan)
    }
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
                    f32::store(
                        wd,
                        addr(
                            p.db_ptr,
                            d as i64 * p.db_group_stride + nn as i64 * p.db_dstate_stride,
                            wd,
                        ),
                        &[0.0],
                    );
                }
            }
        }
        if p.is_variable_c == 0 {
            for d in 0..dim {
                for nn in 0..n {
                    f32::store(
                        wd,
                        addr(
                            p.dc_ptr,
                            d as i64 * p.dc_group_stride + nn as i64 * p.dc_dstate_stride,
                            wd,
                        ),
                        &[0.0],
                    );
                }
            }
        }
    }
}
