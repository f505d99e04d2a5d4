/* The factorized DeepFM graph (train/factorize.py builds it, bidder/rowkernel.py reads it) as two C loops.

   imp part, per imp i (one row of the imp inputs):
       x = [table rows of its single fields, flattened | per multi field the sum (or mean) of its tags' table rows]
       x = [x | x * x]
       part[i] = x @ W                                  (W: [2 * K, D]; no constants on the imp side)
   rows, per row r pairing imp row_imp[r] with candidate row_cand[r]:
       t = part[row_imp[r]] + cand[row_cand[r]]                     ([D])
       h = relu(t);  h = relu(h @ W_k^T + b_k) for each layer k
       ctr[r] = sigmoid(h . out + beta * |t[s0:s1]|^2)

   The tables are float32 here: a compressed table is dequantized once at load exactly as the graph's
   DequantizeLinear (or Cast and Mul) does it per gathered row, so the numbers are the graph's numbers. The sums run
   in another order than ONNX Runtime's (its Gemm blocks them its own way): the results agree to float32 rounding,
   and the serving scorer checks them against model.onnx at load to the graphs' own 1e-6.

   Vectors of 8 floats (GCC vector extensions: one AVX register, or two SSE ones); a part is D padded to a multiple
   of 8 (zeros), a layer's output likewise. Each x coordinate adds its weight row to the part held in registers; the
   rows of W that reach only a few columns (the squares and linear weights feed the scalar alone) are added one
   column at a time after. In a layer, the inputs whose ReLU is 0 are dropped first (without a branch per input),
   and each remaining one adds its weight row to the layer's output held in registers. */
#ifndef BIDDER_ROWKERNEL_H
#define BIDDER_ROWKERNEL_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* gcc on x86-64 Linux: one copy of each loop for x86-64-v3 machines (AVX2, FMA) and one for any x86-64, chosen
   at load time by the CPU's features; elsewhere the compiler's default target. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define RK_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define RK_CLONES
#endif
#define RK_INLINE static inline __attribute__((always_inline))

#define RK_MAX_MULTI 16
#define RK_MAX_LAYERS 16
#define RK_LANES 8
#define RK_MAX_VECTORS 16  /* parts and layer outputs up to 128 wide are kept in registers; wider ones in memory */

typedef float rk_v __attribute__((vector_size(32)));
typedef float rk_vu __attribute__((vector_size(32), aligned(4)));  /* unaligned loads and stores */
typedef int32_t rk_vi __attribute__((vector_size(32)));
#define RK_AT(at) (*(rk_vu *)(at))

/* max(v, 0) lane by lane (a comparison gives all bits set where true) */
RK_INLINE rk_v rk_relu(rk_v v) { return (rk_v)((rk_vi)v & (v > 0.0f)); }

typedef struct {
    /* imp side */
    int n_single;                 /* single fields read from the sparse input */
    const int64_t *columns;       /* [n_single] their columns of the sparse input */
    const int64_t *offsets;       /* [n_single] their first row in the single table */
    const float *single;          /* [single_rows, single_width] */
    int64_t single_rows;
    int single_width;
    int n_multi;                  /* multi fields, each an input of its own */
    const float *multi[RK_MAX_MULTI];     /* [multi_rows[m], multi_width[m]] */
    int64_t multi_rows[RK_MAX_MULTI];
    int multi_width[RK_MAX_MULTI];
    /* mean pooling: 0 none (a sum), 1 divided by (the sum's column multi_count[m] + eps), 2 divided by (the number
       of non-zero indices + eps) */
    int multi_mean[RK_MAX_MULTI];
    int multi_count[RK_MAX_MULTI];
    float multi_eps[RK_MAX_MULTI];
    int k;                        /* width of x before the squares */
    int d, dp;                    /* width of a part, and padded to a multiple of 8 */
    int n_wide;                   /* coordinates of x whose weight row spans more than a vector */
    const int32_t *wide;          /* [n_wide] which */
    const float *wide_w;          /* [n_wide, dp] their weight rows, padded */
    int n_narrow;                 /* the other coordinates with a non-zero weight */
    const int32_t *narrow;        /* [n_narrow] which */
    const int32_t *narrow_lo, *narrow_hi;  /* [n_narrow] their first and one past their last non-zero column */
    const float *w;               /* [2k, d] all weight rows */
    /* rows */
    int n_layers;
    const float *layer_w[RK_MAX_LAYERS];       /* [in, out_p]: layer l's weight, transposed, padded */
    const float *layer_b[RK_MAX_LAYERS];       /* [out_p] */
    const int32_t *layer_inputs[RK_MAX_LAYERS]; /* the inputs whose weight row is not all zeros */
    int layer_n_inputs[RK_MAX_LAYERS];
    int layer_out_p[RK_MAX_LAYERS];
    const float *out;             /* [width of the last output, padded] */
    int out_p;
    float beta;
    int s0, s1;
    int max_width;                /* the widest padded h (scratch sizes) */
} rk_model;

