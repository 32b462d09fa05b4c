// Forward selective scan: discretisation, scan, C contraction, D skip and z gating in one pass.
//
// Layout of the work: kG adjacent lanes own one channel, lane j the kKS states
// n = j kKS + s (s < kKS) in registers for the whole sequence; a block owns `kch` channels of one
// batch row (all in one B group and one C group) and walks the sequence in tiles of kTile steps.
// Per tile the block stages, with 16-byte loads, dt = softplus(delta + bias), dt u, u (and z) of
// its channels in shared memory ([channel][t], fp32, once per element for the whole block, not
// per lane), and the variable B / C tile as [t][n] (fp32, or packed 16-bit values beyond 16
// states per channel). The scan then reads dt and dt u four steps per float4 (broadcast to the
// channel's lanes) and B / C as vectors of the lane's states. The output y_t = sum_n C h needs a
// sum over the channel's kG lanes: each lane keeps kU steps of partial sums and one
// reduce-scatter leaves kU / kG finished steps in each lane. The units of a kChunk-step interval
// are unrolled and their finished outputs stay in registers until the interval ends, when they
// go over dt in shared memory: with no shared store inside the interval, the next unit's reads
// and ex2 issue while this unit's shuffles are in flight. The D skip, the z gate and the stores
// run vectorised over the whole block after the tile, off the scan's latency chain. The state
// goes to HBM only every kChunk steps (for the backward and last_state). Steps past the end of
// the sequence run with dt = 0, which leaves h unchanged.
//
// Compile-time: kInType (0 f32, 1 f16, 2 bf16), kKS, kG (dstate <= kG kKS), kTile (steps per
// tile), kChunk (steps per saved state, dividing kTile), kVarB, kVarC, kHasZ, kGeneric (run-time
// B / C / z flags, cuda/common.cuh); tuning constants
// with defaults (kFwdU, kPackBC) can be set through MAMBA_SCAN_CUDA_DEFINES. Run-time argument
// kch: channels per block (blockDim = max(32, kch kG); lanes past kch channels compute on zeros
// and write nothing).

#define TP (kTile + 4)
// Steps per unit (one reduce-scatter of partial outputs): kFwdU, at least kG, at most 16.
#ifndef kFwdU
#define kFwdU 8
#endif
#define kU (kG > 16 ? 16 : kG > kFwdU ? kG : kFwdU)

