"""The `mmc` command line: one subcommand per pipeline step; errors in the input end in one line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from mmc import MMCError, __version__

EPILOG_LOSSES = """example:
  mmc losses --model data/zoo/gpt2-m --data data/corpus --out data/losses/gpt2-m.zarr
  mmc losses --model EleutherAI/pythia-70m --revision step143000 --data data/corpus \\
             --out data/losses/pythia-70m.zarr --dtype bfloat16 --batch-tokens 65536
"""


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("", "none", "null") else int(text)


def _optional_str(text: str) -> str | None:
    return None if text.lower() in ("", "none", "null") else text


def _run_losses(args: argparse.Namespace) -> None:
    from mmc.losses import compute_losses
    from mmc.store import write_store

    dataset = compute_losses(
        args.model, args.data, split=args.split, family=args.family or "", revision=args.revision,
        max_length=args.max_length, stride=args.stride, batch_tokens=args.batch_tokens, device=args.device,
        dtype=args.dtype, device_map=args.device_map, allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code, limit=args.limit,
    )
    write_store(dataset, args.out)
    print(f"wrote {args.out}: {dataset.sizes['sample']} samples, {int(dataset.n_tokens.sum())} tokens, "
          f"{float(dataset.nll.sum()):.1f} nats")


def _add_losses(subparsers) -> None:
    parser = subparsers.add_parser(
        "losses", help="score an evaluation set with one causal LM into a Zarr loss store",
        description="Per-sample total NLL (nats) of every text, lm-eval rolling windows for long ones.",
        epilog=EPILOG_LOSSES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face hub id or local model directory")
    parser.add_argument("--data", required=True, help="dataset saved with save_to_disk (columns sample_id, text)")
    parser.add_argument("--out", required=True, help="output Zarr store, written atomically")
    parser.add_argument("--split", default="eval", help="split to score when DATA is a DatasetDict (default: eval)")
    parser.add_argument("--family", default="", help="model family label recorded in the store")
    parser.add_argument("--revision", type=_optional_str, default=None, help="hub revision (branch, tag or commit)")
    parser.add_argument("--max-length", type=_optional_int, default=None,
                        help="window length in tokens (default: the model's context)")
    parser.add_argument("--stride", type=_optional_int, default=None,
                        help="tokens predicted per later window; default = max-length (lm-eval rolling)")
    parser.add_argument("--batch-tokens", type=int, default=16384, help="padded tokens per batch (default 16384)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    parser.add_argument("--device-map", type=_optional_str, default=None,
                        help="transformers device_map for models too big for one device, e.g. auto")
    parser.add_argument("--allow-pickle", action="store_true", help="accept pickle (*.bin) weights")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    parser.add_argument("--limit", type=_optional_int, default=None, help="score only the first N samples")
    parser.set_defaults(run=_run_losses)


COMMANDS: list[Callable] = [_add_losses]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmc", description="Scaling laws of multi-model collaboration and model merging.")
    parser.add_argument("--version", action="version", version=f"mmc {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--context", default="", help=argparse.SUPPRESS)  # e.g. losses@slug, for messages
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except MMCError as error:
        if args.debug:
            raise
        where = args.context or args.command
        print(f"mmc {where}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
