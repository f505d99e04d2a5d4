# cython: language_level=3
"""The factorized graph's arithmetic in C (``_rowkernel.h``), over arrays that ``bidder/rowkernel.py`` reads from
``factorized.onnx`` and over the scorer's own buffers, bound once."""
import numpy as np

from libc.stdint cimport int32_t, int64_t

cdef extern from "_rowkernel.h":
    enum: RK_MAX_MULTI
    enum: RK_MAX_LAYERS
    enum: RK_LANES
    ctypedef struct rk_model:
        int n_single
        const int64_t *columns
        const int64_t *offsets
        const float *single
        int64_t single_rows
        int single_width
        int n_multi
        const float *multi[RK_MAX_MULTI]
        int64_t multi_rows[RK_MAX_MULTI]
        int multi_width[RK_MAX_MULTI]
        int multi_mean[RK_MAX_MULTI]
        int multi_count[RK_MAX_MULTI]
        float multi_eps[RK_MAX_MULTI]
        int k
        int d
        int dp
        int n_wide
        const int32_t *wide
        const float *wide_w
        int n_narrow
        const int32_t *narrow
        const int32_t *narrow_lo
        const int32_t *narrow_hi
        const float *w
        int n_layers
        const float *layer_w[RK_MAX_LAYERS]
        const float *layer_b[RK_MAX_LAYERS]
        const int32_t *layer_inputs[RK_MAX_LAYERS]
        int layer_n_inputs[RK_MAX_LAYERS]
        int layer_out_p[RK_MAX_LAYERS]
        const float *out
        int out_p
        float beta
        int s0
        int s1
        int max_width
    int rk_imp_part(const rk_model *m, int n, const int64_t *sparse, int sparse_stride,
                    const int64_t *const *multi_index, const int *multi_stride, float *x, float *part,
                    int64_t *bad) nogil
    int rk_rows(const rk_model *m, const float *part, int n_imps, const float *cand, int64_t n_cand,
                const int64_t *row_imp, const int64_t *row_cand, int rows, float *scratch, int32_t *live,
                float *ctr, int64_t *bad) nogil

MAX_MULTI = RK_MAX_MULTI
MAX_LAYERS = RK_MAX_LAYERS


cdef const void *_data(object a, object dtype, tuple shape, str what) except NULL:
    """The first element of ``a``, a C-contiguous array of ``dtype`` and ``shape`` (which the caller keeps alive)."""
    if not isinstance(a, np.ndarray) or a.dtype != dtype or a.shape != shape or not a.flags.c_contiguous:
        raise ValueError(f"{what}: expected C-contiguous {np.dtype(dtype).name} {shape}, got "
                         f"{getattr(a, 'dtype', type(a))} {getattr(a, 'shape', '')}")
    return <const void *><size_t>a.ctypes.data if a.size else <const void *>1  # an empty array is never read


cdef inline const float *_floats(object a, tuple shape, str what) except NULL:
    return <const float *>_data(a, np.float32, shape, what)


cdef inline const int64_t *_longs(object a, tuple shape, str what) except NULL:
    return <const int64_t *>_data(a, np.int64, shape, what)


cdef inline const int32_t *_ints(object a, tuple shape, str what) except NULL:
    return <const int32_t *>_data(a, np.int32, shape, what)


