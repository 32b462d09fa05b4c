//! The CPU path: rayon over (batch, channel) work items, `half` for f16/bf16 rows, f32 state and
//! accumulation (f64 for f64 inputs, so that gradcheck can run).
//!
//! Vectorisation: the state of one channel is kept as blocks of `W` lanes (dstate padded to a
//! multiple of `W` with A = B = C = 0, which keeps the padding at h = 0), and every inner loop is
//! a fixed-width loop over one block, which LLVM turns into SIMD. The exp is a branch-free
//! polynomial so that it vectorises too. Each kernel is compiled three times (AVX-512, AVX2+FMA,
//! baseline x86-64) and the widest one the CPU supports is picked at run time.

pub mod scan_bwd;
pub mod scan_fwd;

use crate::dlpack::DType;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

/// Lanes per state block.
pub const W: usize = 16;

/// Steps per saved state on the CPU: the backward recomputes one chunk at a time from its saved
/// start state, so a chunk's (steps x dstate) history must stay in L2 (256 x 64 x 4 B = 64 KB).
pub const CPU_CHUNK: i32 = 256;

/// The compute type: f32 for f32/f16/bf16 inputs, f64 for f64 inputs.
pub trait Real:
    Copy
    + Send
    + Sync
    + Default
    + PartialOrd
    + std::fmt::Debug
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(x: f64) -> Self;
    /// exp on the hot path (vectorisable polynomial for f32; libm for f64).
    fn fexp(self) -> Self;
    /// Accurate exp and log1p for the per-step (not per-state) work.
    fn exp(self) -> Self;
    fn ln_1p(self) -> Self;
    /// Load `dst.len()` contiguous elements of `dtype` at `ptr`, converting.
    ///
    /// # Safety
    /// `ptr` must point to `dst.len()` readable elements of `dtype`.
    unsafe fn load(dtype: DType, ptr: *const u8, dst: &mut [Self]);
    /// Store `src` as `dtype` at `ptr`, converting (round to nearest even).
    ///
    /// # Safety
    /// `ptr` must point to `src.len()` writable elements of `dtype`.
    unsafe fn store(dtype: DType, ptr: *mut u8, src: &[Self]);
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// 1.5 * 2^23: adding it rounds an f32 in [-2^22, 2^22] to an integer held in the low mantissa.
const ROUND_MAGIC: f32 = 12582912.0;

/// exp(x) for f32 without branches: e^x = 2^k e^r with k = round(x log2 e) and
/// r = x - k ln 2 computed in two pieces (Cody-Waite, so r keeps full precision even for
/// |x| ~ 87), then Cephes' degree-6 polynomial for e^r on [-ln2/2, ln2/2] (~1 ulp).
/// Results below 2^-126 flush to 0; NaN propagates; +-inf map to inf / 0.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    // Comparisons are false for NaN, so NaN flows through to the result.
    let xc = if x < -88.0 { -88.0 } else if x > 89.0 { 89.0 } else { x };
    let r = xc * LOG2E + ROUND_MAGIC;
    let kf = r - ROUND_MAGIC;
    let ki = (r.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let f = xc - kf * 0.693_359_4 - kf * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * f + 1.398_199_9e-3;
    p = p * f + 8.333_452e-3;
    p = p * f + 4.166_579_6e-2;
    p = p * f + 1.666_666_5e-1;
    p = p * f + 5.000_000_1e-1;
    let e = p * (f * f) + f + 1.0;
    // k <= -127 gives a zero scale (flush), k = 128 gives +inf.
    let kc = if ki < -127 { -127 } else { ki };
    let scale = f32::from_bits((kc.wrapping_add(127) << 23) as u32);
    let out = e * scale;
    if x < -88.0 { 0.0 } else { out }
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn fexp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f32::exp(self)
    }
    #[inline(always)]
    fn ln_1p(self) -> Self {
        f32::ln_1p(self)
    }
    #[inline(always)]
    unsafe fn load(dtype: DType, ptr: *const u8, dst: &mut [f32]) {
        let n = dst.len();
        // SAFETY: the caller guarantees `n` readable elements of `dtype` at `ptr`; the element
        // types have alignment <= their size and the tensors come from allocators that align.
        unsafe {
            match dtype {
                DType::F32 => dst.copy_from_slice(std::slice::from_raw_parts(ptr as *const f32, n)),
                DType::F16 => std::slice::from_raw_parts(ptr as *const f16, n).convert_to_f32_slice(dst),
                DType::BF16 => std::slice::from_raw_parts(ptr as *const bf16, n).convert_to_f32_slice(dst),
                DType::F64 => {
                    for (o, i) in dst.iter_mut().zip(std::slice::from_raw_parts(ptr as *const f64, n)) {
                        *o = *i as f32;
                    }
                }
            }
        }
    }
    #[inline(always)]
    unsafe fn store(dtype: DType, ptr: *mut u8, src: &[f32]) {
        let n = src.len();
        // SAFETY: the caller guarantees `n` writable elements of `dtype` at `ptr`.
        unsafe {
            match dtype {
                DType::F32 => std::slice::from_raw_parts_mut(ptr as *mut f32, n).copy_from_slice(src),
                DType::F16 => std::slice::from_raw_parts_mut(ptr as *mut f16, n).convert_from_f32_slice(src),
                DType::BF16 => std::slice::from_raw_parts_mut(ptr as *mut bf16, n).convert_from_f32_slice(src),
                DType::F64 => {
                    for (o, i) in std::slice::from_raw_parts_mut(ptr as *mut f64, n).iter_mut().zip(src) {
                        *o = *i as f64;
                    }
                }
            }
        }
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn fexp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn ln_1p(self) -> Self {
        f64::ln_1p(self)
    }
    #[inline(always)]
    unsafe fn load(dtype: DType, ptr: *const u8, dst: &mut [f64]) {
        let n = dst.len();
        // SAFETY: as for f32.
        unsafe {
            match dtype {
                DType::F64 => dst.copy_from_slice(std::slice::from_raw_parts(ptr as *const f64, n)),
                DType::F32 => {
                    for (o, i) in dst.iter_mut().zip(std::slice::from_raw_parts(ptr as *const f32, n)) {
                        *o = *i as f64;
                    }
                }
                DType::F16 => {
                    for (o, i) in dst.iter_mut().zip(std::slice::from_raw_parts(ptr as *const f16, n)) {
                        *o = i.to_f64();
                    }
                }
                DType::BF16 => {
                    for (o, i) in dst.iter_mut().zip(std::slice::from_raw_parts(ptr as *const bf16, n)) {
                        *o = i.to_f64();
                    }
                }
            }
        }
    }
    #[inline(always)]
    unsafe fn store(dtype: DType, ptr: *mut u8, src: &[f64]) {
        let n = src.len();
        // SAFETY: as for f32.
        unsafe {
            match dtype {
                DType::F64 => std::slice::from_raw_parts_mut(ptr as *mut f64, n).copy_from_slice(src),
                DType::F32 => {
                    for (o, i) in std::slice::from_raw_parts_mut(ptr as *mut f32, n).iter_mut().zip(src) {
                        *o = *i as f32;
                    }
                }
                DType::F16 => {
                    for (o, i) in std::slice::from_raw_parts_mut(ptr as *mut f16, n).iter_mut().zip(src) {
                        *o = f16::from_f64(*i);
                    }
                }
                DType::BF16 => {
                    for (o, i) in std::slice::from_raw_parts_mut(ptr as *mut bf16, n).iter_mut().zip(src) {
                        *o = bf16::from_f64(*i);
                    }
                }
            }
        }
    }
}

