"""crossent.distributed: vocab-parallel losses on 1, 2 and 3 gloo ranks vs the single-process result.

Each spawn runs the whole case list (spawning costs seconds, a case milliseconds). Every rank
rebuilds the full float64 problem from a seed, keeps its uneven slice of the classes, and
compares the loss and its slice of the gradient with crossent.cross_entropy, the float64
reference and (where it has the option) torch's F.cross_entropy. Failures are collected, so
every rank runs every collective, and raised together at the end.
"""
from __future__ import annotations

import functools
import itertools
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import crossent
from crossent._core import reference as _reference
from crossent.distributed import (
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
    vocab_shard_range,
)

TOL = dict(rtol=1e-9, atol=1e-9)  # float64 throughout: merged statistics differ by roundings only
V = 13
SIZES = {1: [V], 2: [8, 5], 3: [6, 4, 3]}  # uneven shards of the 13 classes
EMPTY = {1: [V], 2: [V, 0], 3: [5, 0, 8]}  # a rank holding no class at all

EXTRAS = [dict(), dict(z_loss=1e-2), dict(softcap=2.5), dict(z_loss=3e-3, softcap=4.0)]
CE_CASES = [
    dict(reduction=r, weighted=w, label_smoothing=eps, **extra)
    for r, w, eps, extra in itertools.product(["none", "mean", "sum"], [False, True], [0.0, 0.15], EXTRAS)
]
CE_CASES += [
    dict(reduction="mean", weighted=True, label_smoothing=0.1, ignore_index=3),  # a class index
    dict(reduction="mean", weighted=False, all_ignored=True),  # NaN loss, zero gradient
    dict(reduction="sum", weighted=True, all_ignored=True),
    dict(reduction="none", weighted=True, label_smoothing=0.2, shape=(3, V, 2, 3)),  # K-dim
    dict(reduction="mean", weighted=True, label_smoothing=0.2, z_loss=1e-2, shape=(3, V, 4)),
    dict(reduction="sum", weighted=False, shape=(V,)),  # unbatched
    dict(reduction="mean", weighted=True, label_smoothing=0.1, sizes=EMPTY),
    dict(reduction="none", weighted=False, softcap=3.0, sizes=EMPTY),
    dict(reduction="mean", weighted=True, padded=True),
    dict(reduction="none", weighted=False, z_loss=1e-2, padded=True),
    dict(reduction="sum", weighted=True, label_smoothing=0.1, padded=True),  # inf / NaN as torch
    # logits near +-1e15, where float64's lse has lost log S (ulp 0.125): (M - x) + log S
    dict(reduction="none", weighted=True, label_smoothing=0.15, offset=1e15),
    dict(reduction="mean", weighted=False, label_smoothing=0.2, offset=-1e15, sizes=EMPTY),
]
PROB_CASES = [
    dict(reduction=r, weighted=w, label_smoothing=eps, probs=True, **extra)
    for r, w, eps, extra in itertools.product(["none", "mean", "sum"], [False, True], [0.0, 0.2],
                                              [dict(), dict(z_loss=1e-2, softcap=3.0)])
]
PROB_CASES += [dict(reduction="none", weighted=w, label_smoothing=0.2, probs=True, offset=1e15)
               for w in (False, True)]
LINEAR_CASES = [
    dict(reduction=r, weighted=w, label_smoothing=eps, bias=b, **extra)
    for r, (w, eps, b), extra in itertools.product(
        ["none", "mean", "sum"], [(False, 0.0, True), (True, 0.1, False), (True, 0.2, True)],
        [dict(), dict(z_loss=1e-2, softcap=3.0)])
]
LINEAR_CASES += [
    dict(reduction="mean", weighted=True, bias=True, shape=(2, 3)),  # (*, H) input
    dict(reduction="sum", weighted=False, bias=True, probs=True, label_smoothing=0.1),
    dict(reduction="mean", weighted=True, bias=True, label_smoothing=0.1, sizes=EMPTY),
    dict(reduction="sum", weighted=True, bias=True, label_smoothing=0.1, z_loss=1e-2, chunk_size=4),
    dict(reduction="mean", weighted=False, bias=False, softcap=2.0, chunk_size=1, sizes=EMPTY),
]


