/* Fused CPU kernels for the fake-quant hot paths (loaded by qrun/quant/kernels.py through ctypes).
 *
 * Each activation function is one OpenMP loop over a dense float32 buffer: eager PyTorch runs the same maths as 5
 * (grid forward) to 25 (DSQ backward) separate passes over activation-sized tensors, each allocating or streaming a
 * full temporary. DoReFa's weight functions take two loops (a reduction, then the map) in place of ~10 to 15
 * dispatched ops. Outputs may alias inputs elementwise (a gradient masked in place).
 *
 * Floating-point contract: built with -ffp-contract=off and without -ffast-math, so every forward expression
 * rounds exactly like the eager op sequence it replaces (x * (1/step), round half to even, clamp, * step), and
 * eager's add-with-alpha (DSQ's levels and l + Delta q) is one fused multiply-add here wherever ATen's vectorized
 * kernels make it one (see mul_add). Forward values are tested bit-identical, level boundaries included. The sums
 * are accumulated per block in float and across blocks in double.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 4096

static inline int64_t block_end(int64_t start, int64_t n) { return start + BLOCK < n ? start + BLOCK : n; }

/* NaN passes through (both comparisons are false), as with torch.clamp. */
static inline float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

/* exp(v) for v in [-87, 87]: Cody-Waite range reduction and the Cephes expf polynomial (relative error ~1e-7),
 * written so the compiler vectorizes it (libm's expf is a scalar call). */
static inline float exp_approx(float v) {
    v = clampf(v, -87.0f, 87.0f);
    float k = nearbyintf(v * 1.44269504088896341f);
    float r = v - k * 0.693359375f;
    r = r + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* a * b + c as torch.add(c, a, alpha=b) computes it: rounded once on CPUs with FMA, where ATen's vectorized
 * kernels use a fused multiply-add (rounding twice instead moves x right at a DSQ level boundary a whole level). */
static inline float mul_add(float a, float b, float c) {
#ifdef FP_FAST_FMAF
    return fmaf(a, b, c);
#else
    return a * b + c;
#endif
}

/* The level of one element: round(x * inv_step) for grids, floor(x * inv_step + floor_shift) for DSQ. */
static inline float level(float x, float inv_step, int use_floor, float floor_shift) {
    return use_floor ? floorf(mul_add(x, inv_step, floor_shift)) : nearbyintf(x * inv_step);
}

/* offset + scale * q as ste.affine_levels computes it: a plain product when offset is 0 (keeping -0.0), else one
 * add-with-alpha. */
static inline float affine(float q, float scale, float offset) {
    return offset == 0.0f ? scale * q : mul_add(q, scale, offset);
}

/* q = clamp(level(x), qmin, qmax); y = offset + scale * q; codes = q - shift (int8) when codes is not NULL.
 * use_floor is loop-invariant, so the compiler unswitches it out of the vectorized loops. */
void qrun_levels_forward(const float *x, float *y, int8_t *codes, int64_t n, float inv_step, int use_floor,
                         float floor_shift, float qmin, float qmax, float scale, float offset, float shift,
                         int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t end = block_end(start, n);
        if (codes) {
#pragma omp simd
            for (int64_t i = start; i < end; i++) {
                float q = clampf(level(x[i], inv_step, use_floor, floor_shift), qmin, qmax);
                codes[i] = (int8_t)(q - shift);
                y[i] = affine(q, scale, offset);
            }
        } else {
#pragma omp simd
            for (int64_t i = start; i < end; i++) {
                y[i] = affine(clampf(level(x[i], inv_step, use_floor, floor_shift), qmin, qmax), scale, offset);
            }
        }
    }
}

/* y = offset + scale * (codes + shift): the forward's output rebuilt bit-exactly from its codes. */
void qrun_decode(const int8_t *codes, float *y, int64_t n, float scale, float offset, float shift, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t end = block_end(start, n);
#pragma omp simd
        for (int64_t i = start; i < end; i++) y[i] = affine((float)codes[i] + shift, scale, offset);
    }
}

/* Straight-through backward of a grid quantizer: gx = g where lo_t < x < hi_t, else 0 (strict bounds; callers
 * pass the next float outward for inclusive ones), plus the sums a learned range needs, by `rule`:
 *   GRID_PLAIN: none
 *   GRID_LSQ:   sums[0] = sum g q, q = clamp(round(x * inv_step), qmin, qmax) recomputed as in forward;
 *               sums[1] = sum gx x
 *   GRID_PACT:  sums[0] = sum of g over x > above_t;  sums[1] = sum of g over x < below_t */
enum { GRID_PLAIN = 0, GRID_LSQ = 1, GRID_PACT = 2 };

void qrun_grid_backward(const float *g, const float *x, float *gx, int64_t n, float lo_t, float hi_t, int rule,
                        float inv_step, float qmin, float qmax, float above_t, float below_t, double *sums,
                        int threads) {
    double s0 = 0.0, s1 = 0.0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : s0, s1)
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t end = block_end(start, n);
        float b0 = 0.0f, b1 = 0.0f;
        if (rule == GRID_LSQ) {
#pragma omp simd reduction(+ : b0, b1)
            for (int64_t i = start; i < end; i++) {
                float xi = x[i], gi = g[i];
                float pass = (xi > lo_t && xi < hi_t) ? gi : 0.0f;
                b0 += gi * clampf(level(xi, inv_step, 0, 0.0f), qmin, qmax);
                b1 += pass * xi;
                gx[i] = pass;
            }
        } else if (rule == GRID_PACT) {
#pragma omp simd reduction(+ : b0, b1)
            for (int64_t i = start; i < end; i++) {
                float xi = x[i], gi = g[i];
                b0 += xi > above_t ? gi : 0.0f;
                b1 += xi < below_t ? gi : 0.0f;
                gx[i] = (xi > lo_t && xi < hi_t) ? gi : 0.0f;
            }
        } else {
#pragma omp simd
            for (int64_t i = start; i < end; i++) gx[i] = (x[i] > lo_t && x[i] < hi_t) ? g[i] : 0.0f;
        }
        s0 += b0;
        s1 += b1;
    }
    sums[0] = s0;
    sums[1] = s1;
}

