/* AutoInt's multi-head self-attention over the fields of each sample, forward and backward, in C.

   One layer (deepctr's InteractingLayer) for a batch of a multiple of 8 samples. The arrays are laid
   out column-major in blocks of 8 samples: qkvr is (width, batch / 8, fields, 8), the projections
   [W_Query | W_key | W_Value (| W_Res)]^T x of every field of every sample (width = 3 or 4 times the
   embedding size E = heads x d), so that one matmul computes it for the whole batch, and the kernels
   below read a block's 8 samples as one vector and find all of a block's values close together.
   Per sample and head h, with Q, K, V its (fields, d) slices:

       S = scale * Q K^T,  P = softmax over the rows of S,  A = P V
       out = relu(A (+ R))                 (out: (E, batch / 8, fields, 8), R the residual projection)

   Each product is 19 x 4 by 4 x 19 for the default spec: far too small for a batched matmul to run
   fast, and torch's softmax over rows of 19 is slow too. Here a block's ATT_CHUNK = 8 samples are
   processed together: every value below is a vector of 8 floats, one per sample (GCC/clang vector extensions:
   one AVX register, or two SSE ones), so the arithmetic runs 8 samples wide without reordering any
   sum: each sample's sums are added in the order of the naive formula. The forward saves P (chunk
   layout) for the backward:

       g = dout * (out > 0)                dR = g,  dA = g
       dP = dA V^T,  delta_i = sum_j P_ij dP_ij,  dS = scale * P * (dP - delta)
       dQ = dS K,  dK = dS^T Q,  dV = P^T dA
*/
#ifndef TRAIN_ATTENTION_H
#define TRAIN_ATTENTION_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ATT_CHUNK 8

typedef float att_vf __attribute__((vector_size(32)));
typedef float att_vfu __attribute__((vector_size(32), aligned(4)));  /* unaligned loads and stores */
typedef int32_t att_vi __attribute__((vector_size(32)));
typedef uint32_t att_vu __attribute__((vector_size(32)));

/* gcc on x86-64 Linux: one copy of each kernel for x86-64-v3 machines (AVX2, FMA) and one for any x86-64,
   picked at load time by CPU features (ifunc); elsewhere the compiler's default target. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define ATT_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define ATT_CLONES
#endif
#define ATT_INLINE static inline __attribute__((always_inline))

/* a where mask (all bits set) else b */
ATT_INLINE att_vf att_select(att_vi mask, att_vf a, att_vf b) {
    return (att_vf)(((att_vi)a & mask) | ((att_vi)b & ~mask));
}

ATT_INLINE att_vf att_max(att_vf a, att_vf b) { return att_select(a > b, a, b); }

/* exp(x) for x <= 0 (scores minus their row's maximum), Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a
   degree-7 polynomial in r, times 2^n built in the exponent bits; relative error about 1e-7. Below -87.3
   (exp < 1.2e-38, under float's smallest normal) it returns exp(-87.3) instead of a denormal or 0: the
   clamp compares the bits as unsigned integers, which orders +0 and the negative floats by magnitude. */
ATT_INLINE att_vf att_exp(att_vf x) {
    const att_vu limit = (att_vu){0} + 0xC2AE999Au; /* -87.3f */
    const att_vu bits = (att_vu)x;
    x = (att_vf)att_select((att_vi)(bits < limit), (att_vf)bits, (att_vf)limit);
    const att_vi n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, att_vi); /* x <= 0: rounds */
    const att_vf nf = __builtin_convertvector(n, att_vf);
    att_vf r = x - nf * 0.693359375f;
    r = r - nf * -2.12194440e-4f;
    att_vf p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * (att_vf)((n + 127) << 23);
}

static void att_free(void **blocks, int count) {
    for (int b = 0; b < count; b++) free(blocks[b]);
}

/* 8 samples' floats at ``at`` as one vector (unaligned) */
#define ATT_AT(at) (*(att_vfu *)(at))

/* The head width d: the kernels are compiled once for d = 4 (deepctr's default AutoInt: 16-wide embeddings,
   4 heads), where every loop over d unrolls into registers, and once for any d up to ATT_MAX_D. */
#define ATT_MAX_D 64

