//! The one flat parameter block of the selective scan, shared by the CPU kernels and the CUDA
//! kernels. `cuda/params.h` mirrors it field for field; `tests::layout_matches_header` checks
//! size and offsets against that header so the two can never drift apart.
//!
//! Pointers are raw addresses (`u64`) of host or device memory; strides are in elements, not
//! bytes. The last dimension of every sequence tensor has stride 1 (checked at the boundary).

/// Flat parameters of one selective-scan call (forward and backward).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SsmParams {
    pub batch: i32,
    pub dim: i32,
    pub seqlen: i32,
    pub dstate: i32,
    /// Number of groups of a variable B / C (1 for (batch, dstate, seqlen) inputs).
    pub b_ngroups: i32,
    pub c_ngroups: i32,
    /// Saved states: one (dstate,) fp32 vector per `chunk_size` steps, at the chunk's end.
    pub chunk_size: i32,
    pub n_chunks: i32,
    /// Flags (0/1); the CUDA kernels take these as compile-time constants instead.
    pub is_variable_b: i32,
    pub is_variable_c: i32,
    pub has_d: i32,
    pub has_z: i32,
    pub has_delta_bias: i32,
    pub delta_softplus: i32,
    pub has_initial_state: i32,
    pub has_dlast_state: i32,
    /// Packed sequences: `seq_idx` (batch, seqlen) int32 is given; the state restarts where it
    /// changes along a row. `initial_state`, `dlast_state`, `dinitial_state` and `final_states`
    /// are then per sequence, (num_seqs, dim, dstate), indexed by the seq_idx value (values
    /// outside [0, num_seqs) read and write no state).
    pub has_seq_idx: i32,
    pub num_seqs: i32,

    // Inputs.
    pub u_ptr: u64,
    pub delta_ptr: u64,
    pub a_ptr: u64,
    pub b_ptr: u64,
    pub c_ptr: u64,
    pub d_ptr: u64,
    pub z_ptr: u64,
    pub delta_bias_ptr: u64,
    pub initial_state_ptr: u64,
    // Forward outputs: out (batch, dim, seqlen) and chunk states (batch, dim, n_chunks, dstate).
    pub out_ptr: u64,
    pub states_ptr: u64,
    // Backward: incoming gradients.
    pub dout_ptr: u64,
    pub dlast_state_ptr: u64,
    // Backward: outputs.
    pub du_ptr: u64,
    pub ddelta_ptr: u64,
    pub dz_ptr: u64,
    pub da_ptr: u64,
    pub db_ptr: u64,
    pub dc_ptr: u64,
    pub dd_ptr: u64,
    pub ddelta_bias_ptr: u64,
    pub dinitial_state_ptr: u64,
    /// fp32 scratch for deterministic two-stage reductions (layout chosen by the backend).
    pub workspace_ptr: u64,
    /// seq_idx (batch, seqlen) int32, last stride 1; final_states (num_seqs, dim, dstate) or 0.
    pub seq_idx_ptr: u64,
    pub final_states_ptr: u64,
    pub seq_idx_batch_stride: i64,

    // Strides, in elements. (batch, dim, seqlen) tensors: batch and dim strides.
    pub u_batch_stride: i64,
    pub u_d_stride: i64,
    pub delta_batch_stride: i64,
    pub delta_d_stride: i64,
    pub z_batch_stride: i64,
    pub z_d_stride: i64,
    pub out_batch_stride: i64,
    pub out_d_stride: i64,
    pub dout_batch_stride: i64,
    pub dout_d_stride: i64,
    pub du_batch_stride: i64,
    pub du_d_stride: i64,
    pub ddelta_batch_stride: i64,
    pub ddelta_d_stride: i64,
    pub dz_batch_stride: i64,
    pub dz_d_stride: i64,
    /// A: (dim, dstate).
    pub a_d_stride: i64,
    pub a_dstate_stride: i64,
    /// B: variable (batch, ngroups, dstate, seqlen) or fixed (dim, dstate), in which case the
    /// group stride is the dim stride and the batch stride is unused.
    pub b_batch_stride: i64,
    pub b_group_stride: i64,
    pub b_dstate_stride: i64,
    pub c_batch_stride: i64,
    pub c_group_stride: i64,
    pub c_dstate_stride: i64,
    /// dB/dC follow the same layout rules as B/C.
    pub db_batch_stride: i64,
    pub db_group_stride: i64,
    pub db_dstate_stride: i64,
    pub dc_batch_stride: i64,
    pub dc_group_stride: i64,
    pub dc_dstate_stride: i64,
}

