// Backward selective scan, and the deterministic second-stage reduction.
//
// Same work layout as the forward (kG lanes per channel, lane j the states j kKS + s; a block
// owns `kch` channels of one batch row). Tiles of kTile steps (the runtime builds one of the
// forward's kChunk-step intervals between saved states; the code also takes two) are walked in
// reverse; per tile the block stages
// u, x = delta + bias, dt, dt u, dout and z with 16-byte loads, and the B / C tiles. Then, per
// lane:
//   1. from the tile's saved start state, a forward pass keeps the state at the start of each
//      kTs-step sub-tile (in registers);
//   2. for each sub-tile, last first: recompute its kTs steps into registers (the history h_t),
//      with y_t for the gate gradients (dz, and dy = dout z sigmoid(z)); then the reverse scan
//        g_t = a_{t+1} g_{t+1} + C_t dy_t,   dB_t += g_t dt_t u_t,   dC_t += dy_t h_t,
//        ddt_t = u_t sum_n g_t B_t + sum_n A g_t a_t h_{t-1},  du_t = D dy_t + dt_t sum_n g_t B_t,
//        dA += dt_t g_t a_t h_{t-1}.
// Sums over n (the channel's lanes) use the reduce-scatter; variable dB / dC are summed over the
// warp's channels through shared-memory scratch, then over the block's warps in shared memory in
// a fixed order, then over the blocks of a batch row in `slots` ordered chains (below). Nothing is
// reduced with atomics: per-(batch, channel) sums (dA, fixed dB/dC, dD, ddelta_bias) go to a
// workspace slot each and ssm_bwd_reduce adds the slots and the chains' sums in a fixed order.
// Bitwise reproducible.
//
// The chains: the channel tiles x of a batch row are dealt round-robin to `slots` chains
// (x mod slots; with as many chains as tiles, the default, each tile writes its own partial: no
// counters, no waits). Each chain holds one fp32 (group, n, step) sum in the workspace; at each flush
// the x-th tile adds its partial to its chain's sum after the tile before it in the chain
// (x - slots) has added its own (a per-(row, chain, step) counter, release / acquire), or
// writes it if it is the first of its group in the chain. The workspace thus holds `slots` fp32
// copies of dB / dC instead of one partial per tile (which was up to 21x the anchor's memory at
// dstate 64-256). Blocks take their (row, tile) from a ticket counter in start order, so a
// block only ever waits on blocks that started before it: no deadlock whatever the scheduler
// does.

#define TP (kTile + 4)
#define kU (kG > 4 ? kG : 4)
// 8 steps of register history per sub-tile: with 4 states per lane the kernel then fits in 168
// registers (three 128-thread blocks per SM, 12 warps) without spills.
#define kTs 8
#define kUB 4
// A unit's dt, u and dout as one float4 each (fewer shared-memory instructions) where registers
// allow: up to 4 states per lane and at least 4 lanes per channel (with 8 states per lane, or
// the 1-lane layout's wide scratch sums, the held vectors make ptxas spill).
#define kVecLd (kKS <= 4 && kG >= 4)
// Steps per flush of the block's dB / dC slices (the slices are [warp][dB|dC][n][kFl + 1] in
// shared memory). kBwdFl: the span up to 16 states per channel (at most the tile), where the
// slices are small enough to cover more than a sub-tile: fewer block barriers. kBwdFlW: the span
// beyond 64 states per channel (default a sub-tile; one 4-step unit measured 4.57 against 4.46 ms
// at dstate 128, now that the shuffled channel sums leave the shared memory for it). The Rust side
// sizes shared memory by the same rule (src/cuda/mod.rs, bwd_flush_steps).
#ifndef kBwdFl
#define kBwdFl 32
#endif
#ifndef kBwdFlW
#define kBwdFlW kTs
#endif
#define kFl (kG * kKS > 64 ? kBwdFlW : kG * kKS > 16 ? kTs : (kBwdFl < kTile ? kBwdFl : kTile))
#define TSP (kFl + 1)
// The block's dB / dC slices: [warp][dB|dC][n][kFl + 1] up to 16 states per channel, where the
// flush spans 32 steps (t-major rows: conflict-free flush reads); beyond, [warp][dB|dC][step]
// [NP + 4]: a lane's shuffled totals are consecutive states of one step, stored as vectors (the
// [n][t] rows took one scalar store per state with 4- to 8-way bank conflicts: ncu counted 235M
// conflicting store wavefronts at dstate 128), and NP + 4 keeps the flush's reads, 8 steps by
// 4 states per warp, on distinct banks. The Rust side sizes it by the same rule (smem_bytes).
#define kPT (kG * kKS > 16)
__device__ __forceinline__ int part_at(int w, int which, int n, int ii) {
    constexpr int NP = kG * kKS;
    return kPT ? ((w * 2 + which) * kFl + ii) * (NP + 4) + n : ((w * 2 + which) * NP + n) * TSP + ii;
}
// The sum of variable dB / dC over a warp's channels: a shuffle reduce-scatter, or float4 reads
// of a per-warp shared scratch. kBwdShfl: 0 never shuffles, 2 always, 1 (default) beyond 16
// states per channel. Measured on the H200 (bf16): the shuffles take the dstate-64 backward from
// 4.86 to 4.56 ms and dstate 128 from 4.69 to 4.57, but the main shape (dstate 16) from 0.908 to
// 0.918: there the selects of the reduce-scatter cost more instructions than the scratch's reads.
// The Rust side sizes shared memory by the same rule (src/cuda/mod.rs, smem_bytes).
// Packed sequences' restart offsets (0, or -inf where a sequence starts inside the tile): from
// the tile's bit mask in a register (a select per step), or from a per-step table in shared
// memory (a load per step). The mask costs the dense backward nothing on the H200; on sm_80 it
// takes the main-shape kernels (three blocks per SM, 168 registers) to a 16-byte spill, so
// there the table stays.
#ifndef kBwdOffTable
#if __CUDA_ARCH__ >= 900
#define kBwdOffTable 0
#else
#define kBwdOffTable 1
#endif
#endif
#ifndef kBwdSubUnroll
#define kBwdSubUnroll 0
#endif
// kBwdChains: 1 compiles the chains' hand-over (the runtime sets it where MAMBA_SCAN_BWD_SLOTS
// asks for fewer chains than tiles); 0, the default, leaves it out: each tile writes its own
// partial.
#ifndef kBwdChains
#define kBwdChains 0
#endif
#ifndef kBwdShfl
#define kBwdShfl 1
#endif
#define kShfl (kBwdShfl == 2 || (kBwdShfl == 1 && kG * kKS > 16))

