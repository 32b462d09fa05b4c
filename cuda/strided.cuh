// Strided tensors of any float dtype for the small kernels (state update, causal conv1d):
// TensorRef (cuda/params.h) carries the dtype, read at run time (a uniform branch, cheap next to
// the loads it guards); arithmetic in fp32.
#pragma once
#include "params.h"
#include "common.cuh"

__device__ __forceinline__ float ld_any(const TensorRef& t, long long off) {
    switch (t.dtype) {
    case 0: return ((const float*)t.ptr)[off];
    case 1: return h2f(((const u16*)t.ptr)[off]);
    default: return bf2f(((const u16*)t.ptr)[off]);
    }
}
__device__ __forceinline__ void st_any(const TensorRef& t, long long off, float v) {
    switch (t.dtype) {
    case 0: ((float*)t.ptr)[off] = v; break;
    case 1: ((u16*)t.ptr)[off] = f2h(v); break;
    default: ((u16*)t.ptr)[off] = f2bf(v); break;
    }
}
__device__ __forceinline__ long long ld_int(const TensorRef& t, long long off) {
    return t.dtype == 4 ? (long long)((const int*)t.ptr)[off] : ((const long long*)t.ptr)[off];
}
__device__ __forceinline__ long long off2(const TensorRef& t, long long i, long long j) {
    return i * t.stride[0] + j * t.stride[1];
}
__device__ __forceinline__ long long off3(const TensorRef& t, long long i, long long j,
                                          long long k) {
    return i * t.stride[0] + j * t.stride[1] + k * t.stride[2];
}
__device__ __forceinline__ float nan_f() { return __int_as_float(0x7fffffff); }
