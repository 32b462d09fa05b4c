//! NVRTC compilation of the kernels in `cuda/` to cubins for the device's exact architecture,
//! with an in-memory and an on-disk cache.
//!
//! Disk cache: `$MAMBA_SCAN_CACHE_DIR` or `$XDG_CACHE_HOME/mamba_scan` or `~/.cache/mamba_scan`.
//! The key hashes the full source, the options, the architecture and the NVRTC version. Each
//! entry carries a checksum of its bytes; an entry that fails it is recompiled, never loaded.

use crate::error::{Result, ScanError};
use std::ffi::CString;
use std::path::PathBuf;

const PARAMS_H: &str = include_str!("../../cuda/params.h");
const COMMON_CUH: &str = include_str!("../../cuda/common.cuh");
const SCAN_FWD_CU: &str = include_str!("../../cuda/scan_fwd.cu");
const SCAN_BWD_CU: &str = include_str!("../../cuda/scan_bwd.cu");
const STRIDED_CUH: &str = include_str!("../../cuda/strided.cuh");
const STATE_UPDATE_CU: &str = include_str!("../../cuda/state_update.cu");
const CONV1D_CU: &str = include_str!("../../cuda/conv1d.cu");

/// One NVRTC program: a specialisation of the scan, or one of the small ops' modules (all
/// variants of the decoding step in one, of causal conv1d in the other: they are cheap to
/// compile).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Program {
    Scan(KernelSpec),
    StateUpdate,
    Conv1d,
}

/// Entry points of the state-update module.
pub const STATE_UPDATE_ENTRIES: &[&str] = &[
    "state_update_s0_g1",
    "state_update_s0_g2",
    "state_update_s0_g4",
    "state_update_s0_g8",
    "state_update_s0_g16",
    "state_update_s0_g32",
    "state_update_s1_g1",
    "state_update_s1_g2",
    "state_update_s1_g4",
    "state_update_s1_g8",
    "state_update_s1_g16",
    "state_update_s1_g32",
    "state_update_s2_g1",
    "state_update_s2_g2",
    "state_update_s2_g4",
    "state_update_s2_g8",
    "state_update_s2_g16",
    "state_update_s2_g32",
];

/// Entry points of the causal-conv1d module.
pub const CONV1D_ENTRIES: &[&str] = &[
    "conv_fwd_t0_w2",
    "conv_fwd_t0_w3",
    "conv_fwd_t0_w4",
    "conv_fwd_t1_w2",
    "conv_fwd_t1_w3",
    "conv_fwd_t1_w4",
    "conv_fwd_t2_w2",
    "conv_fwd_t2_w3",
    "conv_fwd_t2_w4",
    "conv_bwd_t0_w2",
    "conv_bwd_t0_w3",
    "conv_bwd_t0_w4",
    "conv_bwd_t1_w2",
    "conv_bwd_t1_w3",
    "conv_bwd_t1_w4",
    "conv_bwd_t2_w2",
    "conv_bwd_t2_w3",
    "conv_bwd_t2_w4",
    "conv_bwd_reduce",
    "conv_update",
    "conv_fwdf_t0_w2",
    "conv_fwdf_t0_w3",
    "conv_fwdf_t0_w4",
    "conv_fwdf_t1_w2",
    "conv_fwdf_t1_w3",
    "conv_fwdf_t1_w4",
    "conv_fwdf_t2_w2",
    "conv_fwdf_t2_w3",
    "conv_fwdf_t2_w4",
    "conv_bwdf_t0_w2",
    "conv_bwdf_t0_w3",
    "conv_bwdf_t0_w4",
    "conv_bwdf_t1_w2",
    "conv_bwdf_t1_w3",
    "conv_bwdf_t1_w4",
    "conv_bwdf_t2_w2",
    "conv_bwdf_t2_w3",
    "conv_bwdf_t2_w4",
];

impl Program {
    /// Name of the program (the cache file's prefix, the compile unit's name).
    pub fn name(&self) -> &'static str {
        match self {
            Program::Scan(s) => s.entry(),
            Program::StateUpdate => "state_update",
            Program::Conv1d => "conv1d",
        }
    }
    /// A readable name of the specialisation (compile reports, logs).
    pub fn label(&self) -> String {
        match self {
            Program::Scan(s) => format!(
                "{} in{} ks{} g{} {} chunk{} tile{}",
                s.entry(),
                s.in_type,
                s.ks,
                s.g,
                if s.generic {
                    "generic".to_string()
                } else {
                    format!(
                        "varB{} varC{} z{}",
                        s.var_b as u8, s.var_c as u8, s.has_z as u8
                    )
                },
                s.chunk(),
                s.tile()
            ),
            Program::StateUpdate => "state_update kernels".to_string(),
            Program::Conv1d => "conv1d kernels".to_string(),
        }
    }
    pub fn entries(&self) -> &'static [&'static str] {
        match self {
            Program::Scan(s) => s.entries(),
            Program::StateUpdate => STATE_UPDATE_ENTRIES,
            Program::Conv1d => CONV1D_ENTRIES,
        }
    }
    pub fn options(&self, arch: &str) -> Vec<String> {
        match self {
            Program::Scan(s) => s.options(arch),
            Program::StateUpdate | Program::Conv1d => vec![
                format!("--gpu-architecture={arch}"),
                "--std=c++17".into(),
                "--ptxas-options=-v".into(),
            ],
        }
    }
    pub fn source(&self) -> String {
        match self {
            Program::Scan(s) => s.source(),
            Program::StateUpdate => join_sources(&[STRIDED_CUH], STATE_UPDATE_CU),
            Program::Conv1d => join_sources(&[STRIDED_CUH], CONV1D_CU),
        }
    }
    /// Every program (the ahead-of-time warm-up and the CI compile check).
    pub fn all() -> Vec<Program> {
        let mut v: Vec<Program> = KernelSpec::all().into_iter().map(Program::Scan).collect();
        v.push(Program::Conv1d);
        v.push(Program::StateUpdate);
        v
    }
}

