// The small kernels around the scan: the decoding step of the selective scan
// (selective_state_update) and the depthwise causal convolution (forward, backward, decoding
// update). They are memory-bound; each takes strided tensors of any float dtype (TensorRef,
// dtype read at run time: a uniform branch, cheap next to the loads it guards) and computes in
// fp32. The training-path convolution is templated on x's dtype and the width, the rest is not.
#include "params.h"
#include "common.cuh"

__device__ __forceinline__ float ld_any(const TensorRef& t, long long off) {
    switch (t.dtype) {
    case 0: return ((const float*)t.ptr)[off];
    case 1: return h2f(((const u16*)t.ptr)[off]);
    default: return bf2f(((const u16*)t.ptr)[off]);
    }
}
__device__ __forceinline__ void st_any(const TensorRef& t, long long off, float v) {
    switch (t.dtype) {
    case 0: ((float*)t.ptr)[off] = v; break;
    case 1: ((u16*)t.ptr)[off] = f2h(v); break;
    default: ((u16*)t.ptr)[off] = f2bf(v); break;
    }
}
__device__ __forceinline__ long long ld_int(const TensorRef& t, long long off) {
    return t.dtype == 4 ? (long long)((const int*)t.ptr)[off] : ((const long long*)t.ptr)[off];
}
__device__ __forceinline__ long long off2(const TensorRef& t, long long i, long long j) {
    return i * t.stride[0] + j * t.stride[1];
}
__device__ __forceinline__ long long off3(const TensorRef& t, long long i, long long j,
                                          long long k) {
    return i * t.stride[0] + j * t.stride[1] + k * t.stride[2];
}
__device__ __forceinline__ float nan_f() { return __int_as_float(0x7fffffff); }

// ---------------------------------------------------------------------------------------------
// selective_state_update: `group` lanes per (batch, head, channel) row, lane j owning states
// j, j + group, ... (kNS of them): each load instruction of a warp reads whole rows of the
// (contiguous) state. The row's output is a shuffle sum over its lanes.
template <int kNS>
__device__ __forceinline__ void state_update_impl(const StateUpdateParams& p) {
    const int g = p.group;
    const long long rows = (long long)p.batch * p.nheads * p.dim;
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / g;
    const int lane = threadIdx.x % g;
    // Lanes past the last row still take part in the shuffles (with zeros), so that every
    // lane of a group reaches them.
    const bool live = row < rows;
    const long long r = live ? row : 0;
    const int pi = (int)(r % p.dim);
    const int hi = (int)((r / p.dim) % p.nheads);
    const long long bi = r / ((long long)p.dim * p.nheads);
    long long si = bi;
    bool pad = false, bad = false;
    if (p.idx.ptr) {
        si = ld_int(p.idx, bi * p.idx.stride[0]);
        pad = si < 0;
        bad = si >= p.state_rows;
    }
    const bool run = live && !pad && !bad;
    const int gi = hi / p.heads_per_group;
    float acc = 0.f, xv = 0.f;
    if (run) {
        xv = ld_any(p.x, off3(p.x, bi, hi, pi));
        float dt = ld_any(p.dt, off3(p.dt, bi, hi, pi));
        if (p.dt_bias.ptr) dt += ld_any(p.dt_bias, off2(p.dt_bias, hi, pi));
        if (p.dt_softplus) dt = softplus_f(dt);
        const float dtx = dt * xv;
        const long long so = si * p.state.stride[0] + hi * p.state.stride[1] + pi * p.state.stride[2];
        const long long ao = off2(p.a, hi, pi);
        const long long bo = off2(p.b, bi, gi), co = off2(p.c, bi, gi);
        float hv[kNS], av[kNS], bv[kNS], cv[kNS];
        // All loads first, then the arithmetic: the loads of a lane's states are in flight
        // together.
#pragma unroll
        for (int s = 0; s < kNS; ++s) {
            const int n = lane + s * g;
            if (n < p.dstate) {
                hv[s] = ld_any(p.state, so + n * p.state.stride[3]);
                av[s] = ld_any(p.a, ao + n * p.a.stride[2]);
                bv[s] = ld_any(p.b, bo + n * p.b.stride[2]);
                cv[s] = ld_any(p.c, co + n * p.c.stride[2]);
            }
        }
#pragma unroll
        for (int s = 0; s < kNS; ++s) {
            const int n = lane + s * g;
            if (n < p.dstate) {
                const float h = expf(av[s] * dt) * hv[s] + bv[s] * dtx;
                st_any(p.state, so + n * p.state.stride[3], h);
                acc += cv[s] * h;
            }
        }
    }
    for (int m = g >> 1; m > 0; m >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, m);
    if (!live || lane != 0) return;
    float o;
    if (pad) {
        o = 0.f;
    } else if (bad) {
        o = nan_f();  // an index past the state's rows: visible, never a write out of bounds
    } else {
        o = acc;
        if (p.d.ptr) o += xv * ld_any(p.d, off2(p.d, hi, pi));
        if (p.z.ptr) {
            const float zv = ld_any(p.z, off3(p.z, bi, hi, pi));
            o *= zv * sigmoid_f(zv);
        }
    }
    st_any(p.out, off3(p.out, bi, hi, pi), o);
}