/// Address of element `off` of a `dtype` tensor at `base`.
#[inline(always)]
pub fn addr(base: u64, off: i64, dtype: DType) -> *mut u8 {
    (base as i64 + off * dtype.size() as i64) as *mut u8
}

/// softplus with torch's threshold rule: x for x > 20.
#[inline(always)]
pub fn softplus<R: Real>(x: R) -> R {
    if x > R::from_f64(20.0) { x } else { x.exp().ln_1p() }
}

#[inline(always)]
pub fn sigmoid<R: Real>(x: R) -> R {
    R::ONE / (R::ONE + (-x).exp())
}

/// Instruction sets the kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Baseline,
}

pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::env::var("MAMBA_SCAN_CPU_ISA").as_deref() == Ok("baseline") {
                return Isa::Baseline;
            }
            let want_avx2 = std::env::var("MAMBA_SCAN_CPU_ISA").as_deref() == Ok("avx2");
            if !want_avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
            {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Baseline
    })
}

static FORKED_CHILD: AtomicBool = AtomicBool::new(false);

extern "C" fn mark_forked_child() {
    FORKED_CHILD.store(true, Ordering::SeqCst);
}

/// Register the fork handler once. A forked child (a DataLoader worker) inherits rayon's pool
/// state but not its threads, so a parallel loop there would wait forever: the child runs
/// every loop on the calling thread instead.
pub fn install_fork_handler() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        #[cfg(unix)]
        // SAFETY: pthread_atfork only records the function pointers; the child handler only
        // stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::pthread_atfork(None, None, Some(mark_forked_child));
        }
    });
}

pub fn in_forked_child() -> bool {
    FORKED_CHILD.load(Ordering::Relaxed)
}

/// Run `f(i, scratch)` for i in 0..n, in parallel unless in a forked child. Each worker thread
/// reuses one scratch value made by `init`.
pub fn par_for<S, I, F>(n: usize, init: I, f: F)
where
    I: Fn() -> S + Sync + Send,
    F: Fn(usize, &mut S) + Sync + Send,
{
    use rayon::prelude::*;
    if in_forked_child() || n <= 1 || rayon::current_num_threads() == 1 {
        let mut s = init();
        for i in 0..n {
            f(i, &mut s);
        }
    } else {
        (0..n).into_par_iter().for_each_init(&init, |s, i| f(i, s));
    }
}

/// Raw params that can cross into rayon's threads. The pointers in it address tensors that the
/// caller keeps alive and does not touch for the duration of the call.
#[derive(Clone, Copy)]
pub struct SendPtr(pub u64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = exp_f32(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
    }

    #[test]
    fn exp_edges() {
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-1000.0), 0.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(1000.0), f32::INFINITY);
        assert_eq!(exp_f32(0.0), 1.0);
    }
}
