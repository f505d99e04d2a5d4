# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Featurization kernel: canonical value strings, transforms, MurmurHash3 and tensor assembly.

The rules are those of ``bidder/reference.py`` (the pure-Python twin); this file implements them over
borrowed references and UTF-8 views so that a row costs no Python allocation on the common paths
(str, int, bool and integral float values). Policy -- what a spec means, validation -- stays in
``bidder/spec.py``.
"""
from cpython.dict cimport PyDict_GetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.math cimport floor, isinf, isnan
from libc.stdint cimport int64_t, uint8_t, uint32_t
from libc.stdio cimport snprintf
from libc.stdlib cimport strtod
from libc.string cimport memcpy, memset

cimport numpy as cnp
import numpy as np

cnp.import_array()

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object o, Py_ssize_t* size) except NULL
    long long PyLong_AsLongLongAndOverflow(object o, int* overflow) except? -1
    double PyLong_AsDouble(object o) except? -1.0
    bint PyUnicode_Check(object o)
    bint PyLong_Check(object o)
    bint PyFloat_Check(object o)
    bint PyBool_Check(object o)
    bint PyList_Check(object o)
    bint PyTuple_Check(object o)
    bint PyDict_CheckExact(object o)
    bint PyDict_Next(object p, Py_ssize_t* ppos, PyObject** pkey, PyObject** pvalue)
    long PyLong_AsLong(object o) except? -1
    double PyFloat_AS_DOUBLE(object o)

cdef extern from "string.h" nogil:
    void* memmem(const void* haystack, size_t haystacklen, const void* needle, size_t needlelen)
    void* memchr(const void* s, int c, size_t n)
    void* memrchr(const void* s, int c, size_t n)

from bidder.spec import BROWSER_KEYWORDS, OS_KEYWORDS, SPARSE_INPUT, TIMESTAMP_KEY

# -- MurmurHash3 x86_32 -----------------------------------------------------------------------------
cdef inline uint32_t _rotl32(uint32_t x, int r) noexcept nogil:
    return (x << r) | (x >> (32 - r))


cdef uint32_t murmur3_32(const uint8_t* data, Py_ssize_t n, uint32_t seed) noexcept nogil:
    cdef uint32_t h = seed, k
    cdef uint32_t c1 = 0xCC9E2D51U, c2 = 0x1B873593U
    cdef Py_ssize_t i, nblocks = n // 4
    for i in range(nblocks):
        # assembled byte by byte: little-endian on every host, no unaligned loads
        k = (<uint32_t>data[4 * i] | (<uint32_t>data[4 * i + 1] << 8)
             | (<uint32_t>data[4 * i + 2] << 16) | (<uint32_t>data[4 * i + 3] << 24))
        k *= c1
        k = _rotl32(k, 15)
        k *= c2
        h ^= k
        h = _rotl32(h, 13)
        h = h * 5 + 0xE6546B64U
    cdef const uint8_t* tail = data + nblocks * 4
    cdef int rem = n & 3
    k = 0
    if rem >= 3:
        k ^= <uint32_t>tail[2] << 16
    if rem >= 2:
        k ^= <uint32_t>tail[1] << 8
    if rem >= 1:
        k ^= tail[0]
        k *= c1
        k = _rotl32(k, 15)
        k *= c2
        h ^= k
    h ^= <uint32_t>n
    h ^= h >> 16
    h *= 0x85EBCA6BU
    h ^= h >> 13
    h *= 0xC2B2AE35U
    h ^= h >> 16
    return h


def hash_bytes(bytes data, uint32_t seed):
    """MurmurHash3 x86_32 of ``data`` (unsigned)."""
    return murmur3_32(<const uint8_t*><const char*>data, len(data), seed)


def hash_value(str value, uint32_t seed):
    """MurmurHash3 x86_32 of the UTF-8 bytes of ``value`` (unsigned); twin of reference.hash_value."""
    cdef Py_ssize_t n
    cdef const char* s = PyUnicode_AsUTF8AndSize(value, &n)
    return murmur3_32(<const uint8_t*>s, n, seed)


# -- field kinds --------------------------------------------------------------------------------------
cdef enum:
    K_CATEGORICAL = 0
    K_BUCKETIZED = 1
    K_OS_BROWSER = 2
    K_IP_PREFIX = 3
    K_WEEKDAY = 4
    K_HOUR = 5

cdef int N_OS = 5
cdef int N_BROWSER = 8
cdef enum:
    SCRATCH = 512  # bytes of per-featurizer scratch space; longer values use the heap

# Where a value's canonical bytes live after _canonical(): a view into a str, or our scratch buffer.
cdef struct Text:
    const char* data
    Py_ssize_t size


cdef int _format_int(char* buf, long long v) noexcept nogil:
    """Decimal digits of ``v`` into ``buf`` (at least 21 bytes); returns the length. snprintf is slower."""
    cdef char tmp[24]
    cdef int n = 0, i
    cdef unsigned long long u = <unsigned long long>(-(v + 1)) + 1 if v < 0 else <unsigned long long>v
    while True:
        tmp[n] = <char>(48 + u % 10)
        n += 1
        u //= 10
        if u == 0:
            break
    i = 0
    if v < 0:
        buf[0] = 45  # '-'
        i = 1
    while n > 0:
        n -= 1
        buf[i] = tmp[n]
        i += 1
    return i


cdef inline int _days_in_month(int y, int m) noexcept nogil:
    if m == 2:
        return 29 if (y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)) else 28
    if m == 4 or m == 6 or m == 9 or m == 11:
        return 30
    return 31


cdef inline int64_t _floor_mod(int64_t a, int64_t b) noexcept nogil:
    cdef int64_t r = a % b
    return r + b if r < 0 else r


cdef int64_t _days_from_civil(int64_t y, int64_t m, int64_t d) noexcept nogil:
    # days since 1970-01-01 in the proleptic Gregorian calendar
    y -= m <= 2
    cdef int64_t era = (y if y >= 0 else y - 399) // 400
    cdef int64_t yoe = y - era * 400
    cdef int64_t mp = m + 9 if m <= 2 else m - 3
    cdef int64_t doy = (153 * mp + 2) // 5 + d - 1
    cdef int64_t doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


cdef inline bint _all_digits(const char* s, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if s[i] < 48 or s[i] > 57:
            return False
    return True


cdef inline int64_t _parse_digits(const char* s, Py_ssize_t n) noexcept nogil:
    cdef int64_t v = 0
    cdef Py_ssize_t i
    for i in range(n):
        v = v * 10 + (s[i] - 48)
    return v


cdef inline bint _is_hex(char c) noexcept nogil:
    return (48 <= c <= 57) or (97 <= c <= 102) or (65 <= c <= 70)


cdef inline int _hex_value(char c) noexcept nogil:
    if c <= 57:
        return c - 48
    if c >= 97:
        return c - 87
    return c - 55


cdef int _ipv6_pieces(const char* s, Py_ssize_t n, uint32_t* out, int limit) noexcept nogil:
    """Parse ':'-separated 1-4 hex digit groups into ``out``; count, or -1 if invalid or > limit."""
    cdef int count = 0, digits = 0
    cdef uint32_t v = 0
    cdef Py_ssize_t i
    for i in range(n + 1):
        if i == n or s[i] == 58:  # ':'
            if digits == 0 or digits > 4 or count >= limit:
                return -1
            out[count] = v
            count += 1
            v = 0
            digits = 0
        elif _is_hex(s[i]):
            v = v * 16 + _hex_value(s[i])
            digits += 1
        else:
            return -1
    return count


cdef bint _number_syntax(const char* s, Py_ssize_t n) noexcept nogil:
    """[+-]?([0-9]+\\.?[0-9]*|\\.[0-9]+)([eE][+-]?[0-9]+)?  -- the twin's _NUMBER_RE."""
    cdef Py_ssize_t i = 0, start
    if i < n and (s[i] == 43 or s[i] == 45):
        i += 1
    start = i
    while i < n and 48 <= s[i] <= 57:
        i += 1
    cdef Py_ssize_t int_digits = i - start
    if i < n and s[i] == 46:  # '.'
        i += 1
        start = i
        while i < n and 48 <= s[i] <= 57:
            i += 1
        if int_digits == 0 and i == start:
            return False
    elif int_digits == 0:
        return False
    if i < n and (s[i] == 101 or s[i] == 69):  # e E
        i += 1
        if i < n and (s[i] == 43 or s[i] == 45):
            i += 1
        start = i
        while i < n and 48 <= s[i] <= 57:
            i += 1
        if i == start:
            return False
    return i == n


