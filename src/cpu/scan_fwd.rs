//! Forward selective scan on the CPU: one work item per (batch, channel); state in registers
//! (blocks of `W` lanes); one fp32 state vector saved per chunk for the backward and last_state.

use super::{Real, W, addr, madd, par_for, sigmoid};
use crate::dlpack::DType;
use crate::ops::scan::Plan;
use crate::params::SsmParams;

/// Per-thread buffers, reused across work items.
pub(crate) struct Scratch<R> {
    pub u: Vec<R>,
    pub x: Vec<R>,
    pub dt: Vec<R>,
    pub z: Vec<R>,
    pub y: Vec<R>,
    pub row: Vec<R>,
    pub bt: Vec<R>,
    pub ct: Vec<R>,
    /// seq_idx of the chunk's steps, the step before it first (packed sequences).
    pub seq: Vec<i32>,
}

impl<R: Real> Scratch<R> {
    pub fn new(chunk: usize, np: usize) -> Self {
        let z = |n| vec![R::ZERO; n];
        Scratch {
            u: z(chunk),
            x: z(chunk),
            dt: z(chunk),
            z: z(chunk),
            y: z(chunk),
            row: z(chunk),
            bt: z(chunk * np),
            ct: z(chunk * np),
            seq: vec![0; chunk + 1],
        }
    }
}

/// Largest number of state blocks (dstate <= 256).
pub(crate) const MAX_NB: usize = 16;

pub(crate) fn padded(dstate: usize) -> usize {
    dstate.div_ceil(W) * W
}

#[inline(always)]
pub(crate) fn hsum<R: Real>(v: &[R; W]) -> R {
    // Fixed pairwise order (deterministic), written as shrinking arrays so that LLVM keeps the
    // halves in registers (a single in-place array went through the stack).
    let mut a8 = [R::ZERO; 8];
    for i in 0..8 {
        a8[i] = v[i] + v[i + 8];
    }
    let mut a4 = [R::ZERO; 4];
    for i in 0..4 {
        a4[i] = a8[i] + a8[i + 4];
    }
    let a2 = [a4[0] + a4[2], a4[1] + a4[3]];
    a2[0] + a2[1]
}

#[inline(always)]
pub(crate) fn blk<R>(v: &[R], o: usize) -> &[R; W] {
    v[o..o + W].try_into().unwrap()
}
#[inline(always)]
pub(crate) fn blk_mut<R>(v: &mut [R], o: usize) -> &mut [R; W] {
    (&mut v[o..o + W]).try_into().unwrap()
}

/// Load one channel's A row (padded with 0) into `a`.
///
/// # Safety
/// `p.a_ptr` must address a live (dim, dstate) tensor of dtype `wd`.
#[inline(always)]
pub(crate) unsafe fn load_a<R: Real>(p: &SsmParams, wd: DType, d: usize, a: &mut [R]) {
    for n in 0..p.dstate as usize {
        let off = d as i64 * p.a_d_stride + n as i64 * p.a_dstate_stride;
        // SAFETY: in bounds of A by the shape check.
        unsafe { R::load(wd, addr(p.a_ptr, off, wd), &mut a[n..n + 1]) };
    }
}

/// Fill `dst` (t-major, `np` lanes per step) with B or C for steps [t0, t0+len) of channel d:
/// a variable B/C is transposed from its (dstate, seqlen) rows; a fixed one is copied into the
/// first `np` entries.
///
/// # Safety
/// The pointer and strides must address a live B/C tensor as checked by `plan_forward`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) unsafe fn load_bc<R: Real, const VAR: bool>(
    p: &SsmParams,
    ind: DType,
    wd: DType,
    ptr: u64,
    (bs, gs, ns): (i64, i64, i64),
    ngroups: i32,
    b: usize,
    d: usize,
    t0: usize,
    len: usize,
    np: usize,
    row: &mut [R],
    dst: &mut [R],
) {
    let n_state = p.dstate as usize;
    if VAR {
        let g = (d as i32 / (p.dim / ngroups)) as i64;
        for n in 0..n_state {
            let off = b as i64 * bs + g * gs + n as i64 * ns + t0 as i64;
            // SAFETY: rows of length seqlen, last stride 1; [t0, t0+len) lies inside.
            unsafe { R::load(ind, addr(ptr, off, ind), &mut row[..len]) };
            for t in 0..len {
                dst[t * np + n] = row[t];
            }
        }
    } else {
        for n in 0..n_state {
            let off = d as i64 * gs + n as i64 * ns;
            // SAFETY: element (d, n) of the fixed (dim, dstate) tensor.
            unsafe { R::load(wd, addr(ptr, off, wd), &mut dst[n..n + 1]) };
        }
    }
}