def _problem(case: dict, seed: int, n_classes: int = V):
    """Full logits, target and class weights, identical on every rank (same seed)."""
    gen = torch.Generator().manual_seed(seed)
    shape = case.get("shape", (11, n_classes))
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + case.get("offset", 0.0)
    if case.get("padded"):  # padded vocabulary: classes 9.. masked to -inf (a whole shard of 3 ranks)
        x[:, 9:] = -torch.inf
    ignore_index = case.get("ignore_index", -100)
    if case.get("probs"):
        target = torch.randn(shape, generator=gen, dtype=torch.float64).softmax(1 if len(shape) > 1 else 0)
    else:
        index_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
        target = torch.randint(0, n_classes, index_shape, generator=gen)
        drop = torch.rand(index_shape, generator=gen) < (1.0 if case.get("all_ignored") else 0.25)
        if len(shape) == 1:
            drop = torch.zeros((), dtype=torch.bool)
        target = torch.where(drop, torch.full_like(target, ignore_index), target)
        if case.get("padded"):
            target = torch.where(target == ignore_index, target, target % 9)
    weight = torch.rand(n_classes, generator=gen, dtype=torch.float64) + 0.2 if case["weighted"] else None
    options = dict(weight=weight, ignore_index=ignore_index, reduction=case["reduction"],
                   label_smoothing=case.get("label_smoothing", 0.0))
    extra = dict(z_loss=case.get("z_loss", 0.0), softcap=case.get("softcap"))
    return gen, x, target, options, extra


def _compare(fails: list, what: str, ours, theirs) -> None:
    try:
        torch.testing.assert_close(ours, theirs, equal_nan=True, **TOL)
    except AssertionError as err:
        fails.append(f"{what}: {err}")


def _local_slice(t: torch.Tensor, start: int, size: int) -> torch.Tensor:
    return t.narrow(0 if t.dim() == 1 else 1, start, size)


def _check_ce(rank: int, world: int, case: dict, seed: int, fails: list, group=None) -> None:
    sizes = case.get("sizes", SIZES)[world]
    start, size = sum(sizes[:rank]), sizes[rank]
    gen, x, target, options, extra = _problem(case, seed)
    local = _local_slice(x, start, size).clone().requires_grad_()
    local_target = _local_slice(target, start, size) if case.get("probs") else target
    vocab_start = start if seed % 2 else None  # both ways of finding the offsets
    ours = vocab_parallel_cross_entropy(local, local_target, vocab_start=vocab_start, group=group,
                                        **options, **extra)
    full = x.clone().requires_grad_()
    ref = crossent.cross_entropy(full, target, **options, **extra)
    upstream = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad(ours, local, upstream)
    (g_full,) = torch.autograd.grad(ref, full, upstream)
    what = f"world={world} rank={rank} {case}"
    _compare(fails, what + " loss vs crossent", ours, ref)
    _compare(fails, what + " grad vs crossent", g_ours, _local_slice(g_full, start, size))
    if case.get("probs") and (seed % 3 == 0 or "offset" in case):  # targets that require grad
        local_t = local_target.clone().requires_grad_()
        full_t = target.clone().requires_grad_()
        loss_t = vocab_parallel_cross_entropy(local.detach(), local_t, vocab_start=vocab_start, group=group,
                                              **options, **extra)
        (gt_ours,) = torch.autograd.grad(loss_t, local_t, upstream)
        (gt_ref,) = torch.autograd.grad(crossent.cross_entropy(x, full_t, **options, **extra),
                                        full_t, upstream)
        _compare(fails, what + " target grad", gt_ours, _local_slice(gt_ref, start, size))
    full64 = x.clone().requires_grad_()
    oracle = _reference.cross_entropy(full64, target, **options, **extra)
    (g_oracle,) = torch.autograd.grad(oracle, full64, upstream)
    _compare(fails, what + " loss vs reference", ours, oracle)
    _compare(fails, what + " grad vs reference", g_ours, _local_slice(g_oracle, start, size))
    if extra["z_loss"] == 0 and extra["softcap"] is None:  # options torch has
        full_t = x.clone().requires_grad_()
        theirs = F.cross_entropy(full_t, target, **options)
        (g_torch,) = torch.autograd.grad(theirs, full_t, upstream)
        _compare(fails, what + " loss vs torch", ours, theirs)
        _compare(fails, what + " grad vs torch", g_ours, _local_slice(g_torch, start, size))


