"""Checking a GGUF file before its conversion: the magic bytes, then the header, metadata and
tensor table walked to the end of the tensor data (the format: ggml's docs/gguf.md), so a
garbage or truncated file fails in a fraction of a second, not seconds into the conversion.
"""
import struct
from pathlib import Path

from qpeft.core.base.errors import ModelLoadError, first_line
from qpeft.core.model.model_dir import INSTEAD as _INSTEAD


def check_gguf(gguf: Path) -> None:
    """The magic bytes, then the header, metadata and tensor table walked to the end of the
    tensor data: a garbage or truncated file fails in a fraction of a second, not seconds
    into the conversion."""
    try:
        with open(gguf, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ModelLoadError(f"{gguf} is not a GGUF file (it does not start with the bytes 'GGUF'); {_INSTEAD}")
        need, size = _gguf_end(gguf), gguf.stat().st_size
    except (struct.error, OverflowError, MemoryError):   # a length or offset past anything the file holds
        raise ModelLoadError(f"{gguf} is truncated or corrupt (its header runs past the end of the file); "
                             "download it again") from None
    except (ValueError, OSError) as exc:
        raise ModelLoadError(f"{gguf} is not a readable GGUF file ({first_line(exc)}); "
                             "download it again, or pass a model directory with config.json") from None
    if size < need:
        raise ModelLoadError(f"{gguf} is truncated ({size} bytes; its tensor data ends at byte {need}); "
                             "download it again")


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _gguf_end(gguf: Path) -> int:
    """The byte where a GGUF file's tensor data ends, computed from its header (the format:
    ggml's docs/gguf.md); struct.error if the header itself is cut short."""
    import math
    import mmap

    from gguf.constants import GGML_QUANT_SIZES

    with open(gguf, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        order = "<" if struct.unpack_from("<I", buf, 4)[0] < 0x10000 else ">"  # big-endian files exist
        pos = 8

        def take(fmt):
            nonlocal pos
            (got,) = struct.unpack_from(order + fmt, buf, pos)
            pos += struct.calcsize(order + fmt)
            return got

        def value(kind):  # reads one metadata value: a scalar is returned, the rest skipped
            nonlocal pos
            if kind == 8:
                length = take("Q")  # (not `pos += take(...)`: that would add to the old pos)
                pos += length
            elif kind == 9:
                kind, count = take("I"), take("Q")
                if kind == 8:  # the vocabulary: ~100k strings, so no call per string
                    for _ in range(count):
                        pos += 8 + struct.unpack_from(order + "Q", buf, pos)[0]
                elif kind in _GGUF_SCALARS:
                    pos += count * struct.calcsize(order + _GGUF_SCALARS[kind])
                else:
                    for _ in range(count):
                        value(kind)
            elif kind in _GGUF_SCALARS:
                return take(_GGUF_SCALARS[kind])
            else:
                raise ValueError(f"unknown metadata type {kind} at byte {pos}")

        n_tensors, n_kv = take("Q"), take("Q")
        alignment = 32
        for _ in range(n_kv):
            length = take("Q")
            key, pos = bytes(buf[pos:pos + length]), pos + length
            got = value(take("I"))
            if key == b"general.alignment":
                alignment = got
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"invalid general.alignment {alignment!r}")
        end = 0
        for _ in range(n_tensors):
            length = take("Q")  # the name
            pos += length
            dims = take("I")
            if dims > 8:   # ggml has at most 4
                raise ValueError(f"a tensor with {dims} dimensions at byte {pos}")
            count = math.prod(struct.unpack_from(f"{order}{dims}Q", buf, pos))
            pos += 8 * dims
            kind, offset = take("I"), take("Q")
            if kind not in GGML_QUANT_SIZES:
                raise ValueError(f"unknown tensor type {kind}")
            block, size = GGML_QUANT_SIZES[kind]
            end = max(end, offset + count // block * size)
        return pos + (-pos) % alignment + end