/// Load the per-step inputs of one chunk: u, x = delta + bias, dt = softplus(x) or x, z.
///
/// # Safety
/// As `plan_forward` checked.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) unsafe fn load_steps<R: Real>(
    p: &SsmParams,
    ind: DType,
    b: usize,
    d: usize,
    t0: usize,
    len: usize,
    bias: R,
    s_u: &mut [R],
    s_x: &mut [R],
    s_dt: &mut [R],
    s_z: &mut [R],
) {
    let (b, d) = (b as i64, d as i64);
    // SAFETY: rows of length seqlen with last stride 1; [t0, t0+len) lies inside.
    unsafe {
        R::load(
            ind,
            addr(
                p.u_ptr,
                b * p.u_batch_stride + d * p.u_d_stride + t0 as i64,
                ind,
            ),
            &mut s_u[..len],
        );
        R::load(
            ind,
            addr(
                p.delta_ptr,
                b * p.delta_batch_stride + d * p.delta_d_stride + t0 as i64,
                ind,
            ),
            &mut s_x[..len],
        );
        if p.has_z != 0 {
            R::load(
                ind,
                addr(
                    p.z_ptr,
                    b * p.z_batch_stride + d * p.z_d_stride + t0 as i64,
                    ind,
                ),
                &mut s_z[..len],
            );
        }
    }
    for x in s_x[..len].iter_mut() {
        *x = *x + bias;
    }
    if p.delta_softplus != 0 {
        for (dt, x) in s_dt[..len].iter_mut().zip(&s_x[..len]) {
            *dt = x.softplus();
        }
    } else {
        s_dt[..len].copy_from_slice(&s_x[..len]);
    }
}

/// Load one per-channel scalar (D or delta_bias) or 0.
///
/// # Safety
/// `ptr` must address a live (dim,) contiguous tensor when `present`.
#[inline(always)]
pub(crate) unsafe fn load_scalar<R: Real>(present: bool, ptr: u64, wd: DType, d: usize) -> R {
    let mut v = [R::ZERO];
    if present {
        // SAFETY: (dim,) contiguous, d < dim.
        unsafe { R::load(wd, addr(ptr, d as i64, wd), &mut v) };
    }
    v[0]
}

/// Load the state before step 0 of channel (b, d) into h[..dstate] (0 without initial_state).
///
/// # Safety
/// As checked by `plan_forward`.
#[inline(always)]
pub(crate) unsafe fn load_initial<R: Real>(
    p: &SsmParams,
    wd: DType,
    b: usize,
    d: usize,
    h: &mut [R],
) {
    let n = p.dstate as usize;
    h.fill(R::ZERO);
    // Packed sequences take their initial states at their first steps instead.
    if p.has_initial_state != 0 && p.has_seq_idx == 0 {
        let off = ((b * p.dim as usize + d) * n) as i64;
        // SAFETY: (batch, dim, dstate) contiguous.
        unsafe { R::load(wd, addr(p.initial_state_ptr, off, wd), &mut h[..n]) };
    }
}