def _check_linear(rank: int, world: int, case: dict, seed: int, fails: list, group=None) -> None:
    sizes = case.get("sizes", SIZES)[world]
    start, size = sum(sizes[:rank]), sizes[rank]
    lead = case.get("shape", (9,))
    gen, _, target, options, extra = _problem(dict(case, shape=(int(torch.tensor(lead).prod()), V)), seed)
    if case.get("probs"):
        target = target.reshape(*lead, V)
    else:
        target = target.reshape(lead)
    hidden = torch.randn(*lead, 6, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, 6, generator=gen, dtype=torch.float64)
    bias = torch.randn(V, generator=gen, dtype=torch.float64) if case["bias"] else None
    h = hidden.clone().requires_grad_()
    w_local = weight[start : start + size].clone().requires_grad_()
    b_local = None if bias is None else bias[start : start + size].clone().requires_grad_()
    local_target = target[..., start : start + size] if case.get("probs") else target
    ours = vocab_parallel_linear_cross_entropy(
        h, w_local, local_target, bias=b_local, vocab_start=start if seed % 2 else None,
        group=group, chunk_size=case.get("chunk_size"), class_weight=options["weight"],
        **{k: v for k, v in options.items() if k != "weight"}, **extra)
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b_ref = None if bias is None else bias.clone().requires_grad_()
    logits = F.linear(h_ref, w_ref, b_ref).movedim(-1, 1)  # class dim second, as torch wants
    ref = crossent.cross_entropy(logits, target.movedim(-1, 1) if case.get("probs") else target,
                                 **options, **extra)
    upstream = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    ours_in = [h, w_local] + ([b_local] if bias is not None else [])
    ref_in = [h_ref, w_ref] + ([b_ref] if bias is not None else [])
    g_ours = torch.autograd.grad(ours, ours_in, upstream)
    g_ref = torch.autograd.grad(ref, ref_in, upstream)
    what = f"linear world={world} rank={rank} {case}"
    _compare(fails, what + " loss", ours, ref)
    _compare(fails, what + " grad input", g_ours[0], g_ref[0])
    for name, ours_g, ref_g in zip(["weight", "bias"], g_ours[1:], g_ref[1:]):
        _compare(fails, f"{what} grad {name}", ours_g, ref_g[start : start + size])


def _check_low_precision(rank: int, world: int, fails: list, group=None) -> None:
    """bfloat16/float16 shards (the recomputing gradient pass) vs crossent on the full logits."""
    sizes = SIZES[world]
    start, size = sum(sizes[:rank]), sizes[rank]
    for dtype in (torch.bfloat16, torch.float16):
        case = dict(reduction="mean", weighted=True, label_smoothing=0.1, z_loss=1e-3)
        _, x, target, options, extra = _problem(case, 7)
        x, options["weight"] = x.to(dtype), options["weight"].to(dtype)
        local = _local_slice(x, start, size).clone().requires_grad_()
        full = x.clone().requires_grad_()
        ours = vocab_parallel_cross_entropy(local, target, group=group, **options, **extra)
        ref = crossent.cross_entropy(full, target, **options, **extra)
        ours.backward()
        ref.backward()
        # Both accumulate in float32 and round once to the output dtype: one ulp apart at most.
        ulp = 2**-7 if dtype == torch.bfloat16 else 2**-10
        what = f"world={world} rank={rank} {dtype}"
        try:
            torch.testing.assert_close(ours, ref, rtol=ulp, atol=0)
            torch.testing.assert_close(local.grad, _local_slice(full.grad, start, size), rtol=ulp,
                                       atol=ulp * float(full.grad.abs().max()))
        except AssertionError as err:
            fails.append(f"{what}: {err}")


def _expect(fails: list, what: str, exc: type, needle: str, fn) -> None:
    try:
        fn()
    except exc as err:
        if needle not in str(err):
            fails.append(f"{what}: message {str(err)!r} lacks {needle!r}")
        return
    fails.append(f"{what}: no {exc.__name__} raised")


