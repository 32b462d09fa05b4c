// Helpers shared by the kernels. Self-contained: no toolkit headers, so that libnvrtc alone
// compiles them. The Rust runtime prepends params.h and this file to each kernel source.
#pragma once

typedef unsigned short u16;

// Input dtype codes (kInType): 0 float32, 1 float16, 2 bfloat16.
// float4 is built into NVRTC; make_float4 lives in a toolkit header, so build one here.
__device__ __forceinline__ float4 f4(float x, float y, float z, float w) {
    float4 v;
    v.x = x;
    v.y = y;
    v.z = z;
    v.w = w;
    return v;
}

// Component k (a compile-time constant after unrolling) of a float4.
__device__ __forceinline__ float f4_at(const float4& v, int k) {
    return k == 0 ? v.x : k == 1 ? v.y : k == 2 ? v.z : v.w;
}

template <int T> struct InType;
template <> struct InType<0> { typedef float t; };
template <> struct InType<1> { typedef u16 t; };
template <> struct InType<2> { typedef u16 t; };

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float bf2f(u16 h) { return __uint_as_float(((unsigned)h) << 16); }
__device__ __forceinline__ u16 f2bf(float f) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

template <int kT> __device__ __forceinline__ float to_f(typename InType<kT>::t v);
template <> __device__ __forceinline__ float to_f<0>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<1>(u16 v) { return h2f(v); }
template <> __device__ __forceinline__ float to_f<2>(u16 v) { return bf2f(v); }
template <int kT> __device__ __forceinline__ typename InType<kT>::t from_f(float v);
template <> __device__ __forceinline__ float from_f<0>(float v) { return v; }
template <> __device__ __forceinline__ u16 from_f<1>(float v) { return f2h(v); }
template <> __device__ __forceinline__ u16 from_f<2>(float v) { return f2bf(v); }

