"""Vocab-parallel cross-entropy on CPU: each rank holds an uneven slice of the output layer.

    torchrun --nproc_per_node 2 examples/vocab_parallel.py

Every rank builds the same seeded problem, keeps its rows of the output projection, trains it
for a few steps with the fused vocab-parallel loss, and checks loss and gradients against
crossent.cross_entropy on the full (unsharded) logits.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

import crossent
from crossent.distributed import (
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
    vocab_shard_range,
)

N, H, V = 64, 32, 1000  # tokens, hidden size, vocabulary


def main() -> None:
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same full problem on every rank
    hidden = torch.randn(N, H)  # (N, H) replicated, as after a tensor-parallel block
    full_weight = torch.randn(V, H) / H**0.5  # (V, H) the unsharded output projection
    target = torch.randint(0, V, (N,))  # (N,) global class indices, the same on every rank
    target[::7] = -100  # some padding tokens

    # Uneven shards: rank r holds a share proportional to r + 1.
    shares = torch.arange(1, world + 1)
    sizes = (shares * V // shares.sum()).tolist()
    sizes[-1] += V - sum(sizes)
    vocab_start, vocab_size = vocab_shard_range(sizes[rank])  # one all-gather, done once
    local_weight = full_weight[vocab_start : vocab_start + sizes[rank]].clone().requires_grad_()
    options = dict(label_smoothing=0.1, z_loss=1e-4)

    # 1. Sharded logits -> loss: one all-gather per call, backward sends nothing.
    local_logits = (hidden @ local_weight.detach().T).requires_grad_()  # (N, V_local)
    loss = vocab_parallel_cross_entropy(local_logits, target, vocab_start=vocab_start, **options)
    loss.backward()
    full_logits = (hidden @ full_weight.T).requires_grad_()  # (N, V): what one device would do
    ref = crossent.cross_entropy(full_logits, target, **options)
    ref.backward()
    ref_slice = full_logits.grad[:, vocab_start : vocab_start + sizes[rank]]
    print(f"rank {rank}: classes [{vocab_start}, {vocab_start + sizes[rank]}) of {vocab_size}, "
          f"loss {loss.item():.6f} (single device {ref.item():.6f}), "
          f"max |grad - single-device slice| {(local_logits.grad - ref_slice).abs().max().item():.1e}")

    # 2. The output layer fused in, trained with SGD: the input gradient is all-reduced.
    h = hidden.clone().requires_grad_()
    for step in range(5):
        loss = vocab_parallel_linear_cross_entropy(h, local_weight, target,
                                                   vocab_start=vocab_start, **options)
        local_weight.grad = h.grad = None
        loss.backward()
        with torch.no_grad():
            local_weight -= 2.0 * local_weight.grad
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}")
    # h.grad is the full input gradient on every rank (its last step's value, before the update).
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
