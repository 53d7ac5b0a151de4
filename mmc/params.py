"""The schema of params.yaml: every key, its type, range and allowed values, checked once, up front.

`read_params` is the one way params reach code: the `check_params` stage (which every other stage depends on, so
that a bad name stops `dvc repro` before DVC removes any stage's outputs), every stage script when it starts, and
`mmc preset` before it writes. Unknown keys are refused with the closest valid one; names that become paths (zoo
members, pool slugs, bases, domains) must be safe names. `params_reference` writes the schema as Markdown.

Pydantic models in strict mode: YAML's own types only (`1.5` is no integer, `"5"` no number, `true` no number).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from mmc import BATCH_TOKENS, CPU_BATCH_TOKENS, FAMILIES, TOKENIZER_KINDS, MMCError, check_name
from mmc.store import atomic_path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # a Hugging Face hub model id (owner/name or name)
ZOO_DIR = "data/zoo"  # where dvc.yaml's zoo stages write their members
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d+)?)$"
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")

Device = Annotated[str, Field(pattern=DEVICE_PATTERN, description="auto, cpu, cuda, cuda:N or mps")]
Dtype = Literal[DTYPES]
Count = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=0)]


def is_gguf(model: str | Path) -> bool:
    """Whether a model path names a GGUF file (scored dequantized)."""
    return str(model).lower().endswith(".gguf")


def _name_check(kind: str, dash: bool = True, dot: bool = True):
    """A validator of names that become paths and stage names (`check_name`); a domain holds no '-' either, as
    DVC names expert stages <base>-<domain> and the stage splits its name at the last '-'; a pool slug or zoo member
    holds no '.', as its stage reads the params key pool.<slug> (zoo.members.<member>) and DVC splits keys at dots."""
    def check(name: str) -> str:
        try:
            check_name(kind, name)
        except MMCError as error:
            raise ValueError(str(error)) from None
        if not dash and "-" in name:
            raise ValueError(f"{kind} {name!r} holds '-': DVC names expert stages <base>-<domain>; use '_'")
        if not dot and "." in name:
            raise ValueError(f"{kind} {name!r} holds '.': DVC reads it as a nested params key; use '_' or '-'")
        return name
    return AfterValidator(check)


MemberName = Annotated[str, _name_check("zoo member", dot=False)]
PoolSlug = Annotated[str, _name_check("pool slug", dot=False)]
BaseName = Annotated[str, _name_check("base")]
Domain = Annotated[str, _name_check("domain", dash=False)]
DomainList = Annotated[str | list[str] | None, Field(description="comma-separated string or list; null = all")]


class Section(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class Corpus(Section):
    """The evaluation and training text (`mmc corpus --help`); changing it reruns everything."""
    source: Literal["stdlib", "real", "hf", "files"] = Field(
        description="stdlib, real (real texts of seven domains, installed offline), hf (datasets.load_dataset) or files")
    path: str | None = Field(description="files: a glob, e.g. texts/**/*.jsonl")
    hf_name: str | None = Field(description="hf: dataset id, e.g. wikitext")
    hf_config: str | None = Field(description="hf: configuration")
    hf_split: str = Field(description="hf: split, slicing allowed, e.g. train[:20000]")
    text_field: str = Field(description="hf/files: the field holding the text")
    domain_field: str | None = Field(description="hf/files: the field holding the domain")
    dep: str = Field(description="a path the corpus stage depends on (files: their folder)")
    max_chars: Count = Field(description="longest document in characters; longer ones are cut at line ends")
    eval_fraction: float = Field(gt=0, lt=1, description="share of documents hashed into eval")
    max_train_docs_per_domain: Count | None = Field(description="train documents kept per domain (null: all)")
    max_eval_docs_per_domain: Count | None = Field(description="eval documents kept per domain (null: all)")
    domains: DomainList


class ZooShared(Section):
    context: Annotated[int, Field(ge=2)] = Field(description="tokens per training window (the models' context)")
    train_tokens: Count = Field(description="training budget per member")
    batch_size: Count = Field(description="windows per step")
    warmup_steps: Seed = Field(description="linear warm-up steps")
    seed: Seed = Field(description="training seed")
    device: Device


class ZooMember(Section):
    """One zoo member; any zoo-wide setting (seed, context, ...) may be overridden here."""
    family: Literal[FAMILIES] = Field(description="architecture family")
    tokenizer: Literal[TOKENIZER_KINDS] = Field(description="tokenizer kind, trained on the member's data")
    vocab_size: Annotated[int, Field(ge=16)] = Field(description="tokenizer vocabulary")
    domains: DomainList = Field(description="the domains it trains on (comma-separated or a list; null = all)")
    d_model: Count = Field(description="width")
    n_layers: Count = Field(description="layers")
    n_heads: Count = Field(description="attention heads (dividing d_model)")
    lr: float = Field(gt=0, description="peak learning rate")
    context: Annotated[int, Field(ge=2)] | None = Field(None, description="overrides zoo.context")
    train_tokens: Count | None = Field(None, description="overrides zoo.train_tokens")
    batch_size: Count | None = Field(None, description="overrides zoo.batch_size")
    warmup_steps: Seed | None = Field(None, description="overrides zoo.warmup_steps")
    seed: Seed | None = Field(None, description="overrides zoo.seed (a replicate)")
    device: Device | None = Field(None, description="overrides zoo.device")


class Zoo(ZooShared):
    """The embedded model zoo: small causal LMs trained from scratch; `members` maps a name to its design."""
    members: dict[MemberName, ZooMember] = Field(description="name -> its design (a safe name: it becomes a path)")


class Losses(Section):
    """Engine settings shared by every losses@<slug> stage (`mmc losses --help`); a pool entry may set any of
    them for itself."""
    max_length: Count | None = Field(description="window length in tokens; null = the model's context")
    stride: Count | None = Field(description="null = lm-eval rolling windows; smaller = overlapping windows")
    batch_tokens: Count | None = Field(description=f"padded tokens per batch; null = {CPU_BATCH_TOKENS} on a CPU, "
                                                             f"{BATCH_TOKENS} on a GPU")
    device: Device
    dtype: Dtype = Field(description="auto = bf16 on GPU, fp32 on CPU")
    head_dtype: Dtype = Field(description="the output head's dtype; auto = fp32 on GPU, the weights' elsewhere")
    device_map: str | None = Field(None, description="accelerate's device map (e.g. auto: a model over several GPUs)")
    trust_remote_code: bool = Field(False, description="run the model repository's own code (off by default)")
    allow_pickle: bool = Field(False, description="accept pickled weights (pytorch_model.bin): runs their code")
    shards: Count = Field(1, description="scoring processes per model, each a shard of the batches (one per GPU: "
                                         "cuda:0, cuda:1, ...), combined into the single run's store")


ENGINE_SETTINGS = tuple(Losses.model_fields)  # what a pool entry may set for itself


def _optional(field: Any) -> Any:
    """A field's type, with its bounds and patterns (which pydantic keeps apart, in `metadata`), or null."""
    kind = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    return kind | None


