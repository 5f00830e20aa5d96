"""Fine-tune Qwen3-VL on packed image + text samples with qwen3vl-flash (full or LoRA).

    python examples/finetune_qwen3vl.py                   # tiny random Qwen3-VL on the CPU, seconds
    python examples/finetune_qwen3vl.py --lora            # LoRA adapters (pip install peft)
    python examples/finetune_qwen3vl.py --trl             # TRL's SFTTrainer (pip install trl)
    python examples/finetune_qwen3vl.py --attn sdpa       # the same run with transformers' sdpa
    python examples/finetune_qwen3vl.py --config 8b --layers 4 --device cuda --dtype bfloat16 \\
        --batch-size 16 --max-tokens 16384                # Qwen3-VL-8B dimensions, 4 text + 4 vision layers

What it shows, in the order a user meets it:

1. ``qf.enable(model)`` switches the text decoder and the vision tower to our attention.
2. ``qf.PackingCollator(model.config, max_tokens=...)`` is the ``data_collator``: each step's samples
   (processor outputs: ``input_ids``, ``labels``, ``pixel_values`` / ``image_grid_thw``, ...) are packed
   without padding into rows of at most ``max_tokens`` tokens, with per-sample MRoPE position ids and
   ``cu_seq_lens``: every attention call of the step is one varlen call, each sample attending only to
   itself, and the loss is the token-weighted mean of the samples' own losses.
3. transformers' ``Trainer`` (or TRL's ``SFTTrainer``) trains as usual; keep
   ``remove_unused_columns=False`` so the pixel values reach the collator.

The data is synthetic (no downloads): random token ids and random "images" (pixel patches of a few
sizes with their grids, laid out as Qwen3-VL's processor lays them out). ``--distinct`` samples are
drawn and cycled, so the model can memorise them and the loss visibly falls. The model has random
weights: ``--config tiny`` (default) is a Qwen3-VL small enough for a CPU; ``--config 2b|4b|8b`` has the
released models' dimensions with ``--layers`` text layers and ``--vision-layers`` vision layers.
Replace ``build_model`` with ``Qwen3VLForConditionalGeneration.from_pretrained(...)`` and the dataset
with your processor's outputs to train a real model; the rest stays as it is.

Notes: ours keeps the model's ``use_cache`` (True in Qwen3-VL's config): transformers then builds no
(T x T) mask and the collator's ``cu_seq_lens`` drive one varlen call per layer. ``--attn sdpa`` sets
``use_cache=False``, the only way transformers builds the block-diagonal mask without which sdpa's
packed samples attend to each other. TRL's SFTTrainer always passes ``use_cache=False``: ours is exact
there too (the block mask is read as the same segments) but pays for building and reading that mask.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import tempfile
import time
from typing import Dict, List, Optional

import torch

import qwen3vl_flash as qf
from qwen3vl_flash._optional import require
from qwen3vl_flash.testing import tiny

CONFIGS = ("tiny", *sorted(tiny.REAL_SIZES))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# image sizes in patches (h, w); every 2 x 2 patches merge into one token, so an image of h x w
# patches is h * w / 4 tokens between <vision_start> and <vision_end> (16 px patches: 16 x 16 patches
# is a 256 x 256 image)
IMAGE_SIZES = {
    "tiny": [(4, 4), (4, 6), (6, 8), (8, 8)],  # 4-16 tokens
    "real": [(16, 16), (24, 32), (32, 32), (48, 64)],  # 64-768 tokens
}
DEFAULT_LENGTHS = {"tiny": (16, 64), "real": (256, 4096)}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # text decoder


# ------------------------------------------------------------------------------------------------
# data: processor-like samples
# ------------------------------------------------------------------------------------------------


def make_sample(config, length: int, image: Optional[tuple], seed: int) -> Dict[str, torch.Tensor]:
    """One sample as Qwen3-VL's processor returns it, ``length`` tokens long: a prompt (text, then
    the image if any) and an answer (text). ``labels`` are -100 over the prompt, so only the answer
    is learned, as in supervised fine-tuning.

    Returns ``input_ids`` (L,), ``labels`` (L,), and with an image ``pixel_values`` (h*w, 3*2*16*16)
    and ``image_grid_thw`` (1, 3); ``mm_token_type_ids`` (L,) on transformers 5.x."""
    if image is not None:
        n_image = image[0] * image[1] // 4 + 2  # the image's tokens plus <vision_start> / <vision_end>
        text = length - n_image
        question = max(1, text // 4)
        layout = [question, tiny.Image(*image), text - question]
        prompt = question + n_image
    else:
        layout = [length]
        prompt = max(1, length // 4)
    inputs = tiny.make_prompt_inputs(config, [layout], seed=seed)
    inputs.pop("attention_mask")  # one unpadded sample: nothing to mask
    sample = {k: (v[0] if k in ("input_ids", "mm_token_type_ids") else v) for k, v in inputs.items()}
    labels = sample["input_ids"].clone()
    labels[:prompt] = -100
    sample["labels"] = labels
    return sample


def make_samples(config, n: int, min_len: int, max_len: int, image_fraction: float, sizes, seed: int):
    """``n`` samples of lengths drawn uniformly from [min_len, max_len], about ``image_fraction``
    of them with an image of one of ``sizes`` (one that fits the sample)."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        fits = [s for s in sizes if s[0] * s[1] // 4 + 2 + 2 <= length]  # leave >= 2 text tokens
        image = None
        if fits and float(torch.rand((), generator=gen)) < image_fraction:
            image = fits[int(torch.randint(len(fits), (1,), generator=gen))]
        samples.append(make_sample(config, length, image, seed=seed * 100003 + i))
    return samples


