// The depthwise causal convolution (causal-conv1d 1.7): forward, backward and the decoding
// update. Memory-bound; strided tensors of any float dtype (cuda/strided.cuh), fp32 arithmetic;
// the training-path convolution is templated on x's dtype and the width. Contract and
// semantics: src/ops/conv1d.rs.
#include "params.h"
#include "common.cuh"
#include "strided.cuh"

// causal conv1d. Tap k of output step t reads xp[t + k] of the padded row
// xp = [initial (W - 1 values, or zeros), x (L values)], i.e. x[t - (W - 1 - k)]; with seq_idx
// only when that step belongs to t's sequence.

template <int kT>
__device__ __forceinline__ float ldx(const TensorRef& t, long long off) {
    return to_f<kT>(((const typename InType<kT>::t*)t.ptr)[off]);
}
template <int kT>
__device__ __forceinline__ void stx(const TensorRef& t, long long off, float v) {
    ((typename InType<kT>::t*)t.ptr)[off] = from_f<kT>(v);
}

// Each thread owns kSeg consecutive steps of one channel and slides a register window over
// its inputs, so every input is loaded once and every pre-activation computed once. Blocks
// are tiles of 8 channels x 32 segments (x channel-first: a warp runs along one channel's
// steps) or 32 channels x 8 segments (channel-last: a warp's loads are 32 adjacent channels).
constexpr int kConvThreads = 256;
constexpr int kSeg = 8;

struct ConvTile {
    int b, d, t0, dtile, ltile, td;
};

__device__ __forceinline__ ConvTile conv_tile(const ConvParams& p) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    ConvTile c;
    c.td = p.l_fast ? kConvThreads / 32 : 32;
    const int tl = (p.l_fast ? 32 : kConvThreads / 32) * kSeg;
    c.dtile = blockIdx.x / p.n_ltiles;
    c.ltile = blockIdx.x % p.n_ltiles;
    c.b = blockIdx.y;
    c.d = c.dtile * c.td + (p.l_fast ? warp : lane);
    c.t0 = c.ltile * tl + (p.l_fast ? lane : warp) * kSeg;
    return c;
}

// The padded inputs xp[src] for src = t0 - (W - 1) + j, j < kN (initial states before step 0,
// zeros past the end), and with seq_idx their sequence ids (-1 before step 0; kept as 32-bit:
// ids of one batch row are sequence numbers, far below 2^31).
// kSeg consecutive values of a row from step t0 (the row's steps contiguous): 16-byte accesses
// where aligned (a warp then reads whole lines instead of one element per 16 bytes), zeros
// past the end.
template <int kT>
__device__ __forceinline__ void ld_seg(const TensorRef& t, long long row, int t0, int L, float* v) {
    const typename InType<kT>::t* base = (const typename InType<kT>::t*)t.ptr + row + t0;
#pragma unroll
    for (int i = 0; i < kSeg; i += Vec<kT>::n) load_vec<kT>(base + i, L - t0 - i, v + i);
}
template <int kT>
__device__ __forceinline__ void st_seg(const TensorRef& t, long long row, int t0, int L, const float* v) {
    if (t.stride[2] == 1) {
        typename InType<kT>::t* base = (typename InType<kT>::t*)t.ptr + row + t0;
#pragma unroll
        for (int i = 0; i < kSeg; i += Vec<kT>::n) store_vec<kT>(base + i, L - t0 - i, v + i);
    } else {
#pragma unroll
        for (int o = 0; o < kSeg; ++o)
            if (t0 + o < L) stx<kT>(t, row + (long long)(t0 + o) * t.stride[2], v[o]);
    }
}