class PoolEntryBase(Section):
    model: Annotated[str, Field(min_length=1)] | None = Field(
        None, description="hub id, local model folder or .gguf file (or `import`)")
    import_: Annotated[str, Field(min_length=1)] | None = Field(
        None, alias="import", description="per-document losses computed elsewhere (`mmc import --help`): lm-eval "
                                          "--log_samples output or a table; instead of `model`")
    format: Literal["auto", "lm-eval", "table"] | None = Field(None, description="import: the file's format")
    n_params: Count | None = Field(None, description="import: the model's parameters")
    n_params_nonembedding: Count | None = Field(None, description="import: its non-embedding parameters")
    family: str = Field(description="family label (ensembles mixing families are heterogeneous)")
    data: str | None = Field(None, description="label of the member's training data")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    dep: Annotated[str, Field(min_length=1)] = Field(
        description="the path the stage depends on (model folder or file, the imported file)")

    @model_validator(mode="after")
    def _one_source(self) -> PoolEntryBase:
        if (self.model is None) == (self.import_ is None):
            raise ValueError("give either model (a model to score) or import (losses computed elsewhere)")
        source = "import" if self.model is None else "model"
        wrong = sorted(name for name in self.model_fields_set if name in (
            ENGINE_SETTINGS + ("revision",) if source == "import" else ("format", "n_params", "n_params_nonembedding")))
        if wrong:
            raise ValueError(f"{', '.join(wrong)} do not apply to an entry with {source}")
        if source == "import" and (self.n_params is None or self.n_params_nonembedding is None):
            raise ValueError("an imported entry needs n_params and n_params_nonembedding (the laws' budget axis)")
        return self


