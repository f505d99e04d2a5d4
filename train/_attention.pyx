# cython: language_level=3
"""AutoInt's attention layer forward and backward in C (``train/_attention.h``), over float32 buffers.

The arrays are column-major in blocks of 8 samples: qkvr is (width, batch / 8, fields, 8), out
(E, batch / 8, fields, 8). ``train/fused.py`` wraps the two functions in a torch autograd function; the arrays
are its tensors' memory.
"""
from libc.stdint cimport int64_t

cdef extern from "_attention.h" nogil:
    int ATT_CHUNK
    int ATT_MAX_D
    int att_forward(const float *qkvr, int64_t batch, int fields, int heads, int d, int res, float scale,
                    float *out, float *saved)
    int att_backward(const float *dout, const float *out, const float *qkvr, const float *saved,
                     int64_t batch, int fields, int heads, int d, int res, float scale, float *dqkvr)

#: samples per vector; the widest head the kernels take (embedding size / heads)
CHUNK = ATT_CHUNK
MAX_D = ATT_MAX_D


def saved_size(Py_ssize_t batch, int fields, int heads) -> int:
    """Floats the forward saves for the backward (the attention weights, in chunks of CHUNK samples)."""
    return ((batch + ATT_CHUNK - 1) // ATT_CHUNK) * heads * fields * fields * ATT_CHUNK


cdef int _embedding(const float[:, :, :, ::1] qkvr, int heads, bint res) except -1:
    """E = heads x d from qkvr's width, checked."""
    cdef int width = qkvr.shape[0], parts = 4 if res else 3
    if qkvr.shape[3] != ATT_CHUNK:
        raise ValueError(f"qkvr must be (width, batch / {ATT_CHUNK}, fields, {ATT_CHUNK}), got {tuple(qkvr.shape)[:4]}")
    if heads < 1 or width % (parts * heads):
        raise ValueError(f"qkvr width {width} is not {parts} x heads ({heads}) x d")
    if width // (parts * heads) > ATT_MAX_D:
        raise ValueError(f"head width {width // (parts * heads)} is above {ATT_MAX_D}")
    return width // parts


cdef _check(str name, const float[:, :, :, ::1] a, Py_ssize_t rows, const float[:, :, :, ::1] qkvr):
    if a.shape[0] != rows or a.shape[1] != qkvr.shape[1] or a.shape[2] != qkvr.shape[2] or a.shape[3] != qkvr.shape[3]:
        raise ValueError(f"{name} must be ({rows}, {qkvr.shape[1]}, {qkvr.shape[2]}, {qkvr.shape[3]}), "
                         f"got {tuple(a.shape)[:4]}")


def forward(const float[:, :, :, ::1] qkvr, int heads, bint res, float scale, float[:, :, :, ::1] out,
            float[::1] saved) -> None:
    """out = relu(attention(Q, K, V) (+ R)) from qkvr = [Q | K | V (| R)]; fills ``saved``."""
    cdef int E = _embedding(qkvr, heads, res), rc
    cdef int fields = qkvr.shape[2]
    cdef int64_t batch = qkvr.shape[1] * ATT_CHUNK
    _check("out", out, E, qkvr)
    if saved.shape[0] != saved_size(batch, fields, heads):
        raise ValueError(f"saved must hold {saved_size(batch, fields, heads)} floats, got {saved.shape[0]}")
    if batch == 0:
        return
    with nogil:
        rc = att_forward(&qkvr[0, 0, 0, 0], batch, fields, heads, E // heads, res, scale, &out[0, 0, 0, 0], &saved[0])
    if rc:
        raise MemoryError("attention forward: out of memory")


def backward(const float[:, :, :, ::1] dout, const float[:, :, :, ::1] out, const float[:, :, :, ::1] qkvr,
             const float[::1] saved, int heads, bint res, float scale, float[:, :, :, ::1] dqkvr) -> None:
    """The gradient of ``forward``'s out with respect to qkvr, written into ``dqkvr``."""
    cdef int E = _embedding(qkvr, heads, res), rc
    cdef int fields = qkvr.shape[2]
    cdef int64_t batch = qkvr.shape[1] * ATT_CHUNK
    _check("dout", dout, E, qkvr)
    _check("out", out, E, qkvr)
    _check("dqkvr", dqkvr, qkvr.shape[0], qkvr)
    if saved.shape[0] != saved_size(batch, fields, heads):
        raise ValueError(f"saved must hold {saved_size(batch, fields, heads)} floats, got {saved.shape[0]}")
    if batch == 0:
        return
    with nogil:
        rc = att_backward(&dout[0, 0, 0, 0], &out[0, 0, 0, 0], &qkvr[0, 0, 0, 0], &saved[0], batch, fields, heads,
                          E // heads, res, scale, &dqkvr[0, 0, 0, 0])
    if rc:
        raise MemoryError("attention backward: out of memory")