/// Packed sequences: the seq_idx values of steps [t0 - 1, t0 + len) of row b into
/// `dst[..len + 1]` (i32::MIN before step 0, so that step 0 always starts a sequence). A step t
/// starts a sequence when `dst[t - t0 + 1] != dst[t - t0]`.
///
/// # Safety
/// `p.seq_idx_ptr` must address a live (batch, seqlen) int32 host tensor, last stride 1.
#[inline(always)]
pub(crate) unsafe fn load_seq(p: &SsmParams, b: usize, t0: usize, len: usize, dst: &mut [i32]) {
    let row = p.seq_idx_ptr as *const i32;
    let base = b as isize * p.seq_idx_batch_stride as isize;
    for (i, x) in dst[..len + 1].iter_mut().enumerate() {
        let t = t0 as isize + i as isize - 1;
        // SAFETY: 0 <= t < seqlen inside row b.
        *x = if t < 0 {
            i32::MIN
        } else {
            unsafe { *row.offset(base + t) }
        };
    }
}

/// The row of sequence `v` in a per-sequence state tensor, if it has one.
#[inline(always)]
pub(crate) fn seq_row(p: &SsmParams, v: i32) -> Option<usize> {
    (v >= 0 && v < p.num_seqs).then_some(v as usize)
}

/// Load sequence v's state of channel d from a (num_seqs, dim, dstate) tensor into h (0 when
/// `ptr` is 0 or v has no row).
///
/// # Safety
/// `ptr` (when not 0) must address a live contiguous (num_seqs, dim, dstate) tensor of `wd`.
#[inline(always)]
pub(crate) unsafe fn load_seq_state<R: Real>(
    p: &SsmParams,
    wd: DType,
    ptr: u64,
    v: i32,
    d: usize,
    h: &mut [R],
) {
    let n = p.dstate as usize;
    h.fill(R::ZERO);
    if let (Some(r), true) = (seq_row(p, v), ptr != 0) {
        let off = ((r * p.dim as usize + d) * n) as i64;
        // SAFETY: row r < num_seqs, channel d < dim.
        unsafe { R::load(wd, addr(ptr, off, wd), &mut h[..n]) };
    }
}

/// Store h as sequence v's state of channel d (nothing when `ptr` is 0 or v has no row).
///
/// # Safety
/// As `load_seq_state`, the tensor writable.
#[inline(always)]
pub(crate) unsafe fn store_seq_state<R: Real>(
    p: &SsmParams,
    wd: DType,
    ptr: u64,
    v: i32,
    d: usize,
    h: &[R],
) {
    let n = p.dstate as usize;
    if let (Some(r), true) = (seq_row(p, v), ptr != 0) {
        let off = ((r * p.dim as usize + d) * n) as i64;
        // SAFETY: row r < num_seqs, channel d < dim.
        unsafe { R::store(wd, addr(ptr, off, wd), &h[..n]) };
    }
}

/// Offset of the saved state at the end of chunk `c` of channel (b, d).
#[inline(always)]
pub(crate) fn state_off(p: &SsmParams, b: usize, d: usize, c: usize) -> i64 {
    (((b * p.dim as usize + d) * p.n_chunks as usize + c) * p.dstate as usize) as i64
}

/// The time loop of one channel with the state held in registers: `NB` blocks of `W` lanes
/// (dstate <= 64 takes this path). B/C come from the t-major tiles when variable, else from the
/// channel's fixed vectors.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn scan_steps<
    R: Real,
    const NB: usize,
    const VB: bool,
    const VC: bool,
    const FMA: bool,
>(
    nb: usize,
    a2: &[R],
    bt: &[R],
    bf: &[R],
    ct: &[R],
    cf: &[R],
    dt: &[R],
    u: &[R],
    y: &mut [R],
    h: &mut [R],
) {
    let nb = if NB <= 2 { NB } else { nb.min(NB) };
    let np = nb * W;
    let mut hr = [[R::ZERO; W]; NB];
    let mut ar = [[R::ZERO; W]; NB];
    let mut bfr = [[R::ZERO; W]; NB];
    let mut cfr = [[R::ZERO; W]; NB];
    for k in 0..nb {
        hr[k] = *blk(h, k * W);
        ar[k] = *blk(a2, k * W);
        bfr[k] = *blk(bf, k * W);
        cfr[k] = *blk(cf, k * W);
    }
    for t in 0..dt.len().min(u.len()).min(y.len()) {
        let dtv = dt[t];
        let dtu = dtv * u[t];
        let mut acc = [R::ZERO; W];
        for k in 0..nb {
            let bb = if VB { blk(bt, t * np + k * W) } else { &bfr[k] };
            let cb = if VC { blk(ct, t * np + k * W) } else { &cfr[k] };
            for l in 0..W {
                let da = (dtv * ar[k][l]).fexp2::<FMA>();
                hr[k][l] = madd::<R, FMA>(da, hr[k][l], dtu * bb[l]);
                acc[l] = madd::<R, FMA>(cb[l], hr[k][l], acc[l]);
            }
        }
        y[t] = hsum(&acc);
    }
    for k in 0..nb {
        blk_mut(h, k * W).copy_from_slice(&hr[k]);
    }
}

