"""Tensor-by-tensor conversion: a plan of output tensors, checked, then streamed to one file.

A ``TensorPlan`` says what one output tensor is (name, shape, dtype) and how to
produce it from the source (a closure that reads, merges or permutes). Shapes are
known from the sources' headers, so the whole plan is checked against the target
model before any weight is read, and ``write_safetensors`` then materialises one
tensor at a time: peak memory is the largest tensor, not the model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch

_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}

CAST = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # the jobs' --dtype choices


class ConversionError(ValueError):
    """An input cannot be converted; the message names the file and the key at fault."""


def safetensors_dtype(name: str, where: str) -> torch.dtype:
    """The floating torch dtype of a safetensors dtype name (``BF16``); weights of another kind are an error."""
    found = next((t for t, n in _DTYPES.items() if n == name), None)
    if found is None or not found.is_floating_point:
        raise ConversionError(f"{where} has dtype {name}, not a floating-point type")
    return found


@dataclass
class TensorPlan:
    """One output tensor: its name, shape and dtype, where it comes from, and how to make it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: str  # "file: key", for errors
    load: Callable[[], torch.Tensor]


def check_plan(plans: Sequence[TensorPlan], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Every expected tensor planned once with its shape, nothing else; else a ConversionError naming the source."""
    names = [p.name for p in plans]
    missing = [n for n in expected if n not in names]
    if missing:
        raise ConversionError(f"{what}: no source for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    extra = [p for p in plans if p.name not in expected]
    if extra:
        raise ConversionError(f"{what}: {extra[0].source} has no place in the target model (as {extra[0].name!r})")
    for p in plans:
        if tuple(p.shape) != tuple(expected[p.name]):
            raise ConversionError(
                f"{what}: {p.source} has shape {list(p.shape)}, but the config makes {p.name!r} {list(expected[p.name])}"
            )


def write_safetensors(path: str | Path, plans: Sequence[TensorPlan], dtype: torch.dtype | None = None) -> None:
    """Write ``plans`` as one safetensors file, producing and freeing one tensor at a time.

    The header is written first from the planned shapes (``dtype`` casts every
    floating tensor); a produced tensor whose shape or dtype differs from its plan
    raises ConversionError naming its source.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    out_dtypes = []
    for p in plans:
        out = dtype if dtype is not None and p.dtype.is_floating_point else p.dtype
        nbytes = out.itemsize * int(torch.Size(p.shape).numel())
        header[p.name] = {"dtype": _DTYPES[out], "shape": list(p.shape), "data_offsets": [offset, offset + nbytes]}
        out_dtypes.append(out)
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for p, out in zip(plans, out_dtypes):
            tensor = p.load()
            if tuple(tensor.shape) != tuple(p.shape):
                raise ConversionError(f"{p.source} has shape {list(tensor.shape)}, its header said {list(p.shape)}")
            data = tensor.detach().to("cpu", out).contiguous().reshape(-1).view(torch.uint8)
            f.write(memoryview(data.numpy()))
            del tensor, data


@contextlib.contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling of ``out`` to write into, renamed to ``out`` on success, removed on failure."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConversionError(f"output {str(out)!r} already exists; choose another directory or remove it")
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
