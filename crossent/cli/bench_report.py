"""Output of ``crossent bench``: the tables (rich or plain) and the ``--plot`` PNG."""
from __future__ import annotations

from collections import defaultdict

GBPS_NOTE = ("GB/s = bytes that must move / median time: fwd+bwd reads the logits and writes "
             "their gradient (2*N*C*itemsize), fwd and no-grad read them (N*C*itemsize)")


def print_report(console, timing: list[dict], memory: list[dict], jit: list[dict],
                 alloc: list[dict], machine: dict, linear: list[dict], gpu: dict | None) -> None:
    """Every table of one run; ``linear`` and ``gpu`` are empty / None when not run."""
    console.heading(f"crossent bench: {machine['cpu']}, {machine['cpus']} CPUs, "
                    f"torch {machine['torch']} ({machine['torch_threads']} threads)")
    for thp in sorted({r["thp"] for r in timing}):
        rows = [(r["case"], r["mode"], r["contender"], f"{r['median_ms']:.1f}",
                 f"{r['ratio']:.3f}", _speedup(r["ratio"]),
                 f"{r['gb_per_s']:.1f}" if "gb_per_s" in r else "-", f"{r['first_ms']:.0f}")
                for r in timing if r["thp"] == thp]
        console.table(f"time, THP_MEM_ALLOC_ENABLE={int(thp)} (median of {timing[0]['runs']} "
                      "alternating rounds; ratio = median of per-round time / torch's; "
                      f"{GBPS_NOTE})",
                      ["case", "mode", "contender", "median ms", "time / torch", "speed-up",
                       "GB/s", "first call ms"], rows, left=3)
    if memory:
        rows = [(r["case"], r["mode"], r["contender"], "1" if r["thp"] else "0",
                 f"{r['extra_bytes'] / 2**20:.0f}", f"{r['extra_x']:.2f}") for r in memory]
        console.table("peak extra resident memory of one call (fresh process, after warm-up)",
                      ["case", "mode", "contender", "THP", "MiB", "x N*C*itemsize"], rows, left=4)
    if linear:
        rows = [(r["shape"], r["contender"], f"{r['median_ms']:.1f}", f"{r['ratio']:.3f}",
                 _speedup(r["ratio"]),
                 "-" if r["extra_bytes"] is None else f"{r['extra_bytes'] / 2**20:.0f}",
                 "-" if r["extra_x"] is None else f"{r['extra_x']:.2f}") for r in linear]
        console.table(f"linear + cross-entropy, fp32 fwd+bwd (median of {linear[0]['runs']} "
                      "alternating rounds; torch = unfused x @ W.T + b then F.cross_entropy; "
                      "memory: extra peak beyond the returned gradients, fresh process)",
                      ["N,H,V", "contender", "median ms", "time / torch", "speed-up",
                       "extra MiB", "x N*V*4"], rows, left=2)
    if gpu:
        rows = [(f"{r['N']}x{r['V']}", r["mode"], r["impl"], f"{r['ms']:.3f}",
                 f"{r['tb_s'] * 1e3:.0f}", f"{r['peak_extra_gb']:.2f}") for r in gpu["rows"]]
        console.table(f"GPU: {gpu['device']}, triton {gpu['triton']}, bf16 (device copy "
                      f"{gpu['copy_tb_s']:.2f} TB/s read + write; {GBPS_NOTE})",
                      ["N x V", "mode", "impl", "ms", "GB/s", "peak extra GiB"], rows, left=3)
    console.table(f"allocate + fill {alloc[0]['gb']:.2f} GB (median of {len(alloc[0]['runs'])}, "
                  "alternating; page faults dominate)", ["allocator", "GB/s", "runs (s)"],
                  [(r["allocator"], f"{r['gb_per_s']:.2f}", " ".join(map(str, r["runs"])))
                   for r in alloc])
    if jit:
        console.table("first fwd+bwd in a fresh process (64x32000, includes importing numba)",
                      ["numba cache", "seconds"], [(r["cache"], f"{r['seconds']:.2f}") for r in jit])


def _speedup(ratio: float) -> str:
    """torch's time / the contender's; two decimals below 1 so a slowdown does not read 0.0x."""
    return "-" if not ratio else f"{1 / ratio:.1f}x" if ratio <= 1 else f"{1 / ratio:.2f}x"


def _grouped(ax, groups: dict[str, dict[str, float]], ylabel: str, title: str) -> None:
    """Bars of ``groups[group][series]``, one cluster per group; a dashed line at 1."""
    series = sorted({s for g in groups.values() for s in g})
    width = 0.8 / max(1, len(series))
    for i, name in enumerate(series):
        xs = [j + i * width for j, g in enumerate(groups.values()) if name in g]
        ys = [g[name] for g in groups.values() if name in g]
        ax.bar(xs, ys, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels(list(groups), rotation=30, ha="right", fontsize=8)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)


def plot(path: str, timing: list[dict], memory: list[dict], linear: list[dict]) -> str | None:
    """Write the PNG; returns why it was skipped (matplotlib missing), else None."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: --plot skipped (pip install matplotlib)"
    speed: dict[str, dict[str, float]] = defaultdict(dict)
    for r in timing:
        if r["contender"] != "torch":
            thp = f" THP={int(r['thp'])}" if len({t["thp"] for t in timing}) > 1 else ""
            speed[f"{r['case']} {r['mode']}{thp}"][r["contender"]] = 1 / r["ratio"]
    for r in linear:
        if r["contender"] != "torch":
            speed[f"linear {r['shape']}"][r["contender"]] = 1 / r["ratio"]
    mem: dict[str, dict[str, float]] = defaultdict(dict)
    for r in memory:
        mem[f"{r['case']} {r['mode']}"][r["contender"] + (" THP" if r["thp"] else "")] = r["extra_x"]
    for r in linear:
        if r["extra_x"] is not None:
            mem[f"linear {r['shape']}"][r["contender"]] = r["extra_x"]
    panels = [(speed, "speed-up vs torch eager (x)", "time: torch / contender (higher is faster)")]
    if mem:
        panels.append((mem, "peak extra memory (x logits bytes)", "peak memory (lower is leaner)"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, len(speed) * 0.9), 4.5 * len(panels)),
                             squeeze=False)
    for ax, (groups, ylabel, title) in zip(axes[:, 0], panels):
        _grouped(ax, groups, ylabel, title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
