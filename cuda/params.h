// Mirror of src/params.rs (SsmParams). Strides are in elements, not bytes.
// Plain C, natural alignment; src/params.rs checks size and offsets against this file.
#pragma once

struct SsmParams {

    int batch;
    int dim;
    int seqlen;
    int dstate;
    // Number of groups of a variable B / C (1 for (batch, dstate, seqlen) inputs).
    int b_ngroups;
    int c_ngroups;
    // Saved states: one (dstate,) fp32 vector per `chunk_size` steps, at the chunk's end.
    int chunk_size;
    int n_chunks;
    // Flags (0/1); the CUDA kernels take these as compile-time constants instead.
    int is_variable_b;
    int is_variable_c;
    int has_d;
    int has_z;
    int has_delta_bias;
    int delta_softplus;
    int has_initial_state;
    int has_dlast_state;
    // Packed sequences (see src/params.rs): the state restarts where seq_idx changes.
    int has_seq_idx;
    int num_seqs;

    // Inputs.
    unsigned long long u_ptr;
    unsigned long long delta_ptr;
    unsigned long long a_ptr;
    unsigned long long b_ptr;
    unsigned long long c_ptr;
    unsigned long long d_ptr;
    unsigned long long z_ptr;
    unsigned long long delta_bias_ptr;
    unsigned long long initial_state_ptr;
    // Forward outputs: out (batch, dim, seqlen) and chunk states (batch, dim, n_chunks, dstate).
    unsigned long long out_ptr;
    unsigned long long states_ptr;
    // Backward: incoming gradients.
    unsigned long long dout_ptr;
    unsigned long long dlast_state_ptr;
    // Backward: outputs.
    unsigned long long du_ptr;
    unsigned long long ddelta_ptr;
    unsigned long long dz_ptr;
    unsigned long long da_ptr;
    unsigned long long db_ptr;
    unsigned long long dc_ptr;
    unsigned long long dd_ptr;
    unsigned long long ddelta_bias_ptr;
    unsigned long long dinitial_state_ptr;
    // fp32 scratch for deterministic two-stage reductions (layout chosen by the backend).
    unsigned long long workspace_ptr;
    // seq_idx (batch, seqlen) int32; final_states (num_seqs, dim, dstate) or 0.
    unsigned long long seq_idx_ptr;
    unsigned long long final_states_ptr;
    long long seq_idx_batch_stride;

    // Strides, in elements. (batch, dim, seqlen) tensors: batch and dim strides.
    long long u_batch_stride;
    long long u_d_stride;
    long long delta_batch_stride;
    long long delta_d_stride;
    long long z_batch_stride;
    long long z_d_stride;
    long long out_batch_stride;
    long long out_d_stride;
    long long dout_batch_stride;
    long long dout_d_stride;
    long long du_batch_stride;
    long long du_d_stride;
    long long ddelta_batch_stride;
    long long ddelta_d_stride;
    long long dz_batch_stride;
    long long dz_d_stride;
    // A: (dim, dstate).
    long long a_d_stride;
    long long a_dstate_stride;
    // B: variable (batch, ngroups, dstate, seqlen) or fixed (dim, dstate), in which case the
    // group stride is the dim stride and the batch stride is unused.
    long long b_batch_stride;
    long long b_group_stride;
    long long b_dstate_stride;
    long long c_batch_stride;
    long long c_group_stride;
    long long c_dstate_stride;
    // dB/dC follow the same layout rules as B/C.
    long long db_batch_stride;
    long long db_group_stride;
    long long db_dstate_stride;
    long long dc_batch_stride;
    long long dc_group_stride;
    long long dc_dstate_stride;
};

// A strided tensor of the small kernels (decoding step, causal conv1d). ptr 0: absent.
// dtype: 0 float32, 1 float16, 2 bfloat16, 4 int32, 5 int64. Strides in elements, outermost
// first, unused trailing entries 0.
struct TensorRef {
    unsigned long long ptr;
    int dtype;
    int ndim;
    long long stride[4];
};

// selective_state_update on CUDA. state (state_rows, nheads, dim, dstate); x, dt, z, out
// (batch, nheads, dim); A (nheads, dim, dstate); B, C (batch, ngroups, dstate); D, dt_bias
// (nheads, dim); idx (batch,) rows of the state, negative for padding.
struct StateUpdateParams {
    int batch;
    int nheads;
    int dim;
    int dstate;
    // nheads / ngroups.
    int heads_per_group;
    int state_rows;
    int dt_softplus;
    // Lanes per (batch, head, channel) row; each lane owns states lane, lane + group, ...
    int group;
    TensorRef state;
    TensorRef x;
    TensorRef dt;
    TensorRef a;
    TensorRef b;
    TensorRef c;
    TensorRef d;
    TensorRef z;
    TensorRef dt_bias;
    TensorRef out;
    TensorRef idx;
};

// causal_conv1d forward / backward / decoding update on CUDA. x, out, dout, dx (batch, dim,
// seqlen) with any strides (x's layout picks the thread mapping); weight, dweight (dim, width);
// bias, dbias (dim,); initial, final_states, dfinal, dinitial (batch, dim, width - 1); seq_idx
// (batch, seqlen); conv_state (state_rows, dim, state_len); cache_seqlens, state_idx (batch,).
struct ConvParams {
    int batch;
    int dim;
    int seqlen;
    int width;
    int silu;
    // 1 when x's seqlen stride is 1 (channel-first): threads run along seqlen, else along dim.
    int l_fast;
    // Backward: tiles along seqlen per batch entry (one fp32 partial of dweight / dbias each).
    int n_ltiles;
    int state_len;
    int state_rows;
    int pad;
    TensorRef x;
    TensorRef weight;
    TensorRef bias;
    TensorRef seq_idx;
    TensorRef initial;
    TensorRef out;
    TensorRef final_states;
    TensorRef dout;
    TensorRef dfinal;
    TensorRef dx;
    TensorRef dweight;
    TensorRef dbias;
    TensorRef dinitial;
    TensorRef conv_state;
    TensorRef cache_seqlens;
    TensorRef state_idx;
    // fp32 partial sums (batch * n_ltiles, dim, width + 1) of the backward.
    unsigned long long workspace_ptr;
};
