"""``qwen3vl-flash``: info, bench, demo.

    qwen3vl-flash info                 # hardware, profile, backend auto picks, versions
    qwen3vl-flash bench                # time our backends against SDPA and eager, CSV + PNG
    qwen3vl-flash tune [--quick]       # measure here; auto then uses the tuned profile
    qwen3vl-flash demo                 # a tiny Qwen3-VL end to end, ours vs sdpa (no downloads)
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _cmd_info(args) -> int:
    import platform

    import torch

    import qwen3vl_flash as qf
    from qwen3vl_flash._optional import available
    from qwen3vl_flash.backends.base import AttnRequest, get_backend
    from qwen3vl_flash.interface import choose_backend

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    hw = qf.detect_hardware(device)
    prof = qf.select_profile(hw, name=args.profile)
    print(f"qwen3vl-flash {qf.__version__}")
    print(f"device    : {device}  --  {hw.summary()}")
    print(f"profile   : {prof.name}  (tile {prof.tile_size}; tiled blocks {prof.block_m}x{prof.block_n}) {prof.description}")
    from qwen3vl_flash.hardware.tuning import tuned_status

    print(f"tuned     : {tuned_status(hw).describe()}")
    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for mod in ("triton", "transformers"):
        if available(mod):
            versions.append(f"{mod} {__import__(mod).__version__}")
        else:
            versions.append(f"{mod} not installed")
    print(f"versions  : {', '.join(versions)}")
    cap = hw.compute_capability if device.type == "cuda" else None
    print("backends  :")
    for dtype in (torch.bfloat16, torch.float32):
        for name, need_lse, need_grad in (("inference", False, False), ("with lse (training, CP)", True, True)):
            req = AttnRequest(
                device_type=device.type, dtype=dtype, head_dim=128, num_heads=32, num_kv_heads=8,
                seqlen_q=4096, seqlen_k=4096, causal=True, need_lse=need_lse, need_grad=need_grad,
                device_capability=cap,
            )
            chain = [b.name for b in choose_backend(req, "auto", prof)]
            print(f"  auto, text-8B causal S=4096 {str(dtype)[6:]:8s} {name:23s} -> {' > '.join(chain)}")
    for b in qf.available_backends():
        req = AttnRequest(device_type=device.type, dtype=torch.bfloat16, head_dim=128, num_heads=32,
                          num_kv_heads=8, seqlen_q=4096, seqlen_k=4096, causal=True, device_capability=cap)
        reason = get_backend(b).check(req)
        print(f"  {b:7s}: {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen3vl-flash", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p_info = sub.add_parser("info", help="hardware, tile profile, the backend auto picks, versions")
    p_info.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    p_info.add_argument("--profile", default=None, help="show this named profile instead of the detected one")
    p_info.set_defaults(func=_cmd_info)

    from . import bench

    p_bench = sub.add_parser("bench", help="time backends vs SDPA/eager over sequence lengths; CSV + PNG")
    bench.add_arguments(p_bench)
    p_bench.set_defaults(func=bench.main)

    from . import tune

    p_tune = sub.add_parser("tune", help="measure backends and tiled's tiles here; write the tuned profile auto uses")
    tune.add_arguments(p_tune)
    p_tune.set_defaults(func=tune.main)

    p_demo = sub.add_parser("demo", help="tiny Qwen3-VL end to end with our attention vs sdpa (no downloads)")
    try:
        from . import demo
    except ImportError as exc:  # pragma: no cover - only while the demo module is absent
        p_demo.set_defaults(func=lambda a, e=exc: _fail(e))
    else:
        demo.add_arguments(p_demo)
        p_demo.set_defaults(func=demo.main)
    return parser


def _fail(exc) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ImportError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