/* part += a * w over nv vectors held in registers, for each (a, w) of the wide rows */
RK_INLINE void rk_wide(const rk_model *m, const float *x, float *part, const int nv) {
    rk_v acc[RK_MAX_VECTORS];
    for (int v = 0; v < nv; v++) acc[v] = (rk_v){0};
    for (int q = 0; q < m->n_wide; q++) {
        const float a = x[m->wide[q]];
        const float *w = m->wide_w + (int64_t)q * m->dp;
        for (int v = 0; v < nv; v++) acc[v] += a * RK_AT(w + v * RK_LANES);
    }
    for (int v = 0; v < nv; v++) RK_AT(part + v * RK_LANES) = acc[v];
}

/* part[i] for imps [0, n); returns -1 and the bad index in *bad when a gathered index is outside its table.
   sparse: [n, sparse_stride]; multi_index[m]: [n, multi_stride[m]]; x: scratch of 2k floats; part: [n, dp]. */
RK_CLONES
static int rk_imp_part(const rk_model *m, int n, const int64_t *sparse, int sparse_stride,
                       const int64_t *const *multi_index, const int *multi_stride, float *x, float *part,
                       int64_t *bad) {
    const int k = m->k, d = m->d, dp = m->dp, width = m->single_width, nv = dp / RK_LANES;
    for (int i = 0; i < n; i++) {
        float *xp = x;
        const int64_t *row = sparse + (int64_t)i * sparse_stride;
        for (int s = 0; s < m->n_single; s++) {
            const int64_t at = row[m->columns[s]] + m->offsets[s];
            if (at < 0 || at >= m->single_rows) { *bad = at; return -1; }
            memcpy(xp, m->single + at * width, (size_t)width * sizeof(float));
            xp += width;
        }
        for (int f = 0; f < m->n_multi; f++) {
            const int w = m->multi_width[f], stride = multi_stride[f];
            const int64_t *tags = multi_index[f] + (int64_t)i * stride;
            for (int c = 0; c < w; c++) xp[c] = 0.0f;
            for (int t = 0; t < stride; t++) {
                const int64_t at = tags[t];
                if (at < 0 || at >= m->multi_rows[f]) { *bad = at; return -1; }
                const float *v = m->multi[f] + at * w;
                for (int c = 0; c < w; c++) xp[c] += v[c];
            }
            if (m->multi_mean[f]) {
                float count = 0.0f;
                if (m->multi_mean[f] == 1) count = xp[m->multi_count[f]];
                else for (int t = 0; t < stride; t++) count += tags[t] != 0 ? 1.0f : 0.0f;
                const float denominator = count + m->multi_eps[f];
                for (int c = 0; c < w; c++) xp[c] = xp[c] / denominator;
            }
            xp += w;
        }
        for (int c = 0; c < k; c++) x[k + c] = x[c] * x[c];
        float *p = part + (int64_t)i * dp;
        switch (nv) {  /* constant trip counts: the accumulators stay in registers */
#define RK_CASE(NV) case NV: rk_wide(m, x, p, NV); break;
            RK_CASE(1) RK_CASE(2) RK_CASE(3) RK_CASE(4) RK_CASE(5) RK_CASE(6) RK_CASE(7) RK_CASE(8)
            RK_CASE(9) RK_CASE(10) RK_CASE(11) RK_CASE(12) RK_CASE(13) RK_CASE(14) RK_CASE(15) RK_CASE(16)
#undef RK_CASE
            default:
                for (int j = 0; j < dp; j++) p[j] = 0.0f;
                for (int q = 0; q < m->n_wide; q++) {
                    const float a = x[m->wide[q]];
                    const float *w = m->wide_w + (int64_t)q * dp;
                    for (int j = 0; j < dp; j++) p[j] += a * w[j];
                }
        }
        for (int q = 0; q < m->n_narrow; q++) {
            const int r = m->narrow[q];
            const float a = x[r];
            const float *w = m->w + (int64_t)r * d;
            for (int j = m->narrow_lo[q]; j < m->narrow_hi[q]; j++) p[j] += a * w[j];
        }
    }
    return 0;
}

