// Plackett–Luce NLL of a given order, forward and backward; the CUDA twin of
// `plackett_luce.rs` (same formulas, same treatment of -inf scores as absent items).
// One thread per row: each row is a sequential O(m) scan, rows run in parallel.
// `mu` always holds m position weights (ones when the caller has none).
#include <stdint.h>

#define PARITY_EPS 1e-10

__device__ __forceinline__ bool absent(double x) { return isinf(x) && x < 0.0; }
__device__ __forceinline__ double weight(const double* mu, int k) { return mu[k]; }

template <typename T>
__device__ int first_max(const T* row, const uint32_t* ord, int m) {
    int best = -1;
    double bv = 0.0;
    for (int k = 0; k < m; ++k) {
        double x = (double)row[ord[k]];
        if (!absent(x) && (best < 0 || x > bv)) { best = k; bv = x; }
    }
    return best;
}

template <typename T>
__device__ double row_loss(const T* row, const uint32_t* ord, const double* mu, int m, int exact) {
    double loss = 0.0;
    if (exact) {
        double rmax = -INFINITY, rsum = 0.0;
        for (int k = m - 1; k >= 0; --k) {
            double x = (double)row[ord[k]];
            if (absent(x)) continue;
            if (x > rmax) { rsum = rsum * exp(rmax - x) + 1.0; rmax = x; }
            else rsum += exp(x - rmax);
            loss += weight(mu, k) * (rmax + log(rsum) - x);
        }
    } else {
        int a = first_max(row, ord, m);
        double mx = a < 0 ? 0.0 : (double)row[ord[a]];
        double c = 0.0;
        for (int k = m - 1; k >= 0; --k) {
            double x = (double)row[ord[k]];
            if (absent(x)) continue;
            c += exp(x - mx);
            loss += weight(mu, k) * (log(c + PARITY_EPS) - (x - mx));
        }
    }
    return loss;
}

// scratch: n*m doubles, one row of suffix statistics per thread.
template <typename T>
__device__ void row_grad(const T* row, const uint32_t* ord, const double* mu, int m, int exact,
                         double up, double* scratch, T* grad_row) {
    if (exact) {
        double rmax = -INFINITY, rsum = 0.0;
        for (int k = m - 1; k >= 0; --k) {
            double x = (double)row[ord[k]];
            if (!absent(x)) {
                if (x > rmax) { rsum = rsum * exp(rmax - x) + 1.0; rmax = x; }
                else rsum += exp(x - rmax);
            }
            scratch[k] = rsum > 0.0 ? rmax + log(rsum) : -INFINITY;
        }
        double acc = 0.0, prev = -INFINITY;
        for (int j = 0; j < m; ++j) {
            double l = scratch[j];
            double x = (double)row[ord[j]];
            acc = (absent(l) || absent(prev)) ? 0.0 : acc * exp(l - prev);
            double g = 0.0;
            if (!absent(x)) {
                acc += weight(mu, j);
                g = -weight(mu, j) + exp(x - l) * acc;
            }
            grad_row[ord[j]] += (T)(g * up);
            prev = l;
        }
    } else {
        int a = first_max(row, ord, m);
        double mx = a < 0 ? 0.0 : (double)row[ord[a]];
        double c = 0.0;
        for (int k = m - 1; k >= 0; --k) {
            double x = (double)row[ord[k]];
            if (!absent(x)) c += exp(x - mx);
            scratch[k] = c;
        }
        double b = 0.0, via_max = 0.0;
        for (int j = 0; j < m; ++j) {
            double x = (double)row[ord[j]];
            if (absent(x)) continue;
            double denom = scratch[j] + PARITY_EPS;
            b += weight(mu, j) / denom;
            via_max += weight(mu, j) * PARITY_EPS / denom;
            grad_row[ord[j]] += (T)((-weight(mu, j) + exp(x - mx) * b) * up);
        }
        if (a >= 0) grad_row[ord[a]] += (T)(via_max * up);
    }
}

#define PL_KERNELS(T, SUFFIX)                                                                      \
    extern "C" __global__ void pl_nll_fwd_##SUFFIX(const T* scores, const uint32_t* order,          \
                                                   const double* mu, T* out, int n, int m,          \
                                                   int exact) {                                     \
        int i = blockIdx.x * blockDim.x + threadIdx.x;                                              \
        if (i >= n) return;                                                                         \
        out[i] = (T)row_loss<T>(scores + (size_t)i * m, order + (size_t)i * m, mu, m, exact);       \
    }                                                                                               \
    extern "C" __global__ void pl_nll_bwd_##SUFFIX(const T* scores, const uint32_t* order,          \
                                                   const T* upstream, const double* mu,             \
                                                   double* scratch, T* grad, int n, int m,          \
                                                   int exact) {                                     \
        int i = blockIdx.x * blockDim.x + threadIdx.x;                                              \
        if (i >= n) return;                                                                         \
        row_grad<T>(scores + (size_t)i * m, order + (size_t)i * m, mu, m, exact,                    \
                    (double)upstream[i], scratch + (size_t)i * m, grad + (size_t)i * m);            \
    }

PL_KERNELS(float, f32)
PL_KERNELS(double, f64)
