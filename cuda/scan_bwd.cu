// Backward selective scan, and the deterministic second-stage reduction.
//
// Same work layout as the forward (a block owns KCH channels of one batch row, a half-warp one
// channel, lane l the states l + 16 s). Tiles are walked in reverse. For each tile the lane
// recomputes h over the tile from the state the forward saved at the tile's start, keeping the
// tile's history in registers (kChunk x kNS floats: the loops are fully unrolled so every index
// is a compile-time constant), recomputes y for the z-gate gradient, then runs the reverse scan:
//   g_t = a_{t+1} g_{t+1} + C_t dy_t,  dB_t += g_t dt_t u_t,  dC_t += dy_t h_t,
//   ddt_t = sum_n g_t (B_t u_t + A a_t h_{t-1}),  du_t = D dy_t + dt_t sum_n g_t B_t,
//   dA += dt_t g_t a_t h_{t-1}.
// Sums over n use the 16-lane reduce-scatter. Nothing is reduced with atomics: per-(batch,
// channel) sums (dA, fixed dB/dC, dD, ddelta_bias) go to a workspace slot each; variable dB/dC
// are summed over the block's channels in shared memory in a fixed order and written as one
// partial per block; ssm_bwd_reduce adds the partials in a fixed order. Bitwise reproducible.

#define T_PAD (kChunk + 1)

__device__ __forceinline__ float half_warp_sum(float v, unsigned mask) {
    v += shfl_xor(v, 8, mask);
    v += shfl_xor(v, 4, mask);
    v += shfl_xor(v, 2, mask);
    v += shfl_xor(v, 1, mask);
    return v;
}

// Workspace layout (floats): [batch][dim][3 N + 2] per-channel sums (dA, fixed dB, fixed dC,
// dD, ddelta_bias), then variable-dB partials [batch][tiles][N][L], then variable-dC partials.
__device__ __forceinline__ long long ws_chan_size(const SsmParams& p) {
    return (long long)p.batch * p.dim * (3 * p.dstate + 2);
}
__device__ __forceinline__ long long ws_part_size(const SsmParams& p, int kch) {
    return (long long)p.batch * (p.dim / kch) * p.dstate * p.seqlen;
}

