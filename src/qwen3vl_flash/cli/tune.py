"""``qwen3vl-flash tune``: measure the backends and tiled's tiles here; write the tuned profile ``auto`` uses.

    qwen3vl-flash tune --quick          # about a minute on two quiet CPU cores
    qwen3vl-flash tune --show           # every shape and length; prints the timings, writes a PNG
    QWEN3VL_FLASH_TUNED=0 ...           # run anything without the tuned profile

See docs/tuning.md and :mod:`qwen3vl_flash.hardware.tuning`.
"""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--quick", action="store_true",
                   help="the text shape, a quarter of the vision heads, two lengths, two tile candidates, "
                        "three rounds (under a minute on 2 quiet CPU cores)")
    p.add_argument("--show", action="store_true", help="print every timing and write a PNG plot beside the JSON")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    p.add_argument("--out", default=None,
                   help="the JSON's path (default: the user cache directory, where auto looks; "
                        "a file elsewhere is read only through QWEN3VL_FLASH_TUNED=<path>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args) -> int:
    from qwen3vl_flash.hardware import tuning

    tuned = tuning.tune(device=args.device, quick=args.quick, show=args.show, out=args.out,
                        progress=not args.no_progress)
    print(f"tuned profile: {tuned.source}  ({tuned.fingerprint.describe()}; {len(tuned.measurements)} "
          f"timings in {tuned.elapsed_s:.0f} s; timings on a busy machine are noisy)")
    for dtype, order in tuned.auto_order.items():
        per_mode = ", ".join(f"{mode} {' > '.join(o[dtype])}" for mode, o in tuned.mode_orders.items() if dtype in o)
        blocks = tuned.tiled_blocks.get(dtype)
        tiles = f"; tiled {blocks[0]}x{blocks[1]}" if blocks else ""
        print(f"  {dtype:9s} auto: {' > '.join(order)}  (by mode: {per_mode}){tiles}")
    status = tuning.tuned_status(tuning.detect_hardware(tuning._device(args.device)))
    if status.path != tuned.source or status.state != "in use":
        print(f"auto uses: {status.describe()}")
    return 0
