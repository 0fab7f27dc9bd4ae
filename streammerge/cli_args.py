"""The command line's parsers: flags, their checks and help texts (`cli.py` runs what they parse)."""

from __future__ import annotations

import argparse
import math

from .errors import one_line
from .layouts import LOADER_CHOICES

EPILOG = """examples:
  streammerge --base Qwen/Qwen3-1.7B --adapter ./my-lora --output ./merged
  streammerge --base ./base --adapter ./lora --output ./merged --dtype f16 --max-shard-size 2GB
  streammerge --base ./base --adapter ./lora --output ./merged --dry-run
  streammerge --base ./base --adapter ./lora-a --adapter ./lora-b --weights 0.7,0.3 --output ./merged
  streammerge --base ./DeepSeek-V3-FP8 --adapter ./lora --output ./merged-fp8 --dtype keep
  streammerge verify --base ./base --adapter ./lora --merged ./merged
  streammerge batch jobs.yaml [--ray [ADDRESS]] [--json]
"""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one `error: ...` line (exit 2) like every other failure."""

    def error(self, message: str):  # type: ignore[override,unused-ignore]
        self.exit(2, f"error: {one_line(message)}; see '{self.prog} --help'\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}: use a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid number {value}: use a positive integer")
    return value


def weights_list(text: str) -> list[float]:
    try:
        values = [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid weights {text!r}: use numbers separated by commas, e.g. "
                                         "0.7,0.3") from None
    if not all(math.isfinite(w) for w in values):
        raise argparse.ArgumentTypeError(f"invalid weights {text!r}: use finite numbers")
    return values


def check_weight_count(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.weights is not None and len(args.weights) != len(args.adapter):
        parser.error(f"argument --weights: {len(args.weights)} weight(s) for {len(args.adapter)} --adapter(s); "
                     "give one weight per adapter")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="streammerge",
        description="Merge a PEFT LoRA adapter into a safetensors model tensor by tensor, without loading the model.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base", required=True, help="local folder or Hugging Face repo id of the full-precision base")
    p.add_argument("--adapter", required=True, action="append",
                   help="local folder or repo id of a PEFT LoRA adapter; repeat it (with --weights) to merge a "
                        "weighted combination")
    p.add_argument("--weights", type=weights_list, default=None, metavar="W1,W2,...",
                   help="one weight per --adapter: merge W + sum(w_i * s_i * B_i A_i), as PEFT's "
                        "add_weighted_adapter(combination_type='cat') (default with several adapters: 1 each)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32", "auto", "keep"],
                   help="output dtype; auto keeps each tensor's base dtype; keep does too and keeps an FP8 base FP8 "
                        "(merged tensors re-quantized with fresh scales). A quantized base (FP8, compressed-tensors "
                        "FP8, MXFP4, bitsandbytes) is otherwise written dequantized (default: bf16)")
    p.add_argument("--loader", default="auto", choices=LOADER_CHOICES,
                   help="how adapter module names map onto checkpoint names (default: auto-detect)")
    p.add_argument("--hf-token", default=None, help="Hugging Face token (default: $HF_TOKEN); never printed")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB (default: 5GB)")
    p.add_argument("--max-memory", default=None, help="bound the working memory of the merge, e.g. 256MB")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output")
    p.add_argument("--dry-run", action="store_true", help="plan and validate, print the plan, write nothing")
    p.add_argument("--clamp-f16", action="store_true", help="with --dtype f16, clamp values beyond +-65504")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="compute threads (default: the cores this process may use); the output is the same for any N")
    p.add_argument("--resume", action="store_true",
                   help="go on with the merge a killed run (kill -9, OOM, crash; or an interrupted --resume run) "
                        "left unfinished for this --output: its finished shards are checked and reused")
    p.add_argument("--verify", action="store_true",
                   help="after merging, check sampled rows of every tensor against an independent float64 "
                        "reference, as 'streammerge verify' does (exit 9 on a difference)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with the result (or the error) on stdout, everything else on stderr")
    return p


VERIFY_DESCRIPTION = """\
Check a merged model against base + adapter, tensor by tensor, without using the merge's own code.

Every tensor of the output is checked on sampled row blocks (its first and last block and ~N random ones;
every row with --all-rows) against the variant's formula (LoRA, Conv1D/embedding, MoE experts, DoRA,
lora_bias, trainable tokens, replacements, LoHa, LoKr, IA3, VeRA) evaluated in float64 from the base and
adapter files, read with the safetensors library. Copied, cast and replaced values must equal the source
rounded once, bit for bit. Merged values must equal the float64 value rounded once to the output dtype, or
differ from it only as far as float32 arithmetic can explain (a bound from the size of the terms); anything
beyond is reported in ulps. Also checked: no tensor missing or extra, shapes and dtypes, config.json exactly
as the merge writes it, every side file present, every header readable.

Not re-derived: the plan (which adapter tensor belongs to which output tensor, the scale alpha/r, the
orientation); the oracle tests against PEFT cover it.
"""


def build_verify_parser() -> argparse.ArgumentParser:
    from .verify import DEFAULT_SAMPLE_BLOCKS

    p = Parser(
        prog="streammerge verify",
        description=VERIFY_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base", required=True, help="local folder or repo id of the base")
    p.add_argument("--adapter", required=True, action="append",
                   help="local folder or repo id of the adapter; repeated (with --weights) for a combination")
    p.add_argument("--weights", type=weights_list, default=None, metavar="W1,W2,...",
                   help="the weights the combination was merged with")
    p.add_argument("--merged", required=True, help="the merged model folder to check")
    p.add_argument("--loader", default="auto", choices=LOADER_CHOICES)
    p.add_argument("--dtype", default=None, choices=["bf16", "f16", "f32", "auto", "keep"],
                   help="the --dtype the merge was run with (default: any the merged tensors are consistent with; "
                        "keep when the output of a quantized base still has its quantization_config)")
    p.add_argument("--hf-token", default=None, help="Hugging Face token (default: $HF_TOKEN); never printed")
    rows = p.add_mutually_exclusive_group()
    rows.add_argument("--sample", type=positive_int, default=DEFAULT_SAMPLE_BLOCKS, metavar="N",
                      help=f"check ~N random row blocks per tensor besides its first and last (default: "
                           f"{DEFAULT_SAMPLE_BLOCKS})")
    rows.add_argument("--all-rows", action="store_true", help="check every row of every tensor")
    p.add_argument("--max-memory", default=None,
                   help="bound the working memory of the check, e.g. 256MB")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with the result (or the error) on stdout, everything else on stderr")
    return p


def check_sizes(parser: argparse.ArgumentParser, flags: dict[str, str | None]) -> None:
    """Size flags ("5GB", "256MB") are user input: a bad one is a usage error (exit 2), not a failed merge."""
    from .options import parse_size

    for flag, value in flags.items():
        if value is not None:
            try:
                parse_size(value)
            except ValueError as e:
                parser.error(f"argument {flag}: {e}")
