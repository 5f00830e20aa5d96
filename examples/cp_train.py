"""Context-parallel training step: one long sequence split over 2 processes.

    python examples/cp_train.py                      # spawns 2 CPU processes (gloo), seconds
    torchrun --nproc_per_node=2 examples/cp_train.py # same under torchrun; NCCL when GPUs are there

A tiny decoder block with the pieces Qwen3-VL's text attention has (q/k/v/o projections, GQA,
per-head RMSNorm on q and k, MRoPE-style rotary from (3, B, S) position ids, causal attention)
runs forward + backward on its shard of the sequence. Tokens, labels and the position ids are
all sharded with the *same* layout (zigzag); only attention talks to the other ranks. The
gradients of the replicated weights are summed over the context-parallel group (what DDP or
FSDP would do over the data-parallel x context-parallel ranks).

At the end every rank re-runs the same step on the full sequence in one process and prints the
largest difference in loss and gradients: context parallelism changes where the work runs,
not the result.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import qwen3vl_flash as qf
from qwen3vl_flash.parallel import context_parallel_attn, shard


def mrope(x: torch.Tensor, pos: torch.Tensor, theta: float = 5e6) -> torch.Tensor:
    """Rotary embedding with (temporal, height, width) position ids (3, B, S), interleaved over
    frequencies like Qwen3-VL's MRoPE (frequency i uses component i % 3); NeoX rotate_half.
    x (B, S, H, D)."""
    D = x.shape[-1]
    half = D // 2
    inv = theta ** (-torch.arange(half, dtype=torch.float64) / half)
    comp = torch.arange(half) % 3  # which of t / h / w drives frequency i
    p = pos.to(torch.float64)[comp]  # (half, B, S)
    ang = p.permute(1, 2, 0) * inv  # (B, S, half)
    cos = torch.cat([ang.cos(), ang.cos()], -1).unsqueeze(2).to(x.dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1).unsqueeze(2).to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Block(nn.Module):
    def __init__(self, vocab=256, dim=64, heads=4, kv_heads=2, head_dim=16):
        super().__init__()
        self.h, self.kvh, self.d = heads, kv_heads, head_dim
        self.emb = nn.Embedding(vocab, dim)
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=False)
        self.q_norm = nn.RMSNorm(head_dim)
        self.k_norm = nn.RMSNorm(head_dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens, pos, attn):
        B, S = tokens.shape
        x = self.emb(tokens)
        q = mrope(self.q_norm(self.q_proj(x).view(B, S, self.h, self.d)), pos)
        k = mrope(self.k_norm(self.k_proj(x).view(B, S, self.kvh, self.d)), pos)
        v = self.v_proj(x).view(B, S, self.kvh, self.d)
        x = x + self.o_proj(attn(q, k, v).reshape(B, S, -1))
        x = x + self.mlp(x)
        return self.lm_head(x)  # (B, S, vocab)


def make_batch(B: int, S: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (B, S + 1), generator=g)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]  # shift BEFORE sharding: labels stay aligned
    # position ids (3, B, S): text-like ramps with an "image" block whose h/w ids form a grid
    pos = torch.arange(S).expand(3, B, S).clone()
    a, side = S // 4, 4
    pos[0, :, a:a + side * side] = a
    pos[1, :, a:a + side * side] = a + torch.arange(side * side) // side
    pos[2, :, a:a + side * side] = a + torch.arange(side * side) % side
    return inputs, labels, pos


def train_step(model, inputs, labels, pos, attn, n_tokens: int, group=None):
    model.zero_grad(set_to_none=True)
    logits = model(inputs, pos, attn)
    # sum over this rank's tokens / all tokens: the shard losses add up to the global mean
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / n_tokens
    loss.backward()
    if group is not None:
        for p in model.parameters():
            dist.all_reduce(p.grad, group=group)
        loss = loss.detach().clone()
        dist.all_reduce(loss, group=group)
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def main(rank: int, world: int, init: str, args) -> None:
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world and not args.cpu
    if use_cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    if not use_cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method=init, rank=rank, world_size=world)
    dtype = torch.float64 if args.dtype == "float64" else getattr(torch, args.dtype)

    torch.manual_seed(0)  # same weights on every rank
    model = Block().to(device=device, dtype=dtype)
    inputs, labels, pos = (t.to(device) for t in make_batch(args.batch, args.seqlen, 256, seed=1))
    n_tokens = labels.numel()

    # shard every per-token tensor with the same layout
    layout = args.layout
    li, ll = shard(inputs, 1, layout=layout), shard(labels, 1, layout=layout)
    lp = shard(pos, -1, layout=layout)  # (3, B, S / world)

    def cp_attn(q, k, v):
        return context_parallel_attn(q, k, v, causal=True, mode=args.mode, layout=layout)

    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss, grads = train_step(model, li, ll, lp, cp_attn, n_tokens, group=dist.group.WORLD)
    if use_cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps

    # the same step on the full sequence, one process, plain flash_attn_func
    ref_loss, ref_grads = train_step(model, inputs, labels, pos, lambda q, k, v: qf.flash_attn_func(q, k, v, causal=True),
                                     n_tokens)
    gdiff = max((grads[n] - ref_grads[n]).abs().max().item() for n in grads)
    if rank == 0:
        print(f"{world} x {device.type} ({dist.get_backend()}), {dtype}, S={args.seqlen} ({layout}, mode={args.mode}): "
              f"{dt * 1e3:.1f} ms/step; loss {loss.item():.6f} vs one process {ref_loss.item():.6f} "
              f"(|diff| {abs(loss.item() - ref_loss.item()):.1e}); max|grad diff| {gdiff:.1e}", flush=True)
    dist.destroy_process_group()


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlen", type=int, default=512, help="global sequence length (a multiple of 2 x world)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--world", type=int, default=2, help="processes to spawn when not under torchrun")
    p.add_argument("--mode", default="auto", choices=["auto", "ring", "ulysses", "hybrid", "allgather"])
    p.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--cpu", action="store_true", help="gloo on CPU even when GPUs are present")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse()
    if "RANK" in os.environ:  # torchrun
        main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://", args)
    else:
        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as d:
            mp.start_processes(main, args=(args.world, f"file://{d}/init", args), nprocs=args.world,
                               start_method="spawn")
