"""Typed run configuration: YAML in, every stage's settings out.

Each stage owns its settings class; this module composes them, applies `--set key=value`
overrides, and turns validation errors into one line per problem that names the key and
what is allowed.
"""

from __future__ import annotations

import logging
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stages.annotate import AnnotateSettings
from stages.base import StageSettings
from stages.caption import CaptionSettings
from stages.embed import EmbedSettings
from stages.ingest import CorpusSettings, IngestSettings
from stages.mine import MineSettings
from stages.models.encoders import looks_local
from stages.search import SearchSettings
from stages.select import SelectSettings
from stages.write import WriteSettings


log = logging.getLogger("megasynth.config")


class ConfigError(ValueError):
    """A configuration that cannot run; the message is meant for the user as is."""


class IngestOptions(IngestSettings):
    """ingest's settings as written in the config: the corpus has its own top-level section."""

    corpus: None = Field(None, exclude=True)


class SelectOptions(SelectSettings):
    """select's settings as written in the config: the spaces its queries are scored in come from `embed.spaces`."""

    spaces: None = Field(None, exclude=True)


class MineOptions(SearchSettings, MineSettings):
    """mine's settings as written in the config: one section for the two stages behind it, search (the
    neighbour lists) and mine (the pairs chosen from them); each stage takes its own fields."""


class ExecutorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["ray", "local"] = "ray"
    ray_address: str | None = Field(None, description="an existing cluster (ray://host:10001 or auto); default: embedded")
    num_cpus: int | None = Field(None, gt=0, description="CPUs of the embedded cluster (default: all)")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of the embedded cluster (default: all)")
    actors: int | None = Field(None, gt=0, description="workers per model stage (default: as many as resources allow)")
    unit_retries: int = Field(3, ge=0, description="retries of a unit after a transient I/O error (EIO, ESTALE, a file briefly missing)")
    retry_pause_s: float = Field(2.0, ge=0, description="pause before the first retry after a transient error; doubles each time")
    lost_retries: int = Field(5, ge=0, description="times a unit is run again after its worker, actor or node was lost")
    placement_timeout_s: float = Field(300, gt=0, description="how long a stage may have no node able to host its workers before the run stops")
    max_in_flight: int | None = Field(None, gt=0, description="tasks submitted at once (default: twice what the cluster runs at once)")
    max_reject_share: float | None = Field(0.5, ge=0, le=1, description="stop when a stage whose rejects are losses (ingest, annotate) "
                                           "rejects more than this share of its first items; null: never")  # fmt: skip


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    corpus: CorpusSettings = CorpusSettings()
    ingest: IngestOptions = IngestOptions()
    caption: CaptionSettings = CaptionSettings()
    embed: EmbedSettings = EmbedSettings()
    select: SelectOptions = SelectOptions()
    mine: MineOptions = MineOptions()
    annotate: AnnotateSettings = AnnotateSettings()
    write: WriteSettings = WriteSettings()
    executor: ExecutorSettings = ExecutorSettings()

    def stage_settings(self, name: str) -> StageSettings:
        """The settings a stage runs with: its section, plus the corpus for ingest and the run seed where unset."""
        if name == "ingest":
            return IngestSettings(corpus=self.corpus, **self.ingest.model_dump(exclude={"corpus"}))
        if name == "select":
            spaces = {n: sp.model_dump() for n, sp in self.embed.spaces.items()}
            return SelectSettings(spaces=spaces, **self.select.model_dump(exclude={"spaces"}))
        if name in ("search", "mine"):
            cls = SearchSettings if name == "search" else MineSettings
            settings = cls.model_validate(self.mine.model_dump(include=set(cls.model_fields)))
        else:
            settings = getattr(self, name)
        if "seed" in type(settings).model_fields and settings.seed is None:
            settings = settings.model_copy(update={"seed": self.seed})
        return settings


def load_config(path: str | Path | None, overrides: list[str] = (), corpus: list[str] | None = None, patch: dict | None = None) -> RunConfig:
    """Read YAML, deep-merge `patch` (a sweep's variant), apply `key=value` overrides and `--corpus`, validate.
    Raises ConfigError."""
    source = str(path) if path else "defaults"
    data = read_yaml(Path(path)) if path else {}
    if patch:
        data = merge(data, patch, RunConfig)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set mine.k=32")
        _set(data, key.strip().split("."), yaml.safe_load(value) if value.strip() else None)
    if corpus:
        data.setdefault("corpus", {})
        if not isinstance(data["corpus"], dict):
            raise ConfigError("corpus: must be a mapping with `paths`")
        data["corpus"]["paths"] = list(corpus)
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"config error ({source}):\n" + "\n".join(_explain(err) for err in e.errors())) from None
    return absolute_paths(cfg)


