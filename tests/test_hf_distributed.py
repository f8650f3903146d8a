"""crossent.hf under DDP and FSDP2 (gloo, 2 CPU ranks): the patched model's gradients after
backward equal the unpatched model's under the same wrapper (so the head's gradient was
reduced and, under FSDP2, its sharded weight gathered by the head's own hooks)."""
from __future__ import annotations

import copy
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

transformers = pytest.importorskip("transformers")

import crossent.hf  # noqa: E402

WORLD = 2


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)  # the same weights on every rank
    return transformers.LlamaForCausalLM(config).train()


def _batch(rank: int):
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    input_ids = torch.randint(0, 97, (2, 10), generator=gen)
    labels = input_ids.clone()
    labels[:, : 2 + rank] = -100  # unequal token counts per rank
    return input_ids, labels


def _ddp(model):
    return torch.nn.parallel.DistributedDataParallel(model)


def _fsdp2(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model.lm_head)  # its own unit: outside its call the weight is a shard
    fully_shard(model)
    return model


def _grads(model):
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        out[name] = g.full_tensor() if hasattr(g, "full_tensor") else g  # FSDP2: DTensor
    return out


def _step(wrapped, rank, use_loss_fn):
    input_ids, labels = _batch(rank)
    if use_loss_fn:
        loss = crossent.hf.causal_lm_loss(wrapped, input_ids, labels)
    else:
        loss = wrapped(input_ids=input_ids, labels=labels).loss
    loss.backward()
    return loss.detach()


def _worker(rank: int, port: int):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    fails = []
    try:
        for wrap in (_ddp, _fsdp2):
            for use_loss_fn in (False, True):
                ref = _llama()
                ours = crossent.hf.patch(copy.deepcopy(ref)) if not use_loss_fn else copy.deepcopy(ref)
                ref, ours = wrap(ref), wrap(ours)
                loss_ref = _step(ref, rank, use_loss_fn=False)
                loss = _step(ours, rank, use_loss_fn)
                try:
                    torch.testing.assert_close(loss, loss_ref)
                    g_ref, g = _grads(ref), _grads(ours)
                    assert g.keys() == g_ref.keys()
                    for name in g_ref:
                        torch.testing.assert_close(g[name], g_ref[name], msg=lambda m: f"{name}: {m}")
                except AssertionError as e:
                    fails.append(f"{wrap.__name__} causal_lm_loss={use_loss_fn}: {e}")
        dist.barrier()  # both ranks done before either tears the group down
    finally:
        dist.destroy_process_group()
    if fails:
        raise AssertionError(f"rank {rank}:\n" + "\n".join(fails))
    # Every check passed: leave without the interpreter's teardown. A spawned rank sometimes
    # aborts there, after the group is destroyed ("terminate called without an active
    # exception" from a C++ thread of torch's distributed stack; seen in about one full test
    # run in five, also before crossent's changes), which would fail a run whose checks passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_and_fsdp2_gradients_equal_the_unpatched_models():
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)
