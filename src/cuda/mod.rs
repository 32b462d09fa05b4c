//! The CUDA runtime: the primary context of the tensor's device, NVRTC-compiled kernels cached
//! per device and specialisation, launches on the caller's (torch's) stream. No device memory is
//! allocated here and nothing synchronises with the host, so calls are CUDA-graph capturable.

pub mod compile;
pub mod conv1d;
pub mod state_update;
mod strided;

use crate::dlpack::{DType, Device};
use crate::error::{Result, ScanError};
use crate::ops::scan::Plan;
use compile::{BWD_SUB_TILE, KernelSpec, Program, chunk_for_layout, compile_cached, layout_for};
use cudarc::driver::{result as drv, sys};
use std::collections::HashMap;
use std::ffi::{CString, c_void};
use std::sync::{Mutex, OnceLock};

fn driver_err(what: &str) -> impl Fn(drv::DriverError) -> ScanError + '_ {
    move |e| {
        let name = e
            .error_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|_| format!("{:?}", e.0));
        ScanError::Cuda {
            name,
            msg: what.to_string(),
        }
    }
}

pub fn driver_present() -> Result<()> {
    // SAFETY: only probes whether the shared library can be loaded.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(ScanError::Library(
            "libcuda (the NVIDIA driver) could not be loaded".into(),
        ))
    }
}

struct DeviceState {
    ctx: sys::CUcontext,
    arch: String,
    /// Streaming multiprocessors (the backward's tile choice counts waves of blocks).
    sms: i32,
    funcs: HashMap<(Program, &'static str), sys::CUfunction>,
    /// Dynamic shared memory and resident blocks per SM of a scan kernel for a block size (the
    /// occupancy calculator, once).
    occupancy: HashMap<(Program, u32), (u32, i32)>,
    /// Dynamic shared memory each function has been allowed so far (cuFuncSetAttribute once per
    /// function and size, not on every launch).
    smem_allowed: HashMap<(Program, &'static str), u32>,
}

// SAFETY: CUcontext / CUfunction are opaque driver handles, valid from any thread; every use
// happens under the registry's mutex.
unsafe impl Send for DeviceState {}

fn registry() -> &'static Mutex<HashMap<i32, DeviceState>> {
    static R: OnceLock<Mutex<HashMap<i32, DeviceState>>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(HashMap::new()))
}

fn device_state(map: &mut HashMap<i32, DeviceState>, ordinal: i32) -> Result<&mut DeviceState> {
    #[allow(clippy::map_entry)] // the insert needs fallible driver calls first
    if !map.contains_key(&ordinal) {
        driver_present()?;
        drv::init().map_err(driver_err("cuInit"))?;
        let dev = drv::device::get(ordinal).map_err(driver_err("cuDeviceGet"))?;
        // SAFETY: `dev` is a valid device; retaining the primary context shares torch's.
        let ctx = unsafe { drv::primary_ctx::retain(dev) }
            .map_err(driver_err("cuDevicePrimaryCtxRetain"))?;
        // SAFETY: valid device handle and attribute enums.
        let attr = |a| unsafe {
            // SAFETY: valid device handle and attribute enum.
            drv::device::get_attribute(dev, a).map_err(driver_err("cuDeviceGetAttribute"))
        };
        use sys::CUdevice_attribute as A;
        let major = attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let sms = attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        map.insert(
            ordinal,
            DeviceState {
                ctx,
                arch: format!("sm_{major}{minor}"),
                sms,
                funcs: HashMap::new(),
                smem_allowed: HashMap::new(),
                occupancy: HashMap::new(),
            },
        );
    }
    let st = map.get_mut(&ordinal).unwrap();
    // SAFETY: a retained primary context.
    unsafe { drv::ctx::set_current(st.ctx) }.map_err(driver_err("cuCtxSetCurrent"))?;
    Ok(st)
}

fn function(st: &mut DeviceState, spec: Program, name: &'static str) -> Result<sys::CUfunction> {
    if let Some(f) = st.funcs.get(&(spec, name)) {
        return Ok(*f);
    }
    let cubin = compile_cached(&spec, &st.arch)?;
    // SAFETY: the cubin was produced by NVRTC for this device's arch (or read back from the
    // checksummed cache); the context is current. Modules are kept for the process lifetime.
    unsafe {
        let module = drv::module::load_data(cubin.as_ptr() as *const c_void)
            .map_err(driver_err("cuModuleLoadData"))?;
        for entry in spec.entries() {
            let f = drv::module::get_function(module, CString::new(*entry).unwrap())
                .map_err(driver_err("cuModuleGetFunction"))?;
            st.funcs.insert((spec, entry), f);
        }
    }
    st.funcs
        .get(&(spec, name))
        .copied()
        .ok_or_else(|| ScanError::Cuda {
            name: "CUDA_ERROR_NOT_FOUND".into(),
            msg: format!("kernel {name} missing from its module"),
        })
}

