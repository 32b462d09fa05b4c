//! The CPU path: rayon over (batch, channel) work items, `half` for f16/bf16 rows, f32 state and
//! accumulation (f64 for f64 inputs, so that gradcheck can run).
//!
//! Vectorisation: the state of one channel is kept as blocks of `W` lanes (dstate padded to a
//! multiple of `W` with A = B = C = 0, which keeps the padding at h = 0), and every inner loop is
//! a fixed-width loop over one block, which LLVM turns into SIMD. The exp is a branch-free
//! polynomial so that it vectorises too. Each kernel is compiled three times (AVX-512, AVX2+FMA,
//! baseline x86-64) and the widest one the CPU supports is picked at run time.

pub mod conv1d;
pub mod scan_bwd;
pub mod scan_fwd;
pub mod state_update;
pub mod strided;
#[cfg(test)]
mod tests;

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
    /// softplus with torch's threshold rule (x for x > 20); vectorisable for f32.
    fn softplus(self) -> Self;
    /// 2^x on the hot path; `FMA` selects fused multiply-adds (only in kernels compiled with
    /// the fma target feature, where they are single instructions).
    fn fexp2<const FMA: bool>(self) -> Self;
    fn fma(self, b: Self, c: Self) -> Self;
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
    let xc = if x < -88.0 {
        -88.0
    } else if x > 89.0 {
        89.0
    } else {
        x
    };
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

/// a * b + c, fused when the kernel is compiled with FMA.
#[inline(always)]
pub fn madd<R: Real, const FMA: bool>(a: R, b: R, c: R) -> R {
    if FMA { a.fma(b, c) } else { a * b + c }
}

