//! Launch of the decoding step (cuda/state_update.cu). The contract is `ops::state_update`'s,
//! run for the tensors' CUDA device; the index tensor stays on the device (the kernel treats an
//! out-of-range row as documented in state_update.cu instead of the host checking it, which
//! would need a synchronisation).

use super::compile::Program;
use super::strided::{cdiv, cuda_ordinal, entry, i32_of, int_ref, launch, opt_ref, tref};
use crate::error::{Result, shape_err};
use crate::ops::state_update::{UpdateArgs, check};
use crate::params::{StateUpdateParams, TensorRef};

/// One decoding step on CUDA (see `cpu::state_update` for the semantics and shapes).
pub fn state_update(a: &UpdateArgs, stream: u64) -> Result<()> {
    let ordinal = cuda_ordinal(a.state, "state")?;
    check(a, a.state.device)?;
    let s = a.state;
    let (h, p, n) = (s.shape[1], s.shape[2], s.shape[3]);
    let bt = a.x.shape[0];
    if n > 256 {
        return Err(shape_err(
            "state",
            format!("dstate must be <= 256 on CUDA; got {n}"),
        ));
    }
    // Lanes per row: 8 consecutive states each.
    let group = ((n.max(1) as u64).div_ceil(8).next_power_of_two() as i32).min(32);
    let want = format!(
        "state_update_s{}_g{group}",
        super::in_type(a.state.dtype, "state")?
    );
    let name = entry(Program::StateUpdate, &want)?;
    let mut idx = TensorRef::default();
    if let Some(iv) = a.device_indices {
        idx = int_ref(iv, "state_batch_indices", &[bt], s.device)?;
    }
    let prm = StateUpdateParams {
        batch: i32_of(bt, "x")?,
        nheads: i32_of(h, "state")?,
        dim: i32_of(p, "state")?,
        dstate: n as i32,
        heads_per_group: (h / a.b.shape[1]) as i32,
        state_rows: i32_of(s.shape[0], "state")?,
        dt_softplus: a.dt_softplus as i32,
        group,
        state: tref(a.state, "state")?,
        x: tref(a.x, "x")?,
        dt: tref(a.dt, "dt")?,
        a: tref(a.a, "A")?,
        b: tref(a.b, "B")?,
        c: tref(a.c, "C")?,
        d: opt_ref(a.d, "D")?,
        z: opt_ref(a.z, "z")?,
        dt_bias: opt_ref(a.dt_bias, "dt_bias")?,
        out: tref(a.out, "out")?,
        idx,
    };
    if bt > 65535 || h > 65535 {
        return Err(shape_err(
            "x",
            format!("batch ({bt}) and nheads ({h}) must be <= 65535 on CUDA"),
        ));
    }
    let threads = 128i64;
    let rows_per_block = threads / group as i64;
    launch(
        Program::StateUpdate,
        ordinal,
        name,
        (cdiv(p, rows_per_block) as u32, h as u32, bt as u32),
        threads as u32,
        &prm,
        stream,
    )
}
