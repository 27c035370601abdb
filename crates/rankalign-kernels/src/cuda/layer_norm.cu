// LayerNorm over the last dimension, forward and backward; the CUDA twin of
// `layer_norm.rs`. One block per row with a shared-memory reduction; the weight and bias
// gradients are column sums over rows in a second kernel (one thread per column, a fixed
// order, so results are deterministic).
#include <stdint.h>

#define THREADS 256

__device__ double block_sum(double v, double* shared) {
    int t = threadIdx.x;
    shared[t] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) shared[t] += shared[t + s];
        __syncthreads();
    }
    double total = shared[0];
    __syncthreads();
    return total;
}

template <typename T>
__device__ void moments(const T* x, int d, double eps, double* shared, double* mean, double* rstd) {
    double s = 0.0;
    for (int k = threadIdx.x; k < d; k += blockDim.x) s += (double)x[k];
    double mu = block_sum(s, shared) / d;
    double v = 0.0;
    for (int k = threadIdx.x; k < d; k += blockDim.x) { double c = (double)x[k] - mu; v += c * c; }
    double var = block_sum(v, shared) / d;
    *mean = mu;
    *rstd = rsqrt(var + eps);
}

#define LN_KERNELS(T, SUFFIX)                                                                      \
    extern "C" __global__ void layer_norm_fwd_##SUFFIX(const T* x, const T* w, const T* b, T* y,    \
                                                       int rows, int d, double eps) {               \
        __shared__ double shared[THREADS];                                                          \
        int r = blockIdx.x;                                                                         \
        if (r >= rows) return;                                                                      \
        const T* xr = x + (size_t)r * d;                                                            \
        double mean, rstd;                                                                          \
        moments<T>(xr, d, eps, shared, &mean, &rstd);                                               \
        for (int k = threadIdx.x; k < d; k += blockDim.x)                                           \
            y[(size_t)r * d + k] = (T)(((double)xr[k] - mean) * rstd * (double)w[k] + (double)b[k]); \
    }                                                                                               \
    /* out = [dx (rows*d) | dw (d) | db (d)]; this kernel writes dx. */                             \
    extern "C" __global__ void layer_norm_bwd_dx_##SUFFIX(const T* x, const T* w, const T* dy,      \
                                                          T* out, int rows, int d, double eps) {    \
        __shared__ double shared[THREADS];                                                          \
        int r = blockIdx.x;                                                                         \
        if (r >= rows) return;                                                                      \
        const T* xr = x + (size_t)r * d;                                                            \
        const T* gr = dy + (size_t)r * d;                                                           \
        double mean, rstd;                                                                          \
        moments<T>(xr, d, eps, shared, &mean, &rstd);                                               \
        double sg = 0.0, sgx = 0.0;                                                                 \
        for (int k = threadIdx.x; k < d; k += blockDim.x) {                                         \
            double g = (double)gr[k] * (double)w[k];                                                \
            sg += g;                                                                                \
            sgx += g * ((double)xr[k] - mean) * rstd;                                               \
        }                                                                                           \
        double mg = block_sum(sg, shared) / d;                                                      \
        double mgx = block_sum(sgx, shared) / d;                                                    \
        for (int k = threadIdx.x; k < d; k += blockDim.x) {                                         \
            double xh = ((double)xr[k] - mean) * rstd;                                              \
            out[(size_t)r * d + k] = (T)(rstd * ((double)gr[k] * (double)w[k] - mg - xh * mgx));    \
        }                                                                                           \
    }                                                                                               \
    /* One thread per column: dw = sum_r dy*xhat, db = sum_r dy. Needs per-row moments, */        \
    /* recomputed serially per column block from `stats` = [mean, rstd] per row. */               \
    extern "C" __global__ void layer_norm_stats_##SUFFIX(const T* x, double* stats, int rows,       \
                                                         int d, double eps) {                       \
        __shared__ double shared[THREADS];                                                          \
        int r = blockIdx.x;                                                                         \
        if (r >= rows) return;                                                                      \
        double mean, rstd;                                                                          \
        moments<T>(x + (size_t)r * d, d, eps, shared, &mean, &rstd);                                \
        if (threadIdx.x == 0) { stats[2 * r] = mean; stats[2 * r + 1] = rstd; }                     \
    }                                                                                               \
    extern "C" __global__ void layer_norm_bwd_wb_##SUFFIX(const T* x, const T* dy,                 \
                                                          const double* stats, T* out, int rows,    \
                                                          int d) {                                  \
        int k = blockIdx.x * blockDim.x + threadIdx.x;                                              \
        if (k >= d) return;                                                                         \
        double dw = 0.0, db = 0.0;                                                                  \
        for (int r = 0; r < rows; ++r) {                                                            \
            double g = (double)dy[(size_t)r * d + k];                                               \
            dw += g * ((double)x[(size_t)r * d + k] - stats[2 * r]) * stats[2 * r + 1];             \
            db += g;                                                                                \
        }                                                                                           \
        out[(size_t)rows * d + k] = (T)dw;                                                          \
        out[(size_t)rows * d + d + k] = (T)db;                                                      \
    }

LN_KERNELS(float, f32)
LN_KERNELS(double, f64)