def absolute_paths(cfg: RunConfig, cwd: Path | None = None) -> RunConfig:
    """Corpus paths and local model folders as absolute paths, resolved here on the driver: a cluster's
    workers were started from other folders and must never resolve them against their own."""
    cwd = Path(cwd or os.getcwd())

    def local(path: str) -> str:
        p = Path(path).expanduser()
        return path if p.is_absolute() else str(cwd / p)

    def model(name: str) -> str:
        return local(name) if looks_local(name) or (cwd / name).exists() else name

    spaces = {n: sp.model_copy(update={"model": model(sp.model)}) for n, sp in cfg.embed.spaces.items()}
    ann = cfg.annotate
    steps = {step: getattr(ann, step) for step in ("describer", "instructor")}
    steps = {k: g if g.backend == "openai" else g.model_copy(update={"model": model(g.model)}) for k, g in steps.items()}
    cap = cfg.caption
    if cap.captioner is not None and cap.captioner.backend != "openai":
        cap = cap.model_copy(update={"captioner": cap.captioner.model_copy(update={"model": model(cap.captioner.model)})})

    def files(section):  # its file settings (prompts, lists) and answer cache folder
        out = {k: _absolute(getattr(section, k), cwd) for k in _config_relative_fields(type(section)) if isinstance(getattr(section, k), str)}
        return {**out, "cache_dir": local(section.cache_dir)} if section.cache_dir else out

    queries = [q.model_copy(update={"image": local(q.image)}) if q.image else q for q in cfg.select.queries]  # seed images
    return cfg.model_copy(update={
        "corpus": cfg.corpus.model_copy(update={"paths": [local(p) for p in cfg.corpus.paths]}),
        "select": cfg.select.model_copy(update={"queries": queries}),
        "caption": cap.model_copy(update=files(cap)),
        "embed": cfg.embed.model_copy(update={"spaces": spaces}),
        "annotate": ann.model_copy(update={**steps, **files(ann)}),
    })  # fmt: skip