template <int kT, int kW, int kN>
__device__ __forceinline__ void load_window(const ConvParams& p, const ConvTile& c, float (&xw)[kN],
                                            int (&sw)[kN]) {
    const long long xo = (long long)c.b * p.x.stride[0] + (long long)c.d * p.x.stride[1];
    const bool vec = p.x.stride[2] == 1;
    if (vec) ld_seg<kT>(p.x, xo, c.t0, p.seqlen, xw + (kW - 1));
#pragma unroll
    for (int j = 0; j < kN; ++j) {
        const int src = c.t0 - (kW - 1) + j;
        const bool own = j >= kW - 1 && j < kW - 1 + kSeg;  // the segment's steps
        float v = 0.f;
        int sq = -1;
        if (src >= 0 && src < p.seqlen) {
            v = (vec && own) ? xw[j] : ldx<kT>(p.x, xo + (long long)src * p.x.stride[2]);
            if (p.seq_idx.ptr) sq = (int)ld_int(p.seq_idx, off2(p.seq_idx, c.b, src));
        } else if (src < 0 && p.initial.ptr) {
            v = ld_any(p.initial, off3(p.initial, c.b, c.d, kW - 1 + src));
        }
        xw[j] = v;
        sw[j] = sq;
    }
}

// Tap k of the step at window index o + kW - 1 reads window index o + k.
template <int kW, int kN>
__device__ __forceinline__ bool tap_ok(const ConvParams& p, const int (&sw)[kN], int o, int k) {
    return !p.seq_idx.ptr || (sw[o + k] >= 0 && sw[o + k] == sw[o + kW - 1]);
}

// The channel's taps and bias, any dtype: one uniform branch around all the loads, so they are
// in flight together.
template <int kW>
__device__ __forceinline__ float conv_taps(const ConvParams& p, int d, float (&w)[kW]) {
    const long long wo = (long long)d * p.weight.stride[0], ws = p.weight.stride[1];
    if (p.weight.dtype == 0) {
#pragma unroll
        for (int k = 0; k < kW; ++k) w[k] = ((const float*)p.weight.ptr)[wo + k * ws];
    } else {
        u16 r[kW];
#pragma unroll
        for (int k = 0; k < kW; ++k) r[k] = ((const u16*)p.weight.ptr)[wo + k * ws];
#pragma unroll
        for (int k = 0; k < kW; ++k) w[k] = p.weight.dtype == 1 ? h2f(r[k]) : bf2f(r[k]);
    }
    return p.bias.ptr ? ld_any(p.bias, (long long)d * p.bias.stride[0]) : 0.f;
}

template <int kT, int kW>
__device__ __forceinline__ void conv_fwd_impl(const ConvParams& p) {
    const ConvTile c = conv_tile(p);
    if (c.d >= p.dim || c.t0 >= p.seqlen) return;
    constexpr int kN = kSeg + kW - 1;
    float w[kW];
    const float bias = conv_taps<kW>(p, c.d, w);
    float xw[kN];
    int sw[kN];
    load_window<kT, kW, kN>(p, c, xw, sw);
    const long long oo = (long long)c.b * p.out.stride[0] + (long long)c.d * p.out.stride[1];
    float y[kSeg];
#pragma unroll
    for (int o = 0; o < kSeg; ++o) {
        float acc = bias;
#pragma unroll
        for (int k = 0; k < kW; ++k)
            if (tap_ok<kW, kN>(p, sw, o, k)) acc += w[k] * xw[o + k];
        if (p.silu) acc *= sigmoid_f(acc);
        // A negative seq_idx is padding (causal-conv1d's convention): 0 out, no bias.
        y[o] = (p.seq_idx.ptr && sw[o + kW - 1] < 0) ? 0.f : acc;
    }
    st_seg<kT>(p.out, oo, c.t0, p.seqlen, y);
    if (p.final_states.ptr) {
        // final[j] = xp[L + j]: the last W - 1 inputs, reaching into the initial states when
        // L < W - 1 (those written by the first segment's thread).
#pragma unroll
        for (int o = 0; o < kSeg; ++o) {
            const int t = c.t0 + o;
            const int j = t - (p.seqlen - (kW - 1));
            if (t < p.seqlen && j >= 0)
                st_any(p.final_states, off3(p.final_states, c.b, c.d, j), xw[o + kW - 1]);
        }
        if (c.t0 == 0) {
            for (int jj = 0; jj < kW - 1 - p.seqlen; ++jj) {
                const float h = p.initial.ptr ? ld_any(p.initial, off3(p.initial, c.b, c.d, p.seqlen + jj)) : 0.f;
                st_any(p.final_states, off3(p.final_states, c.b, c.d, jj), h);
            }
        }
    }
}

