/* 3x3, padding 1 convolutions of channels-last bfloat16 tensors, for CPUs with AVX512-BF16
 * (vdpbf16ps: 16 fp32 lanes += products of bf16 pairs): forward and input gradient at stride 1,
 * weight gradient at stride 1 or 2.
 *
 * Compiled on first use by longtail/models/kernels.py (cc -O3 -march=native -fopenmp) and called
 * through ctypes from longtail/models/conv3x3.py.  oneDNN's kernels reach about 40% of this
 * machine's bf16 matmul peak on ResNet-32's 16-channel layers and on every weight gradient;
 * these reach 70-100% by reusing each loaded value for several products (see the two kernels).
 *
 * Layouts: x (N, H, W, CI) and y (N, H, W, CO) bf16, rows of channels; w and dw (CO, CI, 3, 3)
 * fp32 with the strides PyTorch gives them (contiguous or channels-last).  Products are exact
 * (bf16 x bf16 fits fp32), sums fp32.  Requirements (checked by the caller): CI % 16 == 0 and
 * CO % 16 == 0.
 *
 *   lt_conv3x3_forward(x, w, y, 0, ..., transpose = 0):   y = conv(x, w)
 *   lt_conv3x3_forward(dy, w, dx, g, ..., transpose = 1): dx = conv(dy, flip(w)^T) + g, the input
 *                                                         gradient (+ another branch's, g)
 *   lt_conv3x3_weight_grad(x, dy, dw, ..., S):         dw[o,i,kh,kw] = sum dy[p,o] x[S p+t,i]
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

/* Threads for the following parallel regions of the calling thread (PyTorch's count). */
void lt_set_threads(int n) {
    if (n > 0) omp_set_num_threads(n);
}

/* Threads the next parallel region of the calling thread would use (for tests). */
int lt_max_threads(void) { return omp_get_max_threads(); }

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>

#define INLINE static inline __attribute__((always_inline))

int lt_conv3x3_available(void) { return 1; }