class CycledSamples(torch.utils.data.Dataset):
    """``length`` items cycling over ``samples`` (what ``Trainer`` iterates)."""

    def __init__(self, samples: List[dict], length: int):
        self.samples, self.length = samples, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return self.samples[i % len(self.samples)]


class CountingCollator:
    """Wraps the collator and queues each batch's (real tokens, rows, row tokens, images, videos) in the
    order the batches are made; the model's forward pre-hook takes them off in the same order (a
    data loader may collate a batch ahead of the step that uses it)."""

    def __init__(self, collator):
        self.collator = collator
        self.pending = collections.deque()

    def __call__(self, features):
        batch = self.collator(features)
        real = sum(len(f["input_ids"]) for f in features)  # the samples carry no padding
        self.pending.append((real, batch["input_ids"].shape[0], batch["input_ids"].numel(), "pixel_values" in batch,
                             "pixel_values_videos" in batch))
        return batch


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------


def build_model(args):
    """A Qwen3-VL with random weights (``tiny`` or a released model's dimensions), on the device."""
    if args.config == "tiny":
        config = tiny.tiny_config(layers=args.layers, vision_depth=args.vision_layers)
    else:
        config = tiny.real_config(args.config, layers=args.layers, vision_depth=args.vision_layers)
    # built with sdpa, then switched: what a user does with a model from from_pretrained
    model = tiny.build_model(config, "sdpa", dtype=DTYPES[args.dtype], seed=args.seed, device=args.device)
    if args.attn == "ours":
        qf.enable(model)
    else:
        # transformers builds its block-diagonal mask for packed rows only without a cache;
        # with one, sdpa's packed samples would attend to each other
        model.config.use_cache = False
        model.config.text_config.use_cache = False
    return model


def apply_lora(model, rank: int):
    """LoRA adapters on the text decoder's attention and MLP projections (the base frozen)."""
    peft = require("peft", "--lora (LoRA fine-tuning)")
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS,
                             task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


# ------------------------------------------------------------------------------------------------
# progress, throughput and loss
# ------------------------------------------------------------------------------------------------