// Backward. g[u] = dout[u] * act'(pre[u]) for the kSeg + W - 1 steps u = t0 .. that the
// segment's inputs feed; dx[t] = sum_j w[W - 1 - j] g[t + j] (same sequence only). dweight /
// dbias partial sums of the tile are summed in shared memory in a fixed order and written to
// the workspace; conv_bwd_reduce adds the tiles in a fixed order: deterministic, no atomics.
template <int kT, int kW>
__device__ __forceinline__ void conv_bwd_impl(const ConvParams& p) {
    __shared__ float red[kConvThreads][kW + 1];
    const ConvTile c = conv_tile(p);
    constexpr int kG = kSeg + kW - 1;      // steps with a gradient g
    constexpr int kN = kG + kW - 1;        // their input window
    float dw[kW + 1];
#pragma unroll
    for (int k = 0; k <= kW; ++k) dw[k] = 0.f;
    const int L = p.seqlen;
    if (c.d < p.dim && c.t0 < L) {
        float w[kW];
        const float bias = conv_taps<kW>(p, c.d, w);
        float xw[kN];
        int sw[kN];
        load_window<kT, kW, kN>(p, c, xw, sw);
        const long long go = (long long)c.b * p.dout.stride[0] + (long long)c.d * p.dout.stride[1];
        float g[kG];
        const bool gvec = p.dout.stride[2] == 1;
        if (gvec) ld_seg<kT>(p.dout, go, c.t0, L, g);
#pragma unroll
        for (int o = 0; o < kG; ++o) {
            const int u = c.t0 + o;
            float gv = 0.f;
            // Padding outputs (negative seq_idx) are the constant 0: no gradient from them.
            if (u < L && !(p.seq_idx.ptr && sw[o + kW - 1] < 0)) {
                gv = (gvec && o < kSeg) ? g[o] : ldx<kT>(p.dout, go + (long long)u * p.dout.stride[2]);
                if (p.silu) {
                    float pre = bias;
#pragma unroll
                    for (int k = 0; k < kW; ++k)
                        if (tap_ok<kW, kN>(p, sw, o, k)) pre += w[k] * xw[o + k];
                    const float sg = sigmoid_f(pre);
                    gv *= sg * (1.f + pre * (1.f - sg));
                }
            }
            g[o] = gv;
        }
        const long long dxo = (long long)c.b * p.dx.stride[0] + (long long)c.d * p.dx.stride[1];
        float dxs[kSeg];
#pragma unroll
        for (int o = 0; o < kSeg; ++o) {
            const int t = c.t0 + o;
            dxs[o] = 0.f;
            if (t >= L) continue;
            // x[t] sits at window index o + kW - 1; step t + j reads it through tap W - 1 - j.
            float dx = 0.f;
#pragma unroll
            for (int j = 0; j < kW; ++j)
                if (tap_ok<kW, kN>(p, sw, o + j, kW - 1 - j)) dx += w[kW - 1 - j] * g[o + j];
            if (p.dfinal.ptr) {
                const int jf = t - (L - (kW - 1));
                if (jf >= 0) dx += ld_any(p.dfinal, off3(p.dfinal, c.b, c.d, jf));
            }
            dxs[o] = dx;
#pragma unroll
            for (int k = 0; k < kW; ++k)
                if (tap_ok<kW, kN>(p, sw, o, k)) dw[k] += g[o] * xw[o + k];
            dw[kW] += g[o];
        }
        st_seg<kT>(p.dx, dxo, c.t0, L, dxs);
        if (c.t0 == 0 && p.dinitial.ptr) {
            // dinitial[i] = sum_{t <= i, t < L} w[i - t] g[t] (+ dfinal[i - L] when the final
            // states reach into the initial ones).
#pragma unroll
            for (int i = 0; i < kW - 1; ++i) {
                float v = 0.f;
#pragma unroll
                for (int j = 0; j <= i; ++j) v += w[i - j] * g[j];
                if (p.dfinal.ptr && i >= L) v += ld_any(p.dfinal, off3(p.dfinal, c.b, c.d, i - L));
                st_any(p.dinitial, off3(p.dinitial, c.b, c.d, i), v);
            }
        }
    }
#pragma unroll
    for (int k = 0; k <= kW; ++k) red[threadIdx.x][k] = dw[k];
    __syncthreads();
    if (threadIdx.x < c.td) {
        const int ch = threadIdx.x, dc = c.dtile * c.td + ch;
        float sum[kW + 1];
#pragma unroll
        for (int k = 0; k <= kW; ++k) sum[k] = 0.f;
        const int members = p.l_fast ? 32 : kConvThreads / 32;
        for (int m = 0; m < members; ++m) {
            const int src = p.l_fast ? ch * 32 + m : m * 32 + ch;
#pragma unroll
            for (int k = 0; k <= kW; ++k) sum[k] += red[src][k];
        }
        if (dc < p.dim) {
            float* ws = (float*)p.workspace_ptr +
                        ((long long)(c.b * p.n_ltiles + c.ltile) * p.dim + dc) * (kW + 1);
#pragma unroll
            for (int k = 0; k <= kW; ++k) ws[k] = sum[k];
        }
    }
}

