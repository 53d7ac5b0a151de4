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


def _add_losses(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "losses", parents=[common], help="score an evaluation set with one causal LM into a Zarr loss store",
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


EPILOG_CORPUS = """examples:
  mmc corpus --out data/corpus                      # Python's standard library: no network needed
  mmc corpus --source files --path 'texts/**/*.jsonl' --domain-field topic --out data/corpus
  mmc corpus --source hf --hf-name allenai/c4 --hf-config en --hf-split 'validation[:20000]' \\
             --max-eval-docs-per-domain 2000 --out data/corpus
"""


def _comma_list(text: str) -> list[str] | None:
    if _optional_str(text) is None:
        return None
    return [item.strip() for item in text.split(",") if item.strip()] or None


def _run_corpus(args: argparse.Namespace) -> None:
    from mmc.corpus import make_corpus

    metadata = make_corpus(
        args.out, args.source, path=args.path, hf_name=args.hf_name, hf_config=args.hf_config,
        hf_split=args.hf_split, text_field=args.text_field, domain_field=args.domain_field,
        max_chars=args.max_chars, eval_fraction=args.eval_fraction,
        max_train_docs_per_domain=args.max_train_docs_per_domain,
        max_eval_docs_per_domain=args.max_eval_docs_per_domain, domains=args.domains,
    )
    splits = ", ".join(f"{name} {counts['n_docs']} docs {counts['n_bytes'] / 1e6:.2f} MB"
                       for name, counts in metadata["splits"].items())
    print(f"wrote {args.out}: {splits}, {len(metadata['domains'])} domains, fingerprint {metadata['fingerprint']}")


def _add_corpus(subparsers, common: argparse.ArgumentParser) -> None:
    # defaults are spelled out (tests/test_corpus.py checks them against mmc.corpus): importing it here
    # would load datasets and pandas for every command, --help included
    parser = subparsers.add_parser(
        "corpus", parents=[common],
        help="build the train/eval text corpus (default: Python's standard library, offline)",
        description="Read documents from a source, cut them at line ends into chunks of at most --max-chars, drop "
                    "empty and duplicate texts, split train/eval by a hash of each text, cap each domain, and save "
                    "a datasets DatasetDict (sample_id, domain, text, n_bytes) plus corpus.json, atomically.",
        epilog=EPILOG_CORPUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="stdlib", choices=("stdlib", "hf", "files"),
                        help="stdlib (sources and docs of this Python), hf (datasets.load_dataset) or files "
                             "(local .txt/.jsonl/.json/.parquet); default stdlib")
    parser.add_argument("--out", default="data/corpus", help="output folder, replaced atomically (default data/corpus)")
    parser.add_argument("--path", type=_optional_str, default=None,
                        help="files: glob of input files, quoted; ** reaches into subfolders")
    parser.add_argument("--hf-name", type=_optional_str, default=None, help="hf: hub dataset id or local data folder")
    parser.add_argument("--hf-config", type=_optional_str, default=None, help="hf: dataset configuration name")
    parser.add_argument("--hf-split", default="train",
                        help="hf: split, slicing allowed, e.g. 'train[:10000]' (default train)")
    parser.add_argument("--text-field", default="text", help="hf/files: field holding the text (default text)")
    parser.add_argument("--domain-field", type=_optional_str, default=None,
                        help="hf/files: field holding the domain label (default: dataset name, or the file's folder)")
    parser.add_argument("--max-chars", type=int, default=2000,
                        help="longest document in characters; longer ones are cut at line ends (default 2000)")
    parser.add_argument("--eval-fraction", type=float, default=0.1,
                        help="share of documents hashed into eval (default 0.1)")
    parser.add_argument("--max-train-docs-per-domain", type=_optional_int, default=2000,
                        help="train documents kept per domain, or none for all (default 2000)")
    parser.add_argument("--max-eval-docs-per-domain", type=_optional_int, default=200,
                        help="eval documents kept per domain, or none for all (default 200)")
    parser.add_argument("--domains", type=_comma_list, default=None,
                        help="comma-separated domains to keep (default: all)")
    parser.set_defaults(run=_run_corpus)


EPILOG_ZOO = """example:
  mmc zoo train --corpus data/corpus/train --family llama --tokenizer metaspace_bpe --vocab-size 1024 \\
                --d-model 64 --n-layers 2 --n-heads 2 --context 128 --train-tokens 600000 --batch-size 16 \\
                --lr 0.006 --warmup-steps 20 --seed 0 --out data/zoo/llama-s --log plots/zoo/llama-s.csv
"""


def _run_zoo_train(args: argparse.Namespace) -> None:
    from mmc.zoo import train_zoo_member

    summary = train_zoo_member(
        args.corpus, args.out, args.log, domains=args.domains, family=args.family, tokenizer_kind=args.tokenizer,
        vocab_size=args.vocab_size, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
        context=args.context, train_tokens=args.train_tokens, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=args.warmup_steps, seed=args.seed, device=args.device,
    )
    print(f"wrote {args.out}: {args.family}, {summary['n_params']:,} parameters "
          f"({summary['n_params_nonembedding']:,} non-embedding), final train loss {summary['final_train_loss']:.4f}")


def _add_zoo(subparsers, common: argparse.ArgumentParser) -> None:
    # choices are spelled out (tests/test_zoo.py checks them against mmc.zoo): importing it here would load
    # torch and transformers for every command, --help included
    parser = subparsers.add_parser("zoo", help="the embedded model zoo: train small causal LMs from scratch",
                                   description="The embedded model zoo (see `mmc zoo train --help`).")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    train = actions.add_parser(
        "train", parents=[common], help="train one zoo member (its own tokenizer, then the model) on a train split",
        description="Train a tokenizer of the given kind on the train split, then a causal LM of the given family "
                    "and size from scratch on random windows of the tokenised split (AdamW, linear warm-up then "
                    "cosine decay to a tenth, seeded). Saves a Hugging Face model directory atomically.",
        epilog=EPILOG_ZOO, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--corpus", required=True, help="train split saved with save_to_disk (e.g. data/corpus/train)")
    train.add_argument("--out", required=True, help="output model directory, written atomically")
    train.add_argument("--log", type=_optional_str, default=None, help="CSV of the training curve (for dvc plots)")
    train.add_argument("--family", required=True, choices=("gpt2", "llama", "gpt_neox"), help="architecture family")
    train.add_argument("--tokenizer", required=True, choices=("byte_bpe", "byte_bpe_bos", "metaspace_bpe"),
                       help="tokenizer kind (all lossless): byte_bpe (GPT-2, EOS only), byte_bpe_bos "
                            "(Pythia-style BOS=EOS), metaspace_bpe (Llama-style, byte fallback, BOS <s>)")
    train.add_argument("--domains", type=_comma_list, default=None,
                       help="comma-separated domains of the split to train on (default: all)")
    train.add_argument("--vocab-size", type=int, required=True, help="tokenizer vocabulary size")
    train.add_argument("--d-model", type=int, required=True, help="hidden width (the MLP is 4x wider)")
    train.add_argument("--n-layers", type=int, required=True, help="number of transformer blocks")
    train.add_argument("--n-heads", type=int, required=True, help="attention heads (must divide --d-model)")
    train.add_argument("--context", type=int, default=128, help="context length in tokens (default 128)")
    train.add_argument("--train-tokens", type=int, required=True, help="training budget in tokens")
    train.add_argument("--batch-size", type=int, default=16, help="windows per step (default 16)")
    train.add_argument("--lr", type=float, required=True, help="peak learning rate")
    train.add_argument("--warmup-steps", type=int, default=20, help="linear warm-up steps (default 20)")
    train.add_argument("--seed", type=int, default=0, help="seed for initialisation and batch sampling (default 0)")
    train.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    train.set_defaults(run=_run_zoo_train)


EPILOG_EXPERTS = """example:
  mmc experts train --base data/zoo/gpt2-m --corpus data/corpus/train --domain tests --train-tokens 60000 \\
                    --lr 0.001 --out data/experts/gpt2-m/tests --log plots/experts/gpt2-m-tests.csv
"""


def _run_experts_train(args: argparse.Namespace) -> None:
    from mmc.zoo import train_expert

    summary = train_expert(
        args.base, args.corpus, args.domain, args.out, args.log, revision=args.revision, context=args.context,
        train_tokens=args.train_tokens, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
        seed=args.seed, device=args.device,
    )
    print(f"wrote {args.out}: {args.base} fine-tuned on {args.domain}, final train loss {summary['final_train_loss']:.4f}")


def _add_experts(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser("experts", help="domain experts: fine-tune a base model on one domain",
                                   description="Domain experts for model merging (see `mmc experts train --help`).")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    train = actions.add_parser(
        "train", parents=[common], help="fully fine-tune a base causal LM on one domain of a train split",
        description="Fine-tune every weight of BASE on the documents of one domain (random windows of the base's "
                    "context, AdamW without weight decay, warm-up then cosine decay, seeded) and save the expert "
                    "as a Hugging Face model directory with the base's tokenizer, atomically.",
        epilog=EPILOG_EXPERTS, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--base", required=True, help="base model: local directory or hub id")
    train.add_argument("--revision", type=_optional_str, default=None, help="hub revision of the base")
    train.add_argument("--corpus", required=True, help="train split saved with save_to_disk, with a domain column")
    train.add_argument("--domain", required=True, help="the domain to specialise in")
    train.add_argument("--out", required=True, help="output model directory, written atomically")
    train.add_argument("--log", type=_optional_str, default=None, help="CSV of the training curve (for dvc plots)")
    train.add_argument("--context", type=_optional_int, default=None, help="window length (default: the base's)")
    train.add_argument("--train-tokens", type=int, required=True, help="fine-tuning budget in tokens")
    train.add_argument("--batch-size", type=int, default=8, help="windows per step (default 8)")
    train.add_argument("--lr", type=float, required=True, help="peak learning rate")
    train.add_argument("--warmup-steps", type=int, default=10, help="linear warm-up steps (default 10)")
    train.add_argument("--seed", type=int, default=0, help="seed for batch sampling (default 0)")
    train.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    train.set_defaults(run=_run_experts_train)


COMMANDS: list[Callable] = [_add_losses, _add_corpus, _add_zoo, _add_experts]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    common.add_argument("--stage", default="", help="DVC stage name shown in error messages (e.g. losses@gpt2-s)")
    parser = argparse.ArgumentParser(
        prog="mmc", description="Scaling laws of multi-model collaboration and model merging.")
    parser.add_argument("--version", action="version", version=f"mmc {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers, common)
    return parser


def _quiet_libraries_off_terminal() -> None:
    """Library progress bars only on a terminal: DVC logs and CI output stay readable."""
    if not sys.stderr.isatty():
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries_off_terminal()
    try:
        args.run(args)
    except MMCError as error:
        if args.debug:
            raise
        where = args.stage or args.command
        print(f"mmc {where}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