/// The kernels' dtype code (0 float32, 1 float16, 2 bfloat16) of argument `arg`.
pub fn in_type(d: DType, arg: &str) -> Result<u8> {
    match d {
        DType::F32 => Ok(0),
        DType::F16 => Ok(1),
        DType::BF16 => Ok(2),
        DType::F64 => Err(ScanError::DType {
            arg: arg.into(),
            msg: "float64 is supported on the CPU only".into(),
        }),
    }
}

/// Steps per saved state for a given dstate on CUDA (the shim sizes `states` with it).
pub fn chunk_size(dstate: i32) -> i32 {
    // Both layout families of a dstate share the chunk (the forward's saved states).
    let (ks, g) = layout_for(dstate, false, false);
    chunk_for_layout(ks, g)
}

/// Channels per block at most (64: the one-lane layouts' fp32 tiles would not fit shared memory
/// with 128).
const MAX_CHANNELS: i32 = 64;

/// Threads per block at most: 128, and for the backward's layouts of 8 states per lane
/// (dstate > 32) kBwdWideThreads (default 256; kMaxThreads in cuda/scan_bwd.cu). Those kernels
/// hold one or two 128-thread blocks per SM (over 200 registers), so 256 threads keep the warps
/// per SM and halve the variable dB / dC partials that go through HBM to the reduce kernel.
fn max_threads(ks: u8, backward: bool) -> i32 {
    if backward && ks == 8 && tuned_define("kBwdWideThreads", 256) >= 256 {
        256
    } else {
        128
    }
}

/// Channels per block: the largest power of two up to min(64, max_threads / g) that divides dim
/// and the group size of each variable B / C, so that a block's channels share one B tile and
/// one C tile.
fn channels_per_block(p: &crate::params::SsmParams, ks: u8, g: u8, backward: bool) -> i32 {
    let groups = gcd_groups(p);
    let mut k = (max_threads(ks, backward) / g as i32).min(MAX_CHANNELS);
    while k > 1 && groups % k != 0 {
        k /= 2;
    }
    k
}

fn threads_per_block(kch: i32, g: u8) -> u32 {
    (kch * g as i32).max(32) as u32
}

/// The value of a `-D{name}=` in MAMBA_SCAN_CUDA_DEFINES, else `default`.
fn tuned_define(name: &str, default: u32) -> u32 {
    compile::tuning_defines()
        .iter()
        .rev()
        .find_map(|d| {
            d.strip_prefix("-D")?
                .strip_prefix(name)?
                .strip_prefix('=')?
                .parse::<u32>()
                .ok()
        })
        .unwrap_or(default)
}

fn gcd_groups(p: &crate::params::SsmParams) -> i32 {
    let mut g = p.dim;
    if p.is_variable_b != 0 {
        g = gcd(g, p.dim / p.b_ngroups);
    }
    if p.is_variable_c != 0 {
        g = gcd(g, p.dim / p.c_ngroups);
    }
    g
}

fn gcd(a: i32, b: i32) -> i32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Which layout family: the wide one (2 states per lane, twice the lanes per channel) wins when
/// the deep one (4 per lane) leaves the H200 short of warps, and for fp32 inputs (the deep
/// layout's fp32 tiles limit blocks per SM); measured on the H200 over the benchmark grid
/// (git history of benchmarks/results). Only dstate <= 64 has a choice.
/// MAMBA_SCAN_CUDA_LAYOUT=deep|wide forces a family for 16-bit inputs (tests, tuning).
fn use_wide(p: &crate::params::SsmParams, in_type: u8, backward: bool) -> bool {
    if in_type == 0 {
        // fp32: its deep kernels where the wide family fits are not built (KernelSpec::all).
        return true;
    }
    match std::env::var("MAMBA_SCAN_CUDA_LAYOUT").as_deref() {
        Ok("deep") => return false,
        Ok("wide") => return true,
        _ => {}
    }
    let (_, g) = layout_for(p.dstate, false, false);
    let warps = p.batch as i64 * p.dim as i64 * g as i64 / 32;
    // Backward: wide measured 4.85 vs 5.43 ms at 640 deep warps ((1, 5120, 16, 16384), 2026-11-29).
    warps < if backward { 700 } else { 1056 }
}