/* Forward of one layer for block ``chunk``; q, k, v: fields * d vectors of scratch. */
ATT_INLINE void att_forward_chunk(const float *qkvr, int64_t batch, int64_t chunk, int fields, int heads,
                                  const int d, int res, float scale, float *out, float *saved, att_vf *q,
                                  att_vf *k, att_vf *v) {
    const int E = heads * d;
    const int64_t column = (int64_t)fields * batch; /* floats from one column of qkvr to the next */
    const int64_t block = chunk * fields * ATT_CHUNK; /* the block's first float in a column */
    for (int h = 0; h < heads; h++) {
        att_vfu *p = (att_vfu *)(saved + (chunk * heads + h) * (int64_t)fields * fields * ATT_CHUNK);
        for (int c = 0; c < d; c++)
            for (int i = 0; i < fields; i++) {
                const float *at = qkvr + (h * d + c) * column + block + i * ATT_CHUNK;
                q[i * d + c] = ATT_AT(at);
                k[i * d + c] = ATT_AT(at + E * column);
                v[i * d + c] = ATT_AT(at + 2 * E * column);
            }
        for (int i = 0; i < fields; i++) {
            att_vfu *pi = p + (int64_t)i * fields;
            att_vf m = {0}, sum = {0}, acc[ATT_MAX_D];
            for (int j = 0; j < fields; j++) {
                att_vf s = {0};
                for (int c = 0; c < d; c++) s += q[i * d + c] * k[j * d + c];
                s *= scale;
                pi[j] = s;
                m = j ? att_max(s, m) : s;
            }
            for (int j = 0; j < fields; j++) {
                const att_vf e = att_exp(pi[j] - m);
                pi[j] = e;
                sum += e;
            }
            const att_vf inverse = 1.0f / sum; /* one division a row */
            for (int c = 0; c < d; c++) acc[c] = (att_vf){0};
            for (int j = 0; j < fields; j++) {
                const att_vf w = pi[j] * inverse;
                pi[j] = w;
                for (int c = 0; c < d; c++) acc[c] += w * v[j * d + c];
            }
            for (int c = 0; c < d; c++) { /* out = relu(A (+ R)) */
                const int64_t at = (h * d + c) * column + block + i * ATT_CHUNK;
                att_vf value = acc[c];
                if (res) value += ATT_AT(qkvr + 3 * E * column + at);
                ATT_AT(out + at) = att_select(value > 0.0f, value, (att_vf){0});
            }
        }
    }
}

/* Backward of one layer for block ``chunk``; q, k, v, ga, dk, dv: fields * d vectors of scratch, ds: fields. */
ATT_INLINE void att_backward_chunk(const float *dout, const float *out, const float *qkvr, const float *saved,
                                   int64_t batch, int64_t chunk, int fields, int heads, const int d, int res,
                                   float scale, float *dqkvr, att_vf *q, att_vf *k, att_vf *v, att_vf *ga,
                                   att_vf *dk, att_vf *dv, att_vf *ds) {
    const int E = heads * d;
    const int64_t column = (int64_t)fields * batch, block = chunk * fields * ATT_CHUNK;
    for (int h = 0; h < heads; h++) {
        const att_vfu *p = (const att_vfu *)(saved + (chunk * heads + h) * (int64_t)fields * fields * ATT_CHUNK);
        for (int c = 0; c < d; c++)
            for (int i = 0; i < fields; i++) {
                const int64_t at = (h * d + c) * column + block + i * ATT_CHUNK;
                q[i * d + c] = ATT_AT(qkvr + at);
                k[i * d + c] = ATT_AT(qkvr + E * column + at);
                v[i * d + c] = ATT_AT(qkvr + 2 * E * column + at);
                /* through the relu: the gradient where out > 0 */
                ga[i * d + c] = att_select(ATT_AT(out + at) > 0.0f, ATT_AT(dout + at), (att_vf){0});
                if (res) ATT_AT(dqkvr + 3 * E * column + at) = ga[i * d + c];
                dk[i * d + c] = dv[i * d + c] = (att_vf){0};
            }
        for (int i = 0; i < fields; i++) {
            const att_vfu *pi = p + (int64_t)i * fields;
            att_vf delta = {0}, acc[ATT_MAX_D];
            for (int j = 0; j < fields; j++) {
                att_vf dp = {0};
                const att_vf w = pi[j];
                for (int c = 0; c < d; c++) {
                    dp += ga[i * d + c] * v[j * d + c];
                    dv[j * d + c] += w * ga[i * d + c];
                }
                ds[j] = dp;
                delta += w * dp;
            }
            for (int c = 0; c < d; c++) acc[c] = (att_vf){0};
            for (int j = 0; j < fields; j++) {
                const att_vf g = scale * pi[j] * (ds[j] - delta);
                for (int c = 0; c < d; c++) {
                    acc[c] += g * k[j * d + c];
                    dk[j * d + c] += g * q[i * d + c];
                }
            }
            for (int c = 0; c < d; c++) ATT_AT(dqkvr + (h * d + c) * column + block + i * ATT_CHUNK) = acc[c];
        }
        for (int c = 0; c < d; c++)
            for (int j = 0; j < fields; j++) {
                const int64_t at = (h * d + c) * column + block + j * ATT_CHUNK;
                ATT_AT(dqkvr + E * column + at) = dk[j * d + c];
                ATT_AT(dqkvr + 2 * E * column + at) = dv[j * d + c];
            }
    }
}

