"""Errors the command line reports as one message instead of a traceback."""


class TrainError(Exception):
    """Bad input or a failed check; the message says where (file:line, field, hyper-parameter)."""


class DataError(TrainError, ValueError):
    """A log file that cannot be read: missing columns, a malformed line, a value of the wrong kind."""


class ParityError(TrainError):
    """The exported ONNX graph does not reproduce the trained model within the tolerance."""