INLINE uint16_t to_bf16(float f) { /* round to nearest even; weights are finite */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

INLINE __m512bh bcast(const uint16_t *p) { /* one bf16 pair in all 16 lanes */
    int32_t v;
    memcpy(&v, p, 4);
    return (__m512bh)_mm512_set1_epi32(v);
}

/* ---------------------------------------------------------------------------------------------
 * Forward.  Register block: PB output pixels of one row x OB blocks of 16 output channels, fp32
 * accumulators.  For each kernel row kh and input-channel pair, the 3 x OB weight vectors stay in
 * registers and each broadcast input pair feeds the three horizontal taps it touches, so a
 * broadcast serves 3*OB products instead of OB.  No padded copy: kernel rows outside the image
 * are skipped (kh0..kh1), and so is the input column left of the block when the block starts
 * the row (L = 1) and the one right of it when it ends the row (R = 1).
 *   x: input at the block's first output pixel, rs: row stride (elements);
 *   wp: packed weights [CO/16][3][3][CI/2][16][2] (output channel in the lane, input pair
 *   innermost) at the block's first channel block, wob elements between channel blocks.
 */
#define DEFINE_FORWARD(PB, OB)                                                                  \
    static void fwd_##PB##_##OB(const uint16_t *x, long rs, int kh0, int kh1, int L, int R,    \
                                int CI, const uint16_t *wp, long wob, uint16_t *y,             \
                                const uint16_t *a, int CO) {                                   \
        __m512 acc[PB][OB];                                                                     \
        _Pragma("GCC unroll 16") for (int p = 0; p < PB; p++)                                   \
            _Pragma("GCC unroll 2") for (int b = 0; b < OB; b++) acc[p][b] =                    \
                a ? _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(                              \
                        (const __m256i *)(a + (long)p * CO + b * 16)))                          \
                  : _mm512_setzero_ps();                                                        \
        for (int kh = kh0; kh < kh1; kh++) {                                                    \
            const uint16_t *xr = x + (kh - 1) * rs;                                             \
            for (int ip = 0; ip < CI / 2; ip++) {                                               \
                __m512bh wv[3][OB];                                                             \
                _Pragma("GCC unroll 3") for (int kw = 0; kw < 3; kw++)                          \
                    _Pragma("GCC unroll 2") for (int b = 0; b < OB; b++) wv[kw][b] =            \
                        (__m512bh)_mm512_loadu_si512(                                           \
                            wp + b * wob + ((long)(kh * 3 + kw) * CI + 2 * ip) * 16);           \
                _Pragma("GCC unroll 18") for (int q = 0; q < PB + 2; q++) {                     \
                    if ((q == 0 && L) || (q == PB + 1 && R)) continue; /* outside the image */  \
                    __m512bh xv = bcast(xr + (long)(q - 1) * CI + 2 * ip);                      \
                    _Pragma("GCC unroll 3") for (int kw = 0; kw < 3; kw++) {                    \
                        int p = q - kw;                                                         \
                        if (p >= 0 && p < PB)                                                   \
                            _Pragma("GCC unroll 2") for (int b = 0; b < OB; b++) acc[p][b] =    \
                                _mm512_dpbf16_ps(acc[p][b], wv[kw][b], xv);                     \
                    }                                                                           \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
        _Pragma("GCC unroll 16") for (int p = 0; p < PB; p++)                                   \
            _Pragma("GCC unroll 2") for (int b = 0; b < OB; b++)                                \
                _mm256_storeu_si256((__m256i *)(y + (long)p * CO + b * 16),                     \
                                    (__m256i)_mm512_cvtneps_pbh(acc[p][b]));                    \
    }

/* Every block width up to 16 pixels (one channel block) or 8 (two): a row is cut into equal
 * blocks (28 = 14 + 14, 7 = 7), as wide as the registers allow. */
DEFINE_FORWARD(1, 1) DEFINE_FORWARD(2, 1) DEFINE_FORWARD(3, 1) DEFINE_FORWARD(4, 1)
DEFINE_FORWARD(5, 1) DEFINE_FORWARD(6, 1) DEFINE_FORWARD(7, 1) DEFINE_FORWARD(8, 1)
DEFINE_FORWARD(9, 1) DEFINE_FORWARD(10, 1) DEFINE_FORWARD(11, 1) DEFINE_FORWARD(12, 1)
DEFINE_FORWARD(13, 1) DEFINE_FORWARD(14, 1) DEFINE_FORWARD(15, 1) DEFINE_FORWARD(16, 1)
DEFINE_FORWARD(1, 2) DEFINE_FORWARD(2, 2) DEFINE_FORWARD(3, 2) DEFINE_FORWARD(4, 2)
DEFINE_FORWARD(5, 2) DEFINE_FORWARD(6, 2) DEFINE_FORWARD(7, 2) DEFINE_FORWARD(8, 2)

typedef void (*fwd_fn)(const uint16_t *, long, int, int, int, int, int, const uint16_t *, long,
                       uint16_t *, const uint16_t *, int);
static const fwd_fn FWD1[17] = {0, fwd_1_1, fwd_2_1, fwd_3_1, fwd_4_1, fwd_5_1, fwd_6_1,
                                fwd_7_1, fwd_8_1, fwd_9_1, fwd_10_1, fwd_11_1, fwd_12_1,
                                fwd_13_1, fwd_14_1, fwd_15_1, fwd_16_1};
static const fwd_fn FWD2[9] = {0, fwd_1_2, fwd_2_2, fwd_3_2, fwd_4_2,
                               fwd_5_2, fwd_6_2, fwd_7_2, fwd_8_2};

/* x (N, H, W, CI) bf16 -> y (N, H, W, CO) bf16, plus add (same shape as y; NULL: nothing) before
 * the one rounding to bf16.  w (CO, CI, 3, 3) fp32, or with transpose = 1 w (CI, CO, 3, 3) used
 * as its flipped transpose (the input gradient of a convolution whose weight is w); w's element
 * [a][b][kh][kw] is at a * sa + b * sb + (3 * kh + kw) * st (PyTorch's contiguous or
 * channels-last weights).  Returns 0, or 1 if the workspace could not be allocated. */
int lt_conv3x3_forward(const uint16_t *x, const float *w, uint16_t *y, const uint16_t *add,
                       int N, int H, int W, int CI, int CO, int transpose, long sa, long sb,
                       long st) {
    const long rs = (long)W * CI, wob = 9L * CI * 16;
    uint16_t *wp = aligned_alloc(64, ((size_t)CO * CI * 9 * 2 + 63) / 64 * 64);
    if (!wp) return 1;
    const int ob2 = CO % 32 == 0 ? 2 : 1, widest = ob2 == 2 ? 8 : 16;
    const int blocks = (W + widest - 1) / widest, narrow = W / blocks, wider = W % blocks;
#pragma omp parallel
    {
        /* Pack weights: wp[o/16][kh][kw][i/2][o%16][i%2] = W[o][i][kh][kw] (bf16). */
#pragma omp for schedule(static)
        for (int o = 0; o < CO; o++)
            for (int i = 0; i < CI; i++)
                for (int t = 0; t < 9; t++) {
                    const float v = transpose ? w[i * sa + o * sb + (8 - t) * st]
                                              : w[o * sa + i * sb + t * st];
                    wp[(((long)(o / 16) * 9 + t) * CI + (i & ~1)) * 16 + (o % 16) * 2 + (i & 1)] =
                        to_bf16(v);
                }
#pragma omp for schedule(static)
        for (long r = 0; r < (long)N * H; r++) {
            const int h = r % H, kh0 = h == 0, kh1 = h == H - 1 ? 2 : 3;
            const uint16_t *xrow = x + r * rs;
            const long yoff = r * (long)W * CO;
            for (int k = 0, w0 = 0; k < blocks; k++) {
                const int pb = narrow + (k < wider);
                for (int ob = 0; ob < CO / 16; ob += ob2) {
                    const long o = yoff + (long)w0 * CO + ob * 16;
                    (ob2 == 2 ? FWD2 : FWD1)[pb](xrow + (long)w0 * CI, rs, kh0, kh1, w0 == 0,
                                                 w0 + pb == W, CI, wp + ob * wob, wob, y + o,
                                                 add ? add + o : 0, CO);
                }
                w0 += pb;
            }
        }
    }
    free(wp);
    return 0;
}

/* 16 channels of two pixels a, b (either NULL = zeros) as pairs: a0 b0 a1 b1 ... a15 b15. */
INLINE __m512i pairs(const uint16_t *a, const uint16_t *b) {
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                         24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                         16, 0);
    __m256i lo = a ? _mm256_loadu_si256((const __m256i *)a) : _mm256_setzero_si256();
    __m256i hi = b ? _mm256_loadu_si256((const __m256i *)b) : _mm256_setzero_si256();
    return _mm512_permutexvar_epi16(idx, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
}

/* ---------------------------------------------------------------------------------------------
 * Weight gradient: dw[o][i][kh][kw] = sum over output pixels p of dy[p][o] x[S p + (kh,kw) - 1][i]
 * (stride S = 1 or 2).  vdpbf16ps sums over pairs, so the reduction runs over pairs of adjacent
 * output pixels (2k, 2k+1) of one row: xt[kw] holds each zero-padded input row with the two
 * input pixels those outputs read at tap kw interleaved per channel, and dyp holds dy's pixel
 * pairs the same way.  (For S = 1, tap 2's pairs are tap 0's shifted by one, so two arrays do.)
 * Register block: lanes = 16 input channels, the three horizontal taps x 8 output channels = 24
 * accumulators; per pixel pair 3 vector loads + 8 broadcasts feed 24 products.  Threads take
 * whole images and sum into private fp32 buffers [9][CO][CI], added at the end.
 */
static void wgrad_image(const uint16_t *x, const uint16_t *dy, float *acc_out, uint16_t *buf,
                        int Hi, int Wi, int S, int CI, int CO) {
    const int Ho = (Hi - 1) / S + 1, Wo = (Wi - 1) / S + 1;
    const int K = (Wo + 1) / 2; /* output pixel pairs per row (the last half zero if Wo odd) */
    const long xrs = (long)(K + 1) * CI * 2, xsz = (long)(Hi + 2) * xrs, drs = (long)K * CO * 2;
    const uint16_t *xt[3];
    uint16_t *dyp = buf + (S == 1 ? 2 : 3) * xsz;
    /* xt[kw][h'][k][i][j] = x[h' - 1][S * (2k + j) + kw - 1][i], zero outside the image. */
    for (int kw = 0; kw < (S == 1 ? 2 : 3); kw++) {
        uint16_t *dst = buf + kw * xsz;
        xt[kw] = dst;
        for (int hp = 0; hp < Hi + 2; hp++) {
            const int h = hp - 1, ok = h >= 0 && h < Hi;
            const uint16_t *row = x + (long)h * Wi * CI;
            for (int k = 0; k < K + 1; k++) {
                const int c0 = S * 2 * k + kw - 1, c1 = c0 + S;
                const uint16_t *a = ok && c0 >= 0 && c0 < Wi ? row + (long)c0 * CI : 0;
                const uint16_t *b = ok && c1 >= 0 && c1 < Wi ? row + (long)c1 * CI : 0;
                for (int i = 0; i < CI; i += 16)
                    _mm512_storeu_si512(dst + hp * xrs + ((long)k * CI + i) * 2,
                                        pairs(a ? a + i : 0, b ? b + i : 0));
            }
        }
    }
    if (S == 1) xt[2] = xt[0] + CI * 2; /* pair (2k+1, 2k+2) is tap 0's pair k + 1 */
    /* dyp[h][k][o][j] = dy[h][2k + j][o]. */
    for (int h = 0; h < Ho; h++)
        for (int k = 0; k < K; k++) {
            const uint16_t *a = dy + ((long)h * Wo + 2 * k) * CO;
            const uint16_t *b = 2 * k + 1 < Wo ? a + CO : 0;
            for (int o = 0; o < CO; o += 16)
                _mm512_storeu_si512(dyp + h * drs + ((long)k * CO + o) * 2,
                                    pairs(a + o, b ? b + o : 0));
        }
    for (int kh = 0; kh < 3; kh++)
        for (int ib = 0; ib < CI; ib += 16)
            for (int o0 = 0; o0 < CO; o0 += 8) {
                __m512 acc[3][8];
#pragma GCC unroll 3
                for (int kw = 0; kw < 3; kw++)
#pragma GCC unroll 8
                    for (int s = 0; s < 8; s++) acc[kw][s] = _mm512_setzero_ps();
                for (int h = 0; h < Ho; h++) {
                    const long xoff = (S * h + kh) * xrs + ib * 2;
                    const uint16_t *r0 = xt[0] + xoff, *r1 = xt[1] + xoff, *r2 = xt[2] + xoff;
                    const uint16_t *dr = dyp + h * drs + o0 * 2;
                    for (int k = 0; k < K; k++) {
                        __m512bh xa[3];
                        xa[0] = (__m512bh)_mm512_loadu_si512(r0 + (long)k * CI * 2);
                        xa[1] = (__m512bh)_mm512_loadu_si512(r1 + (long)k * CI * 2);
                        xa[2] = (__m512bh)_mm512_loadu_si512(r2 + (long)k * CI * 2);
#pragma GCC unroll 8
                        for (int s = 0; s < 8; s++) {
                            __m512bh d = bcast(dr + (long)k * CO * 2 + 2 * s);
#pragma GCC unroll 3
                            for (int kw = 0; kw < 3; kw++)
                                acc[kw][s] = _mm512_dpbf16_ps(acc[kw][s], xa[kw], d);
                        }
                    }
                }
#pragma GCC unroll 3
                for (int kw = 0; kw < 3; kw++)
#pragma GCC unroll 8
                    for (int s = 0; s < 8; s++) {
                        float *dst = acc_out + ((long)(kh * 3 + kw) * CO + o0 + s) * CI + ib;
                        _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), acc[kw][s]));
                    }
            }
}