/// params.h, common.cuh, the `extra` headers and a kernel file as one self-contained source
/// (NVRTC gets no include paths: the includes are dropped and the headers inlined in order).
fn join_sources(extra: &[&str], body: &str) -> String {
    let strip = |s: &str| {
        s.lines()
            .filter(|l| !l.starts_with("#pragma once") && !l.starts_with("#include"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mut out = format!("{}\n{}\n", strip(PARAMS_H), strip(COMMON_CUH));
    for h in extra {
        out.push_str(&strip(h));
        out.push('\n');
    }
    out.push_str(&strip(body));
    out.push('\n');
    out
}

/// Which kernel and which compile-time specialisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelSpec {
    pub backward: bool,
    /// 0 f32, 1 f16, 2 bf16.
    pub in_type: u8,
    /// States per lane (2, 4 or 8).
    pub ks: u8,
    /// Lanes per channel (1 to 32): dstate <= ks * g.
    pub g: u8,
    pub var_b: bool,
    pub var_c: bool,
    pub has_z: bool,
    /// Where `has_long_tile`: stage 64-step tiles (two saved-state intervals) instead of one;
    /// fewer tile phases and barriers, more shared memory per block (fewer resident blocks).
    pub long_tile: bool,
    /// The generic build: `var_b`, `var_c` and `has_z` are all set (the shared-memory carve-up
    /// has room for B, C and z tiles) and the call's flags decide at run time what is read and
    /// written. Calls with a fixed B or C (S4D-style layers, `mamba_inner_fn` with a given B or
    /// C) take it: one kernel per layout instead of six specialisations of every layout and tile.
    pub generic: bool,
}

/// (states per lane, lanes per channel) for each dstate class, smallest first. The deep family
/// keeps 4 states per lane (8 at dstate 256, where a warp holds one channel); the wide family
/// has 2 per lane up to dstate 64: the per-step work of a channel (staging, softplus, gating,
/// the sums over n) is spread over twice the lanes and the grid has twice the warps, at the
/// price of more shared-memory reads per state. The runtime picks one per call.
pub const LAYOUTS: [(u8, u8); 7] = [(4, 1), (4, 2), (4, 4), (4, 8), (4, 16), (4, 32), (8, 32)];
pub const LAYOUTS_WIDE: [(u8, u8); 5] = [(2, 2), (2, 4), (2, 8), (2, 16), (2, 32)];

/// The largest dstate of the wide family (2 states x 32 lanes): up to it a call has a choice.
pub const WIDE_MAX: i32 = 64;

/// The backward's deep family: 8 states per lane from dstate 33 on (half the lanes per channel
/// of the forward's layout, so half the per-step reductions and shuffles per state, and twice
/// the channels per block: half the dB / dC partials). Same states per chunk as the forward.
pub const LAYOUTS_BWD: [(u8, u8); 7] = [(4, 1), (4, 2), (4, 4), (4, 8), (8, 8), (8, 16), (8, 32)];

/// (states per lane, lanes per channel) of a dstate: the wide family when asked and it fits,
/// else the deep family of the direction.
pub fn layout_for(dstate: i32, wide: bool, backward: bool) -> (u8, u8) {
    let fits = |&(ks, g): &(u8, u8)| dstate <= ks as i32 * g as i32;
    if wide {
        if let Some(l) = LAYOUTS_WIDE.into_iter().find(fits) {
            return l;
        }
    }
    let deep = if backward { LAYOUTS_BWD } else { LAYOUTS };
    deep.into_iter().find(fits).unwrap_or(deep[deep.len() - 1])
}

/// Register sub-tile of the backward (steps of history per lane: `kTs` in scan_bwd.cu).
pub const BWD_SUB_TILE: u32 = 8;

/// Steps per tile and per saved state: 32, and 16 past a padded dstate of 128 (the B / C tiles
/// and dB / dC slices in shared memory grow with dstate). 32 keeps the backward's shared memory
/// (staging, raw prefetch tiles) small enough for three blocks per SM.
pub fn chunk_for_layout(ks: u8, g: u8) -> i32 {
    if ks as i32 * g as i32 <= 128 { 32 } else { 16 }
}

impl KernelSpec {
    pub fn new(
        backward: bool,
        in_type: u8,
        dstate: i32,
        wide: bool,
        var_b: bool,
        var_c: bool,
        has_z: bool,
    ) -> Self {
        if !(var_b && var_c) {
            let generic = Self::generic(backward, in_type, dstate);
            if !(backward && generic.ks == 8) {
                return generic;
            }
            // The backward at 8 states per lane (dstate > 128) spills with run-time flags: its
            // fixed-B / C calls keep compile-time specialisations.
            return KernelSpec {
                var_b,
                var_c,
                has_z,
                generic: false,
                ..generic
            };
        }
        let (ks, g) = layout_for(dstate, wide, backward);
        KernelSpec {
            backward,
            in_type,
            ks,
            g,
            var_b,
            var_c,
            has_z,
            long_tile: false,
            generic: false,
        }
    }
    /// The generic kernel of a dstate, for both directions the forward's layouts: the deep
    /// family (4 states per lane up to dstate 128) for 16-bit inputs, the wide one where it fits
    /// for fp32; 32-step tiles (16 past dstate 128), no 64-step ones.
    pub fn generic(backward: bool, in_type: u8, dstate: i32) -> Self {
        let (ks, g) = layout_for(dstate, in_type == 0, false);
        KernelSpec {
            backward,
            in_type,
            ks,
            g,
            var_b: true,
            var_c: true,
            has_z: true,
            long_tile: false,
            generic: true,
        }
    }
    /// Whether a layout also comes with 64-step tiles: the forward's whose chunk is 32. The
    /// backward has none: on the H200 they gained at most ~6% of the backward (long rows over
    /// few channels) and lost on short sequences, for a sixth of the compile time
    /// (benchmarks/results/tile_length_ab_h200.md).
    pub fn has_long_tile(ks: u8, g: u8, backward: bool) -> bool {
        chunk_for_layout(ks, g) == 32 && !backward
    }
    /// Whether this specialisation also comes with 64-step tiles (the generic build has none).
    pub fn with_long_tile(&self) -> bool {
        !self.generic && Self::has_long_tile(self.ks, self.g, self.backward)
    }
    pub fn entry(&self) -> &'static str {
        if self.backward { "ssm_bwd" } else { "ssm_fwd" }
    }
    pub fn entries(&self) -> &'static [&'static str] {
        if self.backward {
            &["ssm_bwd", "ssm_bwd_reduce"]
        } else {
            &["ssm_fwd"]
        }
    }
    pub fn chunk(&self) -> i32 {
        chunk_for_layout(self.ks, self.g)
    }
    /// Steps per staged tile: the chunk, or 64 with `long_tile` (two chunks per tile: the
    /// forward saves the state twice per tile, the backward reads every other saved state).
    pub fn tile(&self) -> i32 {
        if self.long_tile { 64 } else { self.chunk() }
    }
    pub fn options(&self, arch: &str) -> Vec<String> {
        let mut v = vec![
            format!("--gpu-architecture={arch}"),
            "--std=c++17".into(),
            // Unannotated functions (the kernels' local lambdas) are device functions.
            "-default-device".into(),
            "--ptxas-options=-v".into(),
            format!("-DkInType={}", self.in_type),
            format!("-DkKS={}", self.ks),
            format!("-DkG={}", self.g),
            format!("-DkChunk={}", self.chunk()),
            format!("-DkTile={}", self.tile()),
            format!("-DkVarB={}", self.var_b as i32),
            format!("-DkVarC={}", self.var_c as i32),
            format!("-DkHasZ={}", self.has_z as i32),
            format!("-DkGeneric={}", self.generic as i32),
        ];
        if self.backward && bwd_slots_forced().is_some() {
            // The chains' hand-over of the dB / dC sums (cuda/scan_bwd.cu, kBwdChains).
            v.push("-DkBwdChains=1".into());
        }
        v.extend(tuning_defines().iter().cloned());
        v
    }
    pub fn source(&self) -> String {
        join_sources(
            &[],
            if self.backward {
                SCAN_BWD_CU
            } else {
                SCAN_FWD_CU
            },
        )
    }
    /// Every specialisation (for the ahead-of-time warm-up and the CI compile check).
    pub fn all() -> Vec<KernelSpec> {
        let mut v = Vec::new();
        for backward in [false, true] {
            for in_type in 0..3u8 {
                let deep = if backward { LAYOUTS_BWD } else { LAYOUTS };
                for (ks, g) in deep.into_iter().chain(LAYOUTS_WIDE) {
                    // fp32 takes the wide family wherever it fits (src/cuda/mod.rs, use_wide):
                    // its deep layouts up to the wide family's capacity are never selected.
                    if in_type == 0 && ks != 2 && ks as i32 * g as i32 <= WIDE_MAX {
                        continue;
                    }
                    // Variable B and C (every Mamba layer): specialised, with and without z.
                    for has_z in [false, true] {
                        let spec = KernelSpec {
                            backward,
                            in_type,
                            ks,
                            g,
                            var_b: true,
                            var_c: true,
                            has_z,
                            long_tile: false,
                            generic: false,
                        };
                        v.push(spec);
                        if spec.with_long_tile() {
                            v.push(KernelSpec {
                                long_tile: true,
                                ..spec
                            });
                        }
                    }
                }
                // A fixed B or C: what KernelSpec::new picks for each dstate class.
                for (ks, g) in LAYOUTS {
                    let dstate = ks as i32 * g as i32;
                    for (var_b, var_c) in [(false, false), (false, true), (true, false)] {
                        for has_z in [false, true] {
                            for wide in [false, true] {
                                let spec = KernelSpec::new(
                                    backward, in_type, dstate, wide, var_b, var_c, has_z,
                                );
                                if !v.contains(&spec) {
                                    v.push(spec);
                                }
                            }
                        }
                    }
                }
            }
        }
        v
    }
}