// The fast path (no seq_idx, no initial / final states, steps contiguous, rows 16-byte
// aligned: the host checks): a warp owns one channel and 32 x kSegF consecutive steps, kSegF
// per lane. Every load is issued before any is used (raw 16-byte words, converted after), so a
// thread waits for memory once; the W - 1 neighbouring inputs (and, in the backward, gradients)
// come from the adjacent lane by shuffle, and only the warp's edge lanes load one extra vector.
// No shared memory; dweight / dbias are summed over the warp by shuffle.
constexpr int kSegF = 16;

// kN elements from base (16-byte aligned) as raw 16-byte words: vector loads when all kN are
// valid, else element loads with zeros past `valid` (the row's tail; valid <= 0: no load).
template <int kT, int kN>
__device__ __forceinline__ void ld_raw(const typename InType<kT>::t* base, int valid,
                                       uint4 (&r)[kN / Vec<kT>::n]) {
    constexpr int V = Vec<kT>::n;
    if (valid >= kN) {
#pragma unroll
        for (int i = 0; i < kN / V; ++i) r[i] = *reinterpret_cast<const uint4*>(base + i * V);
    } else {
#pragma unroll
        for (int i = 0; i < kN / V; ++i) {
            unsigned wv[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                if constexpr (kT == 0) {
                    const int j = i * V + q;
                    wv[q] = j < valid ? __float_as_uint(base[j]) : 0u;
                } else {
                    const int j = i * V + 2 * q;
                    const unsigned lo = j < valid ? (unsigned)base[j] : 0u;
                    const unsigned hi = j + 1 < valid ? (unsigned)base[j + 1] : 0u;
                    wv[q] = lo | (hi << 16);
                }
            }
            r[i].x = wv[0];
            r[i].y = wv[1];
            r[i].z = wv[2];
            r[i].w = wv[3];
        }
    }
}
template <int kT, int kN>
__device__ __forceinline__ void raw_to_f(const uint4 (&r)[kN / Vec<kT>::n], float* v) {
#pragma unroll
    for (int i = 0; i < kN / Vec<kT>::n; ++i) {
        const unsigned wv[4] = {r[i].x, r[i].y, r[i].z, r[i].w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            if constexpr (kT == 0) {
                v[i * 4 + q] = __uint_as_float(wv[q]);
            } else {
                v[i * 8 + 2 * q] = to_f<kT>((u16)(wv[q] & 0xffffu));
                v[i * 8 + 2 * q + 1] = to_f<kT>((u16)(wv[q] >> 16));
            }
        }
    }
}
template <int kT, int kN>
__device__ __forceinline__ void st_run(const TensorRef& t, long long row, int t0, int L, const float* v) {
    typename InType<kT>::t* base = (typename InType<kT>::t*)t.ptr + row + t0;
#pragma unroll
    for (int i = 0; i < kN; i += Vec<kT>::n) store_vec<kT>(base + i, L - t0 - i, v + i);
}

