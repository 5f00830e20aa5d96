"""Testing fixtures shipped with the package (as FlagAttention's ``testing/``): used by our own tests,
the demo and the benchmarks, and by anyone who wants a Qwen3-VL without downloading weights.

* :mod:`.tiny`: tiny random Qwen3-VL models built from a config (``tiny_config``, ``real_config``,
  ``build_model``); needs transformers.
"""