extern "C" __global__ void state_update_ns1(const StateUpdateParams p) { state_update_impl<1>(p); }
extern "C" __global__ void state_update_ns2(const StateUpdateParams p) { state_update_impl<2>(p); }
extern "C" __global__ void state_update_ns4(const StateUpdateParams p) { state_update_impl<4>(p); }
extern "C" __global__ void state_update_ns8(const StateUpdateParams p) { state_update_impl<8>(p); }

// ---------------------------------------------------------------------------------------------
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

// xp[t + k] for tap k of step t (0 where masked).
template <int kT, int kW>
__device__ __forceinline__ float tap(const ConvParams& p, int b, int d, int t, int k, long long seq_t) {
    const int src = t - (kW - 1 - k);
    if (src < 0) {
        return p.initial.ptr ? ld_any(p.initial, off3(p.initial, b, d, kW - 1 + src)) : 0.f;
    }
    if (p.seq_idx.ptr && ld_int(p.seq_idx, off2(p.seq_idx, b, src)) != seq_t) return 0.f;
    return ldx<kT>(p.x, off3(p.x, b, d, src));
}

template <int kT, int kW>
__device__ __forceinline__ float pre_act(const ConvParams& p, int b, int d, int t, const float (&w)[kW], float bias) {
    const long long seq_t = p.seq_idx.ptr ? ld_int(p.seq_idx, off2(p.seq_idx, b, t)) : 0;
    float acc = bias;
#pragma unroll
    for (int k = 0; k < kW; ++k) acc += w[k] * tap<kT, kW>(p, b, d, t, k, seq_t);
    return acc;
}

// Thread -> (channel, step) of batch entry blockIdx.y, along the dimension in which x is
// contiguous so that a warp's loads and stores coalesce.
__device__ __forceinline__ void conv_coords(const ConvParams& p, long long i, int& d, int& t) {
    if (p.l_fast) {
        d = (int)(i / p.seqlen);
        t = (int)(i % p.seqlen);
    } else {
        t = (int)(i / p.dim);
        d = (int)(i % p.dim);
    }
}

template <int kT, int kW>
__device__ __forceinline__ void conv_fwd_impl(const ConvParams& p) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)p.dim * p.seqlen) return;
    const int b = blockIdx.y;
    int d, t;
    conv_coords(p, i, d, t);
    float w[kW];
#pragma unroll
    for (int k = 0; k < kW; ++k) w[k] = ld_any(p.weight, off2(p.weight, d, k));
    const float bias = p.bias.ptr ? ld_any(p.bias, d * p.bias.stride[0]) : 0.f;
    float v = pre_act<kT, kW>(p, b, d, t, w, bias);
    if (p.silu) v *= sigmoid_f(v);
    stx<kT>(p.out, off3(p.out, b, d, t), v);
    if (p.final_states.ptr) {
        // final[j] = xp[L + j]: the last W - 1 inputs, reaching into the initial states when
        // L < W - 1 (written by step 0's thread).
        const int j = t - (p.seqlen - (kW - 1));
        if (j >= 0) st_any(p.final_states, off3(p.final_states, b, d, j), ldx<kT>(p.x, off3(p.x, b, d, t)));
        if (t == 0) {
            for (int jj = 0; jj < kW - 1 - p.seqlen; ++jj) {
                const float h = p.initial.ptr ? ld_any(p.initial, off3(p.initial, b, d, p.seqlen + jj)) : 0.f;
                st_any(p.final_states, off3(p.final_states, b, d, jj), h);
            }
        }
    }
}

// Backward, per thread a few steps of one channel (a tile of 8 channels x 128 steps when x is
// channel-first, 32 x 32 when channel-last). g[t] = dout[t] * act'(pre[t]) is recomputed for
// the W steps t..t+W-1 that step t's input feeds. dweight / dbias partial sums of the tile are
// summed in shared memory in a fixed order and written to the workspace; conv_bwd_reduce adds
// the tiles in a fixed order: deterministic, no atomics.
constexpr int kConvThreads = 256;
constexpr int kConvSteps = 4;

template <int kT, int kW>
__device__ __forceinline__ float grad_pre(const ConvParams& p, int b, int d, int t, const float (&w)[kW], float bias) {
    const float go = ldx<kT>(p.dout, off3(p.dout, b, d, t));
    if (!p.silu) return go;
    const float pre = pre_act<kT, kW>(p, b, d, t, w, bias);
    const float s = sigmoid_f(pre);
    return go * s * (1.f + pre * (1.f - s));
}

