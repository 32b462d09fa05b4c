// selective_state_update: the decoding step of the selective scan (mamba_ssm's Triton op),
// the state updated in place. Memory-bound; strided tensors of any float dtype (cuda/strided.cuh),
// fp32 arithmetic. Contract and semantics: src/ops/state_update.rs.
#include "params.h"
#include "common.cuh"
#include "strided.cuh"

// selective_state_update: kG lanes per (batch, head, channel) row, lane j owning the 8
// consecutive states 8j .. 8j + 7: one or two 16-byte loads and stores of the state per lane
// where it is contiguous and aligned, so a warp moves whole lines; the row's output is a
// shuffle sum over its lanes. Templated on the state's dtype (kS); the small A / B / C / D
// loads read any dtype. Grid: x over channel tiles, y heads, z batch (no index divisions).
constexpr int kNS = 8;

template <int kS, int kG>
__device__ __forceinline__ void state_update_impl(const StateUpdateParams& p) {
    const int pi = blockIdx.x * (blockDim.x / kG) + threadIdx.x / kG;
    const int hi = blockIdx.y, bi = blockIdx.z;
    const int lane = threadIdx.x % kG;
    // Lanes past the last channel still take part in the shuffles (with zeros).
    const bool live = pi < p.dim;
    long long si = bi;
    bool pad = false, bad = false;
    if (p.idx.ptr) {
        si = ld_int(p.idx, (long long)bi * p.idx.stride[0]);
        pad = si < 0;
        bad = si >= p.state_rows;
    }
    const bool run = live && !pad && !bad;
    const int gi = hi / p.heads_per_group;
    const int n0 = lane * kNS;
    float acc = 0.f, xv = 0.f;
    if (run && n0 < p.dstate) {
        const long long so = si * p.state.stride[0] + hi * p.state.stride[1] + pi * p.state.stride[2];
        typedef typename InType<kS>::t ST;
        ST* srow = (ST*)p.state.ptr + so;
        const bool vec = p.state.stride[3] == 1;
        const int valid = p.dstate - n0;
        float hv[kNS];
        if (vec) {
#pragma unroll
            for (int i = 0; i < kNS; i += Vec<kS>::n) load_vec<kS>(srow + n0 + i, valid - i, hv + i);
        } else {
#pragma unroll
            for (int s = 0; s < kNS; ++s)
                hv[s] = s < valid ? to_f<kS>(srow[(long long)(n0 + s) * p.state.stride[3]]) : 0.f;
        }
        xv = ld_any(p.x, off3(p.x, bi, hi, pi));
        float dt = ld_any(p.dt, off3(p.dt, bi, hi, pi));
        if (p.dt_bias.ptr) dt += ld_any(p.dt_bias, off2(p.dt_bias, hi, pi));
        if (p.dt_softplus) dt = softplus_f(dt);
        const float dtx = dt * xv, dtl = dt * LOG2E_F;
        const long long ao = off2(p.a, hi, pi);
        const long long bo = off2(p.b, bi, gi), co = off2(p.c, bi, gi);
#pragma unroll
        for (int s = 0; s < kNS; ++s) {
            const int n = n0 + s;
            if (s < valid) {
                const float h = ex2(ld_any(p.a, ao + n * p.a.stride[2]) * dtl) * hv[s] +
                                ld_any(p.b, bo + n * p.b.stride[2]) * dtx;
                hv[s] = h;
                acc += ld_any(p.c, co + n * p.c.stride[2]) * h;
            }
        }
        if (vec) {
#pragma unroll
            for (int i = 0; i < kNS; i += Vec<kS>::n) store_vec<kS>(srow + n0 + i, valid - i, hv + i);
        } else {
#pragma unroll
            for (int s = 0; s < kNS; ++s)
                if (s < valid) srow[(long long)(n0 + s) * p.state.stride[3]] = from_f<kS>(hv[s]);
        }
    }
#pragma unroll
    for (int m = kG >> 1; m > 0; m >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, m);
    if (!live || lane != 0) return;
    float o;
    if (pad) {
        o = 0.f;
    } else if (bad) {
        o = nan_f();  // an index past the state's rows: visible, never a write out of bounds
    } else {
        if (p.dstate == 0) xv = ld_any(p.x, off3(p.x, bi, hi, pi));
        o = acc;
        if (p.d.ptr) o += xv * ld_any(p.d, off2(p.d, hi, pi));
        if (p.z.ptr) {
            const float zv = ld_any(p.z, off3(p.z, bi, hi, pi));
            o *= zv * sigmoid_f(zv);
        }
    }
    st_any(p.out, off3(p.out, bi, hi, pi), o);
}

// state_update_s{state dtype}_g{lanes per row}: dstate <= 8 * lanes.
#define SU_ENTRIES(S)                                                                             \
    extern "C" __global__ void state_update_s##S##_g1(const StateUpdateParams p) { state_update_impl<S, 1>(p); }   \
    extern "C" __global__ void state_update_s##S##_g2(const StateUpdateParams p) { state_update_impl<S, 2>(p); }   \
    extern "C" __global__ void state_update_s##S##_g4(const StateUpdateParams p) { state_update_impl<S, 4>(p); }   \
    extern "C" __global__ void state_update_s##S##_g8(const StateUpdateParams p) { state_update_impl<S, 8>(p); }   \
    extern "C" __global__ void state_update_s##S##_g16(const StateUpdateParams p) { state_update_impl<S, 16>(p); } \
    extern "C" __global__ void state_update_s##S##_g32(const StateUpdateParams p) { state_update_impl<S, 32>(p); }
SU_ENTRIES(0)
SU_ENTRIES(1)
SU_ENTRIES(2)
