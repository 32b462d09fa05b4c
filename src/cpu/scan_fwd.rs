//! Forward selective scan on the CPU: one work item per (batch, channel); state in registers
//! (blocks of `W` lanes); one fp32 state vector saved per chunk for the backward and last_state.

use super::{Isa, Real, W, addr, isa, par_for, softplus};
use crate::check::Plan;
use crate::dlpack::DType;
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
    pub a: Vec<R>,
    pub h: Vec<R>,
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
            a: z(np),
            h: z(np),
        }
    }
}

pub(crate) fn padded(dstate: usize) -> usize {
    dstate.div_ceil(W) * W
}

#[inline(always)]
pub(crate) fn hsum<R: Real>(v: &[R; W]) -> R {
    // Fixed pairwise order: deterministic and vectorisable.
    let mut s = *v;
    let mut w = W / 2;
    while w > 0 {
        for i in 0..w {
            s[i] = s[i] + s[i + w];
        }
        w /= 2;
    }
    s[0]
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
        R::load(ind, addr(p.u_ptr, b * p.u_batch_stride + d * p.u_d_stride + t0 as i64, ind), &mut s_u[..len]);
        R::load(
            ind,
            addr(p.delta_ptr, b * p.delta_batch_stride + d * p.delta_d_stride + t0 as i64, ind),
            &mut s_x[..len],
        );
        if p.has_z != 0 {
            R::load(ind, addr(p.z_ptr, b * p.z_batch_stride + d * p.z_d_stride + t0 as i64, ind), &mut s_z[..len]);
        }
    }
    for t in 0..len {
        let x = s_x[t] + bias;
        s_x[t] = x;
        s_dt[t] = if p.delta_softplus != 0 { softplus(x) } else { x };
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
pub(crate) unsafe fn load_initial<R: Real>(p: &SsmParams, wd: DType, b: usize, d: usize, h: &mut [R]) {
    let n = p.dstate as usize;
    h.fill(R::ZERO);
    if p.has_initial_state != 0 {
        let off = ((b * p.dim as usize + d) * n) as i64;
        // SAFETY: (batch, dim, dstate) contiguous.
        unsafe { R::load(wd, addr(p.initial_state_ptr, off, wd), &mut h[..n]) };
    }
}

/// Offset of the saved state at the end of chunk `c` of channel (b, d).
#[inline(always)]
pub(crate) fn state_off(p: &SsmParams, b: usize, d: usize, c: usize) -> i64 {
    (((b * p.dim as usize + d) * p.n_chunks as usize + c) * p.dstate as usize) as i64
}

/// One step of the recurrence for all state blocks; returns y = C . h.
#[inline(always)]
pub(crate) fn step<R: Real>(
    nblk: usize,
    a: &[R],
    bvec: &[R],
    cvec: &[R],
    dtv: R,
    dtu: R,
    h: &mut [R],
) -> R {
    let mut acc = [R::ZERO; W];
    for k in 0..nblk {
        let o = k * W;
        let (ab, bb, cb) = (blk(a, o), blk(bvec, o), blk(cvec, o));
        let hb = blk_mut(h, o);
        for l in 0..W {
            let da = (dtv * ab[l]).fexp();
            hb[l] = da * hb[l] + dtu * bb[l];
            acc[l] = acc[l] + cb[l] * hb[l];
        }
    }
    hsum(&acc)
}

/// The forward of one channel.
///
/// # Safety
/// `p` must come from `plan_forward` with outputs, its tensors alive and not aliased.
#[inline(always)]
unsafe fn fwd_channel<R: Real, const VB: bool, const VC: bool>(
    p: &SsmParams,
    ind: DType,
    wd: DType,
    b: usize,
    d: usize,
    s: &mut Scratch<R>,
) {
    let n_state = p.dstate as usize;
    let np = padded(n_state);
    let nblk = np / W;
    let k = p.chunk_size as usize;
    let seqlen = p.seqlen as usize;
    // SAFETY: all tensors were checked by plan_forward; (b, d) are in range.
    unsafe {
        load_a(p, wd, d, &mut s.a);
        let dval: R = load_scalar(p.has_d != 0, p.d_ptr, wd, d);
        let bias: R = load_scalar(p.has_delta_bias != 0, p.delta_bias_ptr, wd, d);
        load_initial(p, wd, b, d, &mut s.h);
        if !VB {
            load_bc::<R, false>(p, ind, wd, p.b_ptr, (0, p.b_group_stride, p.b_dstate_stride), 1, b, d, 0, 0, np, &mut s.row, &mut s.bt);
        }
        if !VC {
            load_bc::<R, false>(p, ind, wd, p.c_ptr, (0, p.c_group_stride, p.c_dstate_stride), 1, b, d, 0, 0, np, &mut s.row, &mut s.ct);
        }
        for c in 0..p.n_chunks as usize {
            let t0 = c * k;
            let len = k.min(seqlen.saturating_sub(t0));
            load_steps(p, ind, b, d, t0, len, bias, &mut s.u, &mut s.x, &mut s.dt, &mut s.z);
            if VB {
                load_bc::<R, true>(p, ind, wd, p.b_ptr, (p.b_batch_stride, p.b_group_stride, p.b_dstate_stride), p.b_ngroups, b, d, t0, len, np, &mut s.row, &mut s.bt);
            }
            if VC {
                load_bc::<R, true>(p, ind, wd, p.c_ptr, (p.c_batch_stride, p.c_group_stride, p.c_dstate_stride), p.c_ngroups, b, d, t0, len, np, &mut s.row, &mut s.ct);
            }
            for t in 0..len {
                let dtv = s.dt[t];
                let bo = if VB { t * np } else { 0 };
                let co = if VC { t * np } else { 0 };
                s.y[t] = step(nblk, &s.a, &s.bt[bo..bo + np], &s.ct[co..co + np], dtv, dtv * s.u[t], &mut s.h);
            }
            for t in 0..len {
                let mut o = s.y[t] + dval * s.u[t];
                if p.has_z != 0 {
                    let z = s.z[t];
                    o = o * (z / (R::ONE + (-z).exp()));
                }
                s.y[t] = o;
            }
            let off = b as i64 * p.out_batch_stride + d as i64 * p.out_d_stride + t0 as i64;
            R::store(ind, addr(p.out_ptr, off, ind), &s.y[..len]);
            R::store(wd, addr(p.states_ptr, state_off(p, b, d, c), wd), &s.h[..n_state]);
        }
    }
}

type ChannelFn<R> = unsafe fn(&SsmParams, DType, DType, usize, usize, &mut Scratch<R>);

macro_rules! isa_variants {
    ($generic:ident, $scratch:ident, $pick:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
        unsafe fn avx512<R: Real, const VB: bool, const VC: bool>(
            p: &SsmParams,
            ind: DType,
            wd: DType,
            b: usize,
            d: usize,
            s: &mut $scratch<R>,
        ) {
            // SAFETY: forwarded contract; the CPU supports these features (checked by isa()).
            unsafe { $generic::<R, VB, VC>(p, ind, wd, b, d, s) }
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R: Real, const VB: bool, const VC: bool>(
            p: &SsmParams,
            ind: DType,
            wd: DType,
            b: usize,
            d: usize,
            s: &mut $scratch<R>,
        ) {
            // SAFETY: as above.
            unsafe { $generic::<R, VB, VC>(p, ind, wd, b, d, s) }
        }
        unsafe fn baseline<R: Real, const VB: bool, const VC: bool>(
            p: &SsmParams,
            ind: DType,
            wd: DType,
            b: usize,
            d: usize,
            s: &mut $scratch<R>,
        ) {
            // SAFETY: forwarded contract.
            unsafe { $generic::<R, VB, VC>(p, ind, wd, b, d, s) }
        }
        fn $pick<R: Real>(vb: bool, vc: bool) -> unsafe fn(&SsmParams, DType, DType, usize, usize, &mut $scratch<R>) {
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

isa_variants!(fwd_channel, Scratch, pick_fwd);

fn run<R: Real>(plan: &Plan) {
    let p = plan.params;
    let (ind, wd) = (plan.in_dtype, plan.w_dtype);
    let f: ChannelFn<R> = pick_fwd::<R>(p.is_variable_b != 0, p.is_variable_c != 0);
    let np = padded(p.dstate as usize);
    let chunk = p.chunk_size as usize;
    let dim = p.dim as usize;
    par_for(
        p.batch as usize * dim,
        || Scratch::<R>::new(chunk, np),
        |i, s| {
            // SAFETY: plan_forward validated every tensor; each item writes only its own
            // channel's rows of out and states.
            unsafe { f(&p, ind, wd, i / dim, i % dim, s) }
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
    if plan.w_dtype == DType::F64 { run::<f64>(plan) } else { run::<f32>(plan) }
}