// The MUFU's 2^x: the scan's decay exp(dt A) is ex2(dt * (A log2 e)), A pre-scaled once.
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float lg2(float x) {
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float rcp(float x) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

#define LOG2E_F 1.4426950408889634f
#define LN2_F 0.6931471805599453f

// softplus with the accurate libdevice functions (NVRTC provides them without headers): for
// float32 inputs and the decoding step.
__device__ __forceinline__ float softplus_f(float x) { return x > 20.f ? x : log1pf(expf(x)); }
// softplus from the MUFU's ex2 / lg2 (a third of the instructions), for 16-bit inputs: lg2.approx
// is within 2^-22 absolute on [1, 2], far below the 2^-8 / 2^-11 relative rounding of the
// bf16 / fp16 input it is applied to; tiny exp(x) take the series of log1p instead (relative
// error < 2^-30 there).
__device__ __forceinline__ float softplus_mufu(float x) {
    // Both arms are computed and one selected: branch-free (a branch per element serialises the
    // conversion pass).
    const float e = ex2(x * LOG2E_F);
    const float l = LN2_F * lg2(1.f + e);
    const float sr = e * (1.f - e * (0.5f - e * (1.f / 3.f)));
    const float r = e < 0x1p-10f ? sr : l;
    return x > 20.f ? x : r;
}
// 1 - exp(-dt) (= sigmoid(x) for dt = softplus(x)) for 16-bit inputs, the same way: the series
// for small dt (relative error < 2^-30 below 2^-6), else ex2.
__device__ __forceinline__ float one_minus_exp_neg_mufu(float dt) {
    return dt < 0x1p-6f ? dt * (1.f - dt * (0.5f - dt * (1.f / 6.f - dt * (1.f / 24.f))))
                        : 1.f - ex2(-dt * LOG2E_F);
}
// sigmoid from ex2 and rcp.approx (each within ~2 ulp): as accurate as the libdevice expf
// followed by a division at this use, and a few instructions.
__device__ __forceinline__ float sigmoid_f(float x) { return rcp(1.f + ex2(-x * LOG2E_F)); }

__device__ __forceinline__ float shfl_xor(float v, int m, unsigned mask) {
    return __shfl_xor_sync(mask, v, m);
}

// Reduce-scatter across the M lanes lane0 + k * STRIDE (k < M) of a warp, V partials per lane
// (V, M powers of two): after it, w[0 .. R) with R = max(V / M, 1) holds totals of partials
// [blk * R, blk * R + R), where blk = k >> (log2 M - H) and H = min(log2 V, log2 M) halving
// levels. When V < M the last levels are plain butterflies and the lanes with those low bits of k
// set hold copies: `rs_owner` says which lane writes. At each halving level a lane keeps the half
// its bit selects and sends the other half to its partner: V - R shuffles instead of V log2 M.
template <int SIZE, int m, int STRIDE, int V>
__device__ __forceinline__ void rs_level(float (&w)[V], int k, unsigned mask) {
    if constexpr (m >= 1) {
        if constexpr (SIZE > 1) {
            const bool up = k & m;
#pragma unroll
            for (int i = 0; i < SIZE / 2; ++i) {
                const float send = up ? w[i] : w[i + SIZE / 2];
                const float keep = up ? w[i + SIZE / 2] : w[i];
                w[i] = keep + __shfl_xor_sync(mask, send, m * STRIDE);
            }
            rs_level<SIZE / 2, m / 2, STRIDE>(w, k, mask);
        } else {
            w[0] += __shfl_xor_sync(mask, w[0], m * STRIDE);
            rs_level<1, m / 2, STRIDE>(w, k, mask);
        }
    }
}
template <int V, int M, int STRIDE>
__device__ __forceinline__ void reduce_scatter(float (&w)[V], int k, unsigned mask) {
    rs_level<V, M / 2, STRIDE>(w, k, mask);
}
template <int X> struct Lg { static constexpr int v = 1 + Lg<X / 2>::v; };
template <> struct Lg<1> { static constexpr int v = 0; };
template <int V, int M> struct RS {
    static constexpr int H = Lg<V>::v < Lg<M>::v ? Lg<V>::v : Lg<M>::v;
    static constexpr int R = V / (1 << H);
    static constexpr int LOW = Lg<M>::v - H;  // butterfly levels
    __device__ static __forceinline__ int blk(int k) { return k >> LOW; }
    __device__ static __forceinline__ bool owner(int k) { return (k & ((1 << LOW) - 1)) == 0; }
};

// Vectorised row I/O between global memory (in_t, contiguous along t) and fp32 shared memory:
// 16-byte accesses where the address is aligned and the vector lies inside the row, scalar
// otherwise. VEC elements per 16 bytes.
template <int kT> struct Vec { static constexpr int n = kT == 0 ? 4 : 8; };

// VEC elements from 16 aligned bytes, widened to fp32 (no checks: the caller knows the vector is
// whole and aligned, as in the padded raw rows of the staging tiles).
template <int kT>
__device__ __forceinline__ void ld_vec_aligned(const typename InType<kT>::t* src, float* dst) {
    const uint4 r = *reinterpret_cast<const uint4*>(src);
    if constexpr (kT == 0) {
        dst[0] = __uint_as_float(r.x);
        dst[1] = __uint_as_float(r.y);
        dst[2] = __uint_as_float(r.z);
        dst[3] = __uint_as_float(r.w);
    } else {
        const unsigned wv[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            dst[2 * i] = to_f<kT>((u16)(wv[i] & 0xffffu));
            dst[2 * i + 1] = to_f<kT>((u16)(wv[i] >> 16));
        }
    }
}
template <int kT>
__device__ __forceinline__ void load_vec(const typename InType<kT>::t* src, int valid, float* dst) {
    constexpr int VEC = Vec<kT>::n;
    if (valid >= VEC && ((unsigned long long)src & 15) == 0) {
        ld_vec_aligned<kT>(src, dst);
    } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) dst[i] = i < valid ? to_f<kT>(src[i]) : 0.f;
    }
}

