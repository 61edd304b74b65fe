"""tensorio.py: the SCMT named-tensor file (the format of tests/tensorio.h), in Python.

File: b"SCMT", then records until EOF, each:
    uint32 name_len, name bytes (no NUL), uint32 ndim, int32 dims[ndim], float32 data[prod(dims)],
all little-endian. A scalar has ndim = 0.

read(path)  -> dict name -> numpy float32 array (shape from dims; a scalar is a 0-d array),
               in file order (dicts keep insertion order). A repeated name keeps the last record.
write(path, records) writes an iterable of (name, array) pairs or a dict.
"""
import struct

import numpy as np

MAGIC = b"SCMT"


class FormatError(ValueError):
    pass


def read(path):
    with open(path, "rb") as f:
        buf = f.read()
    if buf[:4] != MAGIC:
        raise FormatError("%s: not an SCMT file (magic %r)" % (path, buf[:4]))
    out = {}
    pos, end = 4, len(buf)
    while pos < end:
        if pos + 4 > end:
            raise FormatError("%s: truncated record header at byte %d" % (path, pos))
        (nlen,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if nlen > 4096 or pos + nlen + 4 > end:
            raise FormatError("%s: bad name length %d at byte %d" % (path, nlen, pos - 4))
        name = buf[pos:pos + nlen].decode("utf-8")
        pos += nlen
        (ndim,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if ndim > 8 or pos + 4 * ndim > end:
            raise FormatError("%s: record %s: bad ndim %d" % (path, name, ndim))
        dims = struct.unpack_from("<%di" % ndim, buf, pos)
        pos += 4 * ndim
        if any(dd < 0 for dd in dims):
            raise FormatError("%s: record %s: negative dim %r" % (path, name, dims))
        n = int(np.prod(dims, dtype=np.int64)) if ndim else 1
        if pos + 4 * n > end:
            raise FormatError("%s: record %s: truncated data (%d floats)" % (path, name, n))
        a = np.frombuffer(buf, dtype="<f4", count=n, offset=pos).astype(np.float32).reshape(dims)
        pos += 4 * n
        out[name] = a
    return out


def write(path, records):
    items = records.items() if isinstance(records, dict) else records
    with open(path, "wb") as f:
        f.write(MAGIC)
        for name, a in items:
            a = np.asarray(a, dtype="<f4")
            nb = name.encode("utf-8")
            f.write(struct.pack("<I", len(nb)))
            f.write(nb)
            f.write(struct.pack("<I", a.ndim))
            if a.ndim:
                f.write(struct.pack("<%di" % a.ndim, *a.shape))
            f.write(np.ascontiguousarray(a).tobytes())


def scalar(records, name, default=None):
    """A scalar record as a Python float (default if absent and a default is given)."""
    if name not in records:
        if default is None:
            raise KeyError(name)
        return default
    return float(np.asarray(records[name]).reshape(-1)[0])