struct FastTile {
    int b, d, t0, ltile, lane;
};
__device__ __forceinline__ FastTile fast_tile(const ConvParams& p) {
    FastTile c;
    c.lane = threadIdx.x & 31;
    c.d = (blockIdx.x / p.n_ltiles) * (kConvThreads / 32) + (threadIdx.x >> 5);
    c.ltile = blockIdx.x % p.n_ltiles;
    c.b = blockIdx.y;
    c.t0 = c.ltile * (32 * kSegF) + c.lane * kSegF;
    return c;
}

// xw[0 .. kW - 2] = x[t0 - (kW - 1) ..]: the previous lane's last inputs; lane 0 takes them
// from `prev`, the vector that ends at t0 (zeros at t0 == 0).
template <int kT, int kW, int kN>
__device__ __forceinline__ void halo_before(const float (&own)[kSegF], const float* prev, int lane,
                                            float (&xw)[kN]) {
    constexpr int V = Vec<kT>::n;
#pragma unroll
    for (int j = 0; j < kW - 1; ++j) {
        const float up = __shfl_up_sync(0xffffffffu, own[kSegF - (kW - 1) + j], 1);
        xw[j] = lane == 0 ? prev[V - (kW - 1) + j] : up;
    }
}

template <int kT, int kW>
__device__ __forceinline__ void conv_fwd_fast(const ConvParams& p) {
    typedef typename InType<kT>::t T;
    const FastTile c = fast_tile(p);
    if (c.d >= p.dim) return;  // warp-uniform: a warp is one channel
    constexpr int V = Vec<kT>::n, kN = kSegF + kW - 1;
    const int L = p.seqlen;
    const T* xb = (const T*)p.x.ptr + (long long)c.b * p.x.stride[0] + (long long)c.d * p.x.stride[1];
    uint4 rown[kSegF / V], rprev[1];
    ld_raw<kT, kSegF>(xb + c.t0, L - c.t0, rown);
    ld_raw<kT, V>(xb + c.t0 - V, c.lane == 0 && c.t0 > 0 ? V : 0, rprev);
    float w[kW];
    const float bias = conv_taps<kW>(p, c.d, w);
    float own[kSegF], prev[V], xw[kN];
    raw_to_f<kT, kSegF>(rown, own);
    raw_to_f<kT, V>(rprev, prev);
    halo_before<kT, kW, kN>(own, prev, c.lane, xw);
#pragma unroll
    for (int o = 0; o < kSegF; ++o) xw[kW - 1 + o] = own[o];
    float y[kSegF];
#pragma unroll
    for (int o = 0; o < kSegF; ++o) {
        float acc = bias;
#pragma unroll
        for (int k = 0; k < kW; ++k) acc += w[k] * xw[o + k];
        if (p.silu) acc *= sigmoid_f(acc);
        y[o] = acc;
    }
    const long long oo = (long long)c.b * p.out.stride[0] + (long long)c.d * p.out.stride[1];
    st_run<kT, kSegF>(p.out, oo, c.t0, L, y);
}