def _check_errors(rank: int, world: int, fails: list, group=None) -> None:
    """Bad layouts raise the same error on every rank, after the collective (no deadlock)."""
    sizes = SIZES[world]
    start, size = sum(sizes[:rank]), sizes[rank]
    _, x, target, _, _ = _problem(dict(weighted=False, reduction="mean"), 5)
    local = _local_slice(x, start, size)
    ce = functools.partial(vocab_parallel_cross_entropy, group=group)
    if world > 1:
        _expect(fails, "overlapping shards", ValueError, "tile",
                lambda: ce(local, target, vocab_start=0))
        bad_target = target.clone()
        bad_target[0] = (target[0] + rank + 1) % V
        _expect(fails, "targets differ", RuntimeError, "target differs",
                lambda: ce(local, bad_target))
    _expect(fails, "weight too long", RuntimeError, f"all {V} classes",
            lambda: ce(local, target, weight=torch.ones(V + 1, dtype=torch.float64)))
    _expect(fails, "weight too short", RuntimeError, f"all {V} classes",
            lambda: ce(local, target, weight=torch.ones(V - 1, dtype=torch.float64),
                       label_smoothing=0.1, vocab_start=start))
    out_of_range = torch.where(target == -100, V, target)
    _expect(fails, "target out of range", IndexError, f"{V} classes",
            lambda: ce(local, out_of_range, vocab_start=start))
    got = vocab_shard_range(size, group)
    if got != (start, V):
        fails.append(f"world={world}: vocab_shard_range({size}) = {got}, expected {(start, V)}")