// Four elements (8 bytes for 16-bit inputs) from an aligned address, widened to fp32.
template <int kT>
__device__ __forceinline__ void ld4_aligned(const typename InType<kT>::t* src, float* dst) {
    if constexpr (kT == 0) {
        ld_vec_aligned<0>(src, dst);
    } else {
        const uint2 r = *reinterpret_cast<const uint2*>(src);
        dst[0] = to_f<kT>((u16)(r.x & 0xffffu));
        dst[1] = to_f<kT>((u16)(r.x >> 16));
        dst[2] = to_f<kT>((u16)(r.y & 0xffffu));
        dst[3] = to_f<kT>((u16)(r.y >> 16));
    }
}
// Four elements to a global row: one 8-byte (16-bit) / 16-byte (fp32) store when all four are
// valid and the address is aligned, else element by element up to `valid` (which may be <= 0).
template <int kT>
__device__ __forceinline__ void st4(typename InType<kT>::t* dst, int valid, const float* v) {
    constexpr unsigned long long al = kT == 0 ? 15 : 7;
    if (valid >= 4 && ((unsigned long long)dst & al) == 0) {
        if constexpr (kT == 0) {
            *reinterpret_cast<float4*>(dst) = f4(v[0], v[1], v[2], v[3]);
        } else {
            uint2 r;
            r.x = (unsigned)from_f<kT>(v[0]) | ((unsigned)from_f<kT>(v[1]) << 16);
            r.y = (unsigned)from_f<kT>(v[2]) | ((unsigned)from_f<kT>(v[3]) << 16);
            *reinterpret_cast<uint2*>(dst) = r;
        }
    } else {
        for (int i = 0; i < 4 && i < valid; ++i) dst[i] = from_f<kT>(v[i]);
    }
}
// The staging passes give each thread VEC elements of one row as groups of four: at t and (for
// 8-element vectors) at t + half. With half = 4 these are 16 contiguous bytes of the raw row.
// With 16-bit inputs and 64-step tiles a quarter-warp covers one fp32 row, and contiguous groups
// would put the float4 of threads l and l + 4 in the same banks; there each thread takes
// t = 4 l and t + 32 instead, and the quarter-warp's float4 accesses cover the 32 banks once.
template <int kT, int kTileT> struct Stage {
    static constexpr int VEC = Vec<kT>::n;
    static constexpr bool split = VEC == 8 && kTileT >= 64;
    static constexpr int half = split ? kTileT / 2 : 4;
    // First element of vector l of a row.
    __device__ static __forceinline__ int first(int l) { return split ? l * 4 : l * VEC; }
    // Position of element k (< VEC) of the vector that starts at t.
    __device__ static __forceinline__ int pos(int t, int k) { return k < 4 ? t + k : t + half + k - 4; }
};

template <int kT>
__device__ __forceinline__ void store_vec(typename InType<kT>::t* dst, int valid, const float* v) {
    constexpr int VEC = Vec<kT>::n;
    if (valid >= VEC && ((unsigned long long)dst & 15) == 0) {
        uint4 r;
        if constexpr (kT == 0) {
            r.x = __float_as_uint(v[0]);
            r.y = __float_as_uint(v[1]);
            r.z = __float_as_uint(v[2]);
            r.w = __float_as_uint(v[3]);
        } else {
            unsigned wv[4];
#pragma unroll
            for (int i = 0; i < 4; ++i)
                wv[i] = (unsigned)(u16)from_f<kT>(v[2 * i]) | ((unsigned)(u16)from_f<kT>(v[2 * i + 1]) << 16);
            r.x = wv[0];
            r.y = wv[1];
            r.z = wv[2];
            r.w = wv[3];
        }
        *reinterpret_cast<uint4*>(dst) = r;
    } else {
        for (int i = 0; i < VEC && i < valid; ++i) dst[i] = from_f<kT>(v[i]);
    }
}