cdef class Featurizer:
    """Writes a spec's int64 model inputs for a batch of records.

    ``transform(records)`` returns fresh arrays; ``transform_into(buffers, records)`` fills the first
    rows of caller-owned buffers (e.g. buffers bound to an ONNX Runtime session) and returns the row
    count. A record is a dict of raw columns or a tuple of dicts (first dict holding a key wins).
    """
    cdef readonly object spec
    cdef uint32_t seed
    cdef int n_single, n_multi
    cdef list _keys          # keeps the key objects alive; _single_key/_multi_key borrow from it
    cdef PyObject** _single_key
    cdef int* _kind
    cdef uint32_t* _single_mod
    cdef double* _bounds
    cdef int* _bound_start
    cdef int* _bound_count
    cdef PyObject** _multi_key
    cdef uint32_t* _multi_mod
    cdef int* _multi_len
    cdef list _multi_names
    cdef object _ts_key
    cdef uint32_t _os_browser_hash[6][9]
    # Last value seen per field and its index. Rows of one request share their request-level value
    # objects (layered records), so an identity hit skips canonicalisation and hashing. The lists hold
    # strong references: a cached object stays alive, so equal addresses mean the same object. Only
    # immutable values (str, int, float, bool; tuples and str for multi fields) are cached across
    # calls; a list of tags is cached within one call only.
    cdef list _last_refs, _last_ts_refs, _multi_last_refs
    cdef PyObject** _last_val
    cdef int64_t* _last_idx
    cdef PyObject** _last_ts_val
    cdef int64_t* _last_ts_idx
    cdef PyObject** _multi_last_val
    cdef int64_t* _multi_last_rows
    cdef int* _multi_row_start
    cdef unsigned long _call
    cdef unsigned long* _multi_last_call
    cdef bint _cacheable
    # the base layer of overlay rows: its row of indices, valid for one call (dicts are mutable)
    cdef dict _key_cols      # record key -> tuple of columns it feeds (multi m is n_single + m)
    cdef object _base_ref
    cdef PyObject* _base_val
    cdef unsigned long _base_call
    cdef int64_t* _base_sparse
    cdef int64_t* _base_multi
    cdef object _keep        # holds a temporary str (rare paths) while its bytes are hashed
    cdef object _keep_value  # holds a value returned by a non-dict mapping's .get()
    cdef char _scratch[SCRATCH]
    cdef char _scratch2[SCRATCH]

    def __cinit__(self):
        self._single_key = NULL
        self._kind = NULL
        self._single_mod = NULL
        self._bounds = NULL
        self._bound_start = NULL
        self._bound_count = NULL
        self._multi_key = NULL
        self._multi_mod = NULL
        self._multi_len = NULL
        self._last_val = NULL
        self._last_idx = NULL
        self._last_ts_val = NULL
        self._last_ts_idx = NULL
        self._multi_last_val = NULL
        self._multi_last_rows = NULL
        self._multi_row_start = NULL
        self._multi_last_call = NULL
        self._base_sparse = NULL
        self._base_multi = NULL
        self._base_val = NULL

    def __init__(self, spec):
        from bidder.spec import FeatureSpec
        if not isinstance(spec, FeatureSpec):
            raise TypeError(f"Featurizer needs a FeatureSpec, got {type(spec).__name__}")
        self.spec = spec
        self.seed = spec.seed
        singles = spec.single_fields
        multis = spec.multi_fields
        self.n_single = len(singles)
        self.n_multi = len(multis)
        self._keys = []
        self._ts_key = TIMESTAMP_KEY
        n_bounds = sum(len(f.boundaries) for f in singles if f.kind == "bucketized")
        self._single_key = <PyObject**>PyMem_Malloc(max(1, self.n_single) * sizeof(PyObject*))
        self._kind = <int*>PyMem_Malloc(max(1, self.n_single) * sizeof(int))
        self._single_mod = <uint32_t*>PyMem_Malloc(max(1, self.n_single) * sizeof(uint32_t))
        self._bound_start = <int*>PyMem_Malloc(max(1, self.n_single) * sizeof(int))
        self._bound_count = <int*>PyMem_Malloc(max(1, self.n_single) * sizeof(int))
        self._bounds = <double*>PyMem_Malloc(max(1, n_bounds) * sizeof(double))
        self._multi_key = <PyObject**>PyMem_Malloc(max(1, self.n_multi) * sizeof(PyObject*))
        self._multi_mod = <uint32_t*>PyMem_Malloc(max(1, self.n_multi) * sizeof(uint32_t))
        self._multi_len = <int*>PyMem_Malloc(max(1, self.n_multi) * sizeof(int))
        total_len = sum(f.max_len for f in multis)
        self._last_val = <PyObject**>PyMem_Malloc(max(1, self.n_single) * sizeof(PyObject*))
        self._last_idx = <int64_t*>PyMem_Malloc(max(1, self.n_single) * sizeof(int64_t))
        self._last_ts_val = <PyObject**>PyMem_Malloc(max(1, self.n_single) * sizeof(PyObject*))
        self._last_ts_idx = <int64_t*>PyMem_Malloc(max(1, self.n_single) * sizeof(int64_t))
        self._multi_last_val = <PyObject**>PyMem_Malloc(max(1, self.n_multi) * sizeof(PyObject*))
        self._multi_last_rows = <int64_t*>PyMem_Malloc(max(1, total_len) * sizeof(int64_t))
        self._multi_row_start = <int*>PyMem_Malloc(max(1, self.n_multi) * sizeof(int))
        self._multi_last_call = <unsigned long*>PyMem_Malloc(max(1, self.n_multi) * sizeof(unsigned long))
        self._base_sparse = <int64_t*>PyMem_Malloc(max(1, self.n_single) * sizeof(int64_t))
        self._base_multi = <int64_t*>PyMem_Malloc(max(1, total_len) * sizeof(int64_t))
        if not self._base_sparse or not self._base_multi:
            raise MemoryError()
        self._base_call = 0
        key_cols = {}
        for col, f in enumerate(singles):
            key_cols.setdefault(str(f.source), []).append(col)
        for col, f in enumerate(multis):
            key_cols.setdefault(str(f.source), []).append(self.n_single + col)
        self._key_cols = {k: tuple(v) for k, v in key_cols.items()}
        if (not self._last_val or not self._last_idx or not self._last_ts_val or not self._last_ts_idx
                or not self._multi_last_val or not self._multi_last_rows or not self._multi_row_start
                or not self._multi_last_call):
            raise MemoryError()
        self._last_refs = [None] * self.n_single
        self._last_ts_refs = [None] * self.n_single
        self._multi_last_refs = [None] * self.n_multi
        self._call = 1
        if (not self._single_key or not self._kind or not self._single_mod or not self._bound_start
                or not self._bound_count or not self._bounds or not self._multi_key
                or not self._multi_mod or not self._multi_len):
            raise MemoryError()
        kinds = {"categorical": K_CATEGORICAL, "bucketized": K_BUCKETIZED}
        transforms = {"os_browser": K_OS_BROWSER, "ip_prefix": K_IP_PREFIX, "weekday": K_WEEKDAY,
                      "hour": K_HOUR}
        cdef int i, j, b = 0
        for i, f in enumerate(singles):
            key = str(f.source)
            self._keys.append(key)
            self._single_key[i] = <PyObject*>key
            self._kind[i] = transforms[f.transform] if f.kind == "derived" else kinds[f.kind]
            self._single_mod[i] = f.buckets - 1
            self._last_val[i] = NULL
            self._last_ts_val[i] = NULL
            self._bound_start[i] = b
            self._bound_count[i] = 0
            if f.kind == "bucketized":
                for bound in f.boundaries:
                    self._bounds[b] = bound
                    b += 1
                self._bound_count[i] = len(f.boundaries)
        self._multi_names = []
        start = 0
        for i, f in enumerate(multis):
            self._multi_last_val[i] = NULL
            self._multi_last_call[i] = 0
            self._multi_row_start[i] = start
            start += f.max_len
            key = str(f.source)
            self._keys.append(key)
            self._multi_key[i] = <PyObject*>key
            self._multi_mod[i] = f.buckets - 1
            self._multi_len[i] = f.max_len
            self._multi_names.append(f.name)
        # every user-agent family string is known up front: hash them once
        cdef bytes family
        for i in range(N_OS + 1):
            for j in range(N_BROWSER + 1):
                os_name = OS_KEYWORDS[i] if i < N_OS else "other"
                browser = BROWSER_KEYWORDS[j] if j < N_BROWSER else "other"
                family = f"{os_name}_{browser}".encode()
                self._os_browser_hash[i][j] = murmur3_32(<const uint8_t*><const char*>family,
                                                         len(family), self.seed)

    def __dealloc__(self):
        PyMem_Free(self._single_key)
        PyMem_Free(self._kind)
        PyMem_Free(self._single_mod)
        PyMem_Free(self._bounds)
        PyMem_Free(self._bound_start)
        PyMem_Free(self._bound_count)
        PyMem_Free(self._multi_key)
        PyMem_Free(self._multi_mod)
        PyMem_Free(self._multi_len)
        PyMem_Free(self._last_val)
        PyMem_Free(self._last_idx)
        PyMem_Free(self._last_ts_val)
        PyMem_Free(self._last_ts_idx)
        PyMem_Free(self._multi_last_val)
        PyMem_Free(self._multi_last_rows)
        PyMem_Free(self._multi_row_start)
        PyMem_Free(self._multi_last_call)
        PyMem_Free(self._base_sparse)
        PyMem_Free(self._base_multi)

    # -- public API ------------------------------------------------------------------------------
    def transform(self, records):
        """Fresh ``{input name: int64 [rows, width]}`` arrays for ``records``."""
        if not isinstance(records, (list, tuple)):
            records = list(records)
        buffers = self.spec.allocate(len(records))
        self.transform_into(buffers, records)
        return buffers

    def transform_into(self, dict buffers, records):
        """Write ``records`` into rows ``[0, n)`` of ``buffers``; returns ``n``.

        ``buffers`` maps each input name to a writable, row-contiguous int64 array with at least
        ``n`` rows (``spec.allocate(max_rows)`` makes such a set).
        """
        if not isinstance(records, (list, tuple)):
            records = list(records)
        cdef Py_ssize_t n = len(records)
        cdef int64_t* sparse = NULL
        cdef Py_ssize_t sparse_stride = 0
        if self.n_single:
            sparse = self._buffer(buffers, SPARSE_INPUT, self.n_single, n, &sparse_stride)
        cdef int64_t* multi_ptr[64]
        cdef Py_ssize_t multi_stride[64]
        cdef int m
        if self.n_multi > 64:
            raise ValueError("at most 64 multi-valued fields are supported")
        for m in range(self.n_multi):
            multi_ptr[m] = self._buffer(buffers, self._multi_names[m], self._multi_len[m], n,
                                        &multi_stride[m])
        cdef Py_ssize_t row
        cdef bint is_list = PyList_Check(records)
        cdef int64_t* row_multi[64]
        cdef object record
        self._call += 1
        for row in range(n):
            record = <object>(PyList_GET_ITEM(records, row) if is_list else PyTuple_GET_ITEM(records, row))
            for m in range(self.n_multi):
                row_multi[m] = multi_ptr[m] + row * multi_stride[m]
            try:
                if (PyTuple_Check(record) and PyTuple_GET_SIZE(record) == 2
                        and PyDict_CheckExact(<object>PyTuple_GET_ITEM(record, 0))
                        and PyDict_CheckExact(<object>PyTuple_GET_ITEM(record, 1))
                        and PyDict_GetItem(<object>PyTuple_GET_ITEM(record, 0), self._ts_key) == NULL):
                    self._overlay_row(record, sparse + row * sparse_stride, row_multi)
                else:
                    self._row(record, sparse + row * sparse_stride, row_multi)
            except ValueError as exc:
                raise ValueError(f"record {row}: {exc}") from None
        return n

    # -- internals -------------------------------------------------------------------------------
    cdef int64_t* _buffer(self, dict buffers, name, int width, Py_ssize_t rows,
                          Py_ssize_t* stride) except NULL:
        arr = buffers.get(name)
        if arr is None:
            raise ValueError(f"buffers have no array for model input {name!r}")
        if not isinstance(arr, np.ndarray):
            raise ValueError(f"buffer {name!r}: expected a numpy array, got {type(arr).__name__}")
        cdef cnp.ndarray a = arr
        if cnp.PyArray_TYPE(a) != cnp.NPY_INT64 or cnp.PyArray_NDIM(a) != 2:
            raise ValueError(f"buffer {name!r}: expected a 2-D int64 array, got {a.ndim}-D {a.dtype}")
        if cnp.PyArray_DIM(a, 1) != width:
            raise ValueError(f"buffer {name!r}: expected {width} columns, got {cnp.PyArray_DIM(a, 1)}")
        if cnp.PyArray_DIM(a, 0) < rows:
            raise ValueError(f"buffer {name!r}: {rows} records do not fit in {cnp.PyArray_DIM(a, 0)} rows")
        # numpy leaves the strides of length-0/1 axes arbitrary: only axes we step along matter
        if ((rows > 0 and width > 1 and cnp.PyArray_STRIDE(a, 1) != 8)
                or (rows > 1 and (cnp.PyArray_STRIDE(a, 0) % 8 != 0 or cnp.PyArray_STRIDE(a, 0) < 8 * width))):
            raise ValueError(f"buffer {name!r}: rows must be contiguous")
        if not cnp.PyArray_ISWRITEABLE(a):
            raise ValueError(f"buffer {name!r} is read-only")
        stride[0] = cnp.PyArray_STRIDE(a, 0) // 8
        return <int64_t*>cnp.PyArray_DATA(a)

    cdef inline PyObject* _lookup(self, object record, PyObject* key) except? NULL:
        """Borrowed value for ``key``, NULL when absent (None is returned as None)."""
        cdef PyObject* value
        cdef Py_ssize_t i, n
        if PyDict_CheckExact(record):
            return PyDict_GetItem(record, <object>key)
        if PyTuple_Check(record):
            n = PyTuple_GET_SIZE(record)
            for i in range(n):
                layer = <object>PyTuple_GET_ITEM(record, i)
                if PyDict_CheckExact(layer):
                    value = PyDict_GetItem(layer, <object>key)
                    if value != NULL:
                        return value
                else:
                    value = self._slow_get(layer, <object>key, True)
                    if value != NULL:
                        return value
            return NULL
        return self._slow_get(record, <object>key, False)

    cdef PyObject* _slow_get(self, object mapping, object key, bint layered) except? NULL:
        # Mappings other than dict: .get() allocates nothing we keep, but it is a Python call.
        try:
            getter = mapping.get
        except AttributeError:
            raise ValueError(f"expected a mapping{' layer' if layered else ' or a tuple of mappings'}, "
                             f"got {type(mapping).__name__}") from None
        value = getter(key, _ABSENT)
        if value is _ABSENT:
            return NULL
        self._keep_value = value
        return <PyObject*>value

    cdef int _canonical(self, object v, object key, Text* out) except -1:
        """Point ``out`` at the canonical bytes of ``v``; 1 if present, 0 if missing."""
        cdef double d
        cdef long long i
        cdef int overflow = 0
        cdef int n
        if v is None:
            return 0
        if PyUnicode_Check(v):
            try:
                out.data = PyUnicode_AsUTF8AndSize(v, &out.size)
            except UnicodeEncodeError:
                raise ValueError(f"field {key!r}: value cannot be encoded as UTF-8 (lone surrogate)") from None
            return 1 if out.size > 0 else 0
        if PyBool_Check(v):
            self._scratch[0] = 49 if v is True else 48
            out.data = self._scratch
            out.size = 1
            return 1
        if PyLong_Check(v):
            i = PyLong_AsLongLongAndOverflow(v, &overflow)
            if overflow:
                self._keep = int.__repr__(v)
                out.data = PyUnicode_AsUTF8AndSize(self._keep, &out.size)
                return 1
            n = _format_int(self._scratch, i)
            out.data = self._scratch
            out.size = n
            return 1
        if PyFloat_Check(v):
            d = PyFloat_AS_DOUBLE(v)
            if isnan(d):
                return 0
            if isinf(d):
                if d > 0:
                    memcpy(self._scratch, b"inf", 3)
                    out.size = 3
                else:
                    memcpy(self._scratch, b"-inf", 4)
                    out.size = 4
                out.data = self._scratch
                return 1
            if floor(d) == d:
                # glibc prints integral doubles exactly; -0.0 prints "-0" but int(-0.0) is 0
                n = snprintf(self._scratch, SCRATCH, "%.0f", d if d != 0 else 0.0)
                out.data = self._scratch
                out.size = n
                return 1
            self._keep = float.__repr__(v)
            out.data = PyUnicode_AsUTF8AndSize(self._keep, &out.size)
            return 1
        raise ValueError(f"field {key!r}: expected a string, number, boolean or null, got {type(v).__name__}")

    cdef inline int64_t _index(self, const char* data, Py_ssize_t size, uint32_t mod) noexcept:
        return 1 + murmur3_32(<const uint8_t*>data, size, self.seed) % mod

    cdef int _overlay_row(self, tuple record, int64_t* sparse, int64_t** multi_out) except -1:
        """A (top, base) pair of dicts: the base row's indices, then the top dict's keys redone.

        Equal to the layered lookup of ``_row``: a key in ``top`` shadows ``base``, every other field
        reads ``base``. The base row is computed once per call for consecutive rows sharing a base
        object (one imp, many candidate ads). Callers route tops holding a timestamp to ``_row``
        because weekday/hour read it across fields.
        """
        cdef object top = <object>PyTuple_GET_ITEM(record, 0)
        cdef PyObject* base = PyTuple_GET_ITEM(record, 1)
        cdef int m, c
        cdef int64_t* base_multi[64]
        for m in range(self.n_multi):
            base_multi[m] = self._base_multi + self._multi_row_start[m]
        if base != self._base_val or self._base_call != self._call:
            try:
                self._row(<object>base, self._base_sparse, base_multi)
            except ValueError:
                # a base value the top layer shadows may be bad without the record being bad:
                # the field-by-field path raises only for values this record really reads
                self._base_val = NULL
                return self._row(record, sparse, multi_out)
            self._base_ref = <object>base
            self._base_val = base
            self._base_call = self._call
        memcpy(sparse, self._base_sparse, self.n_single * sizeof(int64_t))
        for m in range(self.n_multi):
            memcpy(multi_out[m], base_multi[m], self._multi_len[m] * sizeof(int64_t))
        cdef Py_ssize_t pos = 0, i
        cdef PyObject* key
        cdef PyObject* value
        cdef PyObject* cols
        while PyDict_Next(top, &pos, &key, &value):
            cols = PyDict_GetItem(self._key_cols, <object>key)
            if cols == NULL:
                continue
            for i in range(PyTuple_GET_SIZE(<object>cols)):
                c = <int>PyLong_AsLong(<object>PyTuple_GET_ITEM(<object>cols, i))
                if c < self.n_single:
                    sparse[c] = self._cached_single(c, record, value)
                else:
                    self._multi(c - self.n_single, value, <object>key, multi_out[c - self.n_single])
        return 0

    cdef int64_t _cached_single(self, int col, object record, PyObject* value) except -1:
        if value != NULL and value == self._last_val[col]:
            return self._last_idx[col]
        self._cacheable = value != NULL
        cdef int64_t idx = self._single(col, record, <object>value if value != NULL else None,
                                        <object>self._single_key[col])
        if self._cacheable:
            self._last_refs[col] = <object>value
            self._last_val[col] = value
            self._last_idx[col] = idx
        return idx

    cdef int _row(self, object record, int64_t* sparse, int64_t** multi_out) except -1:
        cdef int col, m
        cdef PyObject* value
        cdef Text text
        cdef object key
        if not (PyDict_CheckExact(record) or PyTuple_Check(record)) and not hasattr(record, "get"):
            raise ValueError(f"expected a mapping or a tuple of mappings, got {type(record).__name__}")
        for col in range(self.n_single):
            sparse[col] = self._cached_single(col, record, self._lookup(record, self._single_key[col]))
        for m in range(self.n_multi):
            value = self._lookup(record, self._multi_key[m])
            self._multi(m, value, <object>self._multi_key[m], multi_out[m])
        return 0

    cdef int64_t _single(self, int col, object record, object v, object key) except -1:
        cdef int kind = self._kind[col]
        cdef uint32_t mod = self._single_mod[col]
        cdef Text text
        if kind == K_BUCKETIZED:
            return self._bucket(col, v, key)
        if kind == K_WEEKDAY or kind == K_HOUR:
            if self._canonical(v, key, &text):
                return self._index(text.data, text.size, mod)
            self._cacheable = False  # the index depends on the timestamp, not on this value
            return self._from_timestamp(record, col, kind, mod)
        if not self._canonical(v, key, &text):
            return 0
        if kind == K_CATEGORICAL:
            return self._index(text.data, text.size, mod)
        if kind == K_OS_BROWSER:
            return 1 + self._os_browser(text.data, text.size) % mod
        return self._ip_prefix(text.data, text.size, mod)

    cdef int64_t _bucket(self, int col, object v, object key) except -1:
        cdef double d
        cdef Text text
        cdef int i, idx = 1
        if v is None:
            return 0
        if PyBool_Check(v):
            d = 1.0 if v is True else 0.0
        elif PyLong_Check(v):
            try:
                d = PyLong_AsDouble(v)
            except OverflowError:
                d = float("inf") if v > 0 else float("-inf")
        elif PyFloat_Check(v):
            d = PyFloat_AS_DOUBLE(v)
            if isnan(d):
                return 0
        elif PyUnicode_Check(v):
            self._canonical(v, key, &text)
            if text.size == 0:
                return 0
            if not _number_syntax(text.data, text.size):
                raise ValueError(f"field {key!r}: expected a number, got {v[:40]!r}")
            # the syntax check guarantees strtod consumes the whole (NUL-terminated) string
            d = strtod(text.data, NULL)
        else:
            raise ValueError(f"field {key!r}: expected a number or null, got {type(v).__name__}")
        cdef const double* bounds = self._bounds + self._bound_start[col]
        for i in range(self._bound_count[col]):
            if d > bounds[i]:
                idx += 1
        return idx

    cdef uint32_t _os_browser(self, const char* s, Py_ssize_t n) except? 0:
        cdef char* low = self._scratch2
        cdef char* heap = NULL
        cdef Py_ssize_t i
        cdef int o, b
        if n > SCRATCH:
            heap = <char*>PyMem_Malloc(n)
            if heap == NULL:
                raise MemoryError()
            low = heap
        for i in range(n):
            low[i] = s[i] + 32 if 65 <= s[i] <= 90 else s[i]
        o = N_OS
        for i in range(N_OS):
            if memmem(low, n, _OS_KW[i], _OS_KW_LEN[i]) != NULL:
                o = i
                break
        b = N_BROWSER
        for i in range(N_BROWSER):
            if memmem(low, n, _BROWSER_KW[i], _BROWSER_KW_LEN[i]) != NULL:
                b = i
                break
        PyMem_Free(heap)
        return self._os_browser_hash[o][b]

    cdef int64_t _ip_prefix(self, const char* s, Py_ssize_t n, uint32_t mod) except -1:
        cdef const char* v4
        cdef const char* p
        cdef Py_ssize_t v4n, i, dots, cut, head_n, tail_n
        cdef char* buf
        cdef char* heap = NULL
        cdef uint32_t groups[9]
        cdef uint32_t right[9]
        cdef int nl, nr, k
        cdef int64_t result
        if memchr(s, 46, n) != NULL:  # '.': IPv4, after the last ':'
            p = <const char*>memrchr(s, 58, n)
            v4 = p + 1 if p != NULL else s
            v4n = n - (v4 - s)
            dots = 0
            cut = -1
            for i in range(v4n):
                if v4[i] == 46:
                    dots += 1
                    if dots == 3:
                        cut = i
                        break
            if cut < 0:
                return self._index(s, n, mod)
            if cut + 2 <= SCRATCH:
                buf = self._scratch2
            else:
                heap = <char*>PyMem_Malloc(cut + 2)
                if heap == NULL:
                    raise MemoryError()
                buf = heap
            memcpy(buf, v4, cut)
            buf[cut] = 46
            buf[cut + 1] = 42  # '*'
            result = self._index(buf, cut + 2, mod)
            PyMem_Free(heap)
            return result
        if memchr(s, 58, n) == NULL:
            return self._index(s, n, mod)
        # IPv6: at most one '::' (counted without overlap, like str.count), groups of 1-4 hex digits
        p = <const char*>memmem(s, n, b"::", 2)
        if p != NULL:
            head_n = p - s
            if memmem(p + 2, n - head_n - 2, b"::", 2) != NULL:
                return self._index(s, n, mod)
            tail_n = n - head_n - 2
            nl = _ipv6_pieces(s, head_n, groups, 8) if head_n > 0 else 0
            nr = _ipv6_pieces(p + 2, tail_n, right, 8) if tail_n > 0 else 0
            if nl < 0 or nr < 0 or nl + nr > 7:
                return self._index(s, n, mod)
            for k in range(nl, 8 - nr):
                groups[k] = 0
            for k in range(nr):
                groups[8 - nr + k] = right[k]
        elif _ipv6_pieces(s, n, groups, 9) != 8:
            return self._index(s, n, mod)
        k = snprintf(self._scratch2, SCRATCH, "%x:%x:%x:%x:*", groups[0], groups[1], groups[2], groups[3])
        return self._index(self._scratch2, k, mod)

    cdef int64_t _from_timestamp(self, object record, int col, int kind, uint32_t mod) except -1:
        cdef PyObject* stamp = self._lookup(record, <PyObject*>self._ts_key)
        if stamp == NULL:
            return 0
        if stamp == self._last_ts_val[col]:
            return self._last_ts_idx[col]
        cdef int64_t idx = self._parse_timestamp(<object>stamp, kind, mod)
        if idx > 0:
            self._last_ts_refs[col] = <object>stamp
            self._last_ts_val[col] = stamp
            self._last_ts_idx[col] = idx
        return idx

    cdef int64_t _parse_timestamp(self, object stamp, int kind, uint32_t mod) except -1:
        cdef Text text
        if not self._canonical(stamp, self._ts_key, &text):
            return 0
        cdef const char* s = text.data
        cdef Py_ssize_t n = text.size, nd = n, nf = 0
        cdef const char* dot = <const char*>memchr(s, 46, n)
        cdef bint has_dot = dot != NULL
        cdef int64_t y, mo, d, hh, seconds, weekday = -1, hour = -1
        if has_dot:
            nd = dot - s
            nf = n - nd - 1
        if nd > 0 and _all_digits(s, nd) and (not has_dot or _all_digits(dot + 1, nf)):
            if not has_dot and (nd == 14 or nd == 17):
                y = _parse_digits(s, 4)
                mo = _parse_digits(s + 4, 2)
                d = _parse_digits(s + 6, 2)
                hh = _parse_digits(s + 8, 2)
                if y >= 1 and 1 <= mo <= 12 and 1 <= d <= _days_in_month(y, mo) and hh < 24:
                    weekday = _floor_mod(_days_from_civil(y, mo, d) + 3, 7)
                    hour = hh
            elif not has_dot and nd == 13:
                seconds = _parse_digits(s, nd) // 1000
                weekday = _floor_mod(seconds // 86400 + 3, 7)
                hour = (seconds % 86400) // 3600
            elif nd <= 12:
                seconds = _parse_digits(s, nd)
                weekday = _floor_mod(seconds // 86400 + 3, 7)
                hour = (seconds % 86400) // 3600
        if weekday < 0:
            shown = (<bytes>s[:min(n, 160)]).decode("utf-8", "replace")[:40]
            raise ValueError(f"field {self._ts_key!r}: cannot read timestamp {shown!r} "
                             "(expected yyyyMMddHHmmss[SSS], Unix seconds or Unix milliseconds)")
        cdef int k = _format_int(self._scratch2, weekday if kind == K_WEEKDAY else hour)
        return self._index(self._scratch2, k, mod)

    cdef int _multi(self, int m, PyObject* value, object key, int64_t* out) except -1:
        cdef int width = self._multi_len[m]
        cdef int64_t* saved = self._multi_last_rows + self._multi_row_start[m]
        cdef bint immutable
        if value != NULL and value == self._multi_last_val[m]:
            immutable = not PyList_Check(<object>value)
            if immutable or self._multi_last_call[m] == self._call:
                memcpy(out, saved, width * sizeof(int64_t))
                return 0
        self._fill_multi(m, <object>value if value != NULL else None, key, out)
        if value != NULL:
            memcpy(saved, out, width * sizeof(int64_t))
            self._multi_last_refs[m] = <object>value
            self._multi_last_val[m] = value
            self._multi_last_call[m] = self._call
        return 0

    cdef int _fill_multi(self, int m, object v, object key, int64_t* out) except -1:
        cdef int width = self._multi_len[m], filled = 0
        cdef uint32_t mod = self._multi_mod[m]
        cdef Text text
        cdef Py_ssize_t i, n, start
        cdef const char* s
        if v is None:
            pass
        elif PyList_Check(v) or PyTuple_Check(v):
            n = len(v)
            for i in range(n):
                if filled == width:
                    break
                item = <object>(PyList_GET_ITEM(v, i) if PyList_Check(v) else PyTuple_GET_ITEM(v, i))
                if self._canonical(item, key, &text):
                    out[filled] = self._index(text.data, text.size, mod)
                    filled += 1
        elif PyUnicode_Check(v):
            self._canonical(v, key, &text)
            s = text.data
            n = text.size
            start = 0
            for i in range(n + 1):
                if filled == width:
                    break
                if i == n or s[i] == 44:  # ','
                    if i > start:
                        out[filled] = self._index(s + start, i - start, mod)
                        filled += 1
                    start = i + 1
        else:
            if self._canonical(v, key, &text):
                out[filled] = self._index(text.data, text.size, mod)
                filled += 1
        if filled < width:
            memset(out + filled, 0, (width - filled) * sizeof(int64_t))
        return 0


cdef object _ABSENT = object()

cdef const char* _OS_KW[5]
cdef size_t _OS_KW_LEN[5]
cdef const char* _BROWSER_KW[8]
cdef size_t _BROWSER_KW_LEN[8]
# keep the keyword bytes alive for the module's lifetime: the C arrays borrow from them
_KEYWORD_BYTES = [k.encode() for k in OS_KEYWORDS] + [k.encode() for k in BROWSER_KEYWORDS]


def _init_keywords():
    cdef int i
    cdef bytes kw
    assert len(OS_KEYWORDS) == N_OS and len(BROWSER_KEYWORDS) == N_BROWSER
    for i in range(N_OS):
        kw = _KEYWORD_BYTES[i]
        _OS_KW[i] = kw
        _OS_KW_LEN[i] = len(kw)
    for i in range(N_BROWSER):
        kw = _KEYWORD_BYTES[N_OS + i]
        _BROWSER_KW[i] = kw
        _BROWSER_KW_LEN[i] = len(kw)


_init_keywords()


# -- a batch's rows ------------------------------------------------------------------------------------
def layout_rows(pendings, cnp.ndarray row_imp, cnp.ndarray row_cand, cnp.ndarray row_floor,
                cnp.ndarray row_value):
    """Lay out the rows of ``pendings`` (``bidder.batch.Pending``, their ``first_imp`` set) one after another.

    Row ``r`` gets ``row_imp[r]``, its imp's position in the batch (the request's ``first_imp`` plus the imp's
    position in the request), ``row_cand[r]``, its candidate's catalog ``index`` (both int64), ``row_floor[r]``,
    its imp's floor, and ``row_value[r]``, its candidate's value per click (both float64). Sets each request's
    ``first_row``; returns the number of rows; ValueError if the arrays are too short (they may be longer).
    The arrays are read through their data pointers (a typed memoryview costs about 0.2 µs to acquire).
    """
    cdef Py_ssize_t r = 0, j, imp, n, limit
    cdef double floor
    cdef object pending, eligible, candidate
    cdef list floors, ids, candidates
    for array, kind in ((row_imp, cnp.NPY_INT64), (row_cand, cnp.NPY_INT64), (row_floor, cnp.NPY_FLOAT64),
                        (row_value, cnp.NPY_FLOAT64)):
        if cnp.PyArray_TYPE(array) != kind or not cnp.PyArray_IS_C_CONTIGUOUS(array) or cnp.PyArray_NDIM(array) != 1:
            raise ValueError("row arrays must be contiguous 1-d int64 (imp, candidate) and float64 (floor, value)")
    limit = min(cnp.PyArray_DIM(row_imp, 0), cnp.PyArray_DIM(row_cand, 0), cnp.PyArray_DIM(row_floor, 0),
                cnp.PyArray_DIM(row_value, 0))
    cdef int64_t* imp_of = <int64_t*> cnp.PyArray_DATA(row_imp)
    cdef int64_t* cand_of = <int64_t*> cnp.PyArray_DATA(row_cand)
    cdef double* floor_of = <double*> cnp.PyArray_DATA(row_floor)
    cdef double* value_of = <double*> cnp.PyArray_DATA(row_value)
    for pending in pendings:
        pending.first_row = r
        imp = pending.first_imp
        floors = pending.floors
        ids = pending.imp_ids
        candidates = pending.candidates
        for j in range(len(ids)):
            floor = floors[ids[j]]
            eligible = candidates[j]
            n = len(eligible)
            if r + n > limit:
                raise ValueError(f"the rows do not fit arrays of {limit}")
            for candidate in eligible:
                imp_of[r] = imp
                cand_of[r] = candidate.index
                floor_of[r] = floor
                value_of[r] = candidate.value_per_click
                r += 1
            imp += 1
    return r
