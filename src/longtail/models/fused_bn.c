/* Fused training-mode BatchNorm (+ residual) + ReLU for channels-last CPU tensors.
 *
 * Compiled on first use by longtail/models/fused_bn.py (cc -O3 -march=native -fopenmp) and called
 * through ctypes.  A tensor is an (R, C) row-major matrix: R = N*H*W rows (pixels), C channels,
 * C a multiple of 16.  bf = 1: bfloat16 storage, bf = 0: float32.  Arithmetic is fp32 per
 * element, per-channel sums fp32 within blocks of ROWS rows and fp64 across them.
 *
 * Forward:  y = max(0, (x - mean) * invstd * w + b [+ res])       (batch statistics)
 * Backward: g = dy where y > 0; dres = g;
 *           dx = w*invstd * (g - mean(g) - xhat * mean(g * xhat)),
 *           dw = sum(g * xhat), db = sum(g)
 * PyTorch's separate ops (BN, add, ReLU and their backwards) pass over the activation 13 times
 * per layer, 16 with the residual; this makes 8, 11 with the residual.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

#define INLINE static inline __attribute__((always_inline))

/* Threads for the following parallel regions of the calling thread (PyTorch's count). */
void lt_set_threads(int n) {
    if (n > 0) omp_set_num_threads(n);
}

/* Threads the next parallel region of the calling thread would use (for tests). */
int lt_max_threads(void) { return omp_get_max_threads(); }
#define ROWS 64

INLINE v16f load(const void *p, long i, int bf) {
    v16f f;
    if (bf) {
        v16h h;
        memcpy(&h, (const uint16_t *)p + i, 32);
        v16u u = __builtin_convertvector(h, v16u) << 16;
        memcpy(&f, &u, 64);
    } else {
        memcpy(&f, (const float *)p + i, 64);
    }
    return f;
}

INLINE void store(void *p, long i, v16f f, int bf) {
    if (!bf) {
        memcpy((float *)p + i, &f, 64);
        return;
    }
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    __m512 z;
    memcpy(&z, &f, 64);
    __m256bh hb = _mm512_cvtneps_pbh(z); /* round to nearest even */
    memcpy((uint16_t *)p + i, &hb, 32);
#else
    v16u u;
    memcpy(&u, &f, 64);
    v16u r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;   /* round to nearest even */
    v16u nan = (v16u)((u & 0x7fffffffu) > 0x7f800000u); /* NaN stays NaN */
    r = (r & ~nan) | (((u >> 16) | 0x40u) & nan);
    v16h h = __builtin_convertvector(r, v16h);
    memcpy((uint16_t *)p + i, &h, 32);
#endif
}

INLINE v16f where(v16i mask, v16f v) {
    v16i b;
    memcpy(&b, &v, 64);
    b &= mask;
    memcpy(&v, &b, 64);
    return v;
}

INLINE v16f vec(const float *p) {
    v16f f;
    memcpy(&f, p, 64);
    return f;
}

/* This OpenMP thread's share [lo, hi) of the R rows. */
INLINE void thread_rows(long R, long *lo, long *hi) {
    int t = omp_get_thread_num(), T = omp_get_num_threads();
    *lo = R * t / T;
    *hi = R * (t + 1) / T;
}

/* Adds the 16 lanes of fs and fq into ps[0..16) and pq[0..16). */
INLINE void add_lanes(double *ps, double *pq, v16f fs, v16f fq) {
    for (int j = 0; j < 16; j++) {
        ps[j] += fs[j];
        pq[j] += fq[j];
    }
}

/* Sum over threads of the per-thread partial sums part[t][2][C] into s[C], q[C]. */
static void combine(const double *part, int nt, int C, double *s, double *q) {
    for (int c = 0; c < C; c++) s[c] = q[c] = 0.0;
    for (int t = 0; t < nt; t++)
        for (int c = 0; c < C; c++) {
            s[c] += part[(size_t)t * 2 * C + c];
            q[c] += part[(size_t)t * 2 * C + C + c];
        }
}

/* stats[0..C) = mean, stats[C..2C) = invstd, stats[2C..3C) = scale, stats[3C..4C) = shift,
 * stats[4C..5C) = unbiased variance (the biased one when R == 1).
 * Running statistics (if given) move by `momentum` towards the batch mean and unbiased variance.
 * Returns 0, or -1 when out of memory. */
