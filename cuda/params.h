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