// Asynchronous global -> shared copies (cp.async, sm_80+; a plain copy before that), so that the
// next tile's loads are in flight while the current tile is computed.
__device__ __forceinline__ unsigned smem_u32(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
// dst: the destination's shared-window address (smem_u32); dst_generic: the same as a pointer.
__device__ __forceinline__ void cp_async16_s(unsigned dst, void* dst_generic, const void* src) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
#else
    *reinterpret_cast<uint4*>(dst_generic) = *reinterpret_cast<const uint4*>(src);
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}
// One 16-byte vector of a row: asynchronously when the source is aligned and whole, otherwise
// element by element with zeros past `valid` (which may be <= 0: all zeros, nothing read).
// dst_s: dst's shared-window address (smem_u32), for callers that computed it once.
template <int kT>
__device__ __forceinline__ void fetch_vec_s(typename InType<kT>::t* dst, unsigned dst_s,
                                            const typename InType<kT>::t* src, int valid) {
    constexpr int VEC = Vec<kT>::n;
    if (valid >= VEC && ((unsigned long long)src & 15) == 0) {
        cp_async16_s(dst_s, dst, src);
    } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) dst[k] = k < valid ? src[k] : (typename InType<kT>::t)0;
    }
}
template <int kT>
__device__ __forceinline__ void fetch_vec(typename InType<kT>::t* dst, const typename InType<kT>::t* src, int valid) {
    fetch_vec_s<kT>(dst, smem_u32(dst), src, valid);
}

// Specialised or generic scan kernels. Specialised (kGeneric 0): kVarB, kVarC and kHasZ are
// the call's flags at compile time. Generic (kGeneric 1, compiled with all three set): the
// shared-memory carve-up has room for the B, C and z tiles, and the call's flags decide at run
// time what is loaded, read and written (VAR_B, VAR_C, HAS_Z in the kernels; they expect the
// launch parameters in scope as `p`). Calls with a fixed B or C take the generic build.
#ifndef kGeneric
#define kGeneric 0
#endif
#if kGeneric
#define VAR_B (p.is_variable_b != 0)
#define VAR_C (p.is_variable_c != 0)
#define HAS_Z (p.has_z != 0)
#else
#define VAR_B kVarB
#define VAR_C kVarC
#define HAS_Z kHasZ
#endif