extern "C" __global__ void __launch_bounds__(128, 1) ssm_bwd(const SsmParams p, const int kch_arg) {
    typedef typename InType<kInType>::t in_t;
    extern __shared__ float smem[];
    const int KCH = blockDim.x >> 4;
    const int c = threadIdx.x >> 4, lane = threadIdx.x & 15;
    const unsigned mask = blockDim.x >= 32 ? 0xffffffffu : 0x0000ffffu;
    const int b = blockIdx.y;
    const int d0 = blockIdx.x * KCH;
    const int d = d0 + c;
    const int N = p.dstate, L = p.seqlen;
    const int T = kChunk;
    const int NP = 16 * kNS;
    const int NWS = KCH >= 2 ? KCH / 2 : 1;  // dB/dC slices: one per warp

    float* s_dt = smem;
    float* s_dtu = s_dt + KCH * T;
    float* s_u = s_dtu + KCH * T;
    float* s_x = s_u + KCH * T;
    float* s_z = s_x + KCH * T;
    float* s_dout = s_z + KCH * T;
    float* s_dy = s_dout + KCH * T;
    float* s_y = s_dy + KCH * T;
    float* s_B = s_y + 2 * KCH * T;
    float* s_C = s_B + (kVarB ? NP * T_PAD : 0);
    float* s_dB = s_C + (kVarC ? NP * T_PAD : 0);
    float* s_dC = s_dB + (kVarB ? NWS * NP * T : 0);

    const long long ubs = (long long)b * p.u_batch_stride;
    const in_t* u = (const in_t*)p.u_ptr + ubs + (long long)d * p.u_d_stride;
    const in_t* delta = (const in_t*)p.delta_ptr + (long long)b * p.delta_batch_stride + (long long)d * p.delta_d_stride;
    const in_t* z = (const in_t*)p.z_ptr + (long long)b * p.z_batch_stride + (long long)d * p.z_d_stride;
    const in_t* dout = (const in_t*)p.dout_ptr + (long long)b * p.dout_batch_stride + (long long)d * p.dout_d_stride;
    in_t* du = (in_t*)p.du_ptr + (long long)b * p.du_batch_stride + (long long)d * p.du_d_stride;
    in_t* ddelta = (in_t*)p.ddelta_ptr + (long long)b * p.ddelta_batch_stride + (long long)d * p.ddelta_d_stride;
    in_t* dz = (in_t*)p.dz_ptr + (long long)b * p.dz_batch_stride + (long long)d * p.dz_d_stride;
    const in_t* Bv = (const in_t*)p.b_ptr + (long long)b * p.b_batch_stride +
                     (long long)(d0 / (p.dim / p.b_ngroups)) * p.b_group_stride;
    const in_t* Cv = (const in_t*)p.c_ptr + (long long)b * p.c_batch_stride +
                     (long long)(d0 / (p.dim / p.c_ngroups)) * p.c_group_stride;
    const float Dv = p.has_d ? ((const float*)p.d_ptr)[d] : 0.f;
    const float bias = p.has_delta_bias ? ((const float*)p.delta_bias_ptr)[d] : 0.f;

    float A2[kNS], Bf[kNS], Cf[kNS], g[kNS], dA[kNS], dBf[kNS], dCf[kNS];
#pragma unroll
    for (int s = 0; s < kNS; ++s) {
        const int n = lane + 16 * s;
        const bool ok = n < N;
        A2[s] = ok ? ((const float*)p.a_ptr)[d * p.a_d_stride + n * p.a_dstate_stride] * LOG2E_F : 0.f;
        Bf[s] = (!kVarB && ok) ? ((const float*)p.b_ptr)[d * p.b_group_stride + n * p.b_dstate_stride] : 0.f;
        Cf[s] = (!kVarC && ok) ? ((const float*)p.c_ptr)[d * p.c_group_stride + n * p.c_dstate_stride] : 0.f;
        g[s] = (p.has_dlast_state && ok) ? ((const float*)p.dlast_state_ptr)[((long long)b * p.dim + d) * N + n] : 0.f;
        dA[s] = dBf[s] = dCf[s] = 0.f;
    }
    float dD = 0.f, dbias = 0.f;
    const float* states = (const float*)p.states_ptr + ((long long)b * p.dim + d) * p.n_chunks * N;
    float* ws = (float*)p.workspace_ptr;
    float* ws_dB = ws + ws_chan_size(p);
    float* ws_dC = ws_dB + (kVarB ? ws_part_size(p, KCH) : 0);

    for (int tile = p.n_chunks - 1; tile >= 0; --tile) {
        const int t0 = tile * T;
        const int len = min(T, L - t0);
        __syncthreads();  // shared tiles of the previous iteration are no longer read
        // Per-step inputs of this lane's channel: lane handles steps lane, lane + 16, ...
        for (int t = lane; t < T; t += 16) {
            float uu = 0.f, x = 0.f, dt = 0.f, zz = 0.f, go = 0.f;
            if (t < len) {
                uu = to_f<kInType>(u[t0 + t]);
                x = to_f<kInType>(delta[t0 + t]) + bias;
                dt = p.delta_softplus ? softplus_f(x) : x;
                if (kHasZ) zz = to_f<kInType>(z[t0 + t]);
                go = to_f<kInType>(dout[t0 + t]);
            }
            const int i = c * T + t;
            s_u[i] = uu;
            s_x[i] = x;
            s_dt[i] = dt;
            s_dtu[i] = dt * uu;
            s_z[i] = zz;
            s_dout[i] = go;
        }
        if (kVarB) {
            for (int i = threadIdx.x; i < NP * T; i += blockDim.x) {
                const int n = i / T, t = i - n * T;
                s_B[n * T_PAD + t] = (n < N && t < len) ? to_f<kInType>(Bv[(long long)n * p.b_dstate_stride + t0 + t]) : 0.f;
            }
            for (int i = threadIdx.x; i < NWS * NP * T; i += blockDim.x) s_dB[i] = 0.f;
        }
        if (kVarC) {
            for (int i = threadIdx.x; i < NP * T; i += blockDim.x) {
                const int n = i / T, t = i - n * T;
                s_C[n * T_PAD + t] = (n < N && t < len) ? to_f<kInType>(Cv[(long long)n * p.c_dstate_stride + t0 + t]) : 0.f;
            }
            for (int i = threadIdx.x; i < NWS * NP * T; i += blockDim.x) s_dC[i] = 0.f;
        }
        __syncthreads();

        // Recompute the tile from its start state.
        float h0[kNS];
#pragma unroll
        for (int s = 0; s < kNS; ++s) {
            const int n = lane + 16 * s;
            h0[s] = 0.f;
            if (n < N) {
                if (tile > 0) h0[s] = states[(long long)(tile - 1) * N + n];
                else if (p.has_initial_state) h0[s] = ((const float*)p.initial_state_ptr)[((long long)b * p.dim + d) * N + n];
            }
        }
        float hs[kChunk][kNS];
#pragma unroll
        for (int t16 = 0; t16 < kChunk; t16 += 16) {
            float pacc[16];
#pragma unroll
            for (int j = 0; j < 16; ++j) {
                const int t = t16 + j;
                const float dt = s_dt[c * T + t], dtu = s_dtu[c * T + t];
                float acc = 0.f;
#pragma unroll
                for (int s = 0; s < kNS; ++s) {
                    const int n = lane + 16 * s;
                    const float hp = t == 0 ? h0[s] : hs[t == 0 ? 0 : t - 1][s];
                    const float bb = kVarB ? s_B[n * T_PAD + t] : Bf[s];
                    const float cc = kVarC ? s_C[n * T_PAD + t] : Cf[s];
                    hs[t][s] = fmaf(ex2(dt * A2[s]), hp, dtu * bb);
                    acc = fmaf(cc, hs[t][s], acc);
                }
                pacc[j] = acc;
            }
            s_y[c * T + t16 + lane] = reduce_scatter16(pacc, lane, mask);
        }
        __syncwarp(mask);
        // Gate and skip gradients, per step (lane handles steps lane, lane + 16, ...).
        for (int t = lane; t < T; t += 16) {
            const int i = c * T + t;
            float dy = s_dout[i];
            if (kHasZ) {
                const float zz = s_z[i];
                const float sz = sigmoid_f(zz);
                const float o = fmaf(Dv, s_u[i], s_y[i]);
                if (t < len) dz[t0 + t] = from_f<kInType>(dy * o * sz * (1.f + zz * (1.f - sz)));
                dy *= zz * sz;
            }
            s_dy[i] = dy;
            dD = fmaf(dy, s_u[i], dD);
        }
        __syncwarp(mask);

        // Reverse scan over the tile.
#pragma unroll
        for (int t16 = kChunk - 16; t16 >= 0; t16 -= 16) {
            float qdu[16], qdt[16];
#pragma unroll
            for (int j = 15; j >= 0; --j) {
                const int t = t16 + j;
                const int i = c * T + t;
                const float dy = s_dy[i], dt = s_dt[i], dtu = s_dtu[i], uu = s_u[i];
                float sdu = 0.f, sdt = 0.f;
#pragma unroll
                for (int s = 0; s < kNS; ++s) {
                    const int n = lane + 16 * s;
                    const float bb = kVarB ? s_B[n * T_PAD + t] : Bf[s];
                    const float cc = kVarC ? s_C[n * T_PAD + t] : Cf[s];
                    const float hprev = t == 0 ? h0[s] : hs[t == 0 ? 0 : t - 1][s];
                    const float da = ex2(dt * A2[s]);
                    const float gl = fmaf(cc, dy, g[s]);
                    const float dbv = gl * dtu;
                    const float dcv = dy * hs[t][s];
                    if (kVarB) {
                        // Lanes l and l + 16 (the warp's two channels) hold the same (n, t).
                        const float v = KCH >= 2 ? dbv + shfl_xor(dbv, 16, mask) : dbv;
                        if (KCH < 2 || c % 2 == 0) s_dB[((c >> 1) * NP + n) * T + t] = v;
                    } else {
                        dBf[s] += dbv;
                    }
                    if (kVarC) {
                        const float v = KCH >= 2 ? dcv + shfl_xor(dcv, 16, mask) : dcv;
                        if (KCH < 2 || c % 2 == 0) s_dC[((c >> 1) * NP + n) * T + t] = v;
                    } else {
                        dCf[s] += dcv;
                    }
                    sdu = fmaf(gl, bb, sdu);
                    const float gah = gl * da * hprev;
                    sdt = fmaf(gl * bb, uu, sdt);
                    sdt = fmaf(A2[s] * LN2_F, gah, sdt);
                    dA[s] = fmaf(dt, gah, dA[s]);
                    g[s] = gl * da;
                }
                qdu[j] = sdu;
                qdt[j] = sdt;
            }
            const float su = reduce_scatter16(qdu, lane, mask);
            const float st = reduce_scatter16(qdt, lane, mask);
            const int t = t16 + lane;
            const int i = c * T + t;
            if (t < len) {
                const float dt = s_dt[i];
                du[t0 + t] = from_f<kInType>(fmaf(Dv, s_dy[i], dt * su));
                float gx = st;
                if (p.delta_softplus && !(s_x[i] > 20.f)) gx *= sigmoid_f(s_x[i]);
                ddelta[t0 + t] = from_f<kInType>(gx);
                dbias += gx;
            }
        }
        // Variable dB / dC: sum the warps' slices in a fixed order, one partial per block.
        if (kVarB || kVarC) {
            __syncthreads();
            const long long tiles = p.dim / KCH;
            for (int i = threadIdx.x; i < N * T; i += blockDim.x) {
                const int n = i / T, t = i - n * T;
                if (t >= len) continue;
                const long long o = (((long long)b * tiles + blockIdx.x) * N + n) * L + t0 + t;
                if (kVarB) {
                    float v = 0.f;
                    for (int w = 0; w < NWS; ++w) v += s_dB[(w * NP + n) * T + t];
                    ws_dB[o] = v;
                }
                if (kVarC) {
                    float v = 0.f;
                    for (int w = 0; w < NWS; ++w) v += s_dC[(w * NP + n) * T + t];
                    ws_dC[o] = v;
                }
            }
        }
    }
    // Per-channel results.
    float* slot = ws + ((long long)b * p.dim + d) * (3 * N + 2);
#pragma unroll
    for (int s = 0; s < kNS; ++s) {
        const int n = lane + 16 * s;
        if (n < N) {
            slot[n] = dA[s];
            slot[N + n] = dBf[s];
            slot[2 * N + n] = dCf[s];
            if (p.dinitial_state_ptr) ((float*)p.dinitial_state_ptr)[((long long)b * p.dim + d) * N + n] = g[s];
        }
    }
    dD = half_warp_sum(dD, mask);
    dbias = half_warp_sum(dbias, mask);
    if (lane == 0) {
        slot[3 * N] = dD;
        slot[3 * N + 1] = dbias;
    }
    (void)kch_arg;
}

