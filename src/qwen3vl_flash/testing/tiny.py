"""Tiny random Qwen3-VL models and inputs, fully offline (no hub, no tokenizer).

Used by the tests, the ``demo`` CLI and the end-to-end benchmark. Works on transformers 4.57.x
(``rope_scaling`` + ``rope_theta``) and 5.x (``rope_parameters``; ``mm_token_type_ids`` needed
from 5.4).

    cfg = tiny_config()                                   # 2 text layers, 4/2 heads, head_dim 8
    model = build_model(cfg, attn_implementation="sdpa")
    inputs = make_batch(cfg)                              # 3 left-padded prompts: images, a video, text

``real_config("8b", layers=2)`` gives the released models' dimensions (random weights) for GPU runs.

Prompt layout follows Qwen3-VL's processor: an image is ``<vision_start> <image>*n <vision_end>``
with n = t*h*w / merge^2; a video of grid (t, h, w) is t frames, each ``<timestamp> <vision_start>
<video>*(h*w/merge^2) <vision_end>`` (transformers splits video grids per frame for MRoPE).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .._optional import require

__all__ = [
    "transformers_version",
    "is_v5",
    "tiny_config",
    "real_config",
    "REAL_SIZES",
    "build_model",
    "Image",
    "Video",
    "make_batch",
    "make_prompt_inputs",
    "default_prompts",
]

# token ids of the tiny vocabulary (the real models' ids are used for real_config)
PAD, IMAGE, VIDEO, VISION_START, VISION_END = 2, 3, 4, 5, 6
FIRST_TEXT_TOKEN = 7

# released models' dimensions (config.json): text hidden/layers/heads/kv heads/intermediate,
# vision depth/hidden/heads/intermediate/out hidden, deepstack layers
REAL_SIZES: Dict[str, dict] = {
    "2b": dict(
        text=dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                  intermediate_size=6144, tie_word_embeddings=True),
        vision=dict(depth=24, hidden_size=1024, num_heads=16, intermediate_size=4096, out_hidden_size=2048,
                    deepstack_visual_indexes=[5, 11, 17]),
    ),
    "4b": dict(
        text=dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                  intermediate_size=9728, tie_word_embeddings=True),
        vision=dict(depth=24, hidden_size=1024, num_heads=16, intermediate_size=4096, out_hidden_size=2560,
                    deepstack_visual_indexes=[5, 11, 17]),
    ),
    "8b": dict(
        text=dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                  intermediate_size=12288, tie_word_embeddings=False),
        vision=dict(depth=27, hidden_size=1152, num_heads=16, intermediate_size=4304, out_hidden_size=4096,
                    deepstack_visual_indexes=[8, 16, 24]),
    ),
}
_REAL_TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                    vision_end_token_id=151653)


def transformers_version() -> Tuple[int, int]:
    tf = require("transformers", "the Qwen3-VL integration")
    major, minor = tf.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def is_v5() -> bool:
    return transformers_version() >= (5, 0)


def _rope(text: dict, mrope_section: Sequence[int], theta: float) -> dict:
    rope = {"rope_type": "default", "mrope_section": list(mrope_section), "mrope_interleaved": True}
    if is_v5():
        text["rope_parameters"] = dict(rope, rope_theta=theta)
    else:
        text["rope_theta"] = theta
        text["rope_scaling"] = rope
    return text


def tiny_config(
    *,
    layers: int = 2,
    hidden_size: int = 32,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 8,
    vocab_size: int = 99,
    vision_depth: int = 2,
    vision_hidden_size: int = 32,
    vision_heads: int = 4,
    patch_size: int = 16,
    max_position_embeddings: int = 512,
):
    """A Qwen3VLConfig small enough for CPU tests (a forward takes milliseconds)."""
    tf = require("transformers", "tiny Qwen3-VL models")
    half = head_dim // 2
    # interleaved MRoPE sections (t, h, w) summing to head_dim / 2, in the 24:20:20 proportion
    h = w = max(1, round(half * 20 / 64))
    mrope = [half - h - w, h, w]
    text = dict(
        hidden_size=hidden_size,
        intermediate_size=hidden_size + 5,
        num_hidden_layers=layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=PAD,
    )
    _rope(text, mrope, 1e4)
    vision = dict(
        depth=vision_depth,
        hidden_size=vision_hidden_size,
        intermediate_size=vision_hidden_size,
        num_heads=vision_heads,
        out_hidden_size=hidden_size,
        patch_size=patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=16,
        deepstack_visual_indexes=list(range(min(2, vision_depth))),
    )
    return tf.Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )


def real_config(name: str, layers: Optional[int] = None, vision_depth: Optional[int] = None):
    """The released Qwen3-VL-{2B,4B,8B} dimensions; ``layers``/``vision_depth`` cut the depth.

    Deepstack layers that fall beyond a cut vision depth are dropped."""
    tf = require("transformers", "real-size Qwen3-VL models")
    key = name.lower().removesuffix("-instruct")
    if key not in REAL_SIZES:
        raise ValueError(f"config must be one of {sorted(REAL_SIZES)}, got {name!r}")
    sizes = REAL_SIZES[key]
    text = dict(sizes["text"], head_dim=128, vocab_size=151936, max_position_embeddings=262144,
                rms_norm_eps=1e-6, pad_token_id=151643)
    tie = text.pop("tie_word_embeddings")
    if layers is not None:
        text["num_hidden_layers"] = int(layers)
    _rope(text, [24, 20, 20], 5e6)
    vision = dict(sizes["vision"], patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  num_position_embeddings=2304)
    if vision_depth is not None:
        vision["depth"] = int(vision_depth)
        vision["deepstack_visual_indexes"] = [i for i in vision["deepstack_visual_indexes"] if i < vision_depth]
    return tf.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **_REAL_TOKENS)


def build_model(config=None, attn_implementation: Optional[str] = "sdpa", dtype=torch.float32,
                seed: int = 0, device="cpu"):
    """``Qwen3VLForConditionalGeneration`` with seeded random weights, in eval mode.

    ``attn_implementation`` may be ours (``qwen3vl_flash.ATTN_IMPLEMENTATION``): it is registered
    first. The same ``seed`` gives the same weights whatever the attention implementation."""
    tf = require("transformers", "tiny Qwen3-VL models")
    if config is None:
        config = tiny_config()
    from .. import ATTN_IMPLEMENTATION

    if attn_implementation == ATTN_IMPLEMENTATION:
        from ..integrations.transformers import register

        register()
    torch.manual_seed(seed)
    # models built from one config object would share it (and its _attn_implementation)
    config = copy.deepcopy(config)
    # built and drawn on the device itself (an 8B model drawn on the host took minutes); on an
    # accelerator the weights come from its generator, so they differ from a CPU build's
    with torch.device(device):
        model = tf.Qwen3VLForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    _spread_weights(model, seed)
    return model.to(dtype=dtype).eval()


@torch.no_grad()
def _spread_weights(model, seed: int) -> None:
    """Re-draw weights with unit-variance activations (std 1/sqrt(fan_in)).

    transformers' init (std 0.02) leaves attention nearly uniform in a tiny model, so a wrong mask
    or cache slot would barely move the logits; with these weights attention is peaked and such
    mistakes show up far above float32 noise."""
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(seed + 1)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=gen, device=dev)
        if p.dim() >= 2:
            fan_in = p[0].numel() if "embed" not in name else 1
            p.copy_(r / fan_in ** 0.5)
        elif name.endswith("norm.weight") or "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * r)
        else:
            p.copy_(0.1 * r)


# --------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """An image of h x w patches (h, w even: the 2x2 merge)."""

    h: int = 4
    w: int = 4


@dataclass(frozen=True)
class Video:
    """A video of ``t`` temporal patches (2 frames each) of h x w patches."""

    t: int = 2
    h: int = 4
    w: int = 4


Segment = Union[int, Image, Video]  # an int is that many random text tokens


def default_prompts() -> List[List[Segment]]:
    """Three prompts of different lengths: image + text, video + image + text, text only."""
    return [
        [5, Image(4, 4), 7],
        [3, Video(2, 4, 4), 4, Image(4, 6), 6],
        [9],
    ]


def _ids(config) -> dict:
    return dict(
        image=config.image_token_id,
        video=config.video_token_id,
        start=config.vision_start_token_id,
        end=config.vision_end_token_id,
        pad=getattr(config.text_config, "pad_token_id", None) or 0,
        vocab=config.text_config.vocab_size,
    )


def _text_tokens(n: int, vocab: int, special: set, gen: torch.Generator) -> List[int]:
    out: List[int] = []
    while len(out) < n:
        t = int(torch.randint(FIRST_TEXT_TOKEN, min(vocab, 150000), (1,), generator=gen))
        if t not in special:
            out.append(t)
    return out


def make_prompt_inputs(
    config,
    prompts: Optional[Sequence[Sequence[Segment]]] = None,
    seed: int = 0,
    device="cpu",
    dtype=torch.float32,
) -> Dict[str, torch.Tensor]:
    """Model inputs (``input_ids``, ``attention_mask``, pixel values, grids, ``mm_token_type_ids``
    on 5.x) for a batch of prompts, left-padded as ``generate`` expects."""
    if prompts is None:
        prompts = default_prompts()
    gen = torch.Generator().manual_seed(seed)
    ids = _ids(config)
    special = {ids["image"], ids["video"], ids["start"], ids["end"], ids["pad"]}
    vc = config.vision_config
    merge = vc.spatial_merge_size
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    rows: List[List[int]] = []
    types: List[List[int]] = []
    image_grids, video_grids, image_pixels, video_pixels = [], [], [], []
    for prompt in prompts:
        row: List[int] = []
        typ: List[int] = []
        for seg in prompt:
            if isinstance(seg, int):
                row += _text_tokens(seg, ids["vocab"], special, gen)
                typ += [0] * seg
            elif isinstance(seg, Image):
                n = seg.h * seg.w // merge ** 2
                row += [ids["start"]] + [ids["image"]] * n + [ids["end"]]
                typ += [0] + [1] * n + [0]
                image_grids.append([1, seg.h, seg.w])
                image_pixels.append(torch.randn(seg.h * seg.w, patch_dim, generator=gen))
            elif isinstance(seg, Video):
                n = seg.h * seg.w // merge ** 2
                for _ in range(seg.t):  # one timestamp token + one vision block per frame
                    row += _text_tokens(1, ids["vocab"], special, gen)
                    row += [ids["start"]] + [ids["video"]] * n + [ids["end"]]
                    typ += [0, 0] + [2] * n + [0]
                video_grids.append([seg.t, seg.h, seg.w])
                video_pixels.append(torch.randn(seg.t * seg.h * seg.w, patch_dim, generator=gen))
            else:
                raise TypeError(f"prompt segments must be int, Image or Video, got {type(seg).__name__}")
        rows.append(row)
        types.append(typ)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), ids["pad"], dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    mm_types = torch.zeros((len(rows), width), dtype=torch.int32)
    for b, (row, typ) in enumerate(zip(rows, types)):
        input_ids[b, width - len(row):] = torch.tensor(row)
        attention_mask[b, width - len(row):] = 1
        mm_types[b, width - len(row):] = torch.tensor(typ, dtype=torch.int32)
    out: Dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if image_grids:
        out["pixel_values"] = torch.cat(image_pixels).to(dtype)
        out["image_grid_thw"] = torch.tensor(image_grids)
    if video_grids:
        out["pixel_values_videos"] = torch.cat(video_pixels).to(dtype)
        out["video_grid_thw"] = torch.tensor(video_grids)
    if is_v5():
        out["mm_token_type_ids"] = mm_types
    return {k: v.to(device) for k, v in out.items()}


def make_batch(config, seed: int = 0, device="cpu", dtype=torch.float32) -> Dict[str, torch.Tensor]:
    """The default padded batch of 3 prompts (images, a video, text only)."""
    return make_prompt_inputs(config, default_prompts(), seed=seed, device=device, dtype=dtype)
