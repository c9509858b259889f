"""Where patch mode keeps the original weights, and the verbs that manage them: ``configure`` and ``release``.

Patch mode writes every adapted weight in place, so a parameter's storage never moves (compiled graphs and CUDA
graphs keep their addresses), and keeps the originals (W0) elsewhere for an exact restore:

* ``backup="host"`` (default): CPU memory — for a CPU model a copy in the same memory, for an accelerator model
  pinned host memory filled from a side stream while the weights are rewritten;
* ``backup="device"``: a copy on the weight's device — the fastest rewrites, at the price of device memory;
* ``backup="none"``: no copy, as diffusers' ``fuse_lora`` without ``unfuse``: unload, re-weighting and hotswap
  of those adapters are refused.

A module is backed up once, at its first patch, and the copy is reused by every later load, weight change,
hotswap and unload; unloading restores the values in place and keeps the copy, so the next load is one fused
write per module. :func:`release` frees the copies (and ``release_on_unload=True`` frees them on unload). The
copies of one load share one allocation, whose memory returns to the system once all its modules are released.

Weights the process must not write — a read-only mapping, or a file mapped shared, as ``torch.load(mmap=True)``
or safetensors map checkpoints — are detected (``backends/storage.py``) from ``/proc/self/maps``: the first patch gives the parameter a
private copy, and the mapped original is the backup (no second copy is made; release maps it back).
"""

from __future__ import annotations

from typing import Any

from .backends import patch
from .backends.storage import Settings, check_backup, settings_of, store_settings
from .pipeline import components, registry


def configure(target: Any, *, backup: str | None = None, release_on_unload: bool | None = None) -> Settings:
    """Set how patch mode keeps originals for later loads into ``target`` (a pipeline or a module).

    ``backup``: "host" | "device" | "none" (see this module's docstring); a ``da.load(..., backup=...)``
    overrides it for one load. ``release_on_unload``: free a module's backup when its last adapter is
    unloaded (the next load copies again) instead of keeping it for a warm reload. Returns the settings.
    """
    comps = components(target)
    current = settings_of(next(iter(comps.values()), None))
    new = Settings(backup=check_backup(backup) if backup is not None else current.backup,
                   release_on_unload=current.release_on_unload if release_on_unload is None else bool(release_on_unload))
    for comp in comps.values():
        store_settings(comp, new)
    return new


def release(target: Any, *, bake: bool = False) -> int:
    """Free the originals patch mode keeps for ``target``'s modules; returns the bytes no longer held.

    Modules without an adapter lose their backup (their next patch copies again). Modules an adapter still
    patches keep theirs, so it can be unloaded; ``bake=True`` frees those too, leaving the loaded adapters in
    the weights for good (unload, re-weighting and hotswap are then refused, as with ``backup="none"``).
    """
    reg = registry(target)
    with reg.lock:
        freed = 0
        for comp in components(target).values():
            for module in comp.modules():
                freed += patch.release_module(module, bake=bake)
        return freed