/* dw (CO, CI, 3, 3) fp32 = weight gradient of y = conv(x, w, stride S, padding 1) given dy;
 * x (N, Hi, Wi, CI), dy (N, (Hi-1)/S + 1, (Wi-1)/S + 1, CO); dw[o][i][kh][kw] is written at
 * o * so + i * si + (3 * kh + kw) * st.  Returns 0, or 1 if out of memory. */
int lt_conv3x3_weight_grad(const uint16_t *x, const uint16_t *dy, float *dw, int N, int Hi,
                           int Wi, int CI, int CO, int S, long so, long si, long st) {
    if (S != 1 && S != 2) return 2;
    const int T = omp_get_max_threads();
    const int Ho = (Hi - 1) / S + 1, Wo = (Wi - 1) / S + 1, K = (Wo + 1) / 2;
    const size_t xsz = (size_t)(Hi + 2) * (K + 1) * CI * 2, dsz = (size_t)Ho * K * CO * 2;
    const size_t per = 9 * (size_t)CO * CI, tbuf = 3 * xsz + dsz + 32;
    float *acc = calloc((size_t)T * per, sizeof(float));
    uint16_t *buf = malloc((size_t)T * tbuf * 2);
    if (!acc || !buf) {
        free(acc);
        free(buf);
        return 1;
    }
#pragma omp parallel num_threads(T)
    {
        const int t = omp_get_thread_num();
#pragma omp for schedule(static)
        for (int n = 0; n < N; n++)
            wgrad_image(x + (long)n * Hi * Wi * CI, dy + (long)n * Ho * Wo * CO, acc + t * per,
                        buf + t * tbuf, Hi, Wi, S, CI, CO);
#pragma omp for schedule(static)
        for (long e = 0; e < (long)per; e++) { /* e over (tap, o, i), the buffers' order */
            float s = 0;
            for (int u = 0; u < T; u++) s += acc[u * per + e];
            const long i = e % CI, o = (e / CI) % CO, tap = e / CI / CO;
            dw[o * so + i * si + tap * st] = s;
        }
    }
    free(acc);
    free(buf);
    return 0;
}

#else /* no AVX512-BF16: conv3x3.py uses PyTorch's convolution */
int lt_conv3x3_available(void) { return 0; }
int lt_conv3x3_forward(const uint16_t *x, const float *w, uint16_t *y, const uint16_t *add,
                       int N, int H, int W, int CI, int CO, int transpose, long sa, long sb,
                       long st) {
    return 2;
}
int lt_conv3x3_weight_grad(const uint16_t *x, const uint16_t *dy, float *dw, int N, int Hi,
                           int Wi, int CI, int CO, int S, long so, long si, long st) {
    return 2;
}
#endif