/// MAMBA_SCAN_BWD_SLOTS (read once per process): sum the scan backward's variable dB / dC in
/// this many ordered chains of tiles (src/cuda/mod.rs, bwd_slots) instead of one partial per tile.
pub fn bwd_slots_forced() -> Option<i64> {
    static FORCED: std::sync::OnceLock<Option<i64>> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| {
        std::env::var("MAMBA_SCAN_BWD_SLOTS")
            .ok()?
            .trim()
            .parse()
            .ok()
    })
}

/// Extra `-D` options for the scan kernels from MAMBA_SCAN_CUDA_DEFINES (whitespace-separated,
/// e.g. "-DkFwdU=16"): a tuning knob for A/B runs of the kernels' compile-time constants on the
/// device. Anything that is not a `-D` option is ignored. Read once per process (the compiled
/// kernels are cached per process too); the options are part of the disk cache key.
pub fn tuning_defines() -> &'static [String] {
    static DEFINES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    DEFINES.get_or_init(|| {
        parse_defines(
            std::env::var("MAMBA_SCAN_CUDA_DEFINES")
                .as_deref()
                .unwrap_or(""),
        )
    })
}

fn parse_defines(s: &str) -> Vec<String> {
    s.split_whitespace()
        .filter(|o| o.len() > 2 && o.starts_with("-D"))
        .map(str::to_owned)
        .collect()
}

