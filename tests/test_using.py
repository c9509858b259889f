"""``da.using``: a request's stack is applied and restored atomically, nests, and serializes threads."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import diffadapt as da
from diffadapt.testing import param_hashes, tiny_sd1_pipeline
from test_hotswap import assert_close, files, fresh, pipe, weights_of  # noqa: F401 (fixtures)

REQUESTS = {  # stack → the fresh stack it must equal (name, file, weight), given a=lora@1, b=te@0.8 loaded
    "weights": ({"a": 0.5}, [("a", "lora", 0.5)]),
    "both": ({"b": 0.3, "a": -1.0}, [("a", "lora", -1.0), ("b", "te", 0.3)]),
    "hotswap": ({"a": "loha", "b": 1.0}, [("a", "loha", 1.0), ("b", "te", 1.0)]),
    "source+weight": ({"a": ("oft", 0.5)}, [("a", "oft", 0.5)]),
    "temporary": ({"c": "lokr", "a": 1.0}, [("a", "lora", 1.0), ("c", "lokr", 1.0)]),
}


@pytest.fixture
def served(pipe, files):
    da.load(pipe, files["lora"], "a")
    da.load(pipe, files["te"], "b", weight=0.8)
    state = param_hashes(pipe), {n: (i.weight, i.enabled, i.methods) for n, i in da.adapters(pipe).items()}
    yield pipe
    assert (param_hashes(pipe), {n: (i.weight, i.enabled, i.methods) for n, i in da.adapters(pipe).items()}) == state
    da.unload(pipe)


def request(files, stack: dict) -> dict:
    def resolve(v):
        return (files[v[0]], v[1]) if isinstance(v, tuple) else files[v] if isinstance(v, str) else v

    return {n: resolve(v) for n, v in stack.items()}


@pytest.fixture(scope="module")
def ref():
    return tiny_sd1_pipeline()


@pytest.mark.parametrize("name", list(REQUESTS))
def test_using_applies_the_stack_and_restores(served, ref, files, name):
    stack, expected = REQUESTS[name]
    with da.using(served, request(files, stack)):
        got = weights_of(served)
    assert_close(got, fresh(ref, [(n, files[f], w) for n, f, w in expected]))


def test_using_restores_after_an_exception_and_refuses_bad_requests(served, files, tmp_path):
    with pytest.raises(ZeroDivisionError):
        with da.using(served, request(files, {"a": "resnets", "c": "lokr", "b": 0.1})):
            1 / 0
    bad_requests = [({"nope": 0.5}, da.AdapterNotFoundError), ({"a": tmp_path / "x.safetensors"}, da.SourceError),
                    ({"a": {"vae": 1.0}}, da.DiffAdaptError), ({"a": 0.5, "c": {"k": torch.ones(1)}}, da.FormatError)]
    for bad, error in bad_requests:
        with pytest.raises(error):
            with da.using(served, bad):
                pytest.fail("the block must not run")


def test_using_nests_and_serializes_threads(served):
    def state():
        return {n: i.weight if i.enabled else None for n, i in da.adapters(served).items()}

    with da.using(served, {"a": 0.5}):
        assert state() == {"a": 0.5, "b": None}
        with da.using(served, {"b": 0.2}, exclusive=False):
            assert state() == {"a": 0.5, "b": 0.2}
        assert state() == {"a": 0.5, "b": None}
    seen, spans, errors = {}, [], []

    def worker(i: int):
        try:
            with da.using(served, {"a": i / 10, "b": 1.0}):
                start = time.perf_counter()
                time.sleep(0.02)
                seen[i] = state()
                spans.append((start, time.perf_counter()))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and seen == {i: {"a": i / 10, "b": 1.0} for i in range(6)}
    spans.sort()
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    outcome = []

    def impatient():
        try:
            with da.using(served, {}, timeout=0.05):
                outcome.append("ran")
        except TimeoutError:
            outcome.append("timed out")

    with da.using(served, {}):
        waiting = threading.Thread(target=impatient)
        waiting.start()
        waiting.join()
    assert outcome == ["timed out"]