PoolEntry = create_model(
    "PoolEntry", __base__=PoolEntryBase, __doc__="One pool member: the model scored (or the losses imported) by its "
    "losses@<slug> stage; any `losses` setting set here overrides the shared one for this model only.",
    **{name: (_optional(field), Field(None, description=f"overrides losses.{name}"))
       for name, field in Losses.model_fields.items()})


class Oracle(Section):
    """Oracle ensembles of the pool (`mmc oracle --help`)."""
    max_subsets_per_k: Count = Field(description="enumerate a (kind, k) up to this many subsets, else draw them")
    seed: Seed = Field(description="seed of the drawn subsets")
    sample_chunk: Count = Field(description="samples per block streamed")


class Fit(Section):
    """Law fits (`mmc fit --help`); changing these reruns only the fit stage."""
    bootstrap: Seed = Field(description="resamples of the samples (0 = no intervals)")
    seed: Seed = Field(description="seed of the resamples")
    holdout_fraction: float = Field(ge=0, lt=1, description="share of each series' largest budgets held out")
    x: Literal["total", "nonembedding"] = Field(description="the budget axis")


class Routing(Section):
    """Realisable collaboration (`mmc route --help`); changing these reruns only the routing stage."""
    test_fraction: float = Field(gt=0, lt=1, description="documents held out for scoring")
    seed: Seed = Field(description="seed of the split and of the resamples")
    bootstrap: Seed = Field(description="resamples of the test documents")
    ngram_features: Count = Field(description="hashed character n-gram features of the n-gram router")
    ridge_alpha: float = Field(ge=0, description="ridge penalty of the routers' loss predictions (and the mlp "
                                                 "router's L2 penalty)")
    knn_neighbors: Count = Field(description="training documents the knn router averages over")
    mlp_hidden: Count = Field(description="hidden units of the mlp router (one layer)")
    sweep_points: int = Field(ge=2, description="operating points per cost-quality curve (λ or cascade threshold "
                                                "grid)")


class Merging(Section):
    """The merging law: experts of each base, merged k at a time with each method (`mmc merge-sweep --help`)."""
    base_dir: str = Field(description="folder holding the bases")
    bases: list[BaseName] = Field(description="the bases (folders of base_dir), one merge@<base> stage each")
    domains: list[Domain] = Field(description="one expert per base and domain (no '-' in a domain)")
    expert_tokens: Count = Field(description="fine-tuning budget per expert")
    expert_batch_size: Count = Field(description="windows per fine-tuning step")
    expert_lr: float = Field(gt=0, description="fine-tuning learning rate")
    expert_warmup_steps: Seed = Field(description="linear warm-up steps")
    expert_lora_rank: Count | None = Field(description="null: full fine-tuning; R: LoRA adapters of rank R")
    expert_context: Count | None = Field(description="tokens per fine-tuning window; null = the base's context")
    seed: Seed = Field(description="seed of fine-tuning, subset draws, DARE masks and resamples")
    methods: dict[str, dict[str, float] | None] = Field(
        description="method -> its settings (`mmc merge --help`); unset settings take the defaults")
    max_subsets_per_k: Count = Field(description="subsets merged per k at most (more: seeded draws)")
    docs_per_domain: Count = Field(description="eval documents scored per domain, for every merge")
    bootstrap: Seed = Field(description="resamples of the eval documents")
    holdout_k: Seed = Field(description="the largest k values held out of the fit")


