"""torch.compile for the small element-wise passes that run outside the model: the fused draw (`sampling._race`)
and the chunked loss's per-chunk passes (`linear_nll`). Each is generated anew for every backend and device, so
a compiler that fails on one (a Triton or inductor error) falls back to the same function run eagerly: the same
maths, slower. The failure is warned once and listed by `fallbacks()`, which bench rows record, so a timing
of the eager path is never reported as the compiled one.
"""

from __future__ import annotations

import functools
import warnings

import torch

_FAILED: dict[str, str] = {}  # function name -> the compiler's error, first line


def fallbacks() -> list[str]:
    """Names of the compiled passes that fell back to eager in this process."""
    return sorted(_FAILED)


@functools.cache
def kernel(fn):
    """fn compiled with dynamic shapes (one compilation serves any row count). If the compiled call raises and fn
    itself does not, the compiler is at fault: warn, and run fn from then on. If fn raises too (a genuine error:
    bad shapes), that error propagates and nothing is marked; out of memory propagates at once."""
    compiled = torch.compile(fn, dynamic=True)
    name = fn.__name__

    @functools.wraps(fn)
    def call(*args):
        if name not in _FAILED:
            try:
                return compiled(*args)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - any compiler failure; fn decides whether the call is sound
                out = fn(*args)
                _FAILED[name] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
                warnings.warn(f"torch.compile of {name} failed ({_FAILED[name]}); running it eagerly", RuntimeWarning,
                              stacklevel=2)
                return out
        return fn(*args)

    return call
