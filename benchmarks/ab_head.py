"""The head-free path's functions against those of an earlier commit: time, peak memory and bits, on the CPU.

``losses.py`` of ``--base`` (read with ``git show``) and of this checkout run in one process, interleaved, at
Qwen2's vocabulary: the reference projection (``projected_token_logps``) and the fused loss's forward and backward
(``fused_answer_loss``), the best of ``--repeats``; each case has more answer positions than the fused loss keeps
from forward to backward (``KEPT_BYTES``), so some chunks are projected again. Each case also checks that both give
the same bits (loss, token log-probs, gradients). ``--memory`` instead measures, in a new process per version, the
peak RSS of both functions at Qwen2-1.5B's head in bf16 at 2 × 1,024 answer tokens, above the RSS before the first
call (ru_maxrss is per process; the inputs are made without a larger temporary, so the high-water mark before the
first call is that RSS).

    .venv/bin/python benchmarks/ab_head.py --base 605b654
    .venv/bin/python benchmarks/ab_head.py --base 605b654 --memory
"""

import argparse
import importlib.util
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 151936
CASES = [(256, torch.float32, 1024), (1536, torch.bfloat16, 2048), (1536, torch.float32, 1024)]  # hidden, dtype, rows


def module(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def load(base: str):
    """``losses.py`` of commit ``base`` and that of this checkout, each loaded from its file (not the installed copy)."""
    show = subprocess.run(["git", "show", f"{base}:llamafactory_minorsft/losses.py"], cwd=ROOT, capture_output=True)
    if show.returncode:
        sys.exit(f"--base {base}: git show failed: {show.stderr.decode().strip()}")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "losses_base.py")
        with open(path, "wb") as file:
            file.write(show.stdout)
        old = module("losses_base", path)
    return old, module("losses_this", os.path.join(ROOT, "llamafactory_minorsft", "losses.py"))


def inputs(width: int, dtype: torch.dtype, rows: int, batch: int = 1):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, rows + 1, width, generator=gen, dtype=dtype)
    weight = torch.randn(VOCAB, width, generator=gen, dtype=dtype).mul_(0.02)
    labels = torch.randint(0, VOCAB, (batch, rows + 1), generator=gen)
    return hidden, weight, labels


def step(losses, hidden, weight, labels):
    """(seconds of the reference projection, of the fused loss, and what both gave, the loss included)."""
    start = time.perf_counter()
    reference = losses.projected_token_logps(hidden, weight, labels)[0]
    middle = time.perf_counter()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, tokens, _ = losses.fused_answer_loss(h, w, labels, lambda t: -t.sum() / t.numel())
    loss.backward()
    return middle - start, time.perf_counter() - middle, [reference, loss.detach(), tokens, h.grad, w.grad]


def timing(base: str, repeats: int) -> None:
    old, new = load(base)
    for width, dtype, rows in CASES:
        tensors = inputs(width, dtype, rows)
        best = {}
        for _ in range(repeats):
            for name, module in (("base", old), ("this", new)):
                reference, fused, values = step(module, *tensors)
                best[name, "ref"] = min(best.get((name, "ref"), reference), reference)
                best[name, "fused"] = min(best.get((name, "fused"), fused), fused)
                best[name] = values
        same = all(torch.equal(a, b) for a, b in zip(best["base"], best["this"]))
        print(
            f"hidden {width}, {str(dtype).removeprefix('torch.')}, {rows} positions: reference projection "
            f"{best['base', 'ref']:.2f} s -> {best['this', 'ref']:.2f} s ({best['this', 'ref'] / best['base', 'ref']:.2f}x), "
            f"fused loss {best['base', 'fused']:.2f} s -> {best['this', 'fused']:.2f} s "
            f"({best['this', 'fused'] / best['base', 'fused']:.2f}x); same bits: {same}",
            flush=True,
        )


def memory(base: str, version: str) -> None:
    old, new = load(base)
    losses = old if version == "base" else new
    hidden, weight, labels = inputs(1536, torch.bfloat16, 1024, batch=2)
    with open("/proc/self/status") as status:  # VmRSS, in kB
        before = int(status.read().split("VmRSS:")[1].split()[0])
    high = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    for _ in range(2):
        step(losses, hidden, weight, labels)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"{version}: peak RSS {(peak - before) // 1024} MB above the RSS before the first call "
        f"(high-water mark then: {(high - before) // 1024} MB above it)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the commit to compare against")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="peak RSS, a process per version, twice each")
    parser.add_argument("--version", choices=["base", "this"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.version:
        memory(args.base, args.version)
    elif args.memory:
        for version in ("base", "this", "base", "this"):
            command = [sys.executable, __file__, "--base", args.base, "--version", version]
            subprocess.run(command, check=True)
    else:
        timing(args.base, args.repeats)


if __name__ == "__main__":
    main()