/* DSQ backward through phi (the closed forms of qrun/quant/dsq.py), one pass. With r = (x - l)/Delta,
 * d = q - r (|f| = 1/2 - |d|), a = 2c|f|, p = sigmoid(a), D = 2 s c p (1 - p):
 *   gx = g D inside (lo_t < x < hi_t), else 0
 *   sums[0] = sum g,  sums[1] = sum of g over x > upper,  sums[2] = sum g_in q,  sums[3] = sum gx,
 *   sums[4] = sum gx x,  sums[5] = sum sgn(d) h with h = g_in (s^2 (2p - 1) + alpha_coef p (1 - p) a). */
void qrun_dsq_backward(const float *g, const float *x, float *gx, int64_t n, float lo_t, float hi_t, float upper,
                       float inv_delta, float half_shift, float levels, float lower_over_delta, float c,
                       float two_sc, float s2, float alpha_coef, double *sums, int threads) {
    double t0 = 0.0, t1 = 0.0, t2 = 0.0, t3 = 0.0, t4 = 0.0, t5 = 0.0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : t0, t1, t2, t3, t4, t5)
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t end = block_end(start, n);
        float b0 = 0.0f, b1 = 0.0f, b2 = 0.0f, b3 = 0.0f, b4 = 0.0f, b5 = 0.0f;
#pragma omp simd reduction(+ : b0, b1, b2, b3, b4, b5)
        for (int64_t i = start; i < end; i++) {
            float xi = x[i], gi = g[i];
            float q = clampf(level(xi, inv_delta, 1, half_shift), 0.0f, levels);
            float g_in = (xi > lo_t && xi < hi_t) ? gi : 0.0f;
            float d = mul_add(xi, -inv_delta, q) + lower_over_delta;  /* as eager: add(q, x, alpha=-1/Delta) + l/Delta */
            float a = c - 2.0f * c * fabsf(d);
            float p = 1.0f / (1.0f + exp_approx(-a));
            float pq = p - p * p;
            float gxi = g_in * pq * two_sc;
            float h = (pq * a * alpha_coef + 2.0f * s2 * p - s2) * g_in;
            b0 += gi;
            b1 += xi > upper ? gi : 0.0f;
            b2 += g_in * q;
            b3 += gxi;
            b4 += gxi * xi;
            b5 += d > 0.0f ? h : -h;
            gx[i] = gxi;
        }
        t0 += b0;
        t1 += b1;
        t2 += b2;
        t3 += b3;
        t4 += b4;
        t5 += b5;
    }
    sums[0] = t0;
    sums[1] = t1;
    sums[2] = t2;
    sums[3] = t3;
    sums[4] = t4;
    sums[5] = t5;
}

/* DoReFa's k-bit weights (eq. 9) from t = tanh(w): peak = max|t|, then
 * y = 2 round((t / (2 peak) + 1/2) levels) / levels - 1, rounding for rounding like the eager op sequence (tested
 * bit-identical). Weight tensors are small: eager spends its time dispatching ~10 ops, not in the arithmetic. */
void qrun_dorefa_weight_forward(const float *t, float *y, int64_t n, float levels, double *peak_out, int threads) {
    float peak = 0.0f;
    int has_nan = 0;
    /* A compare-select max (fmaxf does not vectorize well here: 15x slower); NaN propagates as in torch.max. */
#pragma omp parallel for simd num_threads(threads) schedule(static) reduction(max : peak) reduction(| : has_nan)
    for (int64_t i = 0; i < n; i++) {
        float a = fabsf(t[i]);
        peak = a > peak ? a : peak;
        has_nan |= a != a;
    }
    if (has_nan) peak = NAN;
    float denom = 2.0f * peak;
#pragma omp parallel for simd num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) y[i] = nearbyintf((t[i] / denom + 0.5f) * levels) / levels * 2.0f - 1.0f;
    *peak_out = peak;
}

/* Its exact gradient, the max path included: with S = sum g t and m = #{|t| = peak},
 * gw = (1 - t^2) (g / peak - [|t| = peak] sgn(t) S / (peak^2 m)). Away from the peak it rounds like eager. */
void qrun_dorefa_weight_backward(const float *g, const float *t, float *gw, int64_t n, float peak, int threads) {
    double dot = 0.0;
    int64_t at_peak = 0;
#pragma omp parallel for simd num_threads(threads) schedule(static) reduction(+ : dot, at_peak)
    for (int64_t i = 0; i < n; i++) {
        dot += (double)g[i] * t[i];
        at_peak += fabsf(t[i]) == peak;
    }
    float through_peak = (float)(dot / ((double)peak * peak * (double)at_peak));
#pragma omp parallel for simd num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float correction = fabsf(t[i]) == peak ? (t[i] > 0.0f ? through_peak : -through_peak) : 0.0f;
        gw[i] = (g[i] / peak - correction) * (1.0f - t[i] * t[i]);
    }
}