impl SsmParams {
    /// Channels per group of B (variable B only).
    pub fn b_group_of(&self, d: i32) -> i32 {
        d / (self.dim / self.b_ngroups)
    }
    pub fn c_group_of(&self, d: i32) -> i32 {
        d / (self.dim / self.c_ngroups)
    }
}

/// A strided tensor of the small CUDA kernels (`TensorRef` in cuda/params.h). `ptr` 0: absent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TensorRef {
    pub ptr: u64,
    /// 0 float32, 1 float16, 2 bfloat16, 4 int32, 5 int64.
    pub dtype: i32,
    pub ndim: i32,
    /// Strides in elements, outermost first; unused entries 0.
    pub stride: [i64; 4],
}

/// selective_state_update on CUDA (`StateUpdateParams` in cuda/params.h).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StateUpdateParams {
    pub batch: i32,
    pub nheads: i32,
    pub dim: i32,
    pub dstate: i32,
    pub heads_per_group: i32,
    pub state_rows: i32,
    pub dt_softplus: i32,
    /// Lanes per (batch, head, channel) row.
    pub group: i32,
    pub state: TensorRef,
    pub x: TensorRef,
    pub dt: TensorRef,
    pub a: TensorRef,
    pub b: TensorRef,
    pub c: TensorRef,
    pub d: TensorRef,
    pub z: TensorRef,
    pub dt_bias: TensorRef,
    pub out: TensorRef,
    pub idx: TensorRef,
}