// Second stage: fixed-order sums of the workspace into the gradient outputs. One thread per
// output element: dA, fixed dB/dC, dD, ddelta_bias (sums over batch), variable dB/dC (sums over
// the channel tiles of each group).
extern "C" __global__ void ssm_bwd_reduce(const SsmParams p, const int kch) {
    typedef typename InType<kInType>::t in_t;
    const int N = p.dstate, L = p.seqlen, dim = p.dim;
    const long long per = 3 * N + 2;
    const float* ws = (const float*)p.workspace_ptr;
    const long long n_small = (long long)dim * (3 * N + 2);
    const long long n_vb = kVarB ? (long long)p.batch * p.b_ngroups * N * L : 0;
    const long long n_vc = kVarC ? (long long)p.batch * p.c_ngroups * N * L : 0;
    const long long total = n_small + n_vb + n_vc;
    const long long tiles = dim / kch;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        if (i < n_small) {
            const int dd = (int)(i / per), k = (int)(i - dd * per);
            float v = 0.f;
            for (int bb = 0; bb < p.batch; ++bb) v += ws[((long long)bb * dim + dd) * per + k];
            if (k < N) {
                ((float*)p.da_ptr)[(long long)dd * N + k] = v;
            } else if (k < 2 * N) {
                if (!kVarB) ((float*)p.db_ptr)[dd * p.db_group_stride + (k - N) * p.db_dstate_stride] = v;
            } else if (k < 3 * N) {
                if (!kVarC) ((float*)p.dc_ptr)[dd * p.dc_group_stride + (k - 2 * N) * p.dc_dstate_stride] = v;
            } else if (k == 3 * N) {
                if (p.has_d) ((float*)p.dd_ptr)[dd] = v;
            } else {
                if (p.has_delta_bias) ((float*)p.ddelta_bias_ptr)[dd] = v;
            }
            continue;
        }
        const bool isb = i < n_small + n_vb;
        const long long j = isb ? i - n_small : i - n_small - n_vb;
        const int ng = isb ? p.b_ngroups : p.c_ngroups;
        const int t = (int)(j % L);
        const int n = (int)((j / L) % N);
        const int gg = (int)((j / ((long long)L * N)) % ng);
        const int bb = (int)(j / ((long long)L * N * ng));
        const float* part = ws + ws_chan_size(p) + (isb ? 0 : (kVarB ? ws_part_size(p, kch) : 0));
        const long long tiles_per_group = tiles / ng;
        float v = 0.f;
        for (long long k = gg * tiles_per_group; k < (gg + 1) * tiles_per_group; ++k)
            v += part[(((long long)bb * tiles + k) * N + n) * L + t];
        if (isb) {
            ((in_t*)p.db_ptr)[bb * p.db_batch_stride + gg * p.db_group_stride + n * p.db_dstate_stride + t] = from_f<kInType>(v);
        } else {
            ((in_t*)p.dc_ptr)[bb * p.dc_batch_stride + gg * p.dc_group_stride + n * p.dc_dstate_stride + t] = from_f<kInType>(v);
        }
    }
}