// Workspace layout (4-byte words): [batch][dim][3 N + 2] per-channel sums (dA, fixed dB, fixed
// dC, dD, ddelta_bias), padded to 16 bytes; with variable B or C and fewer chains than tiles then
// the counters (zeroed by the launcher): the ticket, then [batch][slots][L + 64] chain counters
// (one per flush's first step; the last tile's flushes may start past L), padded to 16 bytes;
// then the chains' variable-dB sums
// [batch][slots][groups][N][L] ([batch][tiles][N][L] when each tile is its own chain: a tile
// writes its group's rows only), then the variable-dC sums (16-byte aligned rows when L % 4 == 0:
// the reduce reads them as float4). The Rust side sizes the workspace and zeroes the counters by
// the same rule (src/cuda/mod.rs, bwd_workspace_elems / bwd_counters).
__device__ __forceinline__ long long ws_chan_size(const SsmParams& p) {
    return ((long long)p.batch * p.dim * (3 * p.dstate + 2) + 3) & ~3ll;
}
__device__ __forceinline__ long long ws_count_size(const SsmParams& p, int slots, bool chained) {
    return chained ? (4 + (long long)p.batch * slots * (p.seqlen + 64) + 3) & ~3ll : 0;
}
__device__ __forceinline__ long long ws_sum_size(const SsmParams& p, int slots, int groups) {
    return (long long)p.batch * slots * groups * p.dstate * p.seqlen;
}
__device__ __forceinline__ int ld_acquire(const int* a) {
    int v;
    asm volatile("ld.global.acquire.gpu.b32 %0, [%1];" : "=r"(v) : "l"(a) : "memory");
    return v;
}
__device__ __forceinline__ void st_release(int* a, int v) {
    asm volatile("st.global.release.gpu.b32 [%0], %1;" ::"l"(a), "r"(v) : "memory");
}

// Three blocks per SM (<= 168 registers) where that compiles without spills and shared memory
// allows it: the wide family, and 32-step tiles of 4 states per lane and up to 32 per channel,
// of the specialised kernels. The generic build (fixed B or C: each lane also holds its
// channel's B or C, and the run-time flags add registers) takes the registers of fewer
// resident blocks.
#define kMinBlocks (!kGeneric && (kKS < 4 || (kKS * kG <= 32 && kTile <= 32 && kVarB && kVarC)) ? 3 : 1)

// Threads per block at most: 256 for 8 states per lane (kBwdWideThreads; src/cuda/mod.rs,
// max_threads), else 128.
#ifndef kBwdWideThreads
#define kBwdWideThreads 256
#endif
#define kMaxThreads (kKS == 8 && kBwdWideThreads >= 256 ? 256 : 128)

