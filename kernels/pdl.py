"""Programmatic dependent launch (PDL, compute capability 9.0 and later) for the step's kernels.

A kernel launched with PDL may be started while the kernel before it on the stream is still
running: its programs are resident and waiting when that kernel ends, instead of being launched
after it (a decode step of a small model is some 300 kernels of a few microseconds each, and the
launch between two of them is a fair part of each). Every kernel launched so calls
``wait_for_previous`` before it touches memory an earlier kernel writes: ``griddepcontrol.wait``
returns once every kernel it depends on has finished and its writes are visible, then
``griddepcontrol.launch_dependents`` lets the next kernel be started in turn. Before the wait a
kernel may only read what no kernel writes (weights, the RoPE tables) and the step's inputs
(positions, slots, lengths, block tables, token ids: copied from the host before the step's first
kernel, never written by the kernel just before); reading them early takes a load off the path
that starts when the previous kernel ends. A kernel launched without PDL (torch's,
cuBLAS's) waits for the one before it as usual, and one after it waits for it, so the two kinds
mix freely. On the CPU interpreter, before Hopper, or with ``enabled`` off, nothing changes.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

enabled = True  # off: the kernels launch as before (bench.decode_profile --no-pdl)


@functools.cache
def _supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def launch_options(device: torch.device) -> dict:
    """The launch's keyword arguments: PDL on where it is supported, else the flag off."""
    on = (
        enabled
        and device.type == "cuda"
        and _supported(device.index if device.index is not None else torch.cuda.current_device())
    )
    return {"USE_PDL": True, "launch_pdl": True} if on else {"USE_PDL": False}


@triton.jit
def wait_for_previous(USE_PDL: tl.constexpr):
    """The kernels before this one are done and their writes visible; the next may start."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