/// A compiled cubin and what ptxas reported about it.
pub struct Compiled {
    pub cubin: Vec<u8>,
    pub log: String,
}

impl Compiled {
    /// Registers per thread and spill bytes (stores + loads), parsed from ptxas' -v output.
    pub fn resources(&self) -> (Option<u32>, u32) {
        let mut regs = None;
        let mut spill = 0u32;
        for line in self.log.lines() {
            if let Some(i) = line.find("Used ") {
                let rest = &line[i + 5..];
                if let Some(n) = rest.split_whitespace().next().and_then(|x| x.parse().ok()) {
                    if rest.contains("registers") {
                        regs = Some(n);
                    }
                }
            }
            for key in ["bytes spill stores", "bytes spill loads"] {
                if let Some(i) = line.find(key) {
                    let before = line[..i].trim_end();
                    if let Some(n) = before
                        .rsplit([' ', ','])
                        .next()
                        .and_then(|x| x.parse::<u32>().ok())
                    {
                        spill += n;
                    }
                }
            }
        }
        (regs, spill)
    }
}

fn nvrtc_err(msg: &str, e: impl std::fmt::Debug) -> ScanError {
    ScanError::Compile {
        msg: format!("{msg}: {e:?}"),
        log: String::new(),
    }
}

pub fn nvrtc_present() -> Result<()> {
    // SAFETY: only probes whether the shared library can be loaded.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(ScanError::Library(
            "libnvrtc could not be loaded: install torch's CUDA wheels (they bring libnvrtc) or a CUDA \
             toolkit, or put libnvrtc on the loader path"
                .into(),
        ))
    }
}

pub fn nvrtc_version() -> Result<(i32, i32)> {
    nvrtc_present()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; the out-pointers are valid.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_err("nvrtcVersion", r));
    }
    Ok((major, minor))
}

/// Compile with NVRTC (no cache): in a worker process when one is configured (see
/// [`set_worker`]), else in this process.
pub fn compile(spec: &Program, arch: &str) -> Result<Compiled> {
    let src = spec.source();
    let name = format!("{}.cu", spec.name());
    let opts = spec.options(arch);
    if let Some(w) = WORKER.get() {
        if !w.failed.load(std::sync::atomic::Ordering::Relaxed) {
            match w.compile(&src, &name, &opts) {
                Ok(WorkerResult::Done(c)) => return Ok(c),
                Ok(WorkerResult::CompileFailed(log)) => {
                    return Err(ScanError::Compile {
                        msg: format!("{} {:?} for {arch}", spec.name(), spec),
                        log,
                    });
                }
                // The server could not run here (no interpreter, a sandbox that refuses the
                // personality call or process creation): compile in this process from now on.
                Err(e) => {
                    *w.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                    w.failed.store(true, std::sync::atomic::Ordering::Relaxed)
                }
            }
        }
    }
    compile_source(&src, &name, &opts).map_err(|e| match e {
        ScanError::Compile { msg, log } => ScanError::Compile {
            msg: format!("{} {:?} for {arch}: {msg}", spec.name(), spec),
            log,
        },
        e => e,
    })
}

