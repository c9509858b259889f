"""Load-time benchmark: diffadapt's patch-mode ``da.load`` against the reference loaders, same end state.

All on the real-size SD1.5 UNet (random weights, fp32, CPU unless ``--device cuda``), in one process, inside a
``StableDiffusionPipeline`` with tiny other components. Adapters are made by LyCORIS and saved with
safetensors, on every attention, resnet, up/down-sampler, conv_in/out and time-embedding layer (282 modules):

* kohya LoRA, rank 16, alpha 8 (≈ 68 MB) — reference: diffusers ``load_lora_weights`` + ``fuse_lora``;
* LoHa, rank 8, alpha 8 (≈ 68 MB, same size as the LoRA) — reference: ``lycoris.create_lycoris_from_weights``
  + ``merge_to``;
* LoKr, factor 8, rank 16, alpha 16, w2 decomposed (w2_a @ w2_b), w1 full (≈ 9 MB) — reference as LoHa.
  LoHa/LoKr use alpha = rank because LyCORIS' ``merge_to`` applies alpha/r twice (see docs/design.md).

diffadapt's load is timed twice: *first* (no backup of the originals yet: each touched weight is copied to the
backup, then written in place) and *warm* (backups kept from an earlier load and unload: one fused write per
module); each against the reference's load + fuse/merge. A round of each side: first load + unload (backups
kept), warm load + unload + ``da.release`` (untimed), reference load + fuse + unfuse + unload. Memory, in the
warm-up round: the peak RSS each load adds over the RSS before it (sampled every 5 ms, after handing freed heap
memory back to the OS), as a multiple of the bytes of the weights the adapter touches; and the bytes of new
weight storage on the model's device — parameters whose storage moved (CPU) or ``torch.cuda`` allocations
minus the adapter's own tensors (``--device cuda``). Each side runs one untimed warm-up round, then
``--repeats`` timed rounds (default 3, ``--quick``: 1), interleaved so that load from other processes hits every
side alike; times are medians, ratios medians of per-round ratios. The warm-up rounds double as a check: the
parameters diffadapt patches must be exactly those the reference changes, and max |Δ| between the two end
states (printed) must be <= 1e-5, so the bench cannot pass by doing less work.

The LoRA case also times the *bare* operations of a fused load on diffusers' own factors, with no file, key
mapping or checks: one ``addmm`` per touched weight into a reused buffer (a warm load's whole job), and that
plus a copy of the touched weights into fresh memory (a first load's), as ratios to the same reference; on a
machine where those already exceed a target, the target cannot be met by any exact fused load.

The LoRA case also times inject mode (``mode="inject"``: peft tuner layers, unfused) against diffusers'
``load_lora_weights`` alone, which is unfused too.

Targets (LoRA): first load ≤ 0.5 × and warm load ≤ 0.15 × diffusers load + fuse; first-load host memory ≤ 1.05 ×
the touched bytes; new device storage 0; inject-mode load ≤ 0.30 × diffusers load. The machine may be shared:
run it under ``flock /tmp/heavy.lock`` and read the per-round ratios printed beside the medians.

Run: ``python bench/load.py [--repeats N] [--quick] [--threads N] [--device cpu|cuda] [--lora-only]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time

import common
import numpy as np
import torch

import diffadapt as da
from diffadapt import testing

TARGETS = {"first": 0.50, "warm": 0.15}  # LoRA: diffadapt load / (diffusers load + fuse)
HOST_TARGET = 1.05  # first-load peak RSS added / touched bytes
INJECT_TARGET = 0.30  # inject-mode load / diffusers load_lora_weights, same file
TOLERANCE = 1e-5
CASES = {  # name: (label, lycoris_network kwargs, reference)
    "lora": ("kohya LoRA r16 vs diffusers", dict(algo="lora", rank=16, alpha=8), "diffusers"),
    "loha": ("LoHa r8 vs lycoris", dict(algo="loha", rank=8, alpha=8), "lycoris"),
    "lokr": ("LoKr f8 r16 vs lycoris", dict(algo="lokr", rank=16, alpha=16, factor=8), "lycoris"),
}


@contextlib.contextmanager
def lycoris_prefix(prefix: str):
    """LyCORIS matches module names against a class-level prefix; set it for one call."""
    from lycoris import LycorisNetwork

    saved, LycorisNetwork.LORA_PREFIX = LycorisNetwork.LORA_PREFIX, prefix
    try:
        yield
    finally:
        LycorisNetwork.LORA_PREFIX = saved


class Spill:
    """Tensors kept in a file (raw bytes) instead of memory; ``spill[name]`` reads one back."""

    def __init__(self, tensors: dict[str, torch.Tensor], directory: str):
        self.path, self.where, self.nbytes = os.path.join(directory, "patched.bin"), {}, 0
        with open(self.path, "wb") as f:
            for n, t in tensors.items():
                a = t.detach().contiguous().cpu().numpy()
                self.where[n] = (f.tell(), a.dtype, a.shape)
                a.tofile(f)
                self.nbytes += a.nbytes

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def __iter__(self):
        return iter(self.where)

    def __getitem__(self, name: str) -> torch.Tensor:
        offset, dtype, shape = self.where[name]
        count = int(np.prod(shape))
        return torch.from_numpy(np.fromfile(self.path, dtype=dtype, count=count, offset=offset).reshape(shape))


def _device_bytes(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


class Bench:
    def __init__(self, pipe, snapshot: common.Snapshot):
        self.pipe, self.unet, self.snap = pipe, pipe.unet, snapshot
        self.device = next(self.unet.parameters()).device
        self.mem: dict[str, float] = {}
        self.storage: dict[str, float] = {}  # new weight storage on the model's device, bytes
        self.measure = False  # peak RSS in the warm-up rounds only: no sampler thread while timing

    @contextlib.contextmanager
    def _memory(self, key: str):
        if not self.measure:
            yield
            return
        with common.PeakRSS() as m:
            yield
        self.mem[key] = m.added_mb

    # -- diffadapt ----------------------------------------------------------------------------------
    def diffadapt_round(self, path: str, key: str, side: str, check: dict | None = None):
        """``side`` "first": no backups before the load, kept after; "warm": backups there, released after."""
        adapter_bytes = os.path.getsize(path)

        def round_(times):
            before = {n: p.data_ptr() for n, p in self.unet.named_parameters()}
            allocated = _device_bytes(self.device)
            with self._memory(f"{key}/{side}"), common.timed(times, "load"):
                da.load(self.pipe, path, "x")
            if self.measure:
                moved = sum(p.numel() * p.element_size() for n, p in self.unet.named_parameters()
                            if p.data_ptr() != before[n])
                if self.device.type == "cuda":
                    moved += max(0, _device_bytes(self.device) - allocated - adapter_bytes)
                self.storage[f"{key}/{side}"] = moved
            if check is not None:  # our end state, for the reference's round (unload writes in place)
                check["patched"] = Spill({n: p for n, p in self.unet.named_parameters()
                                          if not torch.equal(p, self.snap.saved[n])}, check["dir"])
            with common.timed(times, "unload"):
                da.unload(self.pipe, "x")
            if side == "warm":
                da.release(self.pipe)
        return round_

    def inject_round(self, path: str, key: str):
        """Inject mode: peft tuner layers, unfused — compared with diffusers' (also unfused) load_lora_weights."""
        def round_(times):
            with common.timed(times, "load"):
                info = da.load(self.pipe, path, "x", mode="inject")
            assert info.modules == sum(1 for m in self.unet.modules() if hasattr(m, "base_layer")), "not all injected"
            with common.timed(times, "unload"):
                da.unload(self.pipe, "x")
        return round_

    # -- diffusers ----------------------------------------------------------------------------------
    def diffusers_round(self, path: str, key: str, check: dict | None = None):
        def round_(times):
            with self._memory(f"{key}/reference"):
                with common.timed(times, "load"):
                    self.pipe.load_lora_weights(path, adapter_name="ref")
                with common.timed(times, "fuse"):
                    self.pipe.fuse_lora(components=["unet"])
            if check is not None and "patched" in check:
                self._compare(check, lambda n: n.replace(".base_layer", "") if "lora_" not in n else None)
            with common.timed(times, "unfuse"):
                self.pipe.unfuse_lora(components=["unet"])
            with common.timed(times, "unload"):
                self.pipe.unload_lora_weights()
            self.snap.restore()  # unfusing subtracts the delta again: not bit-exact
        return round_

    def bare_round(self, path: str):
        """The bare operations of a fused load, timed on the reference's own factors (peft layers of diffusers'
        load) with no file, mapping or checks: ``write`` — one ``addmm`` per touched weight into a reused buffer
        (read W0, the GEMM, write W: a warm load's whole job), ``backup`` — a copy of the touched weights into
        fresh memory (what a first load adds to keep the originals for an exact unload)."""
        from peft.tuners.lora import LoraLayer

        def round_(times):
            self.pipe.load_lora_weights(path, adapter_name="bare")
            jobs = []
            for m in self.unet.modules():
                if isinstance(m, LoraLayer) and "bare" in m.lora_A:
                    w = m.get_base_layer().weight.data
                    b = m.lora_B["bare"].weight.detach().reshape(w.shape[0], -1) * m.scaling["bare"]
                    jobs.append((w.reshape(w.shape[0], -1), b, m.lora_A["bare"].weight.detach().reshape(b.shape[1], -1)))
            scratch = torch.empty(max(w.numel() for w, _, _ in jobs), device=self.device)
            with torch.no_grad(), common.timed(times, "write"):
                for w, b, a in jobs:
                    torch.addmm(w, b, a, out=scratch[:w.numel()].view(w.shape))
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
            del scratch
            with common.timed(times, "backup"):
                buf = torch.empty(sum(w.numel() for w, _, _ in jobs), pin_memory=self.device.type == "cuda")
                o = 0
                for w, _, _ in jobs:
                    buf[o:o + w.numel()].view(w.shape).copy_(w)
                    o += w.numel()
            del buf, jobs
            self.pipe.unload_lora_weights()
        return round_

    # -- lycoris ------------------------------------------------------------------------------------
    def lycoris_round(self, path: str, key: str, check: dict | None = None):
        from lycoris import create_lycoris_from_weights

        def round_(times):
            with self._memory(f"{key}/reference"):
                with common.timed(times, "load"), lycoris_prefix("lora_unet"):
                    network, _ = create_lycoris_from_weights(1.0, path, self.unet)
                with common.timed(times, "merge"):
                    network.merge_to(1.0)
            del network
            if check is not None and "patched" in check:
                self._compare(check, lambda n: n)
            self.snap.restore()  # merge_to writes in place
        return round_

    def _compare(self, check: dict, rename) -> None:
        """Against ``check["patched"]``: record the parameters that differ from the base now, and max |Δ|."""
        patched, touched, delta = check["patched"], [], 0.0
        for n, p in self.unet.named_parameters():
            base = rename(n)
            if base is not None and not torch.equal(p, self.snap.saved[base]):
                touched.append(base)
                if base in patched:
                    delta = max(delta, (p.detach() - patched[base].to(p.device)).abs().max().item())
        check.update(touched=touched, delta=delta)

    # -- one case -----------------------------------------------------------------------------------
    def case(self, key: str, path: str, reference: str, repeats: int) -> dict:
        make = self.diffusers_round if reference == "diffusers" else self.lycoris_round
        check: dict = {"dir": os.path.dirname(path)}  # the warm-up rounds: equality check and memory measurement
        self.measure = True
        common.run_rounds({"first": self.diffadapt_round(path, key, "first", check),
                           "warm": self.diffadapt_round(path, key, "warm"), "ref": make(path, key, check)}, repeats=0)
        self.measure = False
        patched, touched = check.pop("patched"), set(check["touched"])
        touched_bytes = patched.nbytes
        if set(patched) != touched:
            raise SystemExit(f"{key}: touched parameters differ: only diffadapt {sorted(set(patched) - touched)[:5]}, "
                             f"only {reference} {sorted(touched - set(patched))[:5]}")
        os.remove(patched.path)
        del patched
        if not check["delta"] <= TOLERANCE:
            raise SystemExit(f"{key}: diffadapt and {reference} disagree: max |Δ| = {check['delta']:.3g}")
        rounds = {"first": self.diffadapt_round(path, key, "first"), "warm": self.diffadapt_round(path, key, "warm"),
                  "ref": make(path, key)}
        if reference == "diffusers":
            rounds["inject"] = self.inject_round(path, key)
            rounds["inject"]({})  # its warm-up (the others had theirs above)
            rounds["bare"] = self.bare_round(path)
            rounds["bare"]({})
        s = common.run_rounds(rounds, repeats=repeats, warmup=0)
        second = "fuse" if reference == "diffusers" else "merge"
        ref = [r + f for r, f in zip(s["ref"]["load"], s["ref"][second])]
        ratios = {side: [o / r for o, r in zip(s[side]["load"], ref)] for side in ("first", "warm")}
        med = {side: {ph: common.median(v) for ph, v in phases.items()} for side, phases in s.items()}
        mem = {side: self.mem[f"{key}/{side}"] for side in ("first", "warm", "reference")}
        storage = {side: self.storage[f"{key}/{side}"] for side in ("first", "warm")}
        if "bare" in s:  # the bare operations of a warm load (write) and a first load (backup + write), per round
            ratios["bare warm"] = [w / r for w, r in zip(s["bare"]["write"], ref)]
            ratios["bare first"] = [(w + b) / r for w, b, r in zip(s["bare"]["write"], s["bare"]["backup"], ref)]
        if "inject" in s:  # unfused against unfused: inject load / diffusers load_lora_weights
            med["inject_ratio"] = common.median([i / r for i, r in zip(s["inject"]["load"], s["ref"]["load"])])
        return {**med, "ratio": {k: common.median(v) for k, v in ratios.items()}, "ratios": ratios, "mem": mem,
                "storage": storage, "touched_mb": touched_bytes / common.MB, "delta": check["delta"],
                "touched": len(touched)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per side (median); default 3")
    ap.add_argument("--quick", action="store_true", help="1 timed round per side")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice); 1 gives "
                    "steadier numbers on a machine shared with other jobs")
    ap.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda); default cpu")
    ap.add_argument("--lora-only", action="store_true", help="only the LoRA case (the one with targets)")
    args = ap.parse_args()
    for key in [k for k in CASES if args.lora_only and k != "lora"]:
        del CASES[key]
    repeats = 1 if args.quick else args.repeats
    if args.threads:
        torch.set_num_threads(args.threads)
    common.quiet()
    t_start = time.perf_counter()

    pipe = common.sd15_pipeline(common.sd15_unet()).to(args.device)
    bench = Bench(pipe, common.Snapshot(pipe.unet))
    results, sizes = {}, {}
    with tempfile.TemporaryDirectory(prefix="diffadapt-bench-") as tmp:
        scratch = common.empty_like_model(testing.sd15_unet)
        configs = {k: dict(prefix="lora_unet", **kw) for k, (_, kw, _) in CASES.items()}
        paths = common.make_lycoris_files(scratch, configs, tmp)
        del scratch
        for key, (label, _, reference) in CASES.items():
            sizes[key] = os.path.getsize(paths[key]) / common.MB
            results[key] = bench.case(key, paths[key], reference, repeats)
            print(f"  {label}: done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    print(render(results, sizes, repeats, time.perf_counter() - t_start))
    print(f"device: {args.device}; torch threads: {torch.get_num_threads()}; the machine may be shared with other jobs")


def render(results: dict, sizes: dict, repeats: int, elapsed: float) -> str:
    rows = []
    for key, (label, _, reference) in CASES.items():
        r = results[key]
        second = "fuse" if reference == "diffusers" else "merge"
        ref_total = r["ref"]["load"] + r["ref"][second]
        for side in ("first", "warm"):
            target = f"<= {TARGETS[side]:.2f}" if key == "lora" else "-"
            rows.append([f"{label}, {side} load", f"load {r['ref']['load']:.2f} + {second} {r['ref'][second]:.2f} = "
                         f"{ref_total:.2f}", f"{r[side]['load']:.3f}", f"{r['ratio'][side]:.3f}", target])
    lo = results["lora"]
    bare = lo["bare"]
    rows.append(["bare warm load: one addmm per touched weight, reused out buffer", "(same reference)",
                 f"{bare['write']:.3f}", f"{lo['ratio']['bare warm']:.3f}", "-"])
    rows.append(["bare first load: + a copy of the touched weights into fresh memory", "(same reference)",
                 f"{bare['write'] + bare['backup']:.3f}", f"{lo['ratio']['bare first']:.3f}", "-"])
    rows.append(["kohya LoRA r16, inject mode vs diffusers load (both unfused)", f"load {lo['ref']['load']:.2f}",
                 f"{lo['inject']['load']:.2f}", f"{lo['inject_ratio']:.3f}", f"<= {INJECT_TARGET:.2f}"])
    unfuse = lo["ref"]["unfuse"] + lo["ref"]["unload"]
    rows.append(["LoRA unload vs unfuse+unload", f"unfuse {lo['ref']['unfuse']:.2f} + unload {lo['ref']['unload']:.2f}",
                 f"{lo['warm']['unload']:.3f}", f"{lo['warm']['unload'] / unfuse:.3f}", "-"])
    out = [common.fmt_table(rows, ["case", "reference (s)", "diffadapt (s)", "ratio", "target"]), ""]
    rows = []
    for key, (label, _, reference) in CASES.items():
        r = results[key]
        m, t = r["mem"], r["touched_mb"]
        target = f"<= {HOST_TARGET:.2f}" if key == "lora" else "-"
        rows.append([label.split(" vs ")[0], f"{t:.0f}", f"{m['reference']:.0f}", f"{m['first']:.0f}",
                     f"{m['first'] / t:.3f}", target, f"{m['warm']:.0f}",
                     f"{r['storage']['first'] / common.MB:.0f} / {r['storage']['warm'] / common.MB:.0f}"])
    out.append(common.fmt_table(rows, ["peak MB added", "touched", "reference", "first", "first/touched", "target",
                                       "warm", "new device storage first / warm (target 0)"]))
    out.append("")
    for key, (label, _, reference) in CASES.items():
        r = results[key]
        out.append(f"max |Δ| diffadapt vs {reference}, {label.split(' vs ')[0]} ({sizes[key]:.1f} MB file): "
                   f"{r['delta']:.3g} over {r['touched']} touched parameters; ratio per round first "
                   + " ".join(f"{x:.2f}" for x in r["ratios"]["first"]) + ", warm "
                   + " ".join(f"{x:.3f}" for x in r["ratios"]["warm"])
                   + ("" if "bare warm" not in r["ratios"] else "; bare first " + " ".join(
                       f"{x:.2f}" for x in r["ratios"]["bare first"]) + ", warm " + " ".join(
                       f"{x:.3f}" for x in r["ratios"]["bare warm"])))
    lora = results["lora"]
    ok = [lora["ratio"][side] <= t for side, t in TARGETS.items()]
    ok += [lora["mem"]["first"] / lora["touched_mb"] <= HOST_TARGET, lora["storage"]["first"] == 0]
    verdict = "PASS" if all(ok) else "FAIL"
    verdict += f", inject {'PASS' if lora['inject_ratio'] <= INJECT_TARGET else 'FAIL'}"
    out.append(f"targets: {verdict}   (median of {repeats} timed rounds after 1 warm-up; bench took {elapsed:.0f} s)")
    return "\n".join(out)


if __name__ == "__main__":
    main()