INLINE int forward_impl(const void *x, const void *res, void *y, long R, int C, const float *w,
                        const float *b, float *run_mean, float *run_var, double momentum,
                        double eps, float *stats, int bf) {
    int nt = omp_get_max_threads();
    double *part = calloc((size_t)nt * 2 * C + 2 * (size_t)C, sizeof(double));
    float *shift0 = malloc((size_t)C * sizeof(float));
    if (!part || !shift0) {
        free(part);
        free(shift0);
        return -1;
    }
    double *s = part + (size_t)nt * 2 * C, *q = s + C;
    /* Sums of (x - x[0]) keep the variance accurate when |mean| >> std. */
    for (int c = 0; c < C; c += 16) {
        v16f v = load(x, c, bf);
        memcpy(shift0 + c, &v, 64);
    }
#pragma omp parallel
    {
        long lo, hi;
        thread_rows(R, &lo, &hi);
        double *ps = part + (size_t)omp_get_thread_num() * 2 * C, *pq = ps + C;
        for (long r0 = lo; r0 < hi; r0 += ROWS) {
            long r1 = r0 + ROWS < hi ? r0 + ROWS : hi;
            for (int c = 0; c < C; c += 16) {
                v16f sh = vec(shift0 + c), fs = {0}, fq = {0};
                for (long r = r0; r < r1; r++) {
                    v16f v = load(x, r * C + c, bf) - sh;
                    fs += v;
                    fq += v * v;
                }
                add_lanes(ps + c, pq + c, fs, fq);
            }
        }
    }
    combine(part, nt, C, s, q);
    for (int c = 0; c < C; c++) {
        double d = s[c] / R, var = q[c] / R - d * d, mean = shift0[c] + d;
        if (var < 0.0) var = 0.0;
        double invstd = 1.0 / sqrt(var + eps);
        stats[c] = (float)mean;
        stats[C + c] = (float)invstd;
        stats[2 * C + c] = (float)(w[c] * invstd);
        stats[3 * C + c] = (float)(b[c] - mean * w[c] * invstd);
        double unbiased = R > 1 ? var * R / (R - 1) : var;
        stats[4 * C + c] = (float)unbiased;
        if (run_mean) {
            run_mean[c] = (float)((1.0 - momentum) * run_mean[c] + momentum * mean);
            run_var[c] = (float)((1.0 - momentum) * run_var[c] + momentum * unbiased);
        }
    }
    free(part);
    free(shift0);
    const float *scale = stats + 2 * C, *shift = stats + 3 * C;
#pragma omp parallel for schedule(static)
    for (long r = 0; r < R; r++)
        for (int c = 0; c < C; c += 16) {
            long i = r * C + c;
            v16f v = load(x, i, bf) * vec(scale + c) + vec(shift + c);
            if (res) v += load(res, i, bf);
            store(y, i, where(v > 0.f, v), bf);
        }
    return 0;
}

/* With res_grad given (the residual variant) the ReLU mask comes from y and the masked gradient
 * g is written to res_grad; otherwise the mask is recomputed from x and y is not read.
 * dw, db: float32 [C].  Returns 0, or -1 when out of memory. */
INLINE int backward_impl(const void *dy, const void *x, const void *y, void *res_grad, void *dx,
                         long R, int C, const float *stats, float *dw, float *db, int bf) {
    const float *mean = stats, *invstd = stats + C, *scale = stats + 2 * C, *shift = stats + 3 * C;
    int nt = omp_get_max_threads();
    double *part = calloc((size_t)nt * 2 * C + 2 * (size_t)C, sizeof(double));
    float *k = malloc((size_t)3 * C * sizeof(float));
    if (!part || !k) {
        free(part);
        free(k);
        return -1;
    }
    double *sg = part + (size_t)nt * 2 * C, *sgx = sg + C;
#pragma omp parallel
    {
        long lo, hi;
        thread_rows(R, &lo, &hi);
        double *ps = part + (size_t)omp_get_thread_num() * 2 * C, *pq = ps + C;
        for (long r0 = lo; r0 < hi; r0 += ROWS) {
            long r1 = r0 + ROWS < hi ? r0 + ROWS : hi;
            for (int c = 0; c < C; c += 16) {
                v16f a = vec(scale + c), b = vec(shift + c), mu = vec(mean + c), fs = {0}, fq = {0};
                for (long r = r0; r < r1; r++) {
                    long i = r * C + c;
                    v16f xv = load(x, i, bf), gv;
                    if (res_grad) {
                        gv = where(load(y, i, bf) > 0.f, load(dy, i, bf));
                        store(res_grad, i, gv, bf);
                    } else {
                        gv = where(xv * a + b > 0.f, load(dy, i, bf));
                    }
                    fs += gv;
                    fq += gv * (xv - mu);
                }
                add_lanes(ps + c, pq + c, fs, fq);
            }
        }
    }
    combine(part, nt, C, sg, sgx);
    float *ka = k, *kb = k + C, *kc = k + 2 * C;
    for (int c = 0; c < C; c++) {
        double is = invstd[c], a = (double)scale[c], bb = -a * is * is * sgx[c] / R;
        ka[c] = (float)a;
        kb[c] = (float)bb;
        kc[c] = (float)(-a * sg[c] / R - bb * mean[c]);
        dw[c] = (float)(sgx[c] * is);
        db[c] = (float)sg[c];
    }
    free(part);
    const void *gsrc = res_grad ? res_grad : dy;
#pragma omp parallel for schedule(static)
    for (long r = 0; r < R; r++)
        for (int c = 0; c < C; c += 16) {
            long i = r * C + c;
            v16f xv = load(x, i, bf), gv = load(gsrc, i, bf);
            if (!res_grad) gv = where(xv * vec(scale + c) + vec(shift + c) > 0.f, gv);
            store(dx, i, vec(ka + c) * gv + vec(kb + c) * xv + vec(kc + c), bf);
        }
    free(k);
    return 0;
}

int lt_bn_relu_forward(const void *x, const void *res, void *y, long R, int C, const float *w,
                       const float *b, float *run_mean, float *run_var, double momentum,
                       double eps, float *stats, int bf) {
    if (bf) return forward_impl(x, res, y, R, C, w, b, run_mean, run_var, momentum, eps, stats, 1);
    return forward_impl(x, res, y, R, C, w, b, run_mean, run_var, momentum, eps, stats, 0);
}

int lt_bn_relu_backward(const void *dy, const void *x, const void *y, void *res_grad, void *dx,
                        long R, int C, const float *stats, float *dw, float *db, int bf) {
    if (bf) return backward_impl(dy, x, y, res_grad, dx, R, C, stats, dw, db, 1);
    return backward_impl(dy, x, y, res_grad, dx, R, C, stats, dw, db, 0);
}