template <int kT, int kW>
__device__ __forceinline__ void conv_bwd_impl(const ConvParams& p) {
    __shared__ float red[kConvThreads][kW + 1];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int td = p.l_fast ? kConvThreads / 32 : 32;     // channels per tile
    const int tl = p.l_fast ? 32 * kConvSteps : (kConvThreads / 32) * kConvSteps;  // steps
    const int dtile = blockIdx.x / p.n_ltiles, ltile = blockIdx.x % p.n_ltiles;
    const int b = blockIdx.y;
    const int d = dtile * td + (p.l_fast ? warp : lane);
    float dw[kW + 1];
#pragma unroll
    for (int k = 0; k <= kW; ++k) dw[k] = 0.f;
    if (d < p.dim) {
        float w[kW];
#pragma unroll
        for (int k = 0; k < kW; ++k) w[k] = ld_any(p.weight, off2(p.weight, d, k));
        const float bias = p.bias.ptr ? ld_any(p.bias, d * p.bias.stride[0]) : 0.f;
        const int L = p.seqlen;
        for (int s = 0; s < kConvSteps; ++s) {
            const int t = ltile * tl + (p.l_fast ? lane + 32 * s : warp + (kConvThreads / 32) * s);
            if (t >= L) continue;
            // g at the steps t + W - 1 - k that read x[t] through tap k (same sequence only).
            const long long seq_t = p.seq_idx.ptr ? ld_int(p.seq_idx, off2(p.seq_idx, b, t)) : 0;
            float g[kW];
#pragma unroll
            for (int j = 0; j < kW; ++j) {
                const int u = t + j;
                bool ok = u < L;
                if (ok && j > 0 && p.seq_idx.ptr) ok = ld_int(p.seq_idx, off2(p.seq_idx, b, u)) == seq_t;
                g[j] = ok ? grad_pre<kT, kW>(p, b, d, u, w, bias) : 0.f;
            }
            float dx = 0.f;
#pragma unroll
            for (int j = 0; j < kW; ++j) dx += w[kW - 1 - j] * g[j];
            if (p.dfinal.ptr) {
                const int jf = t - (L - (kW - 1));
                if (jf >= 0) dx += ld_any(p.dfinal, off3(p.dfinal, b, d, jf));
            }
            stx<kT>(p.dx, off3(p.dx, b, d, t), dx);
            // dweight[k] += g[t] * xp[t + k], dbias += g[t].
#pragma unroll
            for (int k = 0; k < kW; ++k) dw[k] += g[0] * tap<kT, kW>(p, b, d, t, k, seq_t);
            dw[kW] += g[0];
            if (t == 0 && p.dinitial.ptr) {
                // dinitial[i] = sum_{t' <= i, t' < L} w[i - t'] g[t'] (+ dfinal[i - L] when the
                // final states reach into the initial ones); g[0..W-1] are at hand.
                for (int i = 0; i < kW - 1; ++i) {
                    float v = 0.f;
#pragma unroll
                    for (int j = 0; j < kW - 1; ++j)
                        if (j <= i) v += w[i - j] * g[j];
                    if (p.dfinal.ptr && i >= L) v += ld_any(p.dfinal, off3(p.dfinal, b, d, i - L));
                    st_any(p.dinitial, off3(p.dinitial, b, d, i), v);
                }
            }
        }
    }
#pragma unroll
    for (int k = 0; k <= kW; ++k) red[threadIdx.x][k] = dw[k];
    __syncthreads();
    if (threadIdx.x < td) {
        const int c = threadIdx.x, dc = dtile * td + c;
        float sum[kW + 1];
#pragma unroll
        for (int k = 0; k <= kW; ++k) sum[k] = 0.f;
        for (int m = 0; m < 32 && m < kConvThreads; ++m) {
            const int src = p.l_fast ? c * 32 + m : m * 32 + c;
            if (src >= kConvThreads) break;
#pragma unroll
            for (int k = 0; k <= kW; ++k) sum[k] += red[src][k];
        }
        if (dc < p.dim) {
            float* ws = (float*)p.workspace_ptr +
                        ((long long)(b * p.n_ltiles + ltile) * p.dim + dc) * (kW + 1);
#pragma unroll
            for (int k = 0; k <= kW; ++k) ws[k] = sum[k];
        }
    }
}

#define CONV_ENTRIES(T, W)                                                                      \
    extern "C" __global__ void conv_fwd_t##T##_w##W(const ConvParams p) { conv_fwd_impl<T, W>(p); } \
    extern "C" __global__ void __launch_bounds__(kConvThreads)                                  \
        conv_bwd_t##T##_w##W(const ConvParams p) { conv_bwd_impl<T, W>(p); }
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
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)p.batch * p.dim) return;
    const int b = (int)(i / p.dim), d = (int)(i % p.dim);
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
