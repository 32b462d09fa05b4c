//! Unit tests of the CPU kernels against a naive f64 recurrence (forward) and central finite
//! differences (backward), without Python.

use crate::dlpack::{DType, Device, TensorView};
use crate::ops::scan::{BwdArgs, FwdArgs, FwdOut, plan_backward, plan_forward};

fn view<T>(v: &mut [T], dtype: DType, shape: &[i64]) -> TensorView {
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    TensorView {
        ptr: v.as_mut_ptr() as u64,
        dtype,
        device: Device::Cpu,
        shape: shape.to_vec(),
        strides,
        readonly: false,
    }
}

/// Deterministic pseudo-random numbers in [-1, 1).
fn rand(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect()
}

struct Case {
    b: usize,
    d: usize,
    l: usize,
    n: usize,
    u: Vec<f64>,
    delta: Vec<f64>,
    a: Vec<f64>,
    bm: Vec<f64>,
    cm: Vec<f64>,
    dv: Vec<f64>,
    z: Vec<f64>,
    h0: Vec<f64>,
}

impl Case {
    fn new(b: usize, d: usize, l: usize, n: usize) -> Case {
        Case {
            b,
            d,
            l,
            n,
            u: rand(b * d * l, 1),
            delta: rand(b * d * l, 2),
            a: rand(d * n, 3).iter().map(|x| -1.5 + x).collect(),
            bm: rand(b * n * l, 4),
            cm: rand(b * n * l, 5),
            dv: rand(d, 6),
            z: rand(b * d * l, 7),
            h0: rand(b * d * n, 8),
        }
    }

    /// out and last state by the textbook recurrence, softplus on, all options on.
    fn naive(&self) -> (Vec<f64>, Vec<f64>) {
        let (b, d, l, n) = (self.b, self.d, self.l, self.n);
        let mut out = vec![0.0; b * d * l];
        let mut last = vec![0.0; b * d * n];
        for bi in 0..b {
            for di in 0..d {
                let mut h: Vec<f64> = (0..n).map(|k| self.h0[(bi * d + di) * n + k]).collect();
                for t in 0..l {
                    let i = (bi * d + di) * l + t;
                    let x = self.delta[i];
                    let dt = if x > 20.0 { x } else { x.exp().ln_1p() };
                    let mut y = 0.0;
                    for k in 0..n {
                        let bb = self.bm[(bi * n + k) * l + t];
                        let cc = self.cm[(bi * n + k) * l + t];
                        h[k] = (dt * self.a[di * n + k]).exp() * h[k] + dt * bb * self.u[i];
                        y += cc * h[k];
                    }
                    let zz = self.z[i];
                    out[i] = (y + self.dv[di] * self.u[i]) * zz / (1.0 + (-zz).exp());
                }
                last[(bi * d + di) * n..(bi * d + di + 1) * n].copy_from_slice(&h);
            }
        }
        (out, last)
    }

    /// Views of the inputs: u, delta, A, B, C, D, z, h0.
    fn views(&mut self) -> [TensorView; 8] {
        let (b, d, l, n) = (self.b as i64, self.d as i64, self.l as i64, self.n as i64);
        let f = DType::F64;
        [
            view(&mut self.u, f, &[b, d, l]),
            view(&mut self.delta, f, &[b, d, l]),
            view(&mut self.a, f, &[d, n]),
            view(&mut self.bm, f, &[b, n, l]),
            view(&mut self.cm, f, &[b, n, l]),
            view(&mut self.dv, f, &[d]),
            view(&mut self.z, f, &[b, d, l]),
            view(&mut self.h0, f, &[b, d, n]),
        ]
    }

    fn run_fwd(&mut self, chunk: i32) -> (Vec<f64>, Vec<f64>) {
        let (b, d, l, n) = (self.b as i64, self.d as i64, self.l as i64, self.n as i64);
        let nc = (l + chunk as i64 - 1) / chunk as i64;
        let mut out = vec![f64::NAN; (b * d * l) as usize];
        let mut states = vec![f64::NAN; (b * d * nc * n) as usize];
        let f = DType::F64;
        let v = self.views();
        let (ov, sv) = (
            view(&mut out, f, &[b, d, l]),
            view(&mut states, f, &[b, d, nc, n]),
        );
        let args = fwd_args(&v, chunk);
        let plan = plan_forward(
            &args,
            Some(&FwdOut {
                out: &ov,
                states: &sv,
                final_states: None,
            }),
        )
        .unwrap();
        // SAFETY: all buffers live for the call and are distinct.
        unsafe { super::scan_fwd::forward(&plan) };
        let last: Vec<f64> = (0..(b * d) as usize)
            .flat_map(|c| {
                states[(c * nc as usize + nc as usize - 1) * n as usize..][..n as usize].to_vec()
            })
            .collect();
        (out, last)
    }
}

fn fwd_args(v: &[TensorView; 8], chunk: i32) -> FwdArgs<'_> {
    FwdArgs {
        u: &v[0],
        delta: &v[1],
        a: &v[2],
        b: &v[3],
        c: &v[4],
        d: Some(&v[5]),
        z: Some(&v[6]),
        delta_bias: None,
        initial_state: Some(&v[7]),
        delta_softplus: true,
        chunk_size: chunk,
        seq_idx: None,
        num_seqs: -1,
    }
}

#[test]
fn forward_matches_naive_recurrence() {
    for (l, chunk) in [(1, 4), (13, 4), (64, 16), (100, 256)] {
        let mut c = Case::new(2, 3, l, 5);
        let (want, want_last) = c.naive();
        let (got, got_last) = c.run_fwd(chunk);
        for (g, w) in got.iter().zip(&want).chain(got_last.iter().zip(&want_last)) {
            assert!(
                (g - w).abs() <= 1e-12 * (1.0 + w.abs()),
                "L={l}: got {g}, want {w}"
            );
        }
    }
}

