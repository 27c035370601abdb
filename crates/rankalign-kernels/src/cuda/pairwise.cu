// The fused reduction and slope of the weighted pairwise-distance term; the CUDA twin
// of `pairwise.rs`. form 0 = sqrt (the authors' code), 1 = log (meanNN).
#include <stdint.h>

#define MIN_SQ 1e-12

__device__ __forceinline__ double value(double s, int form) { return form == 0 ? sqrt(s) : log(s); }
__device__ __forceinline__ double slope(double s, int form) { return form == 0 ? 0.5 / sqrt(s) : 1.0 / s; }

#define PAIRWISE_KERNELS(T, SUFFIX)                                                                \
    /* One thread per row, a fixed summation order. */                                             \
    extern "C" __global__ void pairwise_fwd_##SUFFIX(const T* s, const T* w, T* out, int n, int m, \
                                                     int form) {                                    \
        int i = blockIdx.x * blockDim.x + threadIdx.x;                                              \
        if (i >= n) return;                                                                         \
        double acc = 0.0;                                                                           \
        for (int j = 0; j < m; ++j) {                                                               \
            double v = (double)s[(size_t)i * m + j];                                                \
            acc += (double)w[(size_t)i * m + j] * value(v < MIN_SQ ? MIN_SQ : v, form);             \
        }                                                                                           \
        out[i] = (T)acc;                                                                            \
    }                                                                                               \
    extern "C" __global__ void pairwise_bwd_##SUFFIX(const T* s, const T* c, T* out, size_t len,   \
                                                     int form) {                                    \
        size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x;                                   \
        if (k >= len) return;                                                                       \
        double v = (double)s[k];                                                                    \
        out[k] = v >= MIN_SQ ? (T)((double)c[k] * slope(v, form)) : (T)0;                           \
    }

PAIRWISE_KERNELS(float, f32)
PAIRWISE_KERNELS(double, f64)