/// Channels per block: the transposed B/C tile of a chunk is shared by this many channels.
pub(crate) const CB: usize = 16;

/// A run of channels [d0, d1) inside one B group and one C group.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Block {
    pub d0: usize,
    pub d1: usize,
    pub gb: usize,
    pub gc: usize,
}

/// Cut [0, dim) at every B-group and C-group boundary, then each piece into pieces of at most
/// `max_len` channels. Depends on the shapes only, never on the thread count.
pub(crate) fn blocks(p: &SsmParams, max_len: usize) -> Vec<Block> {
    let dim = p.dim as usize;
    let sb = dim / p.b_ngroups as usize;
    let sc = dim / p.c_ngroups as usize;
    let cuts: Vec<usize> = (0..=dim)
        .filter(|d| d % sb == 0 || d % sc == 0 || *d == dim)
        .collect();
    let mut out = Vec::new();
    for w in cuts.windows(2) {
        let (s0, s1) = (w[0], w[1]);
        let pieces = (s1 - s0).div_ceil(max_len.max(1));
        let per = (s1 - s0).div_ceil(pieces.max(1)).max(1);
        let mut d = s0;
        while d < s1 {
            let e = (d + per).min(s1);
            out.push(Block {
                d0: d,
                d1: e,
                gb: d / sb,
                gc: d / sc,
            });
            d = e;
        }
    }
    out
}

/// Per-channel constants and carried state of a block of up to CB channels.
pub(crate) struct ChanState<R> {
    pub a2: Vec<R>,
    pub h: Vec<R>,
    pub bf: Vec<R>,
    pub cf: Vec<R>,
    pub dval: [R; CB],
    pub bias: [R; CB],
}

impl<R: Real> ChanState<R> {
    pub fn new(np: usize) -> Self {
        ChanState {
            a2: vec![R::ZERO; CB * np],
            h: vec![R::ZERO; CB * np],
            bf: vec![R::ZERO; CB * np],
            cf: vec![R::ZERO; CB * np],
            dval: [R::ZERO; CB],
            bias: [R::ZERO; CB],
        }
    }

    /// Load A log2 e, D, delta_bias, fixed B/C and the initial state of channels [d0, d0+n).
    ///
    /// # Safety
    /// As checked by `plan_forward`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn load(
        &mut self,
        p: &SsmParams,
        ind: DType,
        wd: DType,
        b: usize,
        d0: usize,
        n: usize,
        np: usize,
        row: &mut [R],
    ) {
        let log2e = R::from_f64(std::f64::consts::LOG2_E);
        for j in 0..n {
            let d = d0 + j;
            let o = j * np;
            // SAFETY: forwarded.
            unsafe {
                load_a(p, wd, d, &mut self.a2[o..o + np]);
                self.dval[j] = load_scalar(p.has_d != 0, p.d_ptr, wd, d);
                self.bias[j] = load_scalar(p.has_delta_bias != 0, p.delta_bias_ptr, wd, d);
                load_initial(p, wd, b, d, &mut self.h[o..o + np]);
                if p.is_variable_b == 0 {
                    load_bc::<R, false>(
                        p,
                        ind,
                        wd,
                        p.b_ptr,
                        (0, p.b_group_stride, p.b_dstate_stride),
                        1,
                        b,
                        d,
                        0,
                        0,
                        np,
                        row,
                        &mut self.bf[o..o + np],
                    );
                }
                if p.is_variable_c == 0 {
                    load_bc::<R, false>(
                        p,
                        ind,
                        wd,
                        p.c_ptr,
                        (0, p.c_group_stride, p.c_dstate_stride),
                        1,
                        b,
                        d,
                        0,
                        0,
                        np,
                        row,
                        &mut self.cf[o..o + np],
                    );
                }
            }
            for x in self.a2[o..o + np].iter_mut() {
                *x = *x * log2e;
            }
        }
    }
}

