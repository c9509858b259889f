"""One shape for every verb that changes a model: check everything, then write with an undo log.

A verb first does all that can fail without touching the model — read, parse, summarise, map, validate —
then opens :func:`writing`. Inside it every backend call goes through :class:`Transaction`, which records how
to undo it: patch-mode writes snapshot the slots of the modules they touch (original tensors, entries and
their strengths, the live buffer), so a rollback rewrites each changed module from its old stack,
bit-identically; inject-mode calls record their inverse (apply ↔ remove, refresh ↔ refresh at the old
weights, hotswap ↔ hotswap back). Any exception in the block, KeyboardInterrupt included, puts every
``Loaded`` record and the registry's dict back as they were, then undoes the steps newest first. The registry
itself changes last, after the writes.

:class:`FairRLock` is the registry lock: reentrant, with an optional timeout, and first come, first served,
so that no request waits behind a stream of later ones.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import time
from typing import Any, Callable, Iterable, Iterator

from . import backends
from .backends import patch

# -- lock ------------------------------------------------------------------------------------------------


class FairRLock:
    """A reentrant lock granted in arrival order (FIFO), with ``acquire(timeout=…)`` like ``threading.RLock``."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._count = 0
        self._queue: collections.deque[object] = collections.deque()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._count += 1
                return True
            if self._owner is None and not self._queue:
                self._owner, self._count = me, 1
                return True
            if not blocking:
                return False
            ticket = object()
            self._queue.append(ticket)
            deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
            try:
                while self._owner is not None or self._queue[0] is not ticket:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self._cond.wait(left)
                self._queue.popleft()
                self._owner, self._count = me, 1
                return True
            finally:
                if self._owner != me:  # timed out or interrupted: give the turn on
                    self._queue.remove(ticket)
                    self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("cannot release a lock held by another thread")
            self._count -= 1
            if self._count == 0:
                self._owner = None
                self._cond.notify_all()

    def locked(self) -> bool:
        return self._owner is not None

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# -- transactions ----------------------------------------------------------------------------------------

def _record(loaded) -> dict[str, Any]:
    """Every field of a ``Loaded`` (dicts copied: their identity is kept on restore, their content saved)."""
    return {f.name: dict(v) if isinstance(v := getattr(loaded, f.name), dict) else v
            for f in dataclasses.fields(loaded)}


def _put(loaded, values: dict[str, Any]) -> None:
    for k, v in values.items():
        current = getattr(loaded, k)
        if isinstance(v, dict) and isinstance(current, dict):
            current.clear()
            current.update(v)
        else:
            setattr(loaded, k, v)


def _modules(loaded) -> list:
    parked = loaded.extra.get(getattr(patch, "PARKED", None), ()) if isinstance(loaded.extra, dict) else ()
    return [t.module for t in loaded.targets] + list(parked)


class Transaction:
    """The undo log of one verb's write phase (see the module docstring); use it through :func:`writing`."""

    def __init__(self, reg) -> None:
        self.reg = reg
        self._adapters = dict(reg.adapters)
        self._records = {id(a): (a, _record(a)) for a in reg.adapters.values()}
        self._undo: list[Callable[[], None]] = []

    # -- recording -------------------------------------------------------------------------------------
    def on_rollback(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def guard(self, modules: Iterable) -> None:
        """Snapshot these modules' patch slots before a patch-mode write touches them."""
        self._undo.append(patch.snapshot(modules))

    def restore_records(self, items: Iterable | None = None) -> None:
        """Put the ``Loaded`` records (all, or these) back as they were when the transaction began."""
        chosen = None if items is None else {id(a) for a in items}
        for key, (loaded, values) in self._records.items():
            if chosen is None or key in chosen:
                _put(loaded, values)

    # -- backend steps ---------------------------------------------------------------------------------
    def apply(self, loaded) -> None:
        backend = backends.get(loaded.mode)
        if loaded.mode == patch.NAME:
            self.guard(_modules(loaded))
            backend.apply(loaded)
        else:
            backend.apply(loaded)  # atomic on its own
            made = _record(loaded)

            def undo() -> None:  # the records are back by now: give remove the state apply made
                _put(loaded, made)
                backend.remove(loaded)
                self.restore_records([loaded])

            self.on_rollback(undo)

    def remove(self, loaded) -> None:
        backend = backends.get(loaded.mode)
        if loaded.mode == patch.NAME:
            self.guard(_modules(loaded))
            backend.remove(loaded)
        else:
            mode = loaded.mode

            def undo() -> None:  # the record is back by now (mode, targets): inject it again
                loaded.mode = mode
                backends.get(mode).apply(loaded)

            self.on_rollback(undo)
            backend.remove(loaded)

    def refresh(self, changed: Iterable) -> None:
        """Rewrite the modules of adapters whose weight or state changed (one backend call per mode)."""
        by_mode: dict[str, list] = {}
        for loaded in changed:
            by_mode.setdefault(loaded.mode, []).append(loaded)
        for mode, group in by_mode.items():
            backend = backends.get(mode)
            if mode == patch.NAME:
                self.guard(m for a in group for m in _modules(a))
            else:
                def undo(group=group, backend=backend) -> None:
                    self.restore_records(group)
                    backend.refresh(group)

                self.on_rollback(undo)
            backend.refresh(group)

    def hotswap(self, loaded, targets) -> None:
        """Swap ``loaded``'s weights for ``targets`` through its backend (the record is updated by the caller)."""
        swap = getattr(backends.get(loaded.mode), "hotswap")
        if loaded.mode == patch.NAME:
            self.guard([*_modules(loaded), *(t.module for t in targets)])
            swap(loaded, targets)
            return
        old = loaded.targets

        def undo() -> None:
            loaded.targets = targets
            try:
                swap(loaded, old)
            finally:
                loaded.targets = old

        self.on_rollback(undo)
        swap(loaded, targets)

    # -- the end ---------------------------------------------------------------------------------------
    def rollback(self, error: BaseException) -> None:
        """Records and registry first (undo steps read the old weights, modes and targets), then every step
        newest first."""
        self.restore_records()
        self.reg.adapters.clear()
        self.reg.adapters.update(self._adapters)
        failures = []
        for undo in reversed(self._undo):
            try:
                undo()
            except BaseException as e:  # keep undoing the rest; report what could not be undone
                failures.append(e)
        for e in failures:
            error.add_note(f"diffadapt: while rolling back: {type(e).__name__}: {e}")


@contextlib.contextmanager
def writing(reg) -> Iterator[Transaction]:
    """The write phase of a verb: on any exception every recorded step is undone, then it re-raises."""
    tx = Transaction(reg)
    try:
        yield tx
    except BaseException as e:
        tx.rollback(e)
        raise