#[test]
fn backward_matches_finite_differences() {
    let (b, d, l, n, chunk) = (2usize, 3usize, 11usize, 5usize, 4i32);
    let mut c = Case::new(b, d, l, n);
    let wout = rand(b * d * l, 11);
    let loss = |c: &mut Case| -> f64 {
        let (o, _) = c.run_fwd(chunk);
        o.iter().zip(&wout).map(|(a, w)| a * w).sum()
    };
    // Analytic gradients.
    let nc = (l as i64 + chunk as i64 - 1) / chunk as i64;
    let (bi, di, li, ni) = (b as i64, d as i64, l as i64, n as i64);
    let mut states = vec![0.0f64; b * d * nc as usize * n];
    let mut out = vec![0.0f64; b * d * l];
    let mut dout = wout.clone();
    let mut du = vec![f64::NAN; b * d * l];
    let mut ddelta = vec![f64::NAN; b * d * l];
    let mut da = vec![f64::NAN; d * n];
    let mut dbm = vec![f64::NAN; b * n * l];
    let mut dcm = vec![f64::NAN; b * n * l];
    let mut ddv = vec![f64::NAN; d];
    let mut dz = vec![f64::NAN; b * d * l];
    let mut dh0 = vec![f64::NAN; b * d * n];
    {
        let f = DType::F64;
        let v = c.views();
        let (ov, sv) = (
            view(&mut out, f, &[bi, di, li]),
            view(&mut states, f, &[bi, di, nc, ni]),
        );
        let args = fwd_args(&v, chunk);
        let plan = plan_forward(
            &args,
            Some(&FwdOut {
                out: &ov,
                states: &sv,
                final_states: None,
            }),
        )
        .unwrap();
        // SAFETY: buffers live and distinct.
        unsafe { super::scan_fwd::forward(&plan) };
        let g = BwdArgs {
            states: &sv,
            dout: &view(&mut dout, f, &[bi, di, li]),
            dlast_state: None,
            du: &view(&mut du, f, &[bi, di, li]),
            ddelta: &view(&mut ddelta, f, &[bi, di, li]),
            da: &view(&mut da, f, &[di, ni]),
            db: &view(&mut dbm, f, &[bi, ni, li]),
            dc: &view(&mut dcm, f, &[bi, ni, li]),
            dd: Some(&view(&mut ddv, f, &[di])),
            dz: Some(&view(&mut dz, f, &[bi, di, li])),
            ddelta_bias: None,
            dinitial_state: Some(&view(&mut dh0, f, &[bi, di, ni])),
            workspace: None,
        };
        let plan = plan_backward(&args, &g).unwrap();
        // SAFETY: buffers live and distinct.
        unsafe { super::scan_bwd::backward(&plan) };
    }
    let eps = 1e-6;
    macro_rules! fd_check {
        ($field:ident, $grad:expr) => {{
            let g: &Vec<f64> = &$grad;
            for i in (0..g.len()).step_by(7) {
                let orig = c.$field[i];
                c.$field[i] = orig + eps;
                let lp = loss(&mut c);
                c.$field[i] = orig - eps;
                let lm = loss(&mut c);
                c.$field[i] = orig;
                let fd = (lp - lm) / (2.0 * eps);
                assert!(
                    (fd - g[i]).abs() <= 1e-6 * (1.0 + fd.abs()),
                    "d{} [{i}]: analytic {} vs fd {fd}",
                    stringify!($field),
                    g[i]
                );
            }
        }};
    }
    fd_check!(u, du);
    fd_check!(delta, ddelta);
    fd_check!(a, da);
    fd_check!(bm, dbm);
    fd_check!(cm, dcm);
    fd_check!(dv, ddv);
    fd_check!(z, dz);
    fd_check!(h0, dh0);
}

#[test]
fn mixed_devices_are_rejected_before_any_access() {
    // Views only: plan_forward checks metadata and never dereferences.
    let mk = |dev: Device, shape: &[i64]| {
        let mut v = view(&mut [0.0f32; 0], DType::F32, shape);
        v.device = dev;
        v.ptr = 0x1000;
        v
    };
    let (u, delta) = (
        mk(Device::Cuda(0), &[2, 4, 8]),
        mk(Device::Cuda(0), &[2, 4, 8]),
    );
    let a = mk(Device::Cpu, &[4, 3]);
    let (bm, cm) = (
        mk(Device::Cuda(0), &[2, 3, 8]),
        mk(Device::Cuda(0), &[2, 3, 8]),
    );
    let args = FwdArgs {
        u: &u,
        delta: &delta,
        a: &a,
        b: &bm,
        c: &cm,
        d: None,
        z: None,
        delta_bias: None,
        initial_state: None,
        delta_softplus: false,
        chunk_size: 4,
        seq_idx: None,
        num_seqs: -1,
    };
    let err = plan_forward(&args, None).unwrap_err().to_string();
    assert_eq!(
        err,
        "A: is on cpu but u is on cuda:0; all tensors must be on one device"
    );
    let c1 = mk(Device::Cuda(1), &[2, 3, 8]);
    let a0 = mk(Device::Cuda(0), &[4, 3]);
    let args = FwdArgs {
        a: &a0,
        c: &c1,
        ..args
    };
    let err = plan_forward(&args, None).unwrap_err().to_string();
    assert_eq!(
        err,
        "C: is on cuda:1 but u is on cuda:0; all tensors must be on one device"
    );
}