/// causal conv1d forward / backward / update on CUDA (`ConvParams` in cuda/params.h).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ConvParams {
    pub batch: i32,
    pub dim: i32,
    pub seqlen: i32,
    pub width: i32,
    pub silu: i32,
    /// 1 when x's seqlen stride is 1 (threads run along seqlen), else 0 (along dim).
    pub l_fast: i32,
    pub n_ltiles: i32,
    pub state_len: i32,
    pub state_rows: i32,
    pub pad: i32,
    pub x: TensorRef,
    pub weight: TensorRef,
    pub bias: TensorRef,
    pub seq_idx: TensorRef,
    pub initial: TensorRef,
    pub out: TensorRef,
    pub final_states: TensorRef,
    pub dout: TensorRef,
    pub dfinal: TensorRef,
    pub dx: TensorRef,
    pub dweight: TensorRef,
    pub dbias: TensorRef,
    pub dinitial: TensorRef,
    pub conv_state: TensorRef,
    pub cache_seqlens: TensorRef,
    pub state_idx: TensorRef,
    pub workspace_ptr: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// (field, offset) of `struct name` in cuda/params.h and its size, as a C compiler lays it
    /// out (plain C, natural alignment: offsets follow from the types; every struct there has
    /// 8-byte alignment).
    fn header_layout(name: &str) -> (Vec<(String, usize)>, usize) {
        let header = include_str!("../cuda/params.h");
        let body = header
            .split(&format!("struct {name} {{"))
            .nth(1)
            .unwrap_or_else(|| panic!("struct {name} in params.h"))
            .split("};")
            .next()
            .unwrap();
        let mut offset = 0usize;
        let mut fields = Vec::new();
        for line in body.lines() {
            let line = line.split("//").next().unwrap().trim();
            if line.is_empty() {
                continue;
            }
            let line = line.trim_end_matches(';');
            let (ty, name) = line.rsplit_once(' ').expect("type name;");
            let (name, count) = match name.split_once('[') {
                Some((n, c)) => (n, c.trim_end_matches(']').parse::<usize>().unwrap()),
                None => (name, 1),
            };
            let (size, align) = match ty.trim() {
                "int" => (4, 4),
                "long long" | "unsigned long long" => (8, 8),
                "TensorRef" => (header_layout("TensorRef").1, 8),
                other => panic!("unexpected type {other} in params.h"),
            };
            offset = offset.div_ceil(align) * align;
            fields.push((name.trim().to_string(), offset));
            offset += size * count;
        }
        (fields, offset.div_ceil(8) * 8)
    }

    #[test]
    fn layout_matches_header() {
        let (fields, total) = header_layout("SsmParams");
        assert_eq!(total, size_of::<SsmParams>(), "sizeof(SsmParams)");
        macro_rules! check {
            ($($f:ident),*) => {{
                let mut n = 0;
                $(
                    let want = fields.iter().find(|(k, _)| k == stringify!($f))
                        .unwrap_or_else(|| panic!("{} missing from params.h", stringify!($f))).1;
                    assert_eq!(offset_of!(SsmParams, $f), want, "offset of {}", stringify!($f));
                    n += 1;
                )*
                assert_eq!(n, fields.len(), "params.h has fields the Rust struct lacks");
            }};
        }
        check!(
            batch,
            dim,
            seqlen,
            dstate,
            b_ngroups,
            c_ngroups,
            chunk_size,
            n_chunks,
            is_variable_b,
            is_variable_c,
            has_d,
            has_z,
            has_delta_bias,
            delta_softplus,
            has_initial_state,
            has_dlast_state,
            has_seq_idx,
            num_seqs,
            u_ptr,
            delta_ptr,
            a_ptr,
            b_ptr,
            c_ptr,
            d_ptr,
            z_ptr,
            delta_bias_ptr,
            initial_state_ptr,
            out_ptr,
            states_ptr,
            dout_ptr,
            dlast_state_ptr,
            du_ptr,
            ddelta_ptr,
            dz_ptr,
            da_ptr,
            db_ptr,
            dc_ptr,
            dd_ptr,
            ddelta_bias_ptr,
            dinitial_state_ptr,
            workspace_ptr,
            seq_idx_ptr,
            final_states_ptr,
            seq_idx_batch_stride,
            u_batch_stride,
            u_d_stride,
            delta_batch_stride,
            delta_d_stride,
            z_batch_stride,
            z_d_stride,
            out_batch_stride,
            out_d_stride,
            dout_batch_stride,
            dout_d_stride,
            du_batch_stride,
            du_d_stride,
            ddelta_batch_stride,
            ddelta_d_stride,
            dz_batch_stride,
            dz_d_stride,
            a_d_stride,
            a_dstate_stride,
            b_batch_stride,
            b_group_stride,
            b_dstate_stride,
            c_batch_stride,
            c_group_stride,
            c_dstate_stride,
            db_batch_stride,
            db_group_stride,
            db_dstate_stride,
            dc_batch_stride,
            dc_group_stride,
            dc_dstate_stride
        );
    }

    macro_rules! check_struct {
        ($ty:ident: $($f:ident),*) => {{
            let (fields, total) = header_layout(stringify!($ty));
            assert_eq!(total, size_of::<$ty>(), "sizeof({})", stringify!($ty));
            let mut n = 0;
            $(
                let want = fields.iter().find(|(k, _)| k == stringify!($f))
                    .unwrap_or_else(|| panic!("{} missing from params.h", stringify!($f))).1;
                assert_eq!(offset_of!($ty, $f), want, "offset of {}", stringify!($f));
                n += 1;
            )*
            assert_eq!(n, fields.len(), "params.h has fields {} lacks", stringify!($ty));
        }};
    }

    #[test]
    fn small_kernel_layouts_match_header() {
        check_struct!(TensorRef: ptr, dtype, ndim, stride);
        check_struct!(StateUpdateParams: batch, nheads, dim, dstate, heads_per_group, state_rows,
            dt_softplus, group, state, x, dt, a, b, c, d, z, dt_bias, out, idx);
        check_struct!(ConvParams: batch, dim, seqlen, width, silu, l_fast, n_ltiles, state_len,
            state_rows, pad, x, weight, bias, seq_idx, initial, out, final_states, dout, dfinal,
            dx, dweight, dbias, dinitial, conv_state, cache_seqlens, state_idx, workspace_ptr);
    }
}