/// NVRTC in this process: source, program name and options to a cubin and the compile log.
pub fn compile_source(src: &str, name: &str, opts: &[String]) -> Result<Compiled> {
    nvrtc_present()?;
    use cudarc::nvrtc::{result, sys};
    let src = CString::new(src).map_err(|e| nvrtc_err("source", e))?;
    let name = CString::new(name).map_err(|e| nvrtc_err("name", e))?;
    let prog = result::create_program(&src, Some(&name))
        .map_err(|e| nvrtc_err("nvrtcCreateProgram", e))?;
    // SAFETY: `prog` is a live program; it is destroyed on every path below.
    unsafe {
        let compiled = result::compile_program(prog, opts);
        let log = result::get_program_log(prog)
            .map(|v| {
                let bytes: Vec<u8> = v
                    .iter()
                    .take_while(|&&c| c != 0)
                    .map(|&c| c as u8)
                    .collect();
                String::from_utf8_lossy(&bytes).into_owned()
            })
            .unwrap_or_default();
        if let Err(e) = compiled {
            let _ = result::destroy_program(prog);
            return Err(ScanError::Compile {
                msg: format!("{e:?}"),
                log,
            });
        }
        let mut size = 0usize;
        let r = sys::nvrtcGetCUBINSize(prog, &mut size);
        if r != sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
            let _ = result::destroy_program(prog);
            return Err(ScanError::Compile {
                msg: format!("nvrtcGetCUBINSize: {r:?} (arch must be a real sm_XY)"),
                log,
            });
        }
        let mut cubin = vec![0u8; size];
        let r = sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut std::ffi::c_char);
        let _ = result::destroy_program(prog);
        if r != sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(ScanError::Compile {
                msg: format!("nvrtcGetCUBIN: {r:?}"),
                log,
            });
        }
        Ok(Compiled { cubin, log })
    }
}

/// Where NVRTC runs. NVVM (NVRTC's optimiser) is not deterministic within a process: the PTX
/// of one source and one set of options depends on the heap addresses of the compiling process
/// (measured with NVRTC 13.0 and 13.2: 5 different PTX texts in 6 compiles of one backward
/// specialisation in one process), and ptxas turns some of those texts into kernels that spill
/// registers. In a process started the same way with address-space randomisation off, the
/// allocations before the compile, and so the addresses, are the same every time: one source
/// compiles to one cubin on a machine, whatever its load or the calling process did before.
/// (`--Ofast-compile=min` also makes NVVM deterministic, but the kernels measured 15-23% slower
/// on an H200.)
///
/// So the compiles run in compile servers: the Python interpreter, without site packages, with
/// a fixed environment and randomisation off, loading this extension module by path. A server
/// forks one child per request from the same state (it allocates nothing that outlives a
/// request, and reads the child's reply into one buffer allocated at start), so every child
/// starts from the same heap; a fork costs milliseconds where starting an interpreter costs
/// ~0.15 s. One server per concurrently compiling thread, kept for the life of the process.
struct Worker {
    python: std::path::PathBuf,
    module: std::path::PathBuf,
    nvrtc: Option<std::path::PathBuf>,
    failed: std::sync::atomic::AtomicBool,
    /// Why the servers could not run (the compiles then run in-process).
    error: std::sync::Mutex<Option<String>>,
    /// Idle servers, and the process that started them (a forked copy of this process must
    /// not talk to its parent's servers).
    idle: std::sync::Mutex<(u32, Vec<Server>)>,
}

static WORKER: std::sync::OnceLock<Worker> = std::sync::OnceLock::new();

/// The server's program. Start: load libnvrtc and this module by path, allocate the reply
/// buffer, write `READY`. Then per request, `u64 length, JSON {source, name, options}` on
/// stdin: fork; the child reads the JSON, compiles in-process and writes `u8 status (0 done,
/// 3 NVRTC failed, 1 other error), u64 length, log, u64 length, cubin` to a pipe; the server
/// reads that into its buffer and writes `u64 length, reply, i32 child's wait status` to
/// stdout. End of stdin ends the server.
const SERVER_CODE: &str = r#"
import os, sys
def send(b):
    v = memoryview(b)
    while v:
        v = v[os.write(1, v):]
try:
    import ctypes, importlib.machinery as m, importlib.util as u, json, traceback
    mod_path, nvrtc = sys.argv[1], sys.argv[2]
    if nvrtc:
        ctypes.CDLL(nvrtc, mode=ctypes.RTLD_GLOBAL)
    loader = m.ExtensionFileLoader("mamba_scan._native", mod_path)
    spec = u.spec_from_file_location("mamba_scan._native", mod_path, loader=loader)
    mod = u.module_from_spec(spec)
    loader.exec_module(mod)
    CAP = 64 << 20
    buf = bytearray(CAP)
    view = memoryview(buf)