def make_meter(transformers, device: torch.device, counter: CountingCollator, show_bar: bool):
    class Meter(transformers.TrainerCallback):
        """Per-step wall time (synchronised on CUDA), tokens, loss; a progress bar showing them."""

        def __init__(self):
            self.times: List[float] = []
            self.tokens: List[int] = []  # real tokens of each step (no pad segments)
            self.rows: List[int] = []  # packed rows of each step
            self.row_tokens: List[int] = []  # their tokens, pad segments included
            self.vision: List[tuple] = []  # (images?, videos?) of each forward
            self.step_losses: List[torch.Tensor] = []  # the model's own loss of each step, exact
            self.logged: Dict[int, float] = {}  # what Trainer logged (rounded; TRL computes its own loss)
            self.bar = None

        def pre_hook(self, module, args, kwargs):
            if not module.training or not counter.pending:
                return
            real, rows, row, images, videos = counter.pending.popleft()
            self.tokens.append(real)
            self.rows.append(rows)
            self.row_tokens.append(row)
            self.vision.append((images, videos))

        def post_hook(self, module, args, kwargs, output):
            loss = getattr(output, "loss", None)
            if module.training and loss is not None:
                self.step_losses.append(loss.detach().float())  # no host sync here

        def losses(self) -> List[float]:
            if len(self.step_losses) == len(self.times):
                return [float(x) for x in self.step_losses]
            return [self.logged[s] for s in sorted(self.logged)]

        def on_train_begin(self, args, state, control, **kw):
            if show_bar:
                self.bar = require("tqdm", "the progress bar").tqdm(total=state.max_steps, desc="training",
                                                                    unit="step", dynamic_ncols=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.times.append(time.perf_counter())
            if self.bar is not None:
                self.bar.update(1)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.logged[state.global_step] = float(logs["loss"])
                if self.bar is not None:
                    self.bar.set_postfix(loss=f"{float(logs['loss']):.4f}", tok_s=f"{self.tokens_per_s():.0f}")

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()

        def tokens_per_s(self) -> float:
            """Real tokens per second over the steps after the first (warm-up: allocator, kernels
            compiled or autotuned); the first step alone when there is only one."""
            n = len(self.times)
            if n == 0:
                return float("nan")
            if n == 1:
                return self.tokens[0] / max(self.times[0] - self.t0, 1e-9)
            return sum(self.tokens[1:n]) / max(self.times[-1] - self.times[0], 1e-9)

    return Meter()


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------


def _training_arguments(cls, args, out_dir: str, **more):
    return cls(
        output_dir=out_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch_fused" if args.device.type == "cuda" else "adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=args.device.type == "cpu",
        bf16=args.dtype == "bfloat16",
        remove_unused_columns=False,  # the collator needs pixel_values / image_grid_thw
        label_names=["labels"],  # a PeftModel's forward hides the name from Trainer
        dataloader_num_workers=0,
        dataloader_pin_memory=args.device.type == "cuda",
        disable_tqdm=True,  # our bar shows loss and tokens/s
        seed=args.seed,
        data_seed=args.seed,
        **more,
    )


def _trl_trainer(args, model, dataset, collator, callbacks, out_dir):
    """TRL's SFTTrainer on the same samples and collator (its dataset must be a datasets.Dataset;
    a processing class is required, so a minimal tokenizer stands in for the processor)."""
    trl = require("trl", "--trl (TRL's SFTTrainer)")
    datasets = require("datasets", "--trl (TRL's SFTTrainer)")
    transformers = require("transformers", "this example")
    tokenizers = require("tokenizers", "--trl (a stand-in tokenizer)")
    keys = sorted({k for s in dataset.samples for k in s})  # from_list takes its columns from the first row
    rows = [{k: (s[k].tolist() if k in s else None) for k in keys} for s in dataset.samples]
    hf_dataset = datasets.Dataset.from_list([rows[i % len(rows)] for i in range(len(dataset))]).with_format("torch")
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config.text_config
    pad = int(getattr(text, "pad_token_id", None) or 0)
    vocab = {f"<t{i}>": i for i in range(text.vocab_size)}
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<t0>")),
        pad_token=f"<t{pad}>", eos_token=f"<t{pad}>")
    # SFTConfig turns activation checkpointing on by default; off here, as in the Trainer run
    fields = {f.name for f in dataclasses.fields(trl.SFTConfig)}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    sft_args = _training_arguments(trl.SFTConfig, args, out_dir, dataset_kwargs={"skip_prepare_dataset": True},
                                   **{ckpt: False})
    return trl.SFTTrainer(model=model, args=sft_args, train_dataset=hf_dataset, data_collator=collator,
                          processing_class=tok, callbacks=callbacks)