/// A scan kernel loaded and allowed its shared memory for `threads`-thread blocks: (function,
/// dynamic shared memory bytes, resident blocks per SM from the driver's occupancy calculator).
fn prepared(
    st: &mut DeviceState,
    spec: KernelSpec,
    threads: u32,
) -> Result<(sys::CUfunction, u32, i32)> {
    let prog = Program::Scan(spec);
    let f = function(st, prog, spec.entry())?;
    if let Some(&(smem, occ)) = st.occupancy.get(&(prog, threads)) {
        return Ok((f, smem, occ));
    }
    let smem = smem_bytes(&spec, threads);
    // SAFETY: `f` belongs to the current context; attribute and sizes are valid.
    let occ = unsafe {
        let allowed = st
            .smem_allowed
            .get(&(prog, spec.entry()))
            .copied()
            .unwrap_or(48 * 1024);
        if smem > allowed {
            drv::function::set_function_attribute(
                f,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(driver_err("cuFuncSetAttribute"))?;
            st.smem_allowed.insert((prog, spec.entry()), smem);
        }
        drv::occupancy::max_active_block_per_multiprocessor(f, threads as i32, smem as usize)
            .map_err(driver_err("cuOccupancyMaxActiveBlocksPerMultiprocessor"))?
    };
    st.occupancy.insert((prog, threads), (smem, occ));
    Ok((f, smem, occ))
}

/// The tile length of a call where the layout has two (`KernelSpec::long_tile`): the 32-step
/// kernels keep more blocks resident per SM (less shared memory, and in the backward <= 168
/// registers); they are taken when that needs fewer waves of `blocks`, the 64-step ones
/// otherwise (fewer tile phases: faster per block, e.g. for long sequences over few channels).
/// MAMBA_SCAN_CUDA_TILE=32|64 forces the choice (tests).
fn choose_tile(
    st: &mut DeviceState,
    spec: KernelSpec,
    threads: u32,
    blocks: i64,
) -> Result<KernelSpec> {
    if !spec.with_long_tile() {
        return Ok(spec);
    }
    let long = KernelSpec {
        long_tile: true,
        ..spec
    };
    match std::env::var("MAMBA_SCAN_CUDA_TILE").as_deref() {
        Ok("32") => return Ok(spec),
        Ok("64") => return Ok(long),
        _ => {}
    }
    let (_, _, occ32) = prepared(st, spec, threads)?;
    let (_, _, occ64) = prepared(st, long, threads)?;
    Ok(if fewer_waves(blocks, st.sms, occ32, occ64) {
        spec
    } else {
        long
    })
}

/// Whether `blocks` take fewer waves over `sms` SMs at `occ_a` resident blocks per SM than at
/// `occ_b` (a zero occupancy counts as one).
fn fewer_waves(blocks: i64, sms: i32, occ_a: i32, occ_b: i32) -> bool {
    let waves = |occ: i32| {
        let per_wave = occ.max(1) as i64 * sms.max(1) as i64;
        (blocks + per_wave - 1) / per_wave
    };
    waves(occ_a) < waves(occ_b)
}

fn spec_of(plan: &Plan, backward: bool) -> Result<KernelSpec> {
    let p = &plan.params;
    let it = in_type(plan.in_dtype, "u")?;
    Ok(KernelSpec::new(
        backward,
        it,
        p.dstate,
        use_wide(p, it, backward),
        p.is_variable_b != 0,
        p.is_variable_c != 0,
        p.has_z != 0,
    ))
}

/// Shared memory (bytes) of one block; mirrors the carve-up at the top of each kernel: fp32
/// tiles, then the raw (input dtype) tiles that cp.async fills one tile ahead, then delta_bias
/// of the block's channels (`rows` floats).
fn smem_bytes(spec: &KernelSpec, threads: u32) -> u32 {
    let t = spec.tile() as u32;
    let tp = t + 4;
    let esz = if spec.in_type == 0 { 4 } else { 2 };
    let rt = t + 16 / esz;
    let rows = threads / spec.g as u32;
    let np = spec.ks as u32 * spec.g as u32;
    let nvar = spec.var_b as u32 + spec.var_c as u32;
    let z = spec.has_z as u32;
    // fp32 B / C tiles, or one tile of packed 16-bit B and C (kPackBC in cuda/common.cuh).
    let packed = !spec.generic
        && spec.var_b
        && spec.var_c
        && spec.in_type != 0
        && np > 16
        && tuned_define("kPackBC", 1) != 0;
    let bc = if packed { t * np } else { nvar * t * np };
    // The generic build's fixed B and C rows of the block's channels (s_fix in both kernels).
    let fixed = if spec.generic { rows * 2 * np } else { 0 };
    let (floats, raw_rows) = if spec.backward {
        let mc = 32 / spec.g as u32;
        let part = if nvar > 0 {
            // part_at in cuda/scan_bwd.cu: [warp][2][n][steps + 1] up to 16 states per
            // channel, else [warp][2][steps][n + 4].
            (threads / 32)
                * 2
                * if np > 16 {
                    bwd_flush_steps(spec) * (np + 4)
                } else {
                    np * (bwd_flush_steps(spec) + 1)
                }
                // The per-warp scratch of the channel sums: kShfl in cuda/scan_bwd.cu.
                + if mc > 1 && !bwd_shuffle_sums(np) {
                    (threads / 32) * 4 * mc * 2 * np
                } else {
                    0
                }
        } else {
            0
        };
        // Last: delta_bias per channel (rows) and the restart offsets' table (t; kBwdOffTable).
        ((3 + z) * rows * tp + bc + part + fixed + rows + t, 3 + z)
    } else {
        ((3 + z) * rows * tp + bc + fixed + rows, 2 + z)
    };
    floats * 4 + (raw_rows * rows + nvar * np) * rt * esz
}

/// Whether the backward sums variable dB / dC over a warp's channels by shuffles (no per-warp
/// scratch in shared memory); mirrors kShfl in cuda/scan_bwd.cu (kBwdShfl: 0 never, 2 always,
/// 1 beyond 16 states per channel).
fn bwd_shuffle_sums(np: u32) -> bool {
    match tuned_define("kBwdShfl", 1) {
        0 => false,
        1 => np > 16,
        _ => true,
    }
}

/// Steps of dB / dC slices the backward keeps in shared memory between two flushes; mirrors
/// kFl in cuda/scan_bwd.cu: kBwdFlW (default an 8-step sub-tile) beyond 64 states per channel,
/// a sub-tile beyond 16, else min(tile, kBwdFl) (32); MAMBA_SCAN_CUDA_DEFINES may set either.
fn bwd_flush_steps(spec: &KernelSpec) -> u32 {
    let np = spec.ks as u32 * spec.g as u32;
    if np > 64 {
        tuned_define("kBwdFlW", BWD_SUB_TILE)
    } else if np > 16 {
        BWD_SUB_TILE
    } else {
        tuned_define("kBwdFl", 32).min(spec.tile() as u32)
    }
}

/// Chains of the backward's variable dB / dC sums (cuda/scan_bwd.cu: each chain holds one fp32
/// copy of dB / dC; the channel tiles of a batch row add to it in turn, after the tile before
/// them in the chain). By default as many chains as tiles: each tile writes its own partial, no
/// waits (the fastest; the partials take batch x tiles x dstate x seqlen floats for each of
/// variable B and C). MAMBA_SCAN_BWD_SLOTS=k (read once per process) takes k chains instead:
/// k copies, at the cost of one hand-over per flush of the sums (measured on the H200: the
/// backward 10-25% slower at dstate 16, 30-70% at 64-256: benchmarks/results/scan_memory_h200.md).
/// Returns (chains, whether they are fewer than the tiles: the hand-over runs).
fn bwd_slots(p: &crate::params::SsmParams, in_type: u8) -> (i32, bool) {
    let tiles = bwd_tiles(p, in_type);
    let slots = compile::bwd_slots_forced().unwrap_or(tiles).clamp(1, tiles);
    (slots as i32, slots < tiles)
}

/// Tiles of channels per batch row of the backward a call of these flags and this input type
/// (0 fp32, 1 fp16, 2 bf16) launches: the layout `spec_of` picks, `channels_per_block` of it.
fn bwd_tiles(p: &crate::params::SsmParams, in_type: u8) -> i64 {
    let spec = KernelSpec::new(
        true,
        in_type,
        p.dstate,
        use_wide(p, in_type, true),
        p.is_variable_b != 0,
        p.is_variable_c != 0,
        p.has_z != 0,
    );
    (p.dim / channels_per_block(p, spec.ks, spec.g, true).max(1)).max(1) as i64
}

/// 4-byte words of the backward's workspace before the chains' sums: the per-(batch, channel)
/// sums (padded to 16 bytes, as ws_chan_size), then with variable B or C and fewer chains than
/// tiles the ticket and the chain counters (as ws_count_size), which the launcher zeroes:
/// (offset, count) of those.
fn bwd_counters(p: &crate::params::SsmParams, slots: i32, chained: bool) -> (i64, i64) {
    let chan = (p.batch as i64 * p.dim as i64 * (3 * p.dstate as i64 + 2) + 3) & !3;
    let count = if chained && (p.is_variable_b != 0 || p.is_variable_c != 0) {
        (4 + p.batch as i64 * slots as i64 * (p.seqlen as i64 + 64) + 3) & !3
    } else {
        0
    };
    (chan, count)
}

/// fp32 workspace (elements) the backward of this input type needs: per-(batch, channel) sums,
/// then with variable B or C the counters and `bwd_slots` chains' sums of dB / dC
/// ([batch][slots][groups][N][L], one group per chain where each tile is a chain), for the
/// layout the launch will pick.
pub fn bwd_workspace_elems(p: &crate::params::SsmParams, in_type: u8) -> i64 {
    let (b, n, l) = (p.batch as i64, p.dstate as i64, p.seqlen as i64);
    let (slots, chained) = bwd_slots(p, in_type);
    let (chan, count) = bwd_counters(p, slots, chained);
    let per = |ng: i32| if chained { ng as i64 } else { 1 };
    let groups =
        p.is_variable_b as i64 * per(p.b_ngroups) + p.is_variable_c as i64 * per(p.c_ngroups);
    chan + count + groups * b * slots as i64 * n * l
}

fn launch(plan: &Plan, stream: u64, backward: bool) -> Result<()> {
    let ordinal = match plan.device {
        Device::Cuda(i) => i,
        Device::Cpu => unreachable!("CPU plans never reach the CUDA runtime"),
    };
    let p = plan.params;
    let spec = spec_of(plan, backward)?;
    if p.chunk_size != spec.chunk() {
        return Err(ScanError::Shape {
            arg: "chunk_size".into(),
            msg: format!(
                "must be {} for dstate {} on CUDA; got {}",
                spec.chunk(),
                p.dstate,
                p.chunk_size
            ),
        });
    }
    if p.batch == 0 || p.dim == 0 {
        if !backward {
            return Ok(());
        }
    } else if p.batch > 65535 {
        return Err(ScanError::Shape {
            arg: "u".into(),
            msg: format!("batch {} exceeds 65535", p.batch),
        });
    }
    if backward && p.workspace_ptr == 0 {
        return Err(ScanError::Shape {
            arg: "workspace".into(),
            msg: "required by the CUDA backward".into(),
        });
    }
    let kch = channels_per_block(&p, spec.ks, spec.g, backward);
    let threads = threads_per_block(kch, spec.g);
    let mut map = registry().lock().unwrap_or_else(|e| e.into_inner());
    let st = device_state(&mut map, ordinal)?;
    let blocks = p.batch as i64 * (p.dim / kch) as i64;
    let spec = choose_tile(st, spec, threads, blocks)?;
    let (main, smem, _) = prepared(st, spec, threads)?;
    let prog = Program::Scan(spec);
    let mut pp = p;
    let mut kch_arg = kch;
    // The backward's chains (unused by the forward, which takes two arguments).
    let (mut slots_arg, chained) = if backward {
        bwd_slots(&p, spec.in_type)
    } else {
        (0, false)
    };
    // SAFETY: the functions belong to the current context; the arguments are passed by value
    // (the driver copies them at launch); the stream is the caller's live stream on this device;
    // every pointer in `p` was validated by plan_forward / plan_backward.
    unsafe {
        if backward && p.batch > 0 && p.dim > 0 {
            // The ticket and the chain counters start at 0 (the caller's workspace, sized by
            // bwd_workspace_elems for these flags).
            let (at, count) = bwd_counters(&p, slots_arg, chained);
            if count > 0 {
                drv::memset_d8_async(
                    p.workspace_ptr + 4 * at as u64,
                    0,
                    4 * count as usize,
                    stream as sys::CUstream,
                )
                .map_err(driver_err("zero the backward's counters"))?;
            }
        }
        if p.batch > 0 && p.dim > 0 {
            let mut args = [
                &mut pp as *mut _ as *mut c_void,
                &mut kch_arg as *mut _ as *mut c_void,
                &mut slots_arg as *mut _ as *mut c_void,
            ];
            // ssm_fwd takes (p, kch), ssm_bwd (p, kch, slots).
            let nargs = if backward { 3 } else { 2 };
            drv::launch_kernel(
                main,
                ((p.dim / kch) as u32, p.batch as u32, 1),
                (threads, 1, 1),
                smem,
                stream as sys::CUstream,
                &mut args[..nargs],
            )
            .map_err(driver_err(if backward {
                "launch ssm_bwd"
            } else {
                "launch ssm_fwd"
            }))?;
        }
        if backward {
            let red = function(st, prog, "ssm_bwd_reduce")?;
            let total = p.dim as i64 * (3 * p.dstate as i64 + 2)
                + (p.is_variable_b as i64 * p.b_ngroups as i64
                    + p.is_variable_c as i64 * p.c_ngroups as i64)
                    * p.batch as i64
                    * p.dstate as i64
                    * ((p.seqlen as i64 + 3) / 4); // variable dB / dC: 4 steps per thread
            if total > 0 {
                // A grid-stride loop: up to 16 blocks per SM of this device.
                let cap = 16 * st.sms.max(1) as u64;
                let blocks = (total as u64).div_ceil(256).min(cap) as u32;
                let mut args = [
                    &mut pp as *mut _ as *mut c_void,
                    &mut kch_arg as *mut _ as *mut c_void,
                    &mut slots_arg as *mut _ as *mut c_void,
                ];
                drv::launch_kernel(
                    red,
                    (blocks, 1, 1),
                    (256, 1, 1),
                    0,
                    stream as sys::CUstream,
                    &mut args,
                )
                .map_err(driver_err("launch ssm_bwd_reduce"))?;
            }
        }
    }
    Ok(())
}

pub fn forward(plan: &Plan, stream: u64) -> Result<()> {
    launch(plan, stream, false)
}

pub fn backward(plan: &Plan, stream: u64) -> Result<()> {
    launch(plan, stream, true)
}

/// What compiling one program reported: its label, registers per thread and spill bytes of its
/// heaviest kernel (None / 0 when it came from the disk cache), and a digest of the cubin.
pub struct CompileReport {
    pub name: String,
    pub registers: Option<u32>,
    pub spill_bytes: u32,
    pub digest: u64,
}

/// The labels of the programs [`compile_program`] takes (every specialisation of every
/// kernel), in index order.
pub fn program_names() -> Vec<String> {
    Program::all().iter().map(Program::label).collect()
}

/// Compile program `index` of [`Program::all`] for `arch` (e.g. "sm_90"), through the disk cache
/// with `use_cache` (the ahead-of-time warm-up), else afresh with ptxas' resource report (the CI
/// compile check). Needs libnvrtc only, no GPU. Callers run several at once on their threads.
pub fn compile_program(index: usize, arch: &str, use_cache: bool) -> Result<CompileReport> {
    let all = Program::all();
    let prog = all.get(index).ok_or_else(|| ScanError::Shape {
        arg: "index".into(),
        msg: format!(
            "must be below the number of programs ({}); got {index}",
            all.len()
        ),
    })?;
    let (cubin, (registers, spill_bytes)) = if use_cache {
        (compile_cached(prog, arch)?, (None, 0))
    } else {
        let c = compile::compile(prog, arch)?;
        let r = c.resources();
        (c.cubin, r)
    };
    Ok(CompileReport {
        name: prog.label(),
        registers,
        spill_bytes,
        digest: compile::fnv64(&[&cubin]),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn tile_choice_counts_waves() {
        // The H200's main shape: 384 blocks; 3 per SM fit one wave of 396, 2 per SM need two.
        assert!(fewer_waves(384, 132, 3, 2));
        // 512 blocks: two waves either way, so the longer tiles (ties go to them).
        assert!(!fewer_waves(512, 132, 3, 2));
        // Few blocks: one wave either way.
        assert!(!fewer_waves(160, 132, 5, 3));
        assert!(fewer_waves(3072, 132, 5, 3));
        assert!(!fewer_waves(10, 132, 0, 0));
    }

    use super::*;

    /// Every specialisation at its largest block fits the 227 KB of shared memory of sm_80/sm_90.
    #[test]
    fn shared_memory_fits() {
        for spec in KernelSpec::all() {
            let kch = (max_threads(spec.ks, spec.backward) / spec.g as i32).min(MAX_CHANNELS);
            let bytes = smem_bytes(&spec, threads_per_block(kch, spec.g));
            assert!(bytes <= 227 * 1024, "{spec:?}: {bytes} bytes");
        }
    }
}