/// 2^y for f32 without branches, for the scan's decay exp(dt A) = 2^(dt A log2 e) with A
/// pre-scaled by log2 e once per channel (one multiply fewer per state and step). y = k + f with
/// k = round(y), f in [-1/2, 1/2] exact; Cephes' degree-6 exp2f polynomial (~1 ulp on top of
/// the rounding of y, which the fp32 reference's exp(dt * A) shares). Flushes below 2^-126.
#[inline(always)]
pub fn exp2_f32<const FMA: bool>(y: f32) -> f32 {
    let yc = if y < -127.0 {
        -127.0
    } else if y > 128.0 {
        128.0
    } else {
        y
    };
    let r = yc + ROUND_MAGIC;
    let kf = r - ROUND_MAGIC;
    let ki = (r.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let f = yc - kf;
    let mut p = 1.535_336_2e-4f32;
    p = madd::<f32, FMA>(p, f, 1.339_887_4e-3);
    p = madd::<f32, FMA>(p, f, 9.618_437_4e-3);
    p = madd::<f32, FMA>(p, f, 5.550_332_5e-2);
    p = madd::<f32, FMA>(p, f, 2.402_264_8e-1);
    p = madd::<f32, FMA>(p, f, 6.931_472e-1);
    p = madd::<f32, FMA>(p, f, 1.0);
    // k = -127 gives a zero scale (flush), k = 128 gives +inf.
    p * f32::from_bits((ki.wrapping_add(127) << 23) as u32)
}

/// ln(x) for positive normal f32 without branches (Cephes' logf polynomial, ~1 ulp).
#[inline(always)]
pub fn ln_f32(v: f32) -> f32 {
    let bits = v.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 126;
    let m = f32::from_bits((bits & 0x807f_ffff) | 0x3f00_0000); // in [0.5, 1)
    let small = m < std::f32::consts::FRAC_1_SQRT_2;
    e = if small { e - 1 } else { e };
    let x = if small { m + m - 1.0 } else { m - 1.0 };
    let ef = e as f32;
    let z = x * x;
    let mut y = 7.037_683_6e-2f32;
    y = y * x - 1.151_461_1e-1;
    y = y * x + 1.167_699_9e-1;
    y = y * x - 1.242_014_1e-1;
    y = y * x + 1.424_932_3e-1;
    y = y * x - 1.666_805_8e-1;
    y = y * x + 2.000_071_4e-1;
    y = y * x - 2.499_999_4e-1;
    y = y * x + 3.333_333_1e-1;
    y = y * x * z;
    y = y + -2.121_944_4e-4 * ef;
    y = y + -0.5 * z;
    (x + y) + 0.693_359_4 * ef
}

/// softplus(x) = ln(1 + e^x), x for x > 20 (torch's threshold), branch-free for SIMD. ln(1+y) is
/// computed as ln(w) * y / (w - 1) with w = 1 + y, which cancels the rounding of w.
#[inline(always)]
pub fn softplus_f32(x: f32) -> f32 {
    let y = exp_f32(if x > 20.0 { 20.0 } else { x });
    let w = 1.0 + y;
    let den = w - 1.0;
    let l = ln_f32(w) * (y / if den == 0.0 { 1.0 } else { den });
    let l = if den == 0.0 { y } else { l };
    if x > 20.0 { x } else { l }
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
    fn softplus(self) -> Self {
        softplus_f32(self)
    }
    #[inline(always)]
    fn fexp2<const FMA: bool>(self) -> Self {
        exp2_f32::<FMA>(self)
    }
    #[inline(always)]
    fn fma(self, b: Self, c: Self) -> Self {
        self.mul_add(b, c)
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
                DType::F16 => {
                    std::slice::from_raw_parts(ptr as *const f16, n).convert_to_f32_slice(dst)
                }
                DType::BF16 => {
                    std::slice::from_raw_parts(ptr as *const bf16, n).convert_to_f32_slice(dst)
                }
                DType::F64 => {
                    for (o, i) in dst
                        .iter_mut()
                        .zip(std::slice::from_raw_parts(ptr as *const f64, n))
                    {
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
                DType::F32 => {
                    std::slice::from_raw_parts_mut(ptr as *mut f32, n).copy_from_slice(src)
                }
                DType::F16 => {
                    std::slice::from_raw_parts_mut(ptr as *mut f16, n).convert_from_f32_slice(src)
                }
                DType::BF16 => {
                    std::slice::from_raw_parts_mut(ptr as *mut bf16, n).convert_from_f32_slice(src)
                }
                DType::F64 => {
                    for (o, i) in std::slice::from_raw_parts_mut(ptr as *mut f64, n)
                        .iter_mut()
                        .zip(src)
                    {
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
    fn softplus(self) -> Self {
        if self > 20.0 {
            self
        } else {
            self.exp().ln_1p()
        }
    }
    #[inline(always)]
    fn fexp2<const FMA: bool>(self) -> Self {
        self.exp2()
    }
    #[inline(always)]
    fn fma(self, b: Self, c: Self) -> Self {
        self.mul_add(b, c)
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
                    for (o, i) in dst
                        .iter_mut()
                        .zip(std::slice::from_raw_parts(ptr as *const f32, n))
                    {
                        *o = *i as f64;
                    }
                }
                DType::F16 => {
                    for (o, i) in dst
                        .iter_mut()
                        .zip(std::slice::from_raw_parts(ptr as *const f16, n))
                    {
                        *o = i.to_f64();
                    }
                }
                DType::BF16 => {
                    for (o, i) in dst
                        .iter_mut()
                        .zip(std::slice::from_raw_parts(ptr as *const bf16, n))
                    {
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
                DType::F64 => {
                    std::slice::from_raw_parts_mut(ptr as *mut f64, n).copy_from_slice(src)
                }
                DType::F32 => {
                    for (o, i) in std::slice::from_raw_parts_mut(ptr as *mut f32, n)
                        .iter_mut()
                        .zip(src)
                    {
                        *o = *i as f32;
                    }
                }
                DType::F16 => {
                    for (o, i) in std::slice::from_raw_parts_mut(ptr as *mut f16, n)
                        .iter_mut()
                        .zip(src)
                    {
                        *o = f16::from_f64(*i);
                    }
                }
                DType::BF16 => {
                    for (o, i) in std::slice::from_raw_parts_mut(ptr as *mut bf16, n)
                        .iter_mut()
                        .zip(src)
                    {
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

#[inline(always)]
pub fn sigmoid<R: Real>(x: R) -> R {
    R::ONE / (R::ONE + (-x).fexp())
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

#[cfg(test)]
mod math_tests {
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
    fn softplus_matches_libm() {
        let mut worst = 0.0f64;
        let mut x = -30.0f32;
        while x < 30.0 {
            let got = softplus_f32(x) as f64;
            let xd = x as f64;
            let want = if xd > 20.0 { xd } else { xd.exp().ln_1p() };
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_97;
        }
        assert!(worst < 6e-7, "worst relative error {worst}");
        assert!(softplus_f32(f32::NAN).is_nan());
    }

    #[test]
    fn ln_matches_libm() {
        let mut worst = 0.0f64;
        let mut v = 1.0e-30f32;
        while v < 1.0e30 {
            let got = ln_f32(v) as f64;
            let want = (v as f64).ln();
            worst = worst.max((got - want).abs() / want.abs().max(1.0));
            v *= 1.001_3;
        }
        assert!(worst < 3e-7, "worst error {worst}");
    }

    #[test]
    fn exp2_matches_libm() {
        for fma in [false, true] {
            let mut worst = 0.0f64;
            let mut y = -126.0f32;
            while y < 127.0 {
                let got = if fma {
                    exp2_f32::<true>(y)
                } else {
                    exp2_f32::<false>(y)
                } as f64;
                let want = (y as f64).exp2();
                worst = worst.max(((got - want) / want).abs());
                y += 0.001_37;
            }
            assert!(worst < 3e-7, "worst relative error {worst}");
        }
        assert!(exp2_f32::<false>(f32::NAN).is_nan());
        assert_eq!(exp2_f32::<false>(-1000.0), 0.0);
        assert_eq!(exp2_f32::<false>(1000.0), f32::INFINITY);
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