def train(args) -> dict:
    """Build the model and data, train ``args.steps`` steps; returns what was measured."""
    transformers = require("transformers", "this example")
    require("accelerate", "transformers' Trainer")
    transformers.set_seed(args.seed)
    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    if args.lora:
        model = apply_lora(model, args.lora_rank)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    kind = "tiny" if args.config == "tiny" else "real"
    config = model.config
    samples = make_samples(config, args.distinct, args.min_len, args.max_len, args.image_fraction,
                           IMAGE_SIZES[kind], args.seed)
    dataset = CycledSamples(samples, args.steps * args.batch_size)
    collator = CountingCollator(qf.PackingCollator(config, max_tokens=args.max_tokens,
                                                   pad_to_multiple_of=args.pad_to_multiple_of))
    meter = make_meter(transformers, args.device, collator, show_bar=not args.no_progress)
    hooks = [model.register_forward_pre_hook(meter.pre_hook, with_kwargs=True),
             model.register_forward_hook(meter.post_hook, with_kwargs=True)]

    with tempfile.TemporaryDirectory() as out_dir:
        if args.trl:
            trainer = _trl_trainer(args, model, dataset, collator, [meter], out_dir)
        else:
            targs = _training_arguments(transformers.TrainingArguments, args, out_dir)
            trainer = transformers.Trainer(model=model, args=targs, train_dataset=dataset, data_collator=collator,
                                           callbacks=[meter])
        # with Trainer's own bar off it prints every log dict; our bar shows the loss instead
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
        if args.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(args.device)
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    losses = meter.losses()
    peak = torch.cuda.max_memory_allocated(args.device) / 2**20 if args.device.type == "cuda" else float("nan")
    return dict(
        losses=losses, tokens_per_s=meter.tokens_per_s(), wall_s=wall, steps=len(meter.times),
        tokens=sum(meter.tokens), row_tokens=sum(meter.row_tokens), forwards=len(meter.tokens), rows=sum(meter.rows),
        image_forwards=sum(i for i, _ in meter.vision), video_forwards=sum(v for _, v in meter.vision),
        params=n_params, trainable=trainable, peak_mb=peak,
        text_layers=config.text_config.num_hidden_layers, vision_layers=config.vision_config.depth,
    )