extern "C" __global__ void __launch_bounds__(128, 1) ssm_fwd(const SsmParams p, const int kch) {
    typedef typename InType<kInType>::t in_t;
    constexpr int NP = kG * kKS;
    constexpr int T = kTile;  // steps per staged tile; the state is saved every kChunk steps
    static_assert(kChunk % kU == 0, "a saved-state interval holds whole units");
    constexpr int VEC = Vec<kInType>::n;
    typedef Stage<kInType, kTile> St;
    // Packed B / C beyond 16 states per channel (measured on the H200: backward -13% at dstate
    // 64, -9% at 128; at dstate 16 the widening costs more than the reads it saves).
    constexpr bool kPack = !kGeneric && kPackBC && kInType != 0 && kVarB && kVarC && NP > 16;
    extern __shared__ float smem[];
    const int rows = blockDim.x / kG;
    const int c = threadIdx.x / kG, j = threadIdx.x % kG;
    const bool live = c < kch;
    const int b = blockIdx.y;
    const int d0 = blockIdx.x * kch;
    const int N = p.dstate, L = p.seqlen;

    constexpr int RT = T + VEC;  // raw rows, padded by 16 bytes (conflict-free vector reads)
    float* s_dt = smem;  // also the output tile
    float* s_dtu = s_dt + rows * TP;
    float* s_u = s_dtu + rows * TP;
    float* s_z = s_u + rows * TP;
    float* s_B = s_z + (kHasZ ? rows * TP : 0);
    float* s_C = s_B + (kVarB ? T * NP : 0);
    u16* s_BC = (u16*)s_B;  // the packed tile (kPack), in place of s_B and s_C
    // Raw (input dtype) tiles, filled by cp.async one tile ahead.
    // Generic build: the fixed B and C rows of the block's channels ([channel][B | C][n]).
    float* s_fix = s_C + (kVarC ? T * NP : 0);
    float* s_fB = s_fix + c * 2 * NP + j * kKS;
    float* s_fC = s_fB + NP;
    in_t* r_u = (in_t*)(kPack ? s_B + T * NP : s_fix + (kGeneric ? rows * 2 * NP : 0));
#if kGeneric
    // Fixed B / C as tiles of step stride 0 (the rows above): one vector read per step either
    // way, no per-state select in the scan.
    const float* pB = VAR_B ? s_B + j * kKS : s_fB;
    const float* pC = VAR_C ? s_C + j * kKS : s_fC;
    const int sB = VAR_B ? NP : 0, sC = VAR_C ? NP : 0;
#endif

    in_t* r_dl = r_u + rows * RT;
    in_t* r_z = r_dl + rows * RT;
    in_t* r_B = r_z + (kHasZ ? rows * RT : 0);
    in_t* r_C = r_B + (kVarB ? NP * RT : 0);
    // delta_bias of the block's channels (0 past kch or without one), read once instead of a
    // global load per staging pass.
    float* s_bias = (float*)(r_C + (kVarC ? NP * RT : 0));
    for (int i = threadIdx.x; i < rows; i += blockDim.x)
        s_bias[i] = (p.has_delta_bias && i < kch) ? ((const float*)p.delta_bias_ptr)[d0 + i] : 0.f;

    const in_t* u = (const in_t*)p.u_ptr + (long long)b * p.u_batch_stride;
    const in_t* delta = (const in_t*)p.delta_ptr + (long long)b * p.delta_batch_stride;
    const in_t* z = (const in_t*)p.z_ptr + (long long)b * p.z_batch_stride;
    in_t* out = (in_t*)p.out_ptr + (long long)b * p.out_batch_stride;
    const in_t* Bv = (const in_t*)p.b_ptr + (long long)b * p.b_batch_stride +
                     (long long)(d0 / (p.dim / p.b_ngroups)) * p.b_group_stride;
    const in_t* Cv = (const in_t*)p.c_ptr + (long long)b * p.c_batch_stride +
                     (long long)(d0 / (p.dim / p.c_ngroups)) * p.c_group_stride;

    const int d = live ? d0 + c : d0;
    float A2[kKS], Bf[kKS], Cf[kKS], h[kKS];
#pragma unroll
    for (int s = 0; s < kKS; ++s) {
        const int n = j * kKS + s;
        const bool ok = live && n < N;
        // Multiply A by log2(e) once so the decay is a single ex2 per state and step.
        A2[s] = ok ? ((const float*)p.a_ptr)[d * p.a_d_stride + n * p.a_dstate_stride] * LOG2E_F : 0.f;
        Bf[s] = (!VAR_B && ok) ? ((const float*)p.b_ptr)[d * p.b_group_stride + n * p.b_dstate_stride] : 0.f;
        Cf[s] = (!VAR_C && ok) ? ((const float*)p.c_ptr)[d * p.c_group_stride + n * p.c_dstate_stride] : 0.f;
        if (kGeneric) {
            // Each lane reads back only what it wrote: no barrier needed.
            s_fB[s] = Bf[s];
            s_fC[s] = Cf[s];
        }
        h[s] = (p.has_initial_state && !p.has_seq_idx && ok)
                   ? ((const float*)p.initial_state_ptr)[((long long)b * p.dim + d) * N + n]
                   : 0.f;
    }
    float* states = (float*)p.states_ptr + ((long long)b * p.dim + d) * p.n_chunks * N;
    const unsigned mask = 0xffffffffu;

    // The thread's share of each tile's u / delta / z copies is the same vectors of the same
    // rows every tile: FS slots, their row pointers computed once (the per-tile address
    // arithmetic was ~10% of the kernel's instructions).
    constexpr int FS = (T / VEC + kG - 1) / kG;  // slots per thread (hoisted from 4 lanes per channel)
    const in_t *fu[FS], *fdl[FS], *fz[FS];
    int fo[FS], ft[FS];
    bool fslot[FS];
    const unsigned fs = smem_u32(r_u);  // r_dl and r_z follow r_u, rows * RT elements apart
    if constexpr (kG >= 4) {
#pragma unroll
        for (int f = 0; f < FS; ++f) {
            const int i = threadIdx.x + f * blockDim.x;
            const int cc = i / (T / VEC), t = (i - cc * (T / VEC)) * VEC;
            fslot[f] = i < rows * (T / VEC);
            const long long dd = d0 + (cc < kch ? cc : 0);
            fu[f] = u + dd * p.u_d_stride + t;
            fdl[f] = delta + dd * p.delta_d_stride + t;
            fz[f] = HAS_Z ? z + dd * p.z_d_stride + t : nullptr;
            fo[f] = cc * RT + t;
            ft[f] = cc < kch ? t : T;  // rows past kch channels: valid <= 0, zeros
        }
    }

    // Tile -1 only starts the copies of tile 0; each tile starts those of the next one as soon
    // as its own raw inputs are converted.
    const int n_tiles = (L + T - 1) / T;
    SeqAhead sqa{0, 0, 0};  // packed sequences: seq_idx of the next tile's steps
    for (int tile = -1; tile < n_tiles; ++tile) {
        const int t0 = tile * T;
        const int len = min(T, L - t0);
        // Packed sequences: the steps of this tile that start one (from values loaded a tile
        // ahead).
        unsigned long long bm = (p.has_seq_idx && tile >= 0) ? seq_starts(sqa, len) : 0ull;
        if (tile >= 0) {
            cp_async_wait_all();
            __syncthreads();  // this tile's raw inputs are in; the previous output tile is stored
            // Convert: dt = softplus(delta + bias), dt u, u, z as fp32 rows; B / C as [t][n].
            for (int i = threadIdx.x; i < rows * (T / VEC); i += blockDim.x) {
                const int cc = i / (T / VEC), t = St::first(i - cc * (T / VEC));
                const int valid = cc < kch ? len : 0;  // elements at positions < valid are real
                float uu[VEC], dt[VEC], zz[VEC];
#pragma unroll
                for (int k = 0; k < VEC; k += 4) {
                    const int e = St::pos(t, k);
                    ld4_aligned<kInType>(r_u + cc * RT + e, uu + k);
                    ld4_aligned<kInType>(r_dl + cc * RT + e, dt + k);
                    if (HAS_Z) ld4_aligned<kInType>(r_z + cc * RT + e, zz + k);
                }
                const float bias = s_bias[cc];
#pragma unroll
                for (int k = 0; k < VEC; ++k) {
                    // Unconditional softplus and selects: no branch per element, so the
                    // elements' ex2 / lg2 latencies overlap.
                    const float x = dt[k] + bias;
                    const float sp = kInType == 0 ? softplus_f(x) : softplus_mufu(x);
                    const float v = p.delta_softplus ? sp : x;
                    dt[k] = St::pos(t, k) < valid ? v : 0.f;
                }
#pragma unroll
                for (int k = 0; k < VEC; k += 4) {
                    const int o = cc * TP + St::pos(t, k);
                    *reinterpret_cast<float4*>(&s_dt[o]) = f4(dt[k], dt[k + 1], dt[k + 2], dt[k + 3]);
                    *reinterpret_cast<float4*>(&s_dtu[o]) =
                        f4(dt[k] * uu[k], dt[k + 1] * uu[k + 1], dt[k + 2] * uu[k + 2], dt[k + 3] * uu[k + 3]);
                    *reinterpret_cast<float4*>(&s_u[o]) = f4(uu[k], uu[k + 1], uu[k + 2], uu[k + 3]);
                    if (HAS_Z) *reinterpret_cast<float4*>(&s_z[o]) = f4(zz[k], zz[k + 1], zz[k + 2], zz[k + 3]);
                }
            }
            if (kVarB || kVarC) {
                // n fastest: the scattered [t][n] writes hit distinct banks; raw rows are padded.
                for (int i = threadIdx.x; i < NP * (T / VEC); i += blockDim.x) {
                    const int n = i % NP, t = (i / NP) * VEC;
                    float v[VEC];
                    if constexpr (kPack) {
                        st_packed<kKS, NP, VEC>(s_BC, (const u16*)(r_B + n * RT + t), n, t, 0);
                        st_packed<kKS, NP, VEC>(s_BC, (const u16*)(r_C + n * RT + t), n, t, 1);
                        continue;
                    }
                    if (VAR_B) {
                        ld_vec_aligned<kInType>(r_B + n * RT + t, v);
#pragma unroll
                        for (int k = 0; k < VEC; ++k) s_B[(t + k) * NP + n] = v[k];
                    }
                    if (VAR_C) {
                        ld_vec_aligned<kInType>(r_C + n * RT + t, v);
#pragma unroll
                        for (int k = 0; k < VEC; ++k) s_C[(t + k) * NP + n] = v[k];
                    }
                }
            }
            __syncthreads();
        }
        if (tile + 1 < n_tiles) {
            // Start the copies of the next tile's raw inputs.
            const int nt0 = t0 + T;
            const int nlen = min(T, L - nt0);
            if (p.has_seq_idx) sqa = seq_ahead(p, b, nt0, nlen);
            if constexpr (kG >= 4) {
#pragma unroll
                for (int f = 0; f < FS; ++f) {
                    if (!fslot[f]) continue;
                    const int valid = nlen - ft[f];  // <= 0 past the last channel: zeros
                    fetch_vec_s<kInType>(r_u + fo[f], fs + fo[f] * (int)sizeof(in_t), fu[f] + nt0, valid);
                    fetch_vec_s<kInType>(r_dl + fo[f], fs + (rows * RT + fo[f]) * (int)sizeof(in_t), fdl[f] + nt0, valid);
                    if (HAS_Z)
                        fetch_vec_s<kInType>(r_z + fo[f], fs + (2 * rows * RT + fo[f]) * (int)sizeof(in_t), fz[f] + nt0, valid);
                }
            } else {
                // Layouts of 1-2 lanes per channel: 4-8 slots, more than registers allow; plain loop.
                for (int i = threadIdx.x; i < rows * (T / VEC); i += blockDim.x) {
                    const int cc = i / (T / VEC), t = (i - cc * (T / VEC)) * VEC;
                    const int valid = cc < kch ? nlen - t : 0;
                    const long long dd = d0 + cc;
                    fetch_vec<kInType>(r_u + cc * RT + t, u + dd * p.u_d_stride + nt0 + t, valid);
                    fetch_vec<kInType>(r_dl + cc * RT + t, delta + dd * p.delta_d_stride + nt0 + t, valid);
                    if (HAS_Z) fetch_vec<kInType>(r_z + cc * RT + t, z + dd * p.z_d_stride + nt0 + t, valid);
                }
            }
            if (kVarB || kVarC) {
                for (int i = threadIdx.x; i < NP * (T / VEC); i += blockDim.x) {
                    const int n = i / (T / VEC), t = (i - n * (T / VEC)) * VEC;
                    const int valid = n < N ? nlen - t : 0;
                    if (VAR_B) fetch_vec<kInType>(r_B + n * RT + t, Bv + (long long)n * p.b_dstate_stride + nt0 + t, valid);
                    if (VAR_C) fetch_vec<kInType>(r_C + n * RT + t, Cv + (long long)n * p.c_dstate_stride + nt0 + t, valid);
                }
            }
        }
        if (tile < 0) continue;
        // Units of kU steps, unrolled over a saved-state interval. The finished outputs stay in
        // registers until the interval ends: with no shared-memory store inside the interval,
        // the next unit's reads and ex2 can issue while this unit's shuffles are in flight.
        // With fewer than 4 lanes per channel (dstate <= 8) there are few or no shuffles to hide
        // and a whole interval of hoisted reads exceeds the registers: those layouts store each
        // unit's outputs at once (kHold false), which also bounds the hoisting.
        typedef RS<kU, kG> R;
        constexpr bool kHold = kG >= 4;
        // The state at a saved-state interval's end (steps past the end of the sequence leave h
        // as is).
        const auto save_state = [&](int ci) {
            if (live && ci < p.n_chunks) {
                if (N % kKS == 0 && (p.states_ptr & 15) == 0) {
                    if (j * kKS < N) st_states<kKS>(&states[(long long)ci * N + j * kKS], h);
                } else {
#pragma unroll
                    for (int s = 0; s < kKS; ++s)
                        if (j * kKS + s < N) states[(long long)ci * N + j * kKS + s] = h[s];
                }
            }
        };
        // Packed sequences: a start at the tile's first step (every row's first tile has one) is
        // done before the scan. A tile where a sequence starts after its first step (at most
        // once per packed sequence) runs a step at a time, not unrolled, with the restart test
        // and a butterfly sum of the channel's lanes per step. Small code: an unrolled copy of
        // the interval with the test had tripled the forward's compile time, and one of a unit
        // took registers from the plain loop.
        if (bm & 1ull) {
            seq_restart<kKS>(p, seq_at(p, b, t0 - 1), seq_at(p, b, t0), d, j, live, h);
            bm &= ~1ull;
        }
        if (bm) {
#pragma unroll 1
            for (int t = 0; t < T; ++t) {
                const float dt = s_dt[c * TP + t], dtu = s_dtu[c * TP + t];
                float bb[kKS], cv[kKS];
                if constexpr (kPack) {
                    ld_bc_packed<kInType, kKS>(s_BC + (t * (NP / kKS) + j) * 2 * kKS, bb, cv);
                } else {
#if kGeneric
                    ld_states<kKS>(pB + t * sB, bb);
                    ld_states<kKS>(pC + t * sC, cv);
#else
                    if (VAR_B) ld_states<kKS>(&s_B[t * NP + j * kKS], bb);
                    if (VAR_C) ld_states<kKS>(&s_C[t * NP + j * kKS], cv);
#endif
                }
                if ((bm >> t) & 1ull) seq_restart<kKS>(p, seq_at(p, b, t0 + t - 1), seq_at(p, b, t0 + t), d, j, live, h);
                float acc = 0.f;
#pragma unroll
                for (int s = 0; s < kKS; ++s) {
                    const float B_ = VAR_B || kGeneric ? bb[s] : Bf[s];
                    const float C_ = VAR_C || kGeneric ? cv[s] : Cf[s];
                    h[s] = fmaf(ex2(dt * A2[s]), h[s], dtu * B_);
                    acc = fmaf(C_, h[s], acc);
                }
#pragma unroll
                for (int o = 1; o < kG; o <<= 1) acc += __shfl_xor_sync(mask, acc, o);
                __syncwarp(mask);  // the channel's lanes have read this step's dt
                if (j == 0) s_dt[c * TP + t] = acc;
                if ((t + 1) % kChunk == 0) save_state((tile * T + t + 1 - kChunk) / kChunk);
            }
        } else {
#pragma unroll 1
            for (int tc = 0; tc < T; tc += kChunk) {
                float yb[kHold ? kChunk / kU : 1][R::R];
#pragma unroll
                for (int ui = 0; ui < kChunk / kU; ++ui) {
                    const int t = tc + ui * kU;
                    float pacc[kU];
#pragma unroll
                    for (int q = 0; q < kU; q += 4) {
                        const float4 dt4 = *reinterpret_cast<const float4*>(&s_dt[c * TP + t + q]);
                        const float4 dtu4 = *reinterpret_cast<const float4*>(&s_dtu[c * TP + t + q]);
#pragma unroll
                        for (int k = 0; k < 4; ++k) {
                            const float dt = f4_at(dt4, k), dtu = f4_at(dtu4, k);
                            float bb[kKS], cv[kKS];
                            if constexpr (kPack) {
                                ld_bc_packed<kInType, kKS>(s_BC + ((t + q + k) * (NP / kKS) + j) * 2 * kKS, bb, cv);
                            } else {
#if kGeneric
                                ld_states<kKS>(pB + (t + q + k) * sB, bb);
                                ld_states<kKS>(pC + (t + q + k) * sC, cv);
#else
                                if (VAR_B) ld_states<kKS>(&s_B[(t + q + k) * NP + j * kKS], bb);
                                if (VAR_C) ld_states<kKS>(&s_C[(t + q + k) * NP + j * kKS], cv);
#endif
                            }
                            float acc = 0.f;
#pragma unroll
                            for (int s = 0; s < kKS; ++s) {
                                const float B_ = VAR_B || kGeneric ? bb[s] : Bf[s];
                                const float C_ = VAR_C || kGeneric ? cv[s] : Cf[s];
                                h[s] = fmaf(ex2(dt * A2[s]), h[s], dtu * B_);
                                acc = fmaf(C_, h[s], acc);
                            }
                            pacc[q + k] = acc;
                        }
                    }
                    reduce_scatter<kU, kG, 1>(pacc, j, mask);
                    if constexpr (kHold) {
#pragma unroll
                        for (int r = 0; r < R::R; ++r) yb[ui][r] = pacc[r];
                    } else {
                        __syncwarp(mask);  // the channel's lanes have read this unit's dt
                        if (R::owner(j)) {
#pragma unroll
                            for (int r = 0; r < R::R; ++r) s_dt[c * TP + t + R::blk(j) * R::R + r] = pacc[r];
                        }
                    }
                }
                // y over dt. The shuffled sums the owner holds already depend on every lane's reads
                // of this interval's dt; the __syncwarp (once per interval) states that ordering in
                // the memory model as well (and for compute-sanitizer's racecheck).
                __syncwarp(mask);
                if (kHold && R::owner(j)) {
#pragma unroll
                    for (int ui = 0; ui < kChunk / kU; ++ui)
#pragma unroll
                        for (int r = 0; r < R::R; ++r) s_dt[c * TP + tc + ui * kU + R::blk(j) * R::R + r] = yb[ui][r];
                }
                save_state((tile * T + tc) / kChunk);  // the state at the interval's end
            }
        }
        __syncthreads();
        // Epilogue, vectorised over the block: D skip, z gate, conversion, 8- / 16-byte stores.
        for (int i = threadIdx.x; i < rows * (T / VEC); i += blockDim.x) {
            const int cc = i / (T / VEC), t = St::first(i - cc * (T / VEC));
            if (cc >= kch || t >= len) continue;
            const float Dc = p.has_d ? ((const float*)p.d_ptr)[d0 + cc] : 0.f;
            in_t* orow = out + (long long)(d0 + cc) * p.out_d_stride + t0;
#pragma unroll
            for (int k = 0; k < VEC; k += 4) {
                const int e = St::pos(t, k), a = cc * TP + e;
                const float4 y4 = *reinterpret_cast<const float4*>(&s_dt[a]);
                const float4 u4 = *reinterpret_cast<const float4*>(&s_u[a]);
                float o[4] = {fmaf(Dc, u4.x, y4.x), fmaf(Dc, u4.y, y4.y), fmaf(Dc, u4.z, y4.z), fmaf(Dc, u4.w, y4.w)};
                if (HAS_Z) {
                    const float4 z4 = *reinterpret_cast<const float4*>(&s_z[a]);
                    o[0] *= z4.x * sigmoid_f(z4.x);
                    o[1] *= z4.y * sigmoid_f(z4.y);
                    o[2] *= z4.z * sigmoid_f(z4.z);
                    o[3] *= z4.w * sigmoid_f(z4.w);
                }
                st4<kInType>(orow + e, len - e, o);
            }
        }
    }
    // Packed sequences: the state after the row's last step is its last sequence's final state.
    if (p.has_seq_idx && L > 0) seq_store<kKS>(p, p.final_states_ptr, seq_at(p, b, L - 1), d, j, live, h);
}