except BaseException as e:
    send(b"ERROR" + repr(e).encode())
    sys.exit(1)
send(b"READY")

def read_exact(n):
    b = b""
    while len(b) < n:
        c = os.read(0, n - len(b))
        if not c:
            raise EOFError
        b += c
    return b

def child(n, w):
    status, log, cubin = 1, "", b""
    try:
        req = json.loads(read_exact(n))
        try:
            cubin, log = mod.nvrtc_compile_in_process(req["source"], req["name"], req["options"])
            status = 0
        except mod.CompileError as e:
            status, log = 3, str(e)
    except BaseException:
        log = traceback.format_exc()
    log = log.encode()
    out = bytes([status]) + len(log).to_bytes(8, "little") + log
    out += len(cubin).to_bytes(8, "little") + cubin
    v = memoryview(out)
    while v:
        v = v[os.write(w, v):]

while True:
    try:
        n = int.from_bytes(read_exact(8), "little")
    except EOFError:
        break
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            child(n, w)
        finally:
            os._exit(0)
    os.close(w)
    got = 0
    while got < CAP:
        k = os.readv(r, [view[got:]])
        if k == 0:
            break
        got += k
    os.close(r)
    status = os.waitpid(pid, 0)[1]
    send(got.to_bytes(8, "little"))
    send(view[:got])
    send(status.to_bytes(4, "little", signed=True))
"#;

/// One compile server: its process and the two pipe ends.
struct Server {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::process::ChildStdout,
}