def _worker(rank: int, port: int) -> None:
    """Three ranks: the default group (world 3), then a subgroup of ranks 0 and 1 (world 2) while
    rank 2 runs alone in a group of size 1 (world 1): one spawn covers all three."""
    torch.set_num_threads(1)  # three ranks share two cores
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3)
    pair = dist.new_group([0, 1])
    alone = dist.new_group([2])  # every rank takes part in every new_group call
    fails: list[str] = []
    try:
        for world, group, member in [(3, None, True), (2, pair, rank < 2), (1, alone, rank == 2)]:
            if not member:
                continue
            group_rank = dist.get_rank(group)
            for seed, case in enumerate(CE_CASES + PROB_CASES):
                _check_ce(group_rank, world, case, seed, fails, group)
            for seed, case in enumerate(LINEAR_CASES):
                _check_linear(group_rank, world, case, seed, fails, group)
            _check_low_precision(group_rank, world, fails, group)
            _check_errors(group_rank, world, fails, group)
        dist.barrier()  # nobody tears the group down while another rank still communicates
    finally:
        dist.destroy_process_group()
    if fails:
        raise AssertionError(f"{len(fails)} failures on rank {rank}:\n" + "\n".join(fails[:10]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vocab_parallel_matches_single_process():
    """2 and 3 gloo ranks with uneven (and empty) shards, and a process group of size 1."""
    mp.spawn(_worker, args=(_free_port(),), nprocs=3, join=True)


def test_single_process_without_process_group():
    """No process group initialised, group=None: the same code path minus the collective."""
    assert not dist.is_initialized()
    fails: list[str] = []
    for seed, case in enumerate(CE_CASES[::5] + PROB_CASES[::4]):
        _check_ce(0, 1, case, seed, fails)
    for seed, case in enumerate(LINEAR_CASES[::4]):
        _check_linear(0, 1, case, seed, fails)
    assert not fails, "\n".join(fails[:10])


def test_device_side_checks(monkeypatch):
    """The accelerator branch (device asserts, vocabulary size as a tensor), run on CPU."""
    from crossent._core import vocab_parallel as _vocab_parallel

    monkeypatch.setattr(_vocab_parallel, "_host_readable", lambda t: False)
    fails: list[str] = []
    for seed, case in enumerate([CE_CASES[4], CE_CASES[30], PROB_CASES[11], CE_CASES[-1]]):
        _check_ce(0, 1, case, 2 * seed + 1, fails)  # odd seed: vocab_start given, size unknown
    assert not fails, "\n".join(fails[:10])
    x = torch.randn(4, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="out of range"):
        vocab_parallel_cross_entropy(x, torch.tensor([0, 7, 1, 1]), vocab_start=0)
    with pytest.raises(RuntimeError, match="tile"):
        vocab_parallel_cross_entropy(x, torch.tensor([0, 1, 1, 1]), vocab_start=1)


def test_bad_arguments():
    x = torch.randn(4, 5, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 3])
    ce = vocab_parallel_cross_entropy
    with pytest.raises(ValueError, match="tile"):
        ce(x, t, vocab_start=2)  # a single process must hold [0, V)
    with pytest.raises(ValueError, match="vocab_start"):
        ce(x, t, vocab_start=-1)
    with pytest.raises(RuntimeError, match="1-D"):
        ce(x, t, weight=torch.ones(5, 1, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="dtype"):
        ce(x, t, weight=torch.ones(5))
    with pytest.raises(IndexError, match="Target 7 is out of bounds"):
        ce(x, torch.tensor([0, 7, 1, 1]))
    with pytest.raises(ValueError, match="reduction"):
        ce(x, t, reduction="avg")
    with pytest.raises(ValueError, match="chunk_size"):
        vocab_parallel_linear_cross_entropy(x, torch.randn(3, 5, dtype=torch.float64), t, chunk_size=0)
    h = x.clone().requires_grad_()
    loss = vocab_parallel_linear_cross_entropy(h, torch.randn(3, 5, dtype=torch.float64), t[:4] % 3)
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    loss.backward()  # retained: the whole gradient again
    torch.testing.assert_close(h.grad, 2 * first)
    with pytest.raises(RuntimeError, match="backward ran twice.*retain_graph=True"):
        loss.backward()
    with pytest.raises(RuntimeError, match="target must be class indices"):
        vocab_parallel_linear_cross_entropy(x, torch.randn(3, 5, dtype=torch.float64), t[:2])


def test_float32_and_bfloat16_single_process():
    """Low precision accumulates in float32, like crossent.cross_entropy: same answer."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(16, 50, generator=gen) * 4).to(dtype)
        t = torch.randint(0, 50, (16,), generator=gen)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours = vocab_parallel_cross_entropy(a, t, label_smoothing=0.1, z_loss=1e-3)
        ref = crossent.cross_entropy(b, t, label_smoothing=0.1, z_loss=1e-3)
        ours.backward()
        ref.backward()
        assert ours.dtype == ref.dtype == dtype and a.grad.dtype == dtype
        # Same float32 math in a different order (merged statistics): within float32 rounding
        # before the final cast, so at most one ulp of the output dtype apart.
        torch.testing.assert_close(ours, ref, rtol=2**-7 if dtype == torch.bfloat16 else 1e-6, atol=0)
        torch.testing.assert_close(a.grad, b.grad, rtol=2**-7 if dtype == torch.bfloat16 else 1e-6,
                                   atol=1e-7)


def test_linear_low_precision_single_process():
    """The fused linear variant in float32/bfloat16 (chunked or not) vs crossent's own fused linear."""
    from crossent.linear import linear_cross_entropy

    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        tensors = [torch.randn(40, 16, generator=gen), torch.randn(300, 16, generator=gen),
                   torch.randn(300, generator=gen)]
        t = torch.randint(0, 300, (40,), generator=gen)
        for chunk_size in (None, 7):
            ours_in = [x.to(dtype).requires_grad_() for x in tensors]
            ref_in = [x.to(dtype).requires_grad_() for x in tensors]
            ours = vocab_parallel_linear_cross_entropy(*ours_in[:2], t, bias=ours_in[2],
                                                       chunk_size=chunk_size, label_smoothing=0.1)
            ref = linear_cross_entropy(*ref_in[:2], t, linear_bias=ref_in[2], label_smoothing=0.1)
            ours.backward()
            ref.backward()
            # float32: roundings of the same math; bfloat16: gradients summed over chunks in
            # another order, each rounded to bfloat16 once: within one bfloat16 ulp of the largest.
            rel = 1e-5 if dtype == torch.float32 else 2**-7
            torch.testing.assert_close(ours, ref, rtol=rel, atol=0)
            for a, b in zip(ours_in, ref_in):
                assert a.grad.dtype == dtype
                torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=rel * float(b.grad.abs().max()))