extern "C" __global__ void __launch_bounds__(kMaxThreads, kMinBlocks) ssm_bwd(const SsmParams p, const int kch, const int slots) {
    typedef typename InType<kInType>::t in_t;
    constexpr int NP = kG * kKS;
    constexpr int T = kTile;  // a multiple of kChunk, the forward's interval between saved states
    constexpr int NSUB = T / kTs;
    constexpr int VEC = Vec<kInType>::n;
    typedef Stage<kInType, kTile> St;
    // Packed B / C beyond 16 states per channel (measured on the H200: backward -13% at dstate
    // 64, -9% at 128; at dstate 16 the widening costs more than the reads it saves).
    constexpr bool kPack = !kGeneric && kPackBC && kInType != 0 && kVarB && kVarC && NP > 16;
    constexpr int MC = 32 / kG;  // channels per warp
    extern __shared__ float smem[];
    const int rows = blockDim.x / kG;
    const int nwarps = blockDim.x / 32;
    const int c = threadIdx.x / kG, j = threadIdx.x % kG;
    const int warp = threadIdx.x >> 5, cw = (threadIdx.x & 31) / kG;
    const bool live = c < kch;
    // With variable B or C the block's (batch row, channel tile) comes from the ticket (see the
    // chains above); smem[0] carries it before anything else uses the shared memory.
    // chained: fewer chains than tiles (else each tile has a chain of its own: no waits).
    int b = blockIdx.y, bx = blockIdx.x;
    int* const counters = (int*)p.workspace_ptr + ws_chan_size(p);
    const bool chained = kBwdChains && (VAR_B || VAR_C) && slots < (int)gridDim.x;
    if (chained) {
        if (threadIdx.x == 0) smem[0] = __int_as_float(atomicAdd(counters, 1));
        __syncthreads();
        const int ticket = __float_as_int(smem[0]);
        __syncthreads();
        b = ticket / (int)gridDim.x;
        bx = ticket - b * (int)gridDim.x;
    }
    const int d0 = bx * kch;
    const int d = live ? d0 + c : d0;
    const int N = p.dstate, L = p.seqlen;
    const unsigned mask = 0xffffffffu;

    constexpr int RT = T + VEC;  // raw rows, padded by 16 bytes
    float* s_dt = smem;  // dt, then ddelta
    float* s_u = s_dt + rows * TP;  // u, then du
    float* s_dy = s_u + rows * TP;  // dout, then dy
    float* s_z = s_dy + rows * TP;  // z, then dz
    float* s_B = s_z + (kHasZ ? rows * TP : 0);
    float* s_C = s_B + (kVarB ? T * NP : 0);
    u16* s_BC = (u16*)s_B;  // the packed tile (kPack), in place of s_B and s_C
    float* s_part = kPack ? s_B + T * NP : s_C + (kVarC ? T * NP : 0);  // part_at()
    float* s_scr = s_part + ((kVarB || kVarC) ? nwarps * 2 * (kPT ? kFl * (NP + 4) : NP * TSP) : 0);  // per-warp dB / dC
    // Raw (input dtype) tiles, filled by cp.async one chunk ahead.
    // Generic build: the fixed B and C rows of the block's channels ([channel][B | C][n]), read
    // per step like the variable tiles instead of held in registers.
    float* s_fix = s_scr + (((kVarB || kVarC) && MC > 1 && !kShfl) ? nwarps * kUB * MC * 2 * NP : 0);
    float* s_fB = s_fix + c * 2 * NP + j * kKS;
    float* s_fC = s_fB + NP;
    in_t* r_u = (in_t*)(s_fix + (kGeneric ? rows * 2 * NP : 0));
#if kGeneric
    // Fixed B / C as tiles of step stride 0 (the rows above): one vector read per step either
    // way, no per-state select in the scan.
    const float* pB = VAR_B ? s_B + j * kKS : s_fB;
    const float* pC = VAR_C ? s_C + j * kKS : s_fC;
    const int sB = VAR_B ? NP : 0, sC = VAR_C ? NP : 0;
#endif

    in_t* r_dl = r_u + rows * RT;
    in_t* r_do = r_dl + rows * RT;
    in_t* r_z = r_do + rows * RT;
    in_t* r_B = r_z + (kHasZ ? rows * RT : 0);
    in_t* r_C = r_B + (kVarB ? NP * RT : 0);
    // delta_bias of the block's channels (0 past kch or without one), read once: the staging's
    // per-tile global load of it was a long-scoreboard stall at first use (2% of the samples).
    float* s_bias = (float*)(r_C + (kVarC ? NP * RT : 0));
    for (int i = threadIdx.x; i < rows; i += blockDim.x)
        s_bias[i] = (p.has_delta_bias && i < kch) ? ((const float*)p.delta_bias_ptr)[d0 + i] : 0.f;
    float* s_off = s_bias + rows;  // the restart offsets' table (kBwdOffTable), T floats
    if (kBwdOffTable)
        for (int i = threadIdx.x; i < T; i += blockDim.x) s_off[i] = 0.f;

    const long long ub = (long long)b;
    const in_t* u = (const in_t*)p.u_ptr + ub * p.u_batch_stride;
    const in_t* delta = (const in_t*)p.delta_ptr + ub * p.delta_batch_stride;
    const in_t* z = (const in_t*)p.z_ptr + ub * p.z_batch_stride;
    const in_t* dout = (const in_t*)p.dout_ptr + ub * p.dout_batch_stride;
    in_t* du = (in_t*)p.du_ptr + ub * p.du_batch_stride;
    in_t* ddelta = (in_t*)p.ddelta_ptr + ub * p.ddelta_batch_stride;
    in_t* dz = (in_t*)p.dz_ptr + ub * p.dz_batch_stride;
    const in_t* Bv = (const in_t*)p.b_ptr + ub * p.b_batch_stride +
                     (long long)(d0 / (p.dim / p.b_ngroups)) * p.b_group_stride;
    const in_t* Cv = (const in_t*)p.c_ptr + ub * p.c_batch_stride +
                     (long long)(d0 / (p.dim / p.c_ngroups)) * p.c_group_stride;
    const float Dv = (p.has_d && live) ? ((const float*)p.d_ptr)[d] : 0.f;

    float A2[kKS], Bf[kKS], Cf[kKS], g[kKS], dA[kKS], dBf[kKS], dCf[kKS];
#pragma unroll
    for (int s = 0; s < kKS; ++s) {
        const int n = j * kKS + s;
        const bool ok = live && n < N;
        A2[s] = ok ? ((const float*)p.a_ptr)[d * p.a_d_stride + n * p.a_dstate_stride] * LOG2E_F : 0.f;
        Bf[s] = (!VAR_B && ok) ? ((const float*)p.b_ptr)[d * p.b_group_stride + n * p.b_dstate_stride] : 0.f;
        Cf[s] = (!VAR_C && ok) ? ((const float*)p.c_ptr)[d * p.c_group_stride + n * p.c_dstate_stride] : 0.f;
        if (kGeneric) {
            // Each lane reads back only what it wrote: no barrier needed.
            s_fB[s] = Bf[s];
            s_fC[s] = Cf[s];
        }
        g[s] = (p.has_dlast_state && !p.has_seq_idx && ok) ? ((const float*)p.dlast_state_ptr)[((long long)b * p.dim + d) * N + n] : 0.f;
        dA[s] = dBf[s] = dCf[s] = 0.f;
    }
    // Packed sequences: the gradient of the row's last sequence's final state enters at the end.
    const unsigned long long h0p = p.has_initial_state ? p.initial_state_ptr : 0ull;
    const unsigned long long dfp = p.has_dlast_state ? p.dlast_state_ptr : 0ull;
    if (p.has_seq_idx && L > 0) seq_load<kKS>(p, dfp, seq_at(p, b, L - 1), d, j, live, g);
    float dD = 0.f, dbias = 0.f;
    const float* states = (const float*)p.states_ptr + ((long long)b * p.dim + d) * p.n_chunks * N;
    float* ws = (float*)p.workspace_ptr;
    // This tile's chain: its sums' rows (group, n) and its counters; pos: tiles before it in the
    // chain, which add first; addB / addC: an earlier tile of its group is in the chain.
    const int tiles = p.dim / kch;
    const int tpgB = tiles / p.b_ngroups, tpgC = tiles / p.c_ngroups;
    const int chain = chained ? bx % slots : bx, pos = chained ? bx / slots : 0;
    const int perB = chained ? p.b_ngroups : 1, perC = chained ? p.c_ngroups : 1;  // groups per chain
    const bool addB = chained && bx - slots >= bx / tpgB * tpgB, addC = chained && bx - slots >= bx / tpgC * tpgC;
    int* const flags = counters + 4 + ((long long)b * slots + chain) * (L + 64);
    float* const sums = ws + ws_chan_size(p) + ws_count_size(p, slots, chained);
    float* const ws_dB = sums + (((long long)b * slots + chain) * perB + (chained ? bx / tpgB : 0)) * N * L;
    float* const ws_dC = sums + (VAR_B ? ws_sum_size(p, slots, perB) : 0) +
                         (((long long)b * slots + chain) * perC + (chained ? bx / tpgC : 0)) * N * L;

    // Tiles run last to first. Iteration n_tiles only starts the copies of the last tile;
    // each tile starts those of the one before it as soon as its own inputs are converted.
    const int n_tiles = (L + T - 1) / T;
    float h_next[kKS];
    SeqAhead sqa{0, 0, 0};  // packed sequences: seq_idx of the next tile's (the one before) steps
    for (int tile = n_tiles; tile >= 0; --tile) {
        const int t0 = tile * T;
        const int len = min(T, L - t0);
        // Packed sequences: the steps of this tile that start one (tiles are at most 32 steps;
        // from values loaded a tile ahead). A start at the tile's first step (every row's first
        // tile has one) is handled around the tile's work: its initial state is the tile's start
        // state, and its gradient is g after the tile. Starts inside the tile restart from 0
        // through an exponent offset; per-sequence states there are not taken (the Python side
        // refuses such calls).
        const unsigned bm0 = (p.has_seq_idx && tile < n_tiles) ? (unsigned)seq_starts(sqa, len) : 0u;
        const unsigned bm = bm0 & ~1u;
        // The offset of step t: 0, or -inf where a sequence starts inside the tile: the decay
        // there is ex2(dt A log2 e + off) = 0, so the state restarts from 0 with no branch in the
        // scans (the gradients through that decay vanish with it). off_at(m, i): bit i of the
        // mask m (kBwdOffTable 0).
        const auto off_at = [](unsigned m, int t) { return ((m >> t) & 1u) ? __int_as_float(0xff800000) : 0.f; };
        if (tile < n_tiles) {
            cp_async_wait_all();
            __syncthreads();  // this chunk's raw inputs are in; the previous results are stored
            if (kBwdOffTable && p.has_seq_idx) {
                for (int i = threadIdx.x; i < T; i += blockDim.x) s_off[i] = off_at(bm, i);
            }
            for (int i = threadIdx.x; i < rows * (T / VEC); i += blockDim.x) {
                const int cc = i / (T / VEC), t = St::first(i - cc * (T / VEC));
                const int valid = cc < kch ? len : 0;  // elements at positions < valid are real
                float uu[VEC], dt[VEC], gg[VEC], zz[VEC];
#pragma unroll
                for (int k = 0; k < VEC; k += 4) {
                    const int e = St::pos(t, k);
                    ld4_aligned<kInType>(r_u + cc * RT + e, uu + k);
                    ld4_aligned<kInType>(r_dl + cc * RT + e, dt + k);
                    ld4_aligned<kInType>(r_do + cc * RT + e, gg + k);
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
                    *reinterpret_cast<float4*>(&s_u[o]) = f4(uu[k], uu[k + 1], uu[k + 2], uu[k + 3]);
                    *reinterpret_cast<float4*>(&s_dy[o]) = f4(gg[k], gg[k + 1], gg[k + 2], gg[k + 3]);
                    if (HAS_Z) *reinterpret_cast<float4*>(&s_z[o]) = f4(zz[k], zz[k + 1], zz[k + 2], zz[k + 3]);
                }
            }
            if (kVarB || kVarC) {
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
        if (tile > 0) {
            // Start the copies of the previous chunk's raw inputs.
            const unsigned fs = smem_u32(r_u);
            const int pt0 = t0 - T;
            const int plen = min(T, L - pt0);
            if (p.has_seq_idx) sqa = seq_ahead(p, b, pt0, plen);
            for (int i = threadIdx.x; i < rows * (T / VEC); i += blockDim.x) {
                const int cc = i / (T / VEC), t = (i - cc * (T / VEC)) * VEC;
                const int valid = cc < kch ? plen - t : 0;
                const long long dd = d0 + cc;
                // Shared-window addresses from one base (r_dl, r_do, r_z follow r_u).
                const int o = cc * RT + t, rs = rows * RT * (int)sizeof(in_t);
                const unsigned so = fs + o * (int)sizeof(in_t);
                fetch_vec_s<kInType>(r_u + o, so, u + dd * p.u_d_stride + pt0 + t, valid);
                fetch_vec_s<kInType>(r_dl + o, so + rs, delta + dd * p.delta_d_stride + pt0 + t, valid);
                fetch_vec_s<kInType>(r_do + o, so + 2 * rs, dout + dd * p.dout_d_stride + pt0 + t, valid);
                if (HAS_Z) fetch_vec_s<kInType>(r_z + o, so + 3 * rs, z + dd * p.z_d_stride + pt0 + t, valid);
            }
            if (kVarB || kVarC) {
                for (int i = threadIdx.x; i < NP * (T / VEC); i += blockDim.x) {
                    const int n = i / (T / VEC), t = (i - n * (T / VEC)) * VEC;
                    const int valid = n < N ? plen - t : 0;
                    if (VAR_B) fetch_vec<kInType>(r_B + n * RT + t, Bv + (long long)n * p.b_dstate_stride + pt0 + t, valid);
                    if (VAR_C) fetch_vec<kInType>(r_C + n * RT + t, Cv + (long long)n * p.c_dstate_stride + pt0 + t, valid);
                }
            }
        }
        // The start state of a tile (the forward's saved state before it, or initial_state),
        // loaded one tile ahead: its global load was a long-scoreboard stall at the first use
        // (2% of the stall samples at the main shape). Not with 8 states per lane: those
        // kernels sit at 249-255 registers and the 8 held values made ptxas spill in some
        // specialisations (fp32, fixed C, no z); there the load stays at the use.
        const auto start_state = [&](int tl, float (&dst)[kKS]) {
#pragma unroll
            for (int s = 0; s < kKS; ++s) {
                const int n = j * kKS + s;
                dst[s] = 0.f;
                if (live && n < N) {
                    if (tl > 0) dst[s] = states[(long long)(tl * (T / kChunk) - 1) * N + n];
                    else if (p.has_initial_state && !p.has_seq_idx) dst[s] = ((const float*)p.initial_state_ptr)[((long long)b * p.dim + d) * N + n];
                }
            }
        };
        constexpr bool kAhead = kKS < 8;
        if (tile == n_tiles) {
            if constexpr (kAhead) start_state(n_tiles - 1, h_next);
            continue;
        }
        // Per-chunk partial sums, added to the totals at the chunk's end (shorter fp32 sums).
        float dDc = 0.f, dbc = 0.f, dAc[kKS];
#pragma unroll
        for (int s = 0; s < kKS; ++s) dAc[s] = 0.f;

        // 1. Sub-tile start states, from the chunk's start state (registers: the loop is unrolled).
        float hb[NSUB][kKS];
        {
            if constexpr (kAhead) {
#pragma unroll
                for (int s = 0; s < kKS; ++s) hb[0][s] = h_next[s];
                if (tile > 0) start_state(tile - 1, h_next);
            } else {
                start_state(tile, hb[0]);
            }
            if (bm0 & 1u) seq_load<kKS>(p, h0p, seq_at(p, b, t0), d, j, live, hb[0]);
#pragma unroll
            for (int sub = 1; sub < NSUB; ++sub) {
                float h[kKS];
#pragma unroll
                for (int s = 0; s < kKS; ++s) h[s] = hb[sub - 1][s];
#pragma unroll
                for (int q = 0; q < kTs; q += 4) {
                    const int t = (sub - 1) * kTs + q;
                    const float4 dt4 = *reinterpret_cast<const float4*>(&s_dt[c * TP + t]);
                    const float4 u4 = *reinterpret_cast<const float4*>(&s_u[c * TP + t]);
#pragma unroll
                    for (int k = 0; k < 4; ++k) {
                        const float dt = f4_at(dt4, k), dtu = dt * f4_at(u4, k);
                        float bb[kKS];
                        if constexpr (kPack) ld_b_packed<kInType, kKS>(s_BC + ((t + k) * (NP / kKS) + j) * 2 * kKS, bb);
#if kGeneric
                        else ld_states<kKS>(pB + (t + k) * sB, bb);
#else
                        else if (VAR_B) ld_states<kKS>(&s_B[(t + k) * NP + j * kKS], bb);
#endif
#pragma unroll
                        for (int s = 0; s < kKS; ++s) h[s] = fmaf(ex2(fmaf(dt, A2[s], kBwdOffTable ? s_off[t + k] : off_at(bm, t + k))), h[s], dtu * (VAR_B || kGeneric ? bb[s] : Bf[s]));
                    }
                }
#pragma unroll
                for (int s = 0; s < kKS; ++s) hb[sub][s] = h[s];
            }
        }

        // 2. Sub-tiles in reverse.
#if kBwdSubUnroll
#pragma unroll
#else
#pragma unroll 1
#endif
        for (int sub = NSUB - 1; sub >= 0; --sub) {
            const int ts = sub * kTs;
            const unsigned bms = bm >> ts;  // the sub-tile's restart bits
            float hst[kKS], hs[kTs][kKS];
#pragma unroll
            for (int s = 0; s < kKS; ++s) {
                hst[s] = hb[0][s];
#pragma unroll
                for (int q = 1; q < NSUB; ++q) hst[s] = sub == q ? hb[q][s] : hst[s];
            }
            // Recompute the history and y; the gate gradients of the steps this lane owns.
#pragma unroll
            for (int ui = 0; ui < kTs / kUB; ++ui) {
                float pacc[kUB];
                float4 dt4, u4;
                if constexpr (kVecLd) {
                    dt4 = *reinterpret_cast<const float4*>(&s_dt[c * TP + ts + ui * kUB]);
                    u4 = *reinterpret_cast<const float4*>(&s_u[c * TP + ts + ui * kUB]);
                }
#pragma unroll
                for (int k = 0; k < kUB; ++k) {
                    const int i = ui * kUB + k, t = ts + i;
                    const float dt = kVecLd ? f4_at(dt4, k) : s_dt[c * TP + t];
                    const float dtu = dt * (kVecLd ? f4_at(u4, k) : s_u[c * TP + t]);
                    float acc = 0.f, bb[kKS], cv[kKS];
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
                    const float off = kBwdOffTable ? s_off[t] : off_at(bms, i);
#pragma unroll
                    for (int s = 0; s < kKS; ++s) {
                        const float B_ = VAR_B || kGeneric ? bb[s] : Bf[s];
                        const float C_ = VAR_C || kGeneric ? cv[s] : Cf[s];
                        const float hp = i == 0 ? hst[s] : hs[i == 0 ? 0 : i - 1][s];
                        hs[i][s] = fmaf(ex2(fmaf(dt, A2[s], off)), hp, dtu * B_);
                        acc = fmaf(C_, hs[i][s], acc);
                    }
                    pacc[k] = acc;
                }
                reduce_scatter<kUB, kG, 1>(pacc, j, mask);
                __syncwarp(mask);  // the channel's lanes have read this unit's inputs
                typedef RS<kUB, kG> R;
                if (R::owner(j)) {
#pragma unroll
                    for (int r = 0; r < R::R; ++r) {
                        const int idx = c * TP + ts + ui * kUB + R::blk(j) * R::R + r;
                        const float uu = s_u[idx];
                        float dy = s_dy[idx];
                        if (HAS_Z) {
                            const float zz = s_z[idx];
                            const float sz = sigmoid_f(zz);
                            const float o = fmaf(Dv, uu, pacc[r]);
                            s_z[idx] = dy * o * sz * (1.f + zz * (1.f - sz));
                            dy *= zz * sz;
                        }
                        s_dy[idx] = dy;
                        dDc = fmaf(dy, uu, dDc);
                    }
                }
            }
            __syncwarp(mask);
            // Reverse scan over the sub-tile.
#pragma unroll
            for (int ui = kTs / kUB - 1; ui >= 0; --ui) {
                float pdu[kUB], pdt[kUB];
                float4 dt4, u4, dy4;
                if constexpr (kVecLd) {
                    dt4 = *reinterpret_cast<const float4*>(&s_dt[c * TP + ts + ui * kUB]);
                    u4 = *reinterpret_cast<const float4*>(&s_u[c * TP + ts + ui * kUB]);
                    dy4 = *reinterpret_cast<const float4*>(&s_dy[c * TP + ts + ui * kUB]);
                }
#pragma unroll
                for (int k = kUB - 1; k >= 0; --k) {
                    const int i = ui * kUB + k, t = ts + i;
                    const float dy = kVecLd ? f4_at(dy4, k) : s_dy[c * TP + t];
                    const float dt = kVecLd ? f4_at(dt4, k) : s_dt[c * TP + t];
                    const float dtu = dt * (kVecLd ? f4_at(u4, k) : s_u[c * TP + t]);
                    float sdu = 0.f, sdt = 0.f;
                    float vbc[2 * kKS], bb[kKS], cv[kKS];
                    const float off = kBwdOffTable ? s_off[t] : off_at(bms, i);
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
#pragma unroll
                    for (int s = 0; s < kKS; ++s) {
                        const float B_ = VAR_B || kGeneric ? bb[s] : Bf[s];
                        const float C_ = VAR_C || kGeneric ? cv[s] : Cf[s];
                        const float hp = i == 0 ? hst[s] : hs[i == 0 ? 0 : i - 1][s];
                        const float a = ex2(fmaf(dt, A2[s], off));
                        const float gl = fmaf(C_, dy, g[s]);
                        const float ga = gl * a;
                        const float gah = ga * hp;
                        dAc[s] = fmaf(dt, gah, dAc[s]);
                        sdt = fmaf(A2[s], gah, sdt);
                        sdu = fmaf(gl, B_, sdu);
                        vbc[s] = gl * dtu;
                        vbc[kKS + s] = dy * hs[i][s];
                        if (!VAR_B) dBf[s] += vbc[s];
                        if (!VAR_C) dCf[s] += vbc[kKS + s];
                        g[s] = ga;
                    }
                    if (kVarB || kVarC) {
                        if constexpr (MC > 1 && kShfl) {
                            // Sum over the warp's channels by a shuffle reduce-scatter: V - R
                            // shuffles (7 at dstate 16), then each owner lane stores its R totals.
                            typedef RS<2 * kKS, MC> RC;
                            reduce_scatter<2 * kKS, MC, kG>(vbc, cw, mask);
                            if (RC::owner(cw)) {
                                // R consecutive states of one half (R divides kKS).
                                const int v0 = RC::blk(cw) * RC::R;
                                const int which = v0 >= kKS ? 1 : 0;
                                const int n0 = j * kKS + v0 - which * kKS;
                                if constexpr (kPT && RC::R >= 2) {
                                    st_states<RC::R>(s_part + part_at(warp, which, n0, (ts + i) % kFl), vbc);
                                } else {
#pragma unroll
                                    for (int r = 0; r < RC::R; ++r) s_part[part_at(warp, which, n0 + r, (ts + i) % kFl)] = vbc[r];
                                }
                            }
                        } else if constexpr (MC > 1) {
                            // To the warp's scratch, [step][channel][dB|dC][n] with the dB / dC
                            // halves swapped in odd channels: the two channels of a quarter-warp
                            // (4 lanes each at dstate 16) then write different banks. Summed below.
                            float* w = s_scr + warp * (kUB * MC * 2 * NP) + (k * MC + cw) * 2 * NP + j * kKS;
                            const int sw = (cw & 1) ? NP : 0;
                            st_states<kKS>(w + sw, vbc);
                            st_states<kKS>(w + NP - sw, vbc + kKS);
                        } else if constexpr (kPT) {
                            // One channel per warp: the lane's states are consecutive.
                            st_states<kKS>(s_part + part_at(warp, 0, j * kKS, (ts + i) % kFl), vbc);
                            st_states<kKS>(s_part + part_at(warp, 1, j * kKS, (ts + i) % kFl), vbc + kKS);
                        } else {
#pragma unroll
                            for (int v = 0; v < 2 * kKS; ++v) {
                                const int which = v >= kKS ? 1 : 0;
                                const int n = j * kKS + (v - which * kKS);
                                s_part[part_at(warp, which, n, (ts + i) % kFl)] = vbc[v];
                            }
                        }
                    }
                    pdu[k] = sdu;
                    pdt[k] = sdt;
                }
                if constexpr ((kVarB || kVarC) && MC > 1 && !kShfl) {
                    // Sum the warp's channels of dB / dC per (step, n): float4 reads of the scratch
                    // (cheaper than shuffles: one add per value and channel), fixed order.
                    __syncwarp(mask);
                    const float* w = s_scr + warp * (kUB * MC * 2 * NP);
                    for (int it = threadIdx.x & 31; it < kUB * 2 * NP / 4; it += 32) {
                        const int k = it / (2 * NP / 4), f = (it - k * (2 * NP / 4)) * 4;
                        float4 acc = *reinterpret_cast<const float4*>(w + k * MC * 2 * NP + f);
                        const int fs = f < NP ? f + NP : f - NP;  // f in an odd channel
#pragma unroll 4
                        for (int m = 1; m < MC; ++m) {
                            const float4 v = *reinterpret_cast<const float4*>(w + (k * MC + m) * 2 * NP + ((m & 1) ? fs : f));
                            acc.x += v.x;
                            acc.y += v.y;
                            acc.z += v.z;
                            acc.w += v.w;
                        }
                        const int which = f / NP, n = f - which * NP, i = ui * kUB + k;
                        const int ii = (ts + i) % kFl;
                        s_part[part_at(warp, which, n, ii)] = acc.x;
                        s_part[part_at(warp, which, n + 1, ii)] = acc.y;
                        s_part[part_at(warp, which, n + 2, ii)] = acc.z;
                        s_part[part_at(warp, which, n + 3, ii)] = acc.w;
                    }
                    __syncwarp(mask);
                }
                reduce_scatter<kUB, kG, 1>(pdu, j, mask);
                reduce_scatter<kUB, kG, 1>(pdt, j, mask);
                __syncwarp(mask);  // the channel's lanes have read dt and u of this unit
                typedef RS<kUB, kG> R;
                if (R::owner(j)) {
#pragma unroll
                    for (int r = 0; r < R::R; ++r) {
                        const int t = ts + ui * kUB + R::blk(j) * R::R + r;
                        const int idx = c * TP + t;
                        const float su = pdu[r];
                        const float dt = s_dt[idx];
                        float gx = fmaf(s_u[idx], su, LN2_F * pdt[r]);
                        // d softplus(x) / dx = sigmoid(x) = 1 - exp(-softplus(x)), from dt itself.
                        if (p.delta_softplus) gx *= kInType == 0 ? -expm1f(-dt) : one_minus_exp_neg_mufu(dt);
                        s_u[idx] = fmaf(Dv, s_dy[idx], dt * su);
                        s_dt[idx] = gx;
                        if (t < len) dbc += gx;
                    }
                }
                if ((kVarB || kVarC) && (ts + ui * kUB) % kFl == 0) {
                    // Sum the warps' dB / dC slices in a fixed order and add the block's partial to
                    // its chain's sums after the tile before it in the chain.
                    int* const flag = flags + t0 + ts + ui * kUB;
                    if (threadIdx.x == 0 && pos > 0 && chained)
                        while (ld_acquire(flag) < pos) {
                        }
                    __syncthreads();
                    constexpr int OUT = 2 * NP * kFl;  // (half, n, step) values per flush
                    if (OUT % kMaxThreads == 0 && blockDim.x == kMaxThreads) {
                        // A full block: compile-time trip counts and warp sums. Each thread
                        // keeps one step (kMaxThreads is a multiple of kFl) and walks rows of
                        // (half, n). ncu at the main shape: the general loop below was 11% of
                        // the backward's instructions and 20% of its stall samples.
                        const int ii = threadIdx.x % kFl, t = ts + ui * kUB + ii;
#pragma unroll
                        for (int q = 0; q < OUT / kMaxThreads; ++q) {
                            const int r = threadIdx.x / kFl + q * (kMaxThreads / kFl);
                            const int which = r / NP, n = r - which * NP;
                            float v = 0.f;
#pragma unroll
                            for (int w = 0; w < kMaxThreads / 32; ++w) v += s_part[part_at(w, which, n, ii)];
                            if (n < N && t < len && (which ? VAR_C : VAR_B)) {
                                float* const dst = (which ? ws_dC : ws_dB) + (long long)n * L + t0 + t;
                                *dst = (which ? addC : addB) ? v + __ldcg(dst) : v;
                            }
                        }
                    } else {
                        for (int m = threadIdx.x; m < OUT; m += blockDim.x) {
                            const int ii = m % kFl, n = (m / kFl) % NP, which = m / (kFl * NP);
                            const int t = ts + ui * kUB + ii;
                            if (n >= N || t >= len || (which == 0 && !VAR_B) || (which == 1 && !VAR_C)) continue;
                            float v = 0.f;
                            for (int w = 0; w < nwarps; ++w) v += s_part[part_at(w, which, n, ii)];
                            float* const dst = (which ? ws_dC : ws_dB) + (long long)n * L + t0 + t;
                            *dst = (which ? addC : addB) ? v + __ldcg(dst) : v;
                        }
                    }
                    __syncthreads();
                    if (threadIdx.x == 0 && chained) st_release(flag, pos + 1);
                }
            }
        }
        if (bm0 & 1u) {
            seq_store<kKS>(p, p.dinitial_state_ptr, seq_at(p, b, t0), d, j, live, g);
            seq_load<kKS>(p, dfp, seq_at(p, b, t0 - 1), d, j, live, g);
        }
        dD += dDc;
        dbias += dbc;
#pragma unroll
        for (int s = 0; s < kKS; ++s) dA[s] += dAc[s];
        __syncthreads();
        for (int i = threadIdx.x; i < rows * (T / VEC); i += blockDim.x) {
            const int cc = i / (T / VEC), t = St::first(i - cc * (T / VEC));
            if (cc >= kch || t >= len) continue;
            const long long dd = d0 + cc;
#pragma unroll
            for (int k = 0; k < VEC; k += 4) {
                const int e = St::pos(t, k), a = cc * TP + e;
                st4<kInType>(du + dd * p.du_d_stride + t0 + e, len - e, &s_u[a]);
                st4<kInType>(ddelta + dd * p.ddelta_d_stride + t0 + e, len - e, &s_dt[a]);
                if (HAS_Z) st4<kInType>(dz + dd * p.dz_d_stride + t0 + e, len - e, &s_z[a]);
            }
        }
    }
    // Per-channel results.
#pragma unroll
    for (int m = 1; m < kG; m *= 2) {
        dD += __shfl_xor_sync(mask, dD, m);
        dbias += __shfl_xor_sync(mask, dbias, m);
    }
    if (live) {
        float* slot = ws + ((long long)b * p.dim + d) * (3 * N + 2);
#pragma unroll
        for (int s = 0; s < kKS; ++s) {
            const int n = j * kKS + s;
            if (n < N) {
                slot[n] = dA[s];
                slot[N + n] = dBf[s];
                slot[2 * N + n] = dCf[s];
                if (p.dinitial_state_ptr && !p.has_seq_idx) ((float*)p.dinitial_state_ptr)[((long long)b * p.dim + d) * N + n] = g[s];
            }
        }
        if (j == 0) {
            slot[3 * N] = dD;
            slot[3 * N + 1] = dbias;
        }
    }
}

// Second stage: fixed-order sums of the workspace into the gradient outputs. One thread per
// output element: dA, fixed dB/dC, dD, ddelta_bias (sums over batch), variable dB/dC (sums over
// the channel tiles of each group).
extern "C" __global__ void ssm_bwd_reduce(const SsmParams p, const int kch, const int slots) {
    typedef typename InType<kInType>::t in_t;
    const int N = p.dstate, L = p.seqlen, dim = p.dim;
    const long long per = 3 * N + 2;
    const float* ws = (const float*)p.workspace_ptr;
    const long long n_small = (long long)dim * (3 * N + 2);
    // Variable dB / dC in items of 4 steps: float4 partial reads where rows are 16-byte aligned.
    const long long L4 = (L + 3) / 4;
    const bool vec = L % 4 == 0;
    const long long qb = VAR_B ? (long long)p.batch * p.b_ngroups * N * L4 : 0;
    const long long qc = VAR_C ? (long long)p.batch * p.c_ngroups * N * L4 : 0;
    const long long total = n_small + qb + qc;
    const long long tiles = dim / kch;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        if (i < n_small) {
            const int dd = (int)(i / per), k = (int)(i - dd * per);
            float v = 0.f;
            for (int bb = 0; bb < p.batch; ++bb) v += ws[((long long)bb * dim + dd) * per + k];
            if (k < N) {
                ((float*)p.da_ptr)[(long long)dd * N + k] = v;
            } else if (k < 2 * N) {
                if (!VAR_B) ((float*)p.db_ptr)[dd * p.db_group_stride + (k - N) * p.db_dstate_stride] = v;
            } else if (k < 3 * N) {
                if (!VAR_C) ((float*)p.dc_ptr)[dd * p.dc_group_stride + (k - 2 * N) * p.dc_dstate_stride] = v;
            } else if (k == 3 * N) {
                if (p.has_d) ((float*)p.dd_ptr)[dd] = v;
            } else {
                if (p.has_delta_bias) ((float*)p.ddelta_bias_ptr)[dd] = v;
            }
            continue;
        }
        // Variable dB / dC: q indexes 4 consecutive steps of one (batch, group, n) row.
        const long long q = i - n_small;
        const bool isb = q < qb;
        const long long jq = isb ? q : q - qb;
        const int ng = isb ? p.b_ngroups : p.c_ngroups;
        const long long row = jq / L4;
        const int t = (int)(jq - row * L4) * 4;
        const int n = (int)(row % N);
        const int gg = (int)((row / N) % ng);
        const int bb = (int)(row / ((long long)N * ng));
        // Groups per chain: all of them, or the one of its tile where each tile is a chain.
        const bool chained = kBwdChains && slots < tiles;
        const int per = chained ? ng : 1;
        const float* sums = ws + ws_chan_size(p) + ws_count_size(p, slots, chained) +
                            (isb ? 0 : (VAR_B ? ws_sum_size(p, slots, chained ? p.b_ngroups : 1) : 0));
        // The group's tiles gg tpg + k, k < tpg, sit in the chains (gg tpg + k) mod slots: its
        // first min(slots, tpg) tiles name the chains that hold its sums, in a fixed order.
        const int tpg = (int)(tiles / ng), first = gg * tpg, nch = min(slots, tpg);
        const long long stride = (long long)per * N * L;  // between two chains
        const float* src = sums + (((long long)bb * slots * per + (chained ? gg : 0)) * N + n) * L + t;
        float4 v = f4(0.f, 0.f, 0.f, 0.f);
        if (vec) {
            // Fixed order, several loads in flight.
#pragma unroll 4
            for (int k = 0; k < nch; ++k) {
                const float4 w = *reinterpret_cast<const float4*>(src + ((first + k) % slots) * stride);
                v.x += w.x;
                v.y += w.y;
                v.z += w.z;
                v.w += w.w;
            }
        } else {
            const int m = min(4, L - t);
#pragma unroll 4
            for (int k = 0; k < nch; ++k) {
                const float* r = src + ((first + k) % slots) * stride;
                v.x += r[0];
                if (m > 1) v.y += r[1];
                if (m > 2) v.z += r[2];
                if (m > 3) v.w += r[3];
            }
        }
        in_t* dst = isb ? (in_t*)p.db_ptr + bb * p.db_batch_stride + gg * p.db_group_stride + n * p.db_dstate_stride + t
                        : (in_t*)p.dc_ptr + bb * p.dc_batch_stride + gg * p.dc_group_stride + n * p.dc_dstate_stride + t;
        const float vv[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int e = 0; e < 4; ++e)
            if (t + e < L) dst[e] = from_f<kInType>(vv[e]);
    }
}