/// The forward of one block of channels (all in one B group and one C group).
///
/// # Safety
/// `p` must come from `plan_forward` with outputs, its tensors alive and not aliased.
#[inline(always)]
unsafe fn fwd_block<R: Real, const VB: bool, const VC: bool, const FMA: bool>(
    p: &SsmParams,
    ind: DType,
    wd: DType,
    b: usize,
    (d0, d1): (usize, usize),
    s: &mut (Scratch<R>, ChanState<R>),
) {
    let (s, cs) = (&mut s.0, &mut s.1);
    let n_state = p.dstate as usize;
    let np = padded(n_state);
    let nblk = np / W;
    let k = p.chunk_size as usize;
    let seqlen = p.seqlen as usize;
    let nch = d1 - d0;
    let varlen = p.has_seq_idx != 0;
    let h0_ptr = if p.has_initial_state != 0 {
        p.initial_state_ptr
    } else {
        0
    };
    // SAFETY: all tensors were checked by plan_forward; (b, d) are in range.
    unsafe {
        cs.load(p, ind, wd, b, d0, nch, np, &mut s.row);
        for c in 0..p.n_chunks as usize {
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
                    d0,
                    t0,
                    len,
                    np,
                    &mut s.row,
                    &mut s.bt,
                );
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
                    d0,
                    t0,
                    len,
                    np,
                    &mut s.row,
                    &mut s.ct,
                );
            }
            if varlen {
                load_seq(p, b, t0, len, &mut s.seq);
            }
            for j in 0..nch {
                let d = d0 + j;
                let o = j * np;
                load_steps(
                    p, ind, b, d, t0, len, cs.bias[j], &mut s.u, &mut s.x, &mut s.dt, &mut s.z,
                );
                let h = &mut cs.h[o..o + np];
                let a2 = &cs.a2[o..o + np];
                let (bt, bf, ct, cf) = (&s.bt[..], &cs.bf[o..o + np], &s.ct[..], &cs.cf[o..o + np]);
                // Segments of the chunk between sequence starts (the whole chunk without
                // seq_idx); at a start, the previous sequence's state is final and the state
                // restarts from the new sequence's initial state (or 0).
                let mut a = 0;
                while a < len {
                    let mut e = len;
                    if varlen {
                        let sq = &s.seq;
                        if sq[a + 1] != sq[a] {
                            if t0 + a > 0 {
                                store_seq_state(p, wd, p.final_states_ptr, sq[a], d, h);
                            }
                            load_seq_state(p, wd, h0_ptr, sq[a + 1], d, h);
                        }
                        e = a + 1;
                        while e < len && sq[e + 1] == sq[e] {
                            e += 1;
                        }
                    }
                    let (bt, ct) = (
                        &bt[if VB { a * np } else { 0 }..],
                        &ct[if VC { a * np } else { 0 }..],
                    );
                    let (dt, u, y) = (&s.dt[a..e], &s.u[a..e], &mut s.y[a..e]);
                    match nblk {
                        1 => scan_steps::<R, 1, VB, VC, FMA>(1, a2, bt, bf, ct, cf, dt, u, y, h),
                        2 => scan_steps::<R, 2, VB, VC, FMA>(2, a2, bt, bf, ct, cf, dt, u, y, h),
                        3 | 4 => {
                            scan_steps::<R, 4, VB, VC, FMA>(nblk, a2, bt, bf, ct, cf, dt, u, y, h)
                        }
                        _ => scan_steps::<R, MAX_NB, VB, VC, FMA>(
                            nblk, a2, bt, bf, ct, cf, dt, u, y, h,
                        ),
                    }
                    a = e;
                }
                if varlen && c + 1 == p.n_chunks as usize && len > 0 {
                    store_seq_state(p, wd, p.final_states_ptr, s.seq[len], d, h);
                }
                let dval = cs.dval[j];
                for t in 0..len {
                    s.y[t] = madd::<R, FMA>(dval, s.u[t], s.y[t]);
                }
                if p.has_z != 0 {
                    for (y, z) in s.y[..len].iter_mut().zip(&s.z[..len]) {
                        *y = *y * (*z * sigmoid(*z));
                    }
                }
                let off = b as i64 * p.out_batch_stride + d as i64 * p.out_d_stride + t0 as i64;
                R::store(ind, addr(p.out_ptr, off, ind), &s.y[..len]);
                R::store(
                    wd,
                    addr(p.states_ptr, state_off(p, b, d, c), wd),
                    &h[..n_state],
                );
            }
        }
    }
}