// Variable B / C of one step in shared memory. Unpacked: fp32 [t][n] tiles, one per matrix.
// Packed (16-bit inputs, both B and C variable, more than 16 states per channel; kPackBC): the
// raw 16-bit values, per step and lane group j, B of the group's KS states then C of them
// (4 KS bytes), so one vector read gives a lane both: half the shared-memory wavefronts of two
// fp32 reads, for one integer instruction per value (bf16) to widen them.
#ifndef kPackBC
#define kPackBC 1
#endif
template <int kT> __device__ __forceinline__ float lo16(unsigned w) {
    if constexpr (kT == 2) return __uint_as_float(w << 16);
    else return h2f((u16)(w & 0xffffu));
}
template <int kT> __device__ __forceinline__ float hi16(unsigned w) {
    if constexpr (kT == 2) return __uint_as_float(w & 0xffff0000u);
    else return h2f((u16)(w >> 16));
}
// NW 32-bit words (1, 2 or a multiple of 4) of a packed tile at src, as one or more vector reads.
template <int NW> __device__ __forceinline__ void ld_words(const u16* src, unsigned (&w)[NW]) {
    if constexpr (NW == 1) {
        w[0] = *reinterpret_cast<const unsigned*>(src);
    } else if constexpr (NW == 2) {
        const uint2 r = *reinterpret_cast<const uint2*>(src);
        w[0] = r.x;
        w[1] = r.y;
    } else {
#pragma unroll
        for (int q = 0; q < NW / 4; ++q) {
            const uint4 r = *reinterpret_cast<const uint4*>(src + 8 * q);
            w[4 * q] = r.x;
            w[4 * q + 1] = r.y;
            w[4 * q + 2] = r.z;
            w[4 * q + 3] = r.w;
        }
    }
}
// The 2 KS packed values of a lane group (B's KS / 2 words, then C's), widened.
template <int kT, int KS>
__device__ __forceinline__ void ld_bc_packed(const u16* src, float (&bb)[KS], float (&cv)[KS]) {
    unsigned w[KS];
    ld_words<KS>(src, w);
#pragma unroll
    for (int i = 0; i < KS / 2; ++i) {
        bb[2 * i] = lo16<kT>(w[i]);
        bb[2 * i + 1] = hi16<kT>(w[i]);
        cv[2 * i] = lo16<kT>(w[KS / 2 + i]);
        cv[2 * i + 1] = hi16<kT>(w[KS / 2 + i]);
    }
}
// B alone from a packed tile (its KS / 2 words).
template <int kT, int KS>
__device__ __forceinline__ void ld_b_packed(const u16* src, float (&bb)[KS]) {
    unsigned w[KS / 2];
    ld_words<KS / 2>(src, w);
#pragma unroll
    for (int i = 0; i < KS / 2; ++i) {
        bb[2 * i] = lo16<kT>(w[i]);
        bb[2 * i + 1] = hi16<kT>(w[i]);
    }
}
// Writes VEC raw values of row n (steps t .. t + VEC) of B (which 0) or C (which 1) into a packed
// tile of NP states.
template <int KS, int NP, int VEC>
__device__ __forceinline__ void st_packed(u16* tile, const u16* raw, int n, int t, int which) {
    const uint4 r = *reinterpret_cast<const uint4*>(raw);
    const unsigned wv[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
        const u16 v = (u16)((wv[k / 2] >> (16 * (k & 1))) & 0xffffu);
        tile[((t + k) * (NP / KS) + n / KS) * 2 * KS + which * KS + n % KS] = v;
    }
}

// KS (2 or a multiple of 4) consecutive fp32 values, as float2 / float4 accesses: the address
// must be aligned to their size (8 or 16 bytes).
template <int KS>
__device__ __forceinline__ void ld_states(const float* src, float (&v)[KS]) {
    if constexpr (KS % 4 == 0) {
#pragma unroll
        for (int s4 = 0; s4 < KS; s4 += 4) {
            const float4 x = *reinterpret_cast<const float4*>(src + s4);
            v[s4] = x.x;
            v[s4 + 1] = x.y;
            v[s4 + 2] = x.z;
            v[s4 + 3] = x.w;
        }
    } else {
        static_assert(KS == 2, "states per lane: 2 or a multiple of 4");
        const float2 x = *reinterpret_cast<const float2*>(src);
        v[0] = x.x;
        v[1] = x.y;
    }
}
template <int KS>
__device__ __forceinline__ void st_states(float* dst, const float* v) {
    if constexpr (KS % 4 == 0) {
#pragma unroll
        for (int s4 = 0; s4 < KS; s4 += 4) *reinterpret_cast<float4*>(dst + s4) = f4(v[s4], v[s4 + 1], v[s4 + 2], v[s4 + 3]);
    } else {
        static_assert(KS == 2, "states per lane: 2 or a multiple of 4");
        float2 x;
        x.x = v[0];
        x.y = v[1];
        *reinterpret_cast<float2*>(dst) = x;
    }
}

// Packed sequences (p.has_seq_idx): the state restarts where seq_idx changes along a row.