# ------------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", choices=CONFIGS, help="model dimensions (random weights)")
    p.add_argument("--layers", type=int, default=2, help="text decoder layers (default 2)")
    p.add_argument("--vision-layers", type=int, default=None, help="vision tower layers (default: --layers)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--attn", default="ours", choices=["ours", "sdpa"],
                   help="ours: qf.enable(model); sdpa: transformers' sdpa on the same packed rows")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8, help="samples per step (packed into rows)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="token budget of a packed row (default: all samples of a step in one row)")
    p.add_argument("--pad-to-multiple-of", type=int, default=None, help="pad rows for static shapes")
    p.add_argument("--min-len", type=int, default=None, help="shortest sample in tokens (tiny 16, else 256)")
    p.add_argument("--max-len", type=int, default=None, help="longest sample in tokens (tiny 64, else 4096)")
    p.add_argument("--image-fraction", type=float, default=0.5, help="share of the samples with an image")
    p.add_argument("--distinct", type=int, default=16, help="distinct samples, cycled (a learnable target)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 2e-3, LoRA 5e-3)")
    p.add_argument("--lora", action="store_true", help="LoRA adapters on the text decoder (needs peft)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--trl", action="store_true", help="TRL's SFTTrainer instead of Trainer (needs trl)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        _validate(args)
    except ValueError as exc:
        p.error(str(exc))
    return args


def _positive(args, name: str, allow_none: bool = False):
    value = getattr(args, name.replace("-", "_"))
    if value is None and allow_none:
        return
    if value is None or value < 1:
        raise ValueError(f"--{name} must be a positive integer, got {value}")


def _validate(args) -> None:
    kind = "tiny" if args.config == "tiny" else "real"
    if args.vision_layers is None:
        args.vision_layers = args.layers
    lo, hi = DEFAULT_LENGTHS[kind]
    args.min_len = lo if args.min_len is None else args.min_len
    args.max_len = max(hi, args.min_len) if args.max_len is None else args.max_len
    if args.lr is None:
        args.lr = 5e-3 if args.lora else 2e-3
    for name in ("layers", "vision-layers", "steps", "batch-size", "distinct", "lora-rank"):
        _positive(args, name)
    for name in ("max-tokens", "pad-to-multiple-of"):
        _positive(args, name, allow_none=True)
    if args.min_len < 4:
        raise ValueError(f"--min-len must be at least 4 tokens, got {args.min_len}")
    if args.max_len < args.min_len:
        raise ValueError(f"--max-len ({args.max_len}) must be at least --min-len ({args.min_len})")
    limit = 512 if kind == "tiny" else 262144  # max_position_embeddings of the config
    if args.max_len > limit:
        raise ValueError(f"--max-len must be at most {limit} for --config {args.config}, got {args.max_len}")
    if args.max_tokens is not None and args.max_tokens < args.max_len:
        raise ValueError(f"--max-tokens ({args.max_tokens}) must be at least --max-len ({args.max_len}): "
                         "every sample must fit in one packed row")
    if not 0.0 <= args.image_fraction <= 1.0:
        raise ValueError(f"--image-fraction must be in [0, 1], got {args.image_fraction}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}") from exc
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA device is available here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        # Trainer puts the model on its own device (the current one): make that the one asked for
        torch.cuda.set_device(device)
    args.device = device


def main(argv=None) -> dict:
    """Parse ``argv``, train, print a summary; returns :func:`train`'s measurements."""
    args = parse_args(argv)
    mode = f"LoRA r={args.lora_rank}" if args.lora else "full fine-tuning"
    print(f"Qwen3-VL {args.config} ({args.layers} text / {args.vision_layers} vision layers, {args.dtype}) on "
          f"{args.device}, attention {'qwen3vl_flash' if args.attn == 'ours' else 'sdpa'}, {mode}, "
          f"{'TRL SFTTrainer' if args.trl else 'transformers Trainer'}", flush=True)
    r = train(args)
    losses = r["losses"]
    pad = r["row_tokens"] - r["tokens"]
    print(f"parameters {r['params'] / 1e6:.2f} M, trainable {r['trainable'] / 1e6:.2f} M")
    print(f"{r['steps']} steps of {args.batch_size} samples packed into {r['rows']} rows "
          f"({r['image_forwards']} steps with images): {r['tokens']} tokens + {pad} pad, {r['wall_s']:.1f} s")
    if losses:
        print(f"loss {losses[0]:.4f} (step 1) -> {losses[-1]:.4f} (step {len(losses)})")
    note = " (the first step excluded as warm-up)" if r["steps"] > 1 else ""
    peak = "" if math.isnan(r["peak_mb"]) else f", peak memory {r['peak_mb']:.0f} MiB"
    print(f"throughput {r['tokens_per_s']:.0f} tokens/s{note}{peak}", flush=True)
    return r


if __name__ == "__main__":
    main()