macro_rules! isa_variants {
    ($generic:ident, $scratch:ty, $item:ty, $pick:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
        unsafe fn avx512<R: Real, const VB: bool, const VC: bool>(
            p: &SsmParams,
            ind: DType,
            wd: DType,
            b: usize,
            k: $item,
            s: &mut $scratch,
        ) {
            // SAFETY: forwarded contract; the CPU supports these features (checked by isa()).
            unsafe { $generic::<R, VB, VC, true>(p, ind, wd, b, k, s) }
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R: Real, const VB: bool, const VC: bool>(
            p: &SsmParams,
            ind: DType,
            wd: DType,
            b: usize,
            k: $item,
            s: &mut $scratch,
        ) {
            // SAFETY: as above.
            unsafe { $generic::<R, VB, VC, true>(p, ind, wd, b, k, s) }
        }
        unsafe fn baseline<R: Real, const VB: bool, const VC: bool>(
            p: &SsmParams,
            ind: DType,
            wd: DType,
            b: usize,
            k: $item,
            s: &mut $scratch,
        ) {
            // SAFETY: forwarded contract. No FMA: mul_add would be a libm call here.
            unsafe { $generic::<R, VB, VC, false>(p, ind, wd, b, k, s) }
        }
        #[allow(clippy::type_complexity)]
        fn $pick<R: Real>(
            vb: bool,
            vc: bool,
        ) -> unsafe fn(&SsmParams, DType, DType, usize, $item, &mut $scratch) {
            use $crate::cpu::{Isa, isa};
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
    };
}
pub(crate) use isa_variants;

isa_variants!(
    fwd_block,
    (Scratch<R>, ChanState<R>),
    (usize, usize),
    pick_fwd
);

fn run<R: Real>(plan: &Plan) {
    let p = plan.params;
    let (ind, wd) = (plan.in_dtype, plan.w_dtype);
    let f = pick_fwd::<R>(p.is_variable_b != 0, p.is_variable_c != 0);
    let np = padded(p.dstate as usize);
    let chunk = p.chunk_size as usize;
    let blks = blocks(&p, CB);
    let nb = blks.len();
    par_for(
        p.batch as usize * nb,
        || (Scratch::<R>::new(chunk, np), ChanState::<R>::new(np)),
        |i, s| {
            let k = blks[i % nb];
            // SAFETY: plan_forward validated every tensor; each item writes only its own
            // channels' rows of out and states.
            unsafe { f(&p, ind, wd, i / nb, (k.d0, k.d1), s) }
        },
    );
}

/// Forward selective scan on the CPU, writing out and the chunk states.
///
/// # Safety
/// `plan` must come from `plan_forward` with outputs, and every tensor it addresses must stay
/// alive and unaliased (outputs distinct from inputs) for the duration of the call.
pub unsafe fn forward(plan: &Plan) {
    if plan.params.batch == 0 || plan.params.dim == 0 {
        return;
    }
    if plan.w_dtype == DType::F64 {
        run::<f64>(plan)
    } else {
        run::<f32>(plan)
    }
}