/* out = relu(bias + sum over the listed inputs j of h[j] * w[j]), nv vectors in registers */
RK_INLINE void rk_layer(const float *w, const float *bias, const float *h, const int32_t *inputs, int n,
                        float *out, const int nv) {
    rk_v acc[RK_MAX_VECTORS];
    for (int v = 0; v < nv; v++) acc[v] = RK_AT(bias + v * RK_LANES);
    for (int q = 0; q < n; q++) {
        const int j = inputs[q];
        const float a = h[j];
        const float *wj = w + (int64_t)j * nv * RK_LANES;
        for (int v = 0; v < nv; v++) acc[v] += a * RK_AT(wj + v * RK_LANES);
    }
    for (int v = 0; v < nv; v++) {
        const rk_v value = acc[v];
        RK_AT(out + v * RK_LANES) = rk_relu(value);
    }
}

/* ctr[r] for rows [0, rows) over the imps' parts and the candidates' parts (n_cand of them, both [., dp]); -1 and
   the bad index in *bad when a row names an imp or candidate outside [0, n_imps) / [0, n_cand).
   scratch: 3 * max_width floats and max_width ints. */
RK_CLONES
static int rk_rows(const rk_model *m, const float *part, int n_imps, const float *cand, int64_t n_cand,
                   const int64_t *row_imp, const int64_t *row_cand, int rows, float *scratch, int32_t *live,
                   float *ctr, int64_t *bad) {
    const int dp = m->dp;
    float *t = scratch;
    for (int r = 0; r < rows; r++) {
        float *a = scratch + m->max_width, *b = scratch + 2 * m->max_width;
        const int64_t i = row_imp[r], c = row_cand[r];
        if (i < 0 || i >= n_imps) { *bad = i; return -1; }
        if (c < 0 || c >= n_cand) { *bad = c; return -1; }
        const float *pi = part + i * dp, *pc = cand + c * dp;
        for (int v = 0; v < dp; v += RK_LANES) {
            const rk_v value = RK_AT(pi + v) + RK_AT(pc + v);
            RK_AT(t + v) = value;
            RK_AT(a + v) = rk_relu(value);
        }
        float square = 0.0f;
        for (int j = m->s0; j < m->s1; j++) square += t[j] * t[j];
        for (int l = 0; l < m->n_layers; l++) {
            const int32_t *inputs = m->layer_inputs[l];
            int n = 0;
            for (int q = 0; q < m->layer_n_inputs[l]; q++) {  /* the inputs that are not 0, in order */
                const int j = inputs[q];
                live[n] = j;
                n += a[j] != 0.0f;
            }
            const int nv = m->layer_out_p[l] / RK_LANES;
            switch (nv) {
#define RK_CASE(NV) case NV: rk_layer(m->layer_w[l], m->layer_b[l], a, live, n, b, NV); break;
                RK_CASE(1) RK_CASE(2) RK_CASE(3) RK_CASE(4) RK_CASE(5) RK_CASE(6) RK_CASE(7) RK_CASE(8)
                RK_CASE(9) RK_CASE(10) RK_CASE(11) RK_CASE(12) RK_CASE(13) RK_CASE(14) RK_CASE(15) RK_CASE(16)
#undef RK_CASE
                default: {
                    const int width = m->layer_out_p[l];
                    memcpy(b, m->layer_b[l], (size_t)width * sizeof(float));
                    for (int q = 0; q < n; q++) {
                        const float h = a[live[q]];
                        const float *wj = m->layer_w[l] + (int64_t)live[q] * width;
                        for (int u = 0; u < width; u++) b[u] += h * wj[u];
                    }
                    for (int u = 0; u < width; u++) b[u] = b[u] > 0.0f ? b[u] : 0.0f;
                }
            }
            float *swap = a; a = b; b = swap;
        }
        rk_v dot = (rk_v){0};
        for (int v = 0; v < m->out_p; v += RK_LANES) dot += RK_AT(a + v) * RK_AT(m->out + v);
        float logit = m->beta * square;
        for (int lane = 0; lane < RK_LANES; lane++) logit += dot[lane];
        ctr[r] = 1.0f / (1.0f + expf(-logit));
    }
    return 0;
}

#endif