template <int kT, int kW>
__device__ __forceinline__ void conv_bwd_fast(const ConvParams& p) {
    typedef typename InType<kT>::t T;
    const FastTile c = fast_tile(p);
    if (c.d >= p.dim) return;
    constexpr int V = Vec<kT>::n;
    constexpr int kG = kSegF + kW - 1;  // steps with a gradient g: the lane's own and the next W - 1
    constexpr int kN = kG + kW - 1;     // their input window
    const int L = p.seqlen;
    const T* xb = (const T*)p.x.ptr + (long long)c.b * p.x.stride[0] + (long long)c.d * p.x.stride[1];
    const T* gb = (const T*)p.dout.ptr + (long long)c.b * p.dout.stride[0] + (long long)c.d * p.dout.stride[1];
    uint4 rown[kSegF / V], rg[kSegF / V], rprev[1], rnx[1], rng[1];
    // The last lane also reads the first inputs and gradients of the next warp's steps.
    const int tn = c.t0 + kSegF, nvalid = c.lane == 31 ? L - tn : 0;
    ld_raw<kT, kSegF>(xb + c.t0, L - c.t0, rown);
    ld_raw<kT, kSegF>(gb + c.t0, L - c.t0, rg);
    ld_raw<kT, V>(xb + c.t0 - V, c.lane == 0 && c.t0 > 0 ? V : 0, rprev);
    ld_raw<kT, V>(xb + tn, nvalid, rnx);
    ld_raw<kT, V>(gb + tn, nvalid, rng);
    float w[kW];
    const float bias = conv_taps<kW>(p, c.d, w);
    float own[kSegF], gown[kSegF], prev[V], nx[V], ng[V];
    raw_to_f<kT, kSegF>(rown, own);
    raw_to_f<kT, kSegF>(rg, gown);
    raw_to_f<kT, V>(rprev, prev);
    raw_to_f<kT, V>(rnx, nx);
    raw_to_f<kT, V>(rng, ng);
    float xw[kN], g[kG];
    halo_before<kT, kW, kN>(own, prev, c.lane, xw);
#pragma unroll
    for (int o = 0; o < kSegF; ++o) {
        xw[kW - 1 + o] = own[o];
        g[o] = gown[o];
    }
#pragma unroll
    for (int j = 0; j < kW - 1; ++j) {
        const float xd = __shfl_down_sync(0xffffffffu, own[j], 1);
        const float gd = __shfl_down_sync(0xffffffffu, gown[j], 1);
        xw[kW - 1 + kSegF + j] = c.lane == 31 ? nx[j] : xd;
        g[kSegF + j] = c.lane == 31 ? ng[j] : gd;  // zeros past the end
    }
    if (p.silu) {
#pragma unroll
        for (int o = 0; o < kG; ++o) {
            float pre = bias;
#pragma unroll
            for (int k = 0; k < kW; ++k) pre += w[k] * xw[o + k];
            const float sg = sigmoid_f(pre);
            g[o] *= sg * (1.f + pre * (1.f - sg));
        }
    }
    float dxs[kSegF], dw[kW + 1];
#pragma unroll
    for (int k = 0; k <= kW; ++k) dw[k] = 0.f;
#pragma unroll
    for (int o = 0; o < kSegF; ++o) {
        float dx = 0.f;
#pragma unroll
        for (int j = 0; j < kW; ++j) dx += w[kW - 1 - j] * g[o + j];
        dxs[o] = dx;
#pragma unroll
        for (int k = 0; k < kW; ++k) dw[k] += g[o] * xw[o + k];
        dw[kW] += g[o];
    }
    const long long dxo = (long long)c.b * p.dx.stride[0] + (long long)c.d * p.dx.stride[1];
    st_run<kT, kSegF>(p.dx, dxo, c.t0, L, dxs);
    // The warp is one channel: its partial dweight / dbias is a shuffle sum, in a fixed order.
#pragma unroll
    for (int k = 0; k <= kW; ++k) {
#pragma unroll
        for (int m = 16; m > 0; m >>= 1) dw[k] += __shfl_xor_sync(0xffffffffu, dw[k], m);
    }
    if (c.lane == 0) {
        float* ws = (float*)p.workspace_ptr +
                    ((long long)(c.b * p.n_ltiles + c.ltile) * p.dim + c.d) * (kW + 1);
#pragma unroll
        for (int k = 0; k <= kW; ++k) ws[k] = dw[k];
    }
}

#define CONV_ENTRIES(T, W)                                                                      \
    extern "C" __global__ void conv_fwd_t##T##_w##W(const ConvParams p) { conv_fwd_impl<T, W>(p); } \
    extern "C" __global__ void __launch_bounds__(kConvThreads, 1)                               \
        conv_bwd_t##T##_w##W(const ConvParams p) { conv_bwd_impl<T, W>(p); }                    \
    extern "C" __global__ void conv_fwdf_t##T##_w##W(const ConvParams p) { conv_fwd_fast<T, W>(p); } \
    extern "C" __global__ void __launch_bounds__(kConvThreads, 3)                               \
        conv_bwdf_t##T##_w##W(const ConvParams p) { conv_bwd_fast<T, W>(p); }
