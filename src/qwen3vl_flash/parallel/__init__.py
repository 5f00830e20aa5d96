"""Context parallelism: one long sequence split across ranks (``torch.distributed``: NCCL on
GPUs, gloo on CPU), with the same outputs and gradients as one device.

    from qwen3vl_flash.parallel import shard, unshard, context_parallel_attn
    q_l, k_l, v_l = (shard(t, seq_dim=1) for t in (q, k, v))   # zigzag by default
    out_l = context_parallel_attn(q_l, k_l, v_l, causal=True)  # ring / Ulysses / hybrid (auto)
    out = unshard(out_l, seq_dim=1)

Modules: ``layout`` (shard/unshard), ``comm`` (groups, ring transport, all-to-all), ``merge``
(the lse merge), ``ring``, ``ulysses`` (and hybrid), ``allgather`` (a baseline), ``faults`` (every
rank raises when one fails, never a hang), ``api``. See docs/parallel.md.
"""

from .api import MODES, choose_kernel, choose_mode, context_parallel_attn
from .faults import ContextParallelError, ContextParallelInputError
from .layout import LAYOUTS, chunk_ids, shard, unshard
from .merge import merge_attn_outputs

__all__ = [
    "shard",
    "unshard",
    "context_parallel_attn",
    "choose_mode",
    "choose_kernel",
    "merge_attn_outputs",
    "chunk_ids",
    "MODES",
    "LAYOUTS",
    "ContextParallelError",
    "ContextParallelInputError",
]
