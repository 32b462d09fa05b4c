//! One contract per op, used by both backends: its arguments, their checks (shapes, dtypes,
//! devices, writability) and the plan the backends run. `scan` (selective scan forward and
//! backward), `conv1d` (causal conv1d forward, backward, decoding update), `state_update` (the
//! decoding step of the scan); `args` holds the checks they share.

pub mod args;
pub mod conv1d;
pub mod scan;
pub mod state_update;