CONV_ENTRIES(0, 2)
CONV_ENTRIES(0, 3)
CONV_ENTRIES(0, 4)
CONV_ENTRIES(1, 2)
CONV_ENTRIES(1, 3)
CONV_ENTRIES(1, 4)
CONV_ENTRIES(2, 2)
CONV_ENTRIES(2, 3)
CONV_ENTRIES(2, 4)

// Second stage: one thread per (channel, k) adds the tiles' partials in order.
extern "C" __global__ void conv_bwd_reduce(const ConvParams p) {
    const int w1 = p.width + 1;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)p.dim * w1) return;
    const int d = (int)(i / w1), k = (int)(i % w1);
    const long long parts = (long long)p.batch * p.n_ltiles;
    const float* ws = (const float*)p.workspace_ptr;
    float s = 0.f;
    for (long long q = 0; q < parts; ++q) s += ws[(q * p.dim + d) * w1 + k];
    if (k < p.width) {
        st_any(p.dweight, off2(p.dweight, d, k), s);
    } else if (p.dbias.ptr) {
        st_any(p.dbias, d * p.dbias.stride[0], s);
    }
}

// Decoding update: one thread per (batch, channel). The outputs read the old state, then the
// state takes the new inputs: shifted left (no cache_seqlens) or written circularly at
// cache_seqlens[b]. A negative state index is padding (state untouched, out 0); one past the
// state's rows gives NaN outputs and touches nothing.
extern "C" __global__ void conv_update(const ConvParams p) {
    const int d = blockIdx.x * blockDim.x + threadIdx.x, b = blockIdx.y;
    if (d >= p.dim) return;
    const int W = p.width, L = p.seqlen, S = p.state_len;
    long long si = b;
    if (p.state_idx.ptr) si = ld_int(p.state_idx, b * p.state_idx.stride[0]);
    if (si < 0 || si >= p.state_rows) {
        const float o = si < 0 ? 0.f : nan_f();
        for (int t = 0; t < L; ++t) st_any(p.out, off3(p.out, b, d, t), o);
        return;
    }
    const long long so = si * p.conv_state.stride[0] + d * p.conv_state.stride[1];
    const long long ss = p.conv_state.stride[2];
    long long start = 0;
    if (p.cache_seqlens.ptr) start = ld_int(p.cache_seqlens, b * p.cache_seqlens.stride[0]);
    const float bias = p.bias.ptr ? ld_any(p.bias, d * p.bias.stride[0]) : 0.f;
    for (int t = 0; t < L; ++t) {
        float acc = bias;
        for (int k = 0; k < W; ++k) {
            const int j = t + k;  // window position: W - 1 old inputs, then the new ones
            float v;
            if (j >= W - 1) {
                v = ld_any(p.x, off3(p.x, b, d, j - (W - 1)));
            } else if (p.cache_seqlens.ptr) {
                long long q = (start - (W - 1) + j) % S;
                if (q < 0) q += S;
                v = ld_any(p.conv_state, so + q * ss);
            } else {
                v = ld_any(p.conv_state, so + (S - (W - 1) + j) * ss);
            }
            acc += ld_any(p.weight, off2(p.weight, d, k)) * v;
        }
        if (p.silu) acc *= sigmoid_f(acc);
        st_any(p.out, off3(p.out, b, d, t), acc);
    }
    if (p.cache_seqlens.ptr) {
        for (int t = 0; t < L; ++t) {
            long long q = (start + t) % S;
            if (q < 0) q += S;
            st_any(p.conv_state, so + q * ss, ld_any(p.x, off3(p.x, b, d, t)));
        }
    } else {
        // Left shift by L in increasing order: each read is ahead of every write.
        for (int k = 0; k < S; ++k) {
            const float v = k + L < S ? ld_any(p.conv_state, so + (long long)(k + L) * ss)
                                      : ld_any(p.x, off3(p.x, b, d, k + L - S));
            st_any(p.conv_state, so + k * ss, v);
        }
    }
}