def read_yaml(p: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file; `extends: other.yaml` (relative to this file) is read first and deep-merged under it.
    Files named by settings marked relative_to_config (prompts, demonstrations) are made absolute against the folder
    of the file that names them, so a domain's folder of config and prompt files works from anywhere."""
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    if p.resolve() in seen:
        raise ConfigError(f"{p}: `extends` loops back on itself")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the config must be a mapping of sections (corpus, embed, mine, ...)")
    _resolve_files(data, RunConfig, p.parent)
    base = data.pop("extends", None)
    if base is None:
        return data
    return merge(read_yaml(p.parent / base, (*seen, p.resolve())), data, RunConfig)


def merge(base: dict, over: dict, model: Any = None, where: str = "") -> dict:
    """`over` deep-merged onto `base`: mappings merge key by key, anything else replaces. With `model` (the settings
    class `base` is written for), a block of `over` that switches a backend (`backend: vllm` over transformers)
    keeps only the keys of `base` that the new backend takes."""
    out = dict(base)
    for k, v in over.items():
        child, at = _child(model, k), f"{where}.{k}".lstrip(".")
        if isinstance(v, dict) and isinstance(child, list) and "backend" in v:
            out[k] = _switch_backend(out.get(k) if isinstance(out.get(k), dict) else _default_block(model, k), child, v["backend"], at)
        out[k] = merge(out[k], v, child, at) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set(data: dict, keys: list[str], value: Any) -> None:
    """One `--set key=value`; setting a block's `backend` to another one drops the old backend's keys (see `merge`)."""
    node: Any = RunConfig
    for i, k in enumerate(keys[:-1]):
        nxt = data.get(k)
        if not isinstance(nxt, dict):
            nxt = data[k] = {}
        if keys[i + 1 :] == ["backend"] and isinstance(_child(node, k), list):
            data[k] = nxt = _switch_backend(nxt or _default_block(node, k), _child(node, k), value, ".".join(keys[:-1]))
        data, node = nxt, _child(node, k)
    data[keys[-1]] = value


def _switch_backend(block: dict, members: list, backend: Any, where: str) -> dict:
    """`block` for `backend`: unchanged if it already is, else without the keys that backend's settings do not take."""
    old = block.get("backend", _default_tag(members))
    new_cls = next((m for m in members if _is_model(m) and typing.get_args(m.model_fields["backend"].annotation) == (backend,)), None)
    if old == backend or new_cls is None:  # an unknown backend is reported by validation, with the known ones
        return block
    kept = {k: v for k, v in block.items() if k in new_cls.model_fields and k != "backend"}
    if dropped := sorted(set(block) - set(kept) - {"backend"}):
        log.warning("%s.backend: %s -> %s; dropped %s (%s settings that %s does not take)", where, old, backend,
                    ", ".join(dropped), old, backend)  # fmt: skip
    return kept


def _default_tag(members: list) -> Any:
    """The backend a block without `backend` gets: the one member whose tag has a default."""
    tagged = [m.model_fields["backend"] for m in members if _is_model(m)]
    return next((f.default for f in tagged if not f.is_required()), None)


def _default_block(model: Any, key: str) -> dict:
    """The settings a model field holds by default, as a block of keys (what a switched backend starts from)."""
    default = model.model_fields[key].default if _is_model(model) and key in model.model_fields else None
    return default.model_dump(exclude_defaults=True) if isinstance(default, BaseModel) else {}


def _child(node: Any, key: str) -> Any:
    """The settings class under `key` of `node` (a list of classes for a backend union), or None."""
    if _is_model(node) and key in node.model_fields:
        return _unwrap(node.model_fields[key].annotation)
    if typing.get_origin(node) is dict:
        return _unwrap(typing.get_args(node)[1])
    return None


def _config_relative_fields(model: Any) -> list[str]:
    extras = {k: f.json_schema_extra for k, f in model.model_fields.items()}
    return [k for k, extra in extras.items() if isinstance(extra, dict) and extra.get("relative_to_config")]


def resolve_files(data: dict, folder: Path) -> dict:
    """A copy of a config mapping (a sweep's variant, say) with its file settings made absolute against `folder`."""
    import copy

    out = copy.deepcopy(data)
    _resolve_files(out, RunConfig, folder)
    return out


def _resolve_files(data: dict, model: Any, folder: Path) -> None:
    """In place: the file settings of `data` (a config file's mapping for `model`) made absolute against `folder`."""
    if not _is_model(model):
        return
    marked = set(_config_relative_fields(model))
    for k, v in data.items():
        if k in marked and isinstance(v, str):
            data[k] = _absolute(v, folder)
        elif isinstance(v, dict) and _is_model(_child(model, k)):
            _resolve_files(v, _child(model, k), folder)
        elif isinstance(v, list) and _is_model(item := _list_item(model, k)):  # e.g. select.queries' seed images
            for x in v:
                if isinstance(x, dict):
                    _resolve_files(x, item, folder)


def _list_item(model: Any, key: str) -> Any:
    """The settings class of the items of a list field `key` of `model`, or None."""
    child = _child(model, key)
    return _unwrap(typing.get_args(child)[0]) if typing.get_origin(child) is list else None


def _absolute(value: str, folder: Path) -> str:
    """A relative path made absolute against `folder`; a bare name (no suffix, no separator: a packaged prompt) as is."""
    p = Path(value).expanduser()
    if p.is_absolute() or not (p.suffix or "/" in value or os.sep in value):
        return str(p) if p.is_absolute() else value
    return os.path.normpath(Path(folder).absolute() / p)


def _explain(err: dict) -> str:
    if err["type"] == "extra_forbidden":
        path, parent = _walk(err["loc"][:-1])
        allowed = [n for n, f in parent.model_fields.items() if not f.exclude] if _is_model(parent) else []
        return f"  {path}.{err['loc'][-1]}: unknown key; allowed here: {', '.join(allowed)}"
    path = _walk(err["loc"])[0]
    if err["type"] == "union_tag_invalid":
        ctx = err.get("ctx", {})
        return f"  {path}.backend: {ctx.get('tag')!r} is not a backend; use one of {ctx.get('expected_tags')}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"  {path}: {msg}" + ("" if err["type"] == "value_error" else f" (got {err.get('input')!r})")


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _unwrap(t: Any) -> Any:
    """Annotated[X, ...] -> X; X | None -> X; a union of several models -> the list of them."""
    while typing.get_origin(t) is typing.Annotated:
        t = typing.get_args(t)[0]
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        members = [_unwrap(a) for a in typing.get_args(t) if a is not type(None)]
        return members[0] if len(members) == 1 else members
    return t


def _walk(loc: tuple) -> tuple[str, Any]:
    """The user's dotted key for a pydantic error location, and the settings class found there."""
    names, node = [], RunConfig
    for part in loc:
        if isinstance(node, list):  # a tagged union: pydantic puts the tag in the location
            node = next((m for m in node if _is_model(m) and "backend" in m.model_fields
                         and typing.get_args(m.model_fields["backend"].annotation) == (part,)), None)  # fmt: skip
            continue
        names.append(str(part))
        if _is_model(node) and part in node.model_fields:
            node = _unwrap(node.model_fields[part].annotation)
        elif typing.get_origin(node) is dict:
            node = _unwrap(typing.get_args(node)[1])
        elif typing.get_origin(node) is list and isinstance(part, int):  # an item of a list of settings (select.queries)
            node = _unwrap(typing.get_args(node)[0])
        else:
            node = None
    return ".".join(names), node


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude={"ingest": {"corpus"}}), sort_keys=False)