// The seq_idx values a lane needs for the starts of the tile at nt0 (nlen <= 64 steps), loaded
// a tile ahead so that their latency hides behind the current tile's scan: steps nt0 + lane and
// nt0 + 32 + lane, and the step before the tile (INT_MIN before step 0: step 0 starts a
// sequence).
struct SeqAhead {
    int v0, v1, prev;
};
__device__ __forceinline__ SeqAhead seq_ahead(const SsmParams& p, int b, int nt0, int nlen) {
    const int* sq = (const int*)p.seq_idx_ptr + (long long)b * p.seq_idx_batch_stride;
    const int lane = threadIdx.x & 31;
    SeqAhead a;
    a.v0 = lane < nlen ? sq[nt0 + lane] : 0;
    a.v1 = 32 + lane < nlen ? sq[nt0 + 32 + lane] : 0;
    a.prev = nt0 > 0 ? sq[nt0 - 1] : (int)0x80000000;
    return a;
}
// Bit t set when step t (t < len) of the tile starts a sequence. Every lane of the warp must
// call it.
__device__ __forceinline__ unsigned long long seq_starts(const SeqAhead& a, int len) {
    const unsigned full = 0xffffffffu;
    const int lane = threadIdx.x & 31;
    int p0 = __shfl_up_sync(full, a.v0, 1);
    const int last0 = __shfl_sync(full, a.v0, 31);
    int p1 = __shfl_up_sync(full, a.v1, 1);
    if (lane == 0) {
        p0 = a.prev;
        p1 = last0;
    }
    const unsigned m0 = __ballot_sync(full, lane < len && a.v0 != p0);
    const unsigned m1 = __ballot_sync(full, 32 + lane < len && a.v1 != p1);
    return (unsigned long long)m0 | ((unsigned long long)m1 << 32);
}

// seq_idx at step g of row b (-1 before step 0).
__device__ __forceinline__ int seq_at(const SsmParams& p, int b, int g) {
    return g < 0 ? -1 : ((const int*)p.seq_idx_ptr)[(long long)b * p.seq_idx_batch_stride + g];
}

// Address of sequence v's state of channel d in a (num_seqs, dim, dstate) tensor, or null when v
// has no row (padding, out of range) or the tensor is absent.
__device__ __forceinline__ float* seq_state(const SsmParams& p, unsigned long long ptr, int v, int d) {
    return (ptr && v >= 0 && v < p.num_seqs) ? (float*)ptr + ((long long)v * p.dim + d) * p.dstate : nullptr;
}

// The lane's states of sequence v from a (num_seqs, dim, dstate) tensor at `ptr` (0 where v has
// no row, the tensor is absent or the lane is past the block's channels).
template <int KS>
__device__ __forceinline__ void seq_load(const SsmParams& p, unsigned long long ptr, int v, int d, int j, bool live, float (&h)[KS]) {
    const float* src = live ? seq_state(p, ptr, v, d) : nullptr;
#pragma unroll
    for (int s = 0; s < KS; ++s) {
        const int n = j * KS + s;
        h[s] = (src && n < p.dstate) ? src[n] : 0.f;
    }
}
template <int KS>
__device__ __forceinline__ void seq_store(const SsmParams& p, unsigned long long ptr, int v, int d, int j, bool live, const float (&h)[KS]) {
    float* dst = live ? seq_state(p, ptr, v, d) : nullptr;
    if (!dst) return;
#pragma unroll
    for (int s = 0; s < KS; ++s)
        if (j * KS + s < p.dstate) dst[j * KS + s] = h[s];
}

// A sequence starts: the lane's states of the previous sequence (prev) are final; the state
// restarts from sequence cur's initial state, or 0.
template <int KS>
__device__ __forceinline__ void seq_restart(const SsmParams& p, int prev, int cur, int d, int j, bool live, float (&h)[KS]) {
    seq_store<KS>(p, p.final_states_ptr, prev, d, j, live, h);
    seq_load<KS>(p, p.has_initial_state ? p.initial_state_ptr : 0ull, cur, d, j, live, h);
}