class Plan(Section):
    """Planning from the fitted merging law (`mmc plan --help`)."""
    method: str = Field(description="whose fit: joint or one method")
    loss: Literal["in_domain", "cross_domain"] = Field(description="which loss the plan is about")
    target: float | None = Field(gt=0, description="target loss in bits per byte (null: skip)")
    epsilon: float = Field(gt=0, description="stop when one more expert gains less than this")
    budget_multiple: float = Field(gt=0, description="expert-parameter budget as a multiple of the largest base")


class Studies(Section):
    """The parts that run beside the collaboration study (corpus, losses, pool, oracle, fit, routing, report).
    DVC has no conditional stages: the merging law's stages are a foreach over `merging` here (fit_merge@law,
    plan@law), so [] switches the merging study off."""
    merging: list[Literal["law"]] = Field(max_length=1, description="[law]: the merging study runs (experts, merges, "
                                                                    "its law and plan); []: it does not")


class Params(Section):
    """params.yaml: one section per part of the pipeline."""
    studies: Studies
    corpus: Corpus
    zoo: Zoo
    losses: Losses
    pool: dict[PoolSlug, PoolEntry] = Field(description="slug -> the model scored (a safe name: it becomes a path)")
    oracle: Oracle
    fit: Fit
    routing: Routing
    merging: Merging
    plan: Plan

    @model_validator(mode="after")
    def _parts_agree(self) -> Params:
        if bool(self.studies.merging) != bool(self.merging.bases):
            raise ValueError("studies.merging and merging.bases disagree: the merging study runs with bases "
                             "(studies.merging: [law]) or without both (studies.merging: [], merging.bases: [])")
        used = {Path(entry.model).as_posix() for entry in self.pool.values() if entry.model is not None}
        bases = set(self.merging.bases) if Path(self.merging.base_dir) == Path(ZOO_DIR) else set()
        unused = [name for name in self.zoo.members if (Path(ZOO_DIR) / name).as_posix() not in used
                  and name not in bases]
        if unused:
            raise ValueError(f"zoo member(s) {', '.join(unused)} used by neither the pool nor the merging study: "
                             f"remove them from zoo.members (the zoo trains only what a study uses)")
        return self


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _model_at(location: tuple) -> type[BaseModel] | None:
    """The schema model that holds the key at `location` (a pydantic error's loc), for "did you mean"."""
    model, parts = Params, list(location[:-1])
    while parts:
        field = model.model_fields.get(parts.pop(0))
        if field is None:
            return None
        annotation = field.annotation
        if get_origin(annotation) is dict and _is_model(get_args(annotation)[1]) and parts:
            parts.pop(0)  # a free name (a member, a slug)
            annotation = get_args(annotation)[1]
        if not _is_model(annotation):
            return None
        model = annotation
    return model


def _message(error: dict) -> str:
    location = tuple(error["loc"])
    key = ".".join(str(part) for part in location)
    if error["type"] == "extra_forbidden":
        model = _model_at(location)
        close = difflib.get_close_matches(str(location[-1]), list(model.model_fields) if model else [], n=1)
        suggestion = ".".join(str(part) for part in location[:-1] + (close[0],)) if close else ""
        return f"unknown key '{key}'" + (f" (did you mean '{suggestion}'?)" if close else "")
    if error["type"] == "missing":
        return f"'{key}' is missing"
    if error["type"] == "value_error":  # a name or consistency check: its own message says what is wrong
        key = ".".join(str(part) for part in location if part != "[key]")
        return f"'{key}': {error['ctx']['error']}" if key else str(error["ctx"]["error"])
    return f"'{key}': {error['msg']}, got {error['input']!r}"