impl Drop for Server {
    fn drop(&mut self) {
        // Its stdin closes with this value: an idle server then exits on its own; reap it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

enum WorkerResult {
    Done(Compiled),
    CompileFailed(String),
}

impl Worker {
    fn spawn(&self) -> std::io::Result<Server> {
        use std::io::Read;
        use std::os::unix::process::CommandExt;
        let nvrtc = self
            .nvrtc
            .as_ref()
            .map(|p| p.as_os_str().to_owned())
            .unwrap_or_default();
        let mut cmd = std::process::Command::new(&self.python);
        cmd.args(["-S", "-s", "-c", SERVER_CODE])
            .arg(&self.module)
            .arg(nvrtc)
            .env_clear()
            .env("PYTHONHASHSEED", "0")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        // SAFETY: the closure runs in the forked child before exec and makes one system call
        // (personality), which is async-signal-safe; it allocates nothing and takes no locks.
        unsafe {
            cmd.pre_exec(|| {
                let cur = libc::personality(0xffff_ffff);
                if cur == -1
                    || libc::personality((cur | libc::ADDR_NO_RANDOMIZE) as libc::c_ulong) == -1
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        let missing = || std::io::Error::other("a pipe is missing");
        let stdin = child.stdin.take().ok_or_else(missing)?;
        let stdout = child.stdout.take().ok_or_else(missing)?;
        let mut server = Server {
            child,
            stdin,
            stdout,
        };
        let mut hello = [0u8; 5];
        let ok = server.stdout.read_exact(&mut hello).is_ok() && &hello == b"READY";
        if !ok {
            let mut rest = Vec::new();
            let _ = server.stdout.read_to_end(&mut rest);
            let said = String::from_utf8_lossy(&rest).into_owned();
            return Err(std::io::Error::other(format!(
                "the compile server did not start ({}): {}",
                self.python.display(),
                said.trim()
            )));
        }
        Ok(server)
    }

    fn request(
        server: &mut Server,
        src: &str,
        name: &str,
        opts: &[String],
    ) -> std::io::Result<WorkerResult> {
        use std::io::{Read, Write};
        let req = format!(
            "{{\"source\": {}, \"name\": {}, \"options\": [{}]}}",
            json_str(src),
            json_str(name),
            opts.iter()
                .map(|o| json_str(o))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut msg = Vec::with_capacity(req.len() + 8);
        msg.extend_from_slice(&(req.len() as u64).to_le_bytes());
        msg.extend_from_slice(req.as_bytes());
        // The request fits the pipe or the child reads it while we write: the server reads
        // only the length, the child the rest, and the reply is read after the whole write.
        server.stdin.write_all(&msg)?;
        server.stdin.flush()?;
        let mut len = [0u8; 8];
        server.stdout.read_exact(&mut len)?;
        let mut reply = vec![0u8; u64::from_le_bytes(len) as usize];
        server.stdout.read_exact(&mut reply)?;
        let mut st = [0u8; 4];
        server.stdout.read_exact(&mut st)?;
        let wait_status = i32::from_le_bytes(st);
        let bad = |what: &str| {
            std::io::Error::other(format!(
                "compile server: {what} (child wait status {wait_status})"
            ))
        };
        let take = |buf: &[u8], at: usize| -> Option<(Vec<u8>, usize)> {
            let n = u64::from_le_bytes(buf.get(at..at + 8)?.try_into().ok()?) as usize;
            Some((buf.get(at + 8..at + 8 + n)?.to_vec(), at + 8 + n))
        };
        let status = *reply.first().ok_or_else(|| bad("no reply"))?;
        let (log, at) = take(&reply, 1).ok_or_else(|| bad("truncated log"))?;
        let log = String::from_utf8_lossy(&log).into_owned();
        let (cubin, _) = take(&reply, at).ok_or_else(|| bad("truncated reply"))?;
        match status {
            0 if wait_status == 0 => Ok(WorkerResult::Done(Compiled { cubin, log })),
            3 => Ok(WorkerResult::CompileFailed(log)),
            _ => Err(bad(&format!("failed: {}", log.trim()))),
        }
    }

    fn compile(&self, src: &str, name: &str, opts: &[String]) -> std::io::Result<WorkerResult> {
        let pid = std::process::id();
        let taken = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.0 != pid {
                // A forked copy of the process that started these servers: leave them to it
                // (forget, not drop: dropping would kill the parent's servers).
                for s in std::mem::take(&mut idle.1) {
                    std::mem::forget(s);
                }
                idle.0 = pid;
            }
            idle.1.pop()
        };
        let mut server = match taken {
            Some(s) => s,
            None => self.spawn()?,
        };
        // A server whose child died mid-reply (killed from outside) is replaced once.
        let r = match Self::request(&mut server, src, name, opts) {
            Ok(r) => r,
            Err(_) => {
                drop(server);
                server = self.spawn()?;
                Self::request(&mut server, src, name, opts)?
            }
        };
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.0 == pid {
            idle.1.push(server);
        }
        Ok(r)
    }
}

/// A JSON string literal.
fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\t' => o.push_str("\\t"),
            '\r' => o.push_str("\\r"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// Run every later compile in a worker: `python` an interpreter that can load this extension
/// module from `module` (its file), `nvrtc` the libnvrtc to load first (None: the loader's
/// search). The first call wins. A worker that cannot run disables itself for the process and
/// the compiles run in-process (nondeterministic, see [`Worker`]).
pub fn set_worker(
    python: std::path::PathBuf,
    module: std::path::PathBuf,
    nvrtc: Option<std::path::PathBuf>,
) -> bool {
    WORKER
        .set(Worker {
            python,
            module,
            nvrtc,
            failed: std::sync::atomic::AtomicBool::new(false),
            error: std::sync::Mutex::new(None),
            idle: std::sync::Mutex::new((std::process::id(), Vec::new())),
        })
        .is_ok()
}

/// Whether compiles go through the worker (configured and not failed).
pub fn worker_active() -> bool {
    WORKER
        .get()
        .is_some_and(|w| !w.failed.load(std::sync::atomic::Ordering::Relaxed))
}

/// Why compiles left the worker for this process, if they did.
pub fn worker_error() -> Option<String> {
    WORKER
        .get()
        .and_then(|w| w.error.lock().unwrap_or_else(|e| e.into_inner()).clone())
}

/// FNV-1a, 64 bit: stable across builds (std's hasher is not), enough for cache keys/checksums.
pub fn fnv64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

pub fn cache_dir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("MAMBA_SCAN_CACHE_DIR") {
        return if d.is_empty() {
            None
        } else {
            Some(PathBuf::from(d))
        };
    }
    if let Ok(d) = std::env::var("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("mamba_scan"));
    }
    std::env::var("HOME")
        .ok()
        .map(|h| PathBuf::from(h).join(".cache").join("mamba_scan"))
}

const MAGIC: &[u8; 8] = b"MSCUBIN1";

/// Called before every compile that the disk cache could not serve, with the program's label,
/// the architecture and the cache directory (the Python module logs the first one: a user then
/// knows why a first step takes seconds). Set once by the binding layer.
pub static COLD_COMPILE_HOOK: std::sync::OnceLock<fn(&str, &str, Option<&std::path::Path>)> =
    std::sync::OnceLock::new();

/// Called when the disk cache cannot take a compiled kernel (a read-only or full directory, a
/// path that is not a directory), with the directory and the error: the kernel then lives in this
/// process's memory only. Set once by the binding layer (the Python module warns, once).
pub static CACHE_WRITE_HOOK: std::sync::OnceLock<fn(&std::path::Path, &str)> =
    std::sync::OnceLock::new();

/// Write `data` to `path` through a temporary name and a rename, so that readers (other
/// processes compiling the same kernel at the same time) never see half a file.
fn write_entry(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let written = std::fs::write(&tmp, data).and_then(|_| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// The cache key of a kernel program: its full source, options, architecture and the NVRTC
/// version that compiles it (an entry of another NVRTC has another name and is never read).
fn entry_key(src: &str, opts: &str, arch: &str, (maj, min): (i32, i32)) -> u64 {
    let ver = format!("nvrtc {maj}.{min}");
    fnv64(&[
        src.as_bytes(),
        opts.as_bytes(),
        arch.as_bytes(),
        ver.as_bytes(),
    ])
}

/// Compile through the disk cache. A missing, unreadable or corrupt entry (checked against the
/// checksum it carries: a truncated or bit-flipped file) is recompiled and rewritten; the key
/// covers the source, the options, the architecture and the NVRTC version, so an entry of
/// another NVRTC is never read.
pub fn compile_cached(spec: &Program, arch: &str) -> Result<Vec<u8>> {
    let opts = spec.options(arch).join(" ");
    let key = entry_key(&spec.source(), &opts, arch, nvrtc_version()?);
    let path = cache_dir().map(|d| d.join(format!("{}-{arch}-{key:016x}.cubin", spec.name())));
    if let Some(path) = &path {
        if let Ok(bytes) = std::fs::read(path) {
            if bytes.len() > 16 && &bytes[..8] == MAGIC {
                let sum = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
                if fnv64(&[&bytes[16..]]) == sum {
                    return Ok(bytes[16..].to_vec());
                }
            }
        }
    }
    if let Some(hook) = COLD_COMPILE_HOOK.get() {
        hook(
            &spec.label(),
            arch,
            path.as_deref().and_then(|p| p.parent()),
        );
    }
    let c = compile(spec, arch)?;
    if let Some(path) = &path {
        let mut data = Vec::with_capacity(c.cubin.len() + 16);
        data.extend_from_slice(MAGIC);
        data.extend_from_slice(&fnv64(&[&c.cubin]).to_le_bytes());
        data.extend_from_slice(&c.cubin);
        if let Err(e) = write_entry(path, &data) {
            if let (Some(hook), Some(dir)) = (CACHE_WRITE_HOOK.get(), path.parent()) {
                hook(dir, &e.to_string());
            }
        }
    }
    Ok(c.cubin)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache entry written under another NVRTC (or another source, options, architecture)
    /// has another key, so it is never read for this one.
    #[test]
    fn cache_key_covers_the_nvrtc_version() {
        let k = |src: &str, opts: &str, arch: &str, v| entry_key(src, opts, arch, v);
        let base = k("src", "-O3", "sm_90", (13, 0));
        assert_eq!(base, k("src", "-O3", "sm_90", (13, 0)));
        for other in [
            k("src", "-O3", "sm_90", (13, 2)),
            k("src", "-O3", "sm_90", (12, 9)),
            k("src", "-O3", "sm_80", (13, 0)),
            k("src", "-O2", "sm_90", (13, 0)),
            k("src ", "-O3", "sm_90", (13, 0)),
        ] {
            assert_ne!(base, other);
        }
    }

    /// Compiles one specialisation when libnvrtc is loadable (skips silently otherwise: the
    /// Python test suite runs the full compile check with torch's libnvrtc).
    #[test]
    fn compile_one_if_nvrtc() {
        if nvrtc_present().is_err() {
            return;
        }
        let spec = KernelSpec::new(true, 2, 16, false, true, true, true);
        for prog in [Program::Scan(spec), Program::Conv1d, Program::StateUpdate] {
            let c = compile(&prog, "sm_90").unwrap();
            eprintln!("{:?}", c.resources());
            assert_eq!(c.resources().1, 0, "{}", c.log);
        }
    }

    /// Every specialisation a call can pick (and its 64-step twin) is among the programs that
    /// the warm-up and the compile check build; and every program is one a call can pick.
    #[test]
    fn every_pickable_spec_is_built() {
        let all = KernelSpec::all();
        let mut picked = std::collections::HashSet::new();
        for backward in [false, true] {
            for in_type in 0..3u8 {
                for dstate in 1..=256 {
                    for wide in [false, true] {
                        // As src/cuda/mod.rs (use_wide): fp32 always asks for the wide family.
                        let wide = wide || in_type == 0;
                        for bits in 0..8 {
                            let (vb, vc, z) = (bits & 1 != 0, bits & 2 != 0, bits & 4 != 0);
                            let s = KernelSpec::new(backward, in_type, dstate, wide, vb, vc, z);
                            assert!(all.contains(&s), "{s:?} is not built");
                            picked.insert(s);
                            if s.with_long_tile() {
                                let long = KernelSpec {
                                    long_tile: true,
                                    ..s
                                };
                                assert!(all.contains(&long), "{long:?} is not built");
                                picked.insert(long);
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(picked.len(), all.len(), "programs no call picks");
        assert!(all.iter().all(|s| !s.generic || !s.long_tile));
    }

    #[test]
    fn tuning_defines_keep_only_d_options() {
        assert_eq!(
            parse_defines("  -DkFwdU=16 --gpu-architecture=sm_80 -D x -DkA=1"),
            vec!["-DkFwdU=16".to_string(), "-DkA=1".to_string()]
        );
        assert!(parse_defines("").is_empty());
    }

    #[test]
    fn fnv_is_stable() {
        assert_eq!(fnv64(&[b"abc"]), fnv64(&[b"abc"]));
        assert_ne!(fnv64(&[b"ab", b"c"]), fnv64(&[b"a", b"bc"]));
    }
}