def _padded(width: int) -> int:
    return -(-width // RK_LANES) * RK_LANES


def _pad(a: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """``a`` (2-d) in the top left corner of zeros [rows, columns], float32."""
    out = np.zeros((rows, columns), dtype=np.float32)
    out[:a.shape[0], :a.shape[1]] = a
    return out


def _span(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``w``: its first non-zero column and one past its last (0, 0 for a row of zeros)."""
    nonzero = w != 0
    any_ = nonzero.any(axis=1)
    lo = np.where(any_, nonzero.argmax(axis=1), 0).astype(np.int32)
    hi = np.where(any_, w.shape[1] - nonzero[:, ::-1].argmax(axis=1), 0).astype(np.int32)
    return lo, hi


cdef class RowKernel:
    """Scores rows as the factorized graph does, in C; ``bind`` the scorer's buffers, ``set_candidates``, then
    ``run(n_imps, rows)`` writes ``output[:rows, 0]``."""
    cdef rk_model m
    cdef list keep          # every array the model's pointers point into
    cdef list bound         # the bound buffers
    cdef object cand_array
    cdef float[:, ::1] part
    cdef float[::1] x
    cdef float[::1] scratch
    cdef int32_t[::1] live
    cdef const int64_t *sparse
    cdef int sparse_stride
    cdef const int64_t *multi_index[RK_MAX_MULTI]
    cdef int multi_stride[RK_MAX_MULTI]
    cdef const int64_t *row_imp
    cdef const int64_t *row_cand
    cdef float *output
    cdef int max_imps, max_rows
    cdef const float *cand
    cdef int64_t n_cand
    cdef readonly tuple multi_inputs
    cdef int64_t top_column

    def __init__(self, columns, offsets, single, multi, weight, layers, out, float beta, int s0, int s1):
        """``multi``: [(input name, table, mean)] with mean None (a sum), ("column", j, eps) (divided by the sum's
        column j + eps) or ("nonzero", eps) (by the number of non-zero indices + eps); ``layers``: [(weight [out, in], bias [out])] as the graph's Gemms
        (transB) hold them; the tables float32, already dequantized."""
        cdef int i
        if len(multi) > RK_MAX_MULTI or len(layers) > RK_MAX_LAYERS:
            raise ValueError(f"at most {RK_MAX_MULTI} multi fields and {RK_MAX_LAYERS} layers")
        self.keep = []
        self.bound = []
        m = &self.m
        columns = np.ascontiguousarray(columns, dtype=np.int64)
        offsets = np.ascontiguousarray(offsets, dtype=np.int64).reshape(-1)
        m.n_single = len(columns)
        if m.n_single and columns.min() < 0:
            raise ValueError("negative sparse column")
        self.top_column = int(columns.max()) if m.n_single else -1
        m.columns = _longs(columns, (m.n_single,), "columns")
        m.offsets = _longs(offsets, (m.n_single,), "offsets")
        m.single_rows, m.single_width = single.shape
        m.single = _floats(single, tuple(single.shape), "single table")
        m.n_multi = len(multi)
        k = m.n_single * m.single_width
        names = []
        for i, (name, table, mean) in enumerate(multi):
            m.multi_rows[i], m.multi_width[i] = table.shape
            m.multi_mean[i], m.multi_count[i], m.multi_eps[i] = 0, 0, 0.0
            if mean is not None and mean[0] == "column":
                if not 0 <= mean[1] < m.multi_width[i]:
                    raise ValueError(f"{name}: count column {mean[1]} outside its table's {m.multi_width[i]}")
                m.multi_mean[i], m.multi_count[i], m.multi_eps[i] = 1, mean[1], mean[2]
            elif mean is not None and mean[0] == "nonzero":
                m.multi_mean[i], m.multi_eps[i] = 2, mean[1]
            elif mean is not None:
                raise ValueError(f"{name}: unknown pooling {mean!r}")
            m.multi[i] = _floats(table, tuple(table.shape), f"table of {name}")
            k += m.multi_width[i]
            names.append(name)
        self.multi_inputs = tuple(names)
        m.k = k
        d = weight.shape[1]
        m.d, m.dp = d, _padded(d)
        if weight.shape != (2 * k, d):
            raise ValueError(f"imp weight: expected [{2 * k}, D], got {weight.shape}")
        m.w = _floats(weight, (2 * k, d), "imp weight")
        lo, hi = _span(weight)
        wide = np.flatnonzero(hi - lo > RK_LANES).astype(np.int32)
        narrow = np.flatnonzero((hi - lo <= RK_LANES) & (hi > lo)).astype(np.int32)
        wide_w = _pad(weight[wide], len(wide), m.dp)
        narrow_lo, narrow_hi = np.ascontiguousarray(lo[narrow]), np.ascontiguousarray(hi[narrow])
        m.n_wide, m.n_narrow = len(wide), len(narrow)
        m.wide = _ints(wide, (m.n_wide,), "wide")
        m.wide_w = _floats(wide_w, (m.n_wide, m.dp), "wide rows")
        m.narrow = _ints(narrow, (m.n_narrow,), "narrow")
        m.narrow_lo = _ints(narrow_lo, (m.n_narrow,), "narrow_lo")
        m.narrow_hi = _ints(narrow_hi, (m.n_narrow,), "narrow_hi")
        self.keep += [columns, offsets, single, [t for _, t, _ in multi], weight, wide, wide_w, narrow, narrow_lo,
                      narrow_hi]
        m.n_layers = len(layers)
        width, rows = d, m.dp
        widest = m.dp
        for i, (lw, lb) in enumerate(layers):
            if lw.ndim != 2 or lw.shape[1] != width or lb.shape != (lw.shape[0],):
                raise ValueError(f"layer {i + 1}: weight {lw.shape} and bias {lb.shape} do not follow width {width}")
            out_p = _padded(lw.shape[0])
            transposed = _pad(np.asarray(lw, dtype=np.float32).T, rows, out_p)
            inputs = np.flatnonzero((transposed != 0).any(axis=1)).astype(np.int32)
            bias = _pad(np.asarray(lb, dtype=np.float32).reshape(1, -1), 1, out_p).reshape(-1)
            m.layer_w[i] = _floats(transposed, (rows, out_p), f"layer {i + 1} weight")
            m.layer_b[i] = _floats(bias, (out_p,), f"layer {i + 1} bias")
            m.layer_inputs[i] = _ints(inputs, (len(inputs),), "inputs")
            m.layer_n_inputs[i] = len(inputs)
            m.layer_out_p[i] = out_p
            self.keep += [transposed, bias, inputs]
            width, rows = lw.shape[0], out_p
            widest = max(widest, out_p)
        out = np.asarray(out, dtype=np.float32).reshape(-1)
        if out.shape != (width,):
            raise ValueError(f"output weight: expected {width}, got {out.shape}")
        out = _pad(out.reshape(1, -1), 1, rows).reshape(-1)
        m.out, m.out_p = _floats(out, (rows,), "output weight"), rows
        self.keep.append(out)
        m.beta = beta
        if not 0 <= s0 <= s1 <= d:
            raise ValueError(f"FM sum columns [{s0}, {s1}) outside the part's {d}")
        m.s0, m.s1 = s0, s1
        m.max_width = widest
        self.x = np.zeros(2 * k, dtype=np.float32)
        self.scratch = np.zeros(3 * widest, dtype=np.float32)
        self.live = np.zeros(widest, dtype=np.int32)
        self.cand = NULL
        self.n_cand = 0
        self.max_imps = self.max_rows = 0

    def bind(self, sparse, multi, row_imp, row_cand, output):
        """The scorer's buffers, read and written by every ``run``: ``sparse`` [max_imps, S] and ``multi`` {input
        name: [max_imps, L]} int64, ``row_imp``/``row_cand`` int64 [max_rows], ``output`` float32 [max_rows, 1]."""
        cdef int i
        self.max_imps = sparse.shape[0]
        self.sparse = _longs(sparse, tuple(sparse.shape), "sparse")
        self.sparse_stride = sparse.shape[1]
        if self.top_column >= self.sparse_stride:
            raise ValueError(f"the graph reads column {self.top_column} of a sparse input {self.sparse_stride} wide")
        for i, name in enumerate(self.multi_inputs):
            a = multi[name]
            if a.shape[0] != self.max_imps:
                raise ValueError(f"{name}: {a.shape[0]} rows, sparse has {self.max_imps}")
            self.multi_index[i] = _longs(a, tuple(a.shape), name)
            self.multi_stride[i] = a.shape[1]
        self.max_rows = row_imp.shape[0]
        self.row_imp = _longs(row_imp, (self.max_rows,), "row_imp")
        self.row_cand = _longs(row_cand, (self.max_rows,), "row_cand")
        if not output.flags.writeable:
            raise ValueError("output: a read-only array")
        self.output = <float *>_floats(output, (self.max_rows, 1), "output")
        self.part = np.zeros((self.max_imps, self.m.dp), dtype=np.float32)
        self.bound = [sparse, dict(multi), row_imp, row_cand, output]

    def set_candidates(self, cand):
        """Every candidate's part ([n, D] float32, the candidate graph's output); candidate i is row_cand value i."""
        cand = np.asarray(cand, dtype=np.float32)
        if cand.ndim != 2 or cand.shape[1] != self.m.d:
            raise ValueError(f"candidate parts: expected [n, {self.m.d}], got {cand.shape}")
        cand = _pad(cand, len(cand), self.m.dp)
        self.cand = _floats(cand, tuple(cand.shape), "candidate parts") if len(cand) else NULL
        self.n_cand = len(cand)
        self.cand_array = cand  # the parts the pointer reads (the previous ones are freed)

    def run(self, int n_imps, int rows):
        """Write the probabilities of rows [0, rows) into ``output[:rows, 0]``."""
        cdef int64_t bad = 0
        cdef int status
        if self.max_imps == 0:
            raise RuntimeError("no buffers: call bind first")
        if not 0 <= n_imps <= self.max_imps or not 0 <= rows <= self.max_rows:
            raise ValueError(f"need 0 <= n_imps <= {self.max_imps} and 0 <= rows <= {self.max_rows}, "
                             f"got n_imps={n_imps}, rows={rows}")
        if rows == 0:
            return
        if self.cand == NULL:
            raise RuntimeError("no candidates: call set_candidates first")
        # the GIL stays held: the worker owns one core, and a background thread given it for these microseconds
        # could keep it for the interpreter's switch interval (5 ms) before the batch goes on
        status = rk_imp_part(&self.m, n_imps, self.sparse, self.sparse_stride, self.multi_index, self.multi_stride,
                             &self.x[0], &self.part[0, 0], &bad)
        if status:
            raise IndexError(f"an imp's feature index {bad} is out of range of its embedding table")
        status = rk_rows(&self.m, &self.part[0, 0], n_imps, self.cand, self.n_cand, self.row_imp, self.row_cand,
                         rows, &self.scratch[0], &self.live[0], self.output, &bad)
        if status:
            raise IndexError(f"a row names imp or candidate {bad}: out of range of the {n_imps} imps and "
                             f"{self.n_cand} candidates")