def check_params(tree: object, where: str = "params.yaml") -> Params:
    """`tree` (params.yaml as loaded) checked against the schema, or an MMCError naming the first bad key."""
    if not isinstance(tree, dict):
        raise MMCError(f"{where} must be a mapping of sections (corpus, zoo, losses, pool, ...), got "
                       f"{type(tree).__name__}")
    try:
        return Params.model_validate(tree)
    except ValidationError as error:
        # an unknown key first: a misspelt key is also reported missing under its right name
        problems = sorted(error.errors(include_url=False), key=lambda problem: problem["type"] != "extra_forbidden")
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise MMCError(f"{where}: {_message(problems[0])}{more}") from None


CHECKED = "params.yaml matches mmc's schema\n"  # the check_params stage's output: the same text whatever params hold


def write_check(out: str | Path) -> None:
    """The check_params stage's output: a constant text, so that the stages after it rerun for their own params,
    never for this stage's."""
    with atomic_path(out, "params check") as tmp:
        tmp.write_text(CHECKED, encoding="utf-8")


def load_yaml(path: str | Path) -> object:
    """A YAML file's content, with one-line errors for what is not there or not YAML."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MMCError(f"'{path}' not found: run from the project's root") from None
    except UnicodeDecodeError as error:
        raise MMCError(f"'{path}' is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except yaml.YAMLError as error:
        raise MMCError(f"'{path}' is not valid YAML: {' '.join(str(error).split())}") from None


def read_params(path: str | Path = "params.yaml") -> dict:
    """params.yaml, checked against the schema: its tree as plain data (the values as written)."""
    tree = load_yaml(path)
    check_params(tree, str(path))
    return tree


def _type_text(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type_text(args[0])
    if origin is Literal:
        return " / ".join(f"`{arg}`" for arg in args)
    if origin in (Union, UnionType):
        return " or ".join(_type_text(arg) for arg in args)
    if origin in (list, dict):
        return f"{origin.__name__} of {_type_text(args[-1])}"
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def _limits(annotation: Any, metadata: list) -> list[str]:
    """The bounds (ge, gt, le, lt) and patterns of a field, its own or inside its (Annotated) type."""
    found = [f"{kind} {getattr(item, kind)}" for item in metadata for kind in ("ge", "gt", "le", "lt", "pattern")
             if getattr(item, kind, None) is not None]
    if get_origin(annotation) is Annotated:
        items = get_args(annotation)[1:]
        found += _limits(get_args(annotation)[0], [meta for item in items for meta in [item, *getattr(item, "metadata", [])]])
    return found + [limit for arg in get_args(annotation) if get_origin(annotation) in (Union, UnionType)
                    for limit in _limits(arg, [])]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(title: str, model: type[BaseModel]) -> str:
    """One Markdown table of a schema model; a mapping of models (zoo members, pool entries) gets its own."""
    rows, nested = [], []
    for name, field in model.model_fields.items():
        limits = _limits(field.annotation, field.metadata)
        kind = _type_text(field.annotation) + (f" ({', '.join(limits)})" if limits else "")
        rows.append(f"| `{field.alias or name}` | {_cell(kind)} | {_cell(field.description or '')} |\n")
        if get_origin(field.annotation) is dict and _is_model(get_args(field.annotation)[1]):
            nested.append(_table(f"{title}.{name}.<name>" if title else f"{name}.<name>",
                                 get_args(field.annotation)[1]))
    doc = (model.__doc__ or "").strip()
    return (f"\n## `{title}`\n\n{doc}\n\n| key | type and range | what it does |\n|---|---|---|\n" + "".join(rows)
            if title else "") + "".join(nested)


def params_reference() -> str:
    """The schema as Markdown: one table per section (and per kind of entry), every key with its type, range and
    what it does."""
    return ("# params.yaml reference\n\nGenerated from the schema in `mmc/params.py` (`mmc params --reference`); a "
            "test fails when this page and the schema differ.\n" +
            "".join(_table(name, field.annotation) for name, field in Params.model_fields.items()
                    if _is_model(field.annotation)) + _table("", Params))