/* Forward of one layer. qkvr: (width, batch / 8, fields, 8) floats, width = (3 + res) * heads * d; out:
   (heads * d, batch / 8, fields, 8); saved: batch * heads * fields * fields floats. Returns 0, -1 when
   out of memory, -2 when d exceeds ATT_MAX_D or batch is not a multiple of ATT_CHUNK. */
ATT_CLONES
static int att_forward(const float *qkvr, int64_t batch, int fields, int heads, int d, int res, float scale,
                       float *out, float *saved) {
    if (d < 1 || d > ATT_MAX_D || batch % ATT_CHUNK) return -2;
    const size_t fd = sizeof(att_vf) * fields * d;
    void *b[3] = {aligned_alloc(32, fd), aligned_alloc(32, fd), aligned_alloc(32, fd)};
    if (!b[0] || !b[1] || !b[2]) {
        att_free(b, 3);
        return -1;
    }
    for (int64_t chunk = 0; chunk < batch / ATT_CHUNK; chunk++) {
        if (d == 4)
            att_forward_chunk(qkvr, batch, chunk, fields, heads, 4, res, scale, out, saved, b[0], b[1], b[2]);
        else
            att_forward_chunk(qkvr, batch, chunk, fields, heads, d, res, scale, out, saved, b[0], b[1], b[2]);
    }
    att_free(b, 3);
    return 0;
}

/* Backward of one layer: dqkvr (qkvr's shape) from dout and the forward's out, qkvr and saved. Returns 0,
   -1 when out of memory, -2 when d exceeds ATT_MAX_D or batch is not a multiple of ATT_CHUNK. */
ATT_CLONES
static int att_backward(const float *dout, const float *out, const float *qkvr, const float *saved,
                        int64_t batch, int fields, int heads, int d, int res, float scale, float *dqkvr) {
    if (d < 1 || d > ATT_MAX_D || batch % ATT_CHUNK) return -2;
    const size_t fd = sizeof(att_vf) * fields * d;
    void *b[7];
    int missing = 0;
    for (int i = 0; i < 7; i++) missing |= !(b[i] = aligned_alloc(32, i < 6 ? fd : sizeof(att_vf) * fields));
    if (missing) {
        att_free(b, 7);
        return -1;
    }
    for (int64_t chunk = 0; chunk < batch / ATT_CHUNK; chunk++) {
        if (d == 4)
            att_backward_chunk(dout, out, qkvr, saved, batch, chunk, fields, heads, 4, res, scale, dqkvr,
                               b[0], b[1], b[2], b[3], b[4], b[5], b[6]);
        else
            att_backward_chunk(dout, out, qkvr, saved, batch, chunk, fields, heads, d, res, scale, dqkvr,
                               b[0], b[1], b[2], b[3], b[4], b[5], b[6]);
    }
    att_free(b, 7);
    return 0;
}

#endif
