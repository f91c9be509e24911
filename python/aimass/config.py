"""aimass.config: the platform's ``config.yml``, validated into dataclasses.

The platform's documented file is valid as it stands::

    data_path: ./data
    download: false
    splitting:
      train: 70
      valid: 15
      test: 15

and may grow sections ``data``, ``model``, ``train``, ``compress``, ``eval``,
``registry``, ``serve`` and ``search`` (docs/training.md lists every key).
An unknown key is a :class:`ConfigError` naming the key, its line and the
closest valid key; a value of the wrong type names the key and the expected type.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import os
import typing
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

__all__ = ["ConfigError", "Config", "load", "loads", "fetch", "aimass_home"]


class ConfigError(ValueError):
    """A config.yml that cannot be used; the message names the file, line and key."""


def aimass_home() -> str:
    """Where aimass keeps its state (studies, demo output, download cache): $AIMASS_HOME or ~/.aimass."""
    return os.path.abspath(os.path.expanduser(os.environ.get("AIMASS_HOME") or "~/.aimass"))


# ----------------------------------------------------------------- sections
@dataclass
class Splitting:
    train: float = 70
    valid: float = 15
    test: float = 15


@dataclass
class DataSection:
    format: str = "auto"          # auto | records | npy | csv | image_folder
    label: str = "label"          # label field (csv: label column)
    input: Optional[str] = None   # input field; default: the one field that is not the label
    classes: Optional[int] = None  # labels 0..classes-1 (clean drops others)
    clean: bool = True
    image_size: List[int] = field(default_factory=lambda: [32, 32])
    scale: float = 1.0            # inputs are cast to float32 and multiplied by this
    out_dir: Optional[str] = None  # where converted records go (default: <data_path>.records)


@dataclass
class ModelSection:
    kind: str = "mlp"             # logreg | mlp | cnn
    hidden: List[int] = field(default_factory=lambda: [128])
    dropout: float = 0.0
    channels: List[int] = field(default_factory=lambda: [8, 16])  # cnn


@dataclass
class TrainSection:
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "sgd"        # sgd | adam | adamw
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "none"        # none | cosine | step
    seed: int = 0
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 0     # steps between checkpoints; 0: at the end of each epoch
    progress: bool = True


@dataclass
class PruneSection:
    method: str = "n:m"           # magnitude | n:m | channel
    sparsity: float = 0.5
    n: int = 2
    m: int = 4
    finetune_epochs: int = 3      # masked fine-tuning after magnitude / n:m pruning (0: none)


@dataclass
class QuantizeSection:
    bits: int = 8                 # 8 | 4
    group_size: int = 32


@dataclass
class DistillSection:
    teacher: Optional[str] = None  # a checkpoint dir or .pt of the teacher (default: the trained model)
    temperature: float = 4.0
    alpha: float = 0.5
    hidden: List[int] = field(default_factory=lambda: [32])
    epochs: Optional[int] = None


@dataclass
class CompressSection:
    prune: Optional[PruneSection] = None
    quantize: Optional[QuantizeSection] = None
    distill: Optional[DistillSection] = None


@dataclass
class EvalSection:
    batch_size: int = 256
    kfold: int = 0
    latency_batches: int = 20
    out_dir: Optional[str] = None


@dataclass
class RegistrySection:
    store: Optional[str] = None
    name: str = "model"
    label: Optional[str] = None


@dataclass
class ServeSection:
    host: str = "127.0.0.1"
    port: int = 8000
    tokens: Optional[str] = None
    max_batch_size: int = 32


@dataclass
class SearchParam:
    type: str = "uniform"         # uniform | log_uniform | int | choice
    low: Optional[float] = None
    high: Optional[float] = None
    choices: Optional[List[Any]] = None


@dataclass
class SearchSection:
    trials: int = 10
    metric: str = "val_accuracy"
    direction: str = "maximize"
    study: Optional[str] = None   # study name (default: from the config file name)
    timeout_s: Optional[float] = None
    params: Dict[str, SearchParam] = field(default_factory=dict)


@dataclass
class Config:
    data_path: Optional[str] = None
    download: bool = False
    data_url: Optional[str] = None
    sha256: Optional[str] = None
    splitting: Splitting = field(default_factory=Splitting)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    compress: CompressSection = field(default_factory=CompressSection)
    eval: EvalSection = field(default_factory=EvalSection)
    registry: RegistrySection = field(default_factory=RegistrySection)
    serve: ServeSection = field(default_factory=ServeSection)
    search: SearchSection = field(default_factory=SearchSection)
    path: Optional[str] = field(default=None, metadata={"internal": True})  # the file it came from

    def resolve(self, p: Optional[str]) -> Optional[str]:
        """A path from the file, relative to the file's folder."""
        if p is None:
            return None
        p = os.path.expanduser(p)
        if os.path.isabs(p) or self.path is None or "://" in p:
            return p
        return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(self.path)), p))

    def splitting_dict(self) -> dict:
        return {"splitting": dataclasses.asdict(self.splitting)}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("path")
        return d


_CHOICES = {
    ("data", "format"): ("auto", "records", "npy", "csv", "image_folder"),
    ("model", "kind"): ("logreg", "mlp", "cnn"),
    ("train", "optimizer"): ("sgd", "adam", "adamw"),
    ("train", "schedule"): ("none", "cosine", "step"),
    ("prune", "method"): ("magnitude", "n:m", "channel"),
    ("quantize", "bits"): (8, 4),
    ("search", "direction"): ("maximize", "minimize"),
    ("params", "type"): ("uniform", "log_uniform", "int", "choice"),
}


# ----------------------------------------------------------------- validation
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " (or null)"
    if origin in (list, List):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (dict, Dict):
        return f"a mapping of name -> {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(tp, str(tp))


class _Validator:
    def __init__(self, filename: str):
        self.filename = filename

    def err(self, node, msg: str) -> ConfigError:
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        return ConfigError(f"{self.filename}{line}: {msg}")

    def value(self, node, tp, key: str):
        import yaml
        if tp is Any:
            return yaml.safe_load(yaml.serialize(node))
        origin = typing.get_origin(tp)
        if origin is Union:
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
                return None
            return self.value(node, args[0], key)
        if dataclasses.is_dataclass(tp):
            if not isinstance(node, yaml.MappingNode):
                raise self.err(node, f"'{key}' must be {_type_name(tp)}, got {self._kind(node)}")
            return self.section(node, tp, key)
        if origin in (list, List):
            if not isinstance(node, yaml.SequenceNode):
                raise self.err(node, f"'{key}' must be {_type_name(tp)}, got {self._kind(node)}")
            (item,) = typing.get_args(tp)
            return [self.value(n, item, f"{key}[{i}]") for i, n in enumerate(node.value)]
        if origin in (dict, Dict):
            if not isinstance(node, yaml.MappingNode):
                raise self.err(node, f"'{key}' must be {_type_name(tp)}, got {self._kind(node)}")
            _, vt = typing.get_args(tp)
            return {self.scalar(k, str, key + " key"): self.value(v, vt, f"{key}.{k.value}") for k, v in node.value}
        return self.scalar(node, tp, key)

    def _kind(self, node) -> str:
        import yaml
        if isinstance(node, yaml.MappingNode):
            return "a mapping"
        if isinstance(node, yaml.SequenceNode):
            return "a list"
        return f"{node.value!r}"

    def scalar(self, node, tp, key):
        import yaml
        if not isinstance(node, yaml.ScalarNode):
            raise self.err(node, f"'{key}' must be {_type_name(tp)}, got {self._kind(node)}")
        v = yaml.safe_load(yaml.serialize(node))
        if tp is float and isinstance(v, str) and node.style is None:
            try:  # PyYAML (YAML 1.1) reads 1e-3 as text; YAML 1.2 and users mean a number
                v = float(v)
            except ValueError:
                pass
        if tp is Any:
            return v
        ok = (isinstance(v, bool) if tp is bool else
              isinstance(v, int) and not isinstance(v, bool) if tp is int else
              isinstance(v, (int, float)) and not isinstance(v, bool) if tp is float else
              isinstance(v, str) if tp is str else True)
        if tp is str and isinstance(v, (int, float)) and not isinstance(v, bool):
            v, ok = node.value, True  # a bare number where a name is expected (e.g. a port-like id)
        if not ok:
            raise self.err(node, f"'{key}' must be {_type_name(tp)}, got {v!r}")
        return float(v) if tp is float else v

    def section(self, node, cls, prefix: str):
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
        kwargs = {}
        for knode, vnode in node.value:
            k = knode.value
            full = f"{prefix}.{k}" if prefix else k
            if k not in names:
                close = difflib.get_close_matches(str(k), names, n=1, cutoff=0.5)
                hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
                raise self.err(knode, f"unknown key '{full}'{hint}")
            if k in kwargs:
                raise self.err(knode, f"key '{full}' appears twice")
            v = self.value(vnode, hints[k], full)
            choices = _CHOICES.get((prefix.split(".")[-1] if prefix else "", k))
            if prefix.startswith("search.params."):
                choices = _CHOICES.get(("params", k))
            if choices is not None and v is not None and v not in choices:
                raise self.err(vnode, f"'{full}' must be one of {', '.join(map(str, choices))}; got {v!r}")
            kwargs[k] = v
        return cls(**kwargs)


def _check(cfg: Config, filename: str) -> Config:
    s = cfg.splitting
    parts = dataclasses.asdict(s)
    if any(v < 0 for v in parts.values()) or abs(sum(parts.values()) - 100) > 1e-9:
        raise ConfigError(f"{filename}: 'splitting' percentages must be >= 0 and sum to 100, got "
                          + ", ".join(f"{k}={v:g}" for k, v in parts.items()))
    t = cfg.train
    for k in ("epochs", "batch_size"):
        if getattr(t, k) < 1:
            raise ConfigError(f"{filename}: 'train.{k}' must be >= 1, got {getattr(t, k)}")
    if t.lr <= 0:
        raise ConfigError(f"{filename}: 'train.lr' must be > 0, got {t.lr}")
    d = cfg.compress.distill
    if d is not None and not 0 <= d.alpha <= 1:
        raise ConfigError(f"{filename}: 'compress.distill.alpha' must be in [0, 1], got {d.alpha}")
    if d is not None and d.temperature <= 0:
        raise ConfigError(f"{filename}: 'compress.distill.temperature' must be > 0, got {d.temperature}")
    for name, p in cfg.search.params.items():
        if p.type == "choice" and not p.choices:
            raise ConfigError(f"{filename}: 'search.params.{name}' is a choice and needs 'choices: [...]'")
        if p.type != "choice" and (p.low is None or p.high is None or p.low > p.high):
            raise ConfigError(f"{filename}: 'search.params.{name}' needs low <= high")
        if p.type == "log_uniform" and p.low <= 0:
            raise ConfigError(f"{filename}: 'search.params.{name}' is log_uniform and needs low > 0")
    return cfg


def loads(text: str, filename: str = "<config>") -> Config:
    """Validate config text (YAML) into a Config."""
    import yaml
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{filename}: not valid YAML: {exc}") from None
    if root is None:
        raise ConfigError(f"{filename}: the file is empty; it needs at least data_path and splitting")
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{filename}:{root.start_mark.line + 1}: the top level must be a mapping "
                          "(data_path: ..., splitting: ...)")
    cfg = _Validator(filename).section(root, Config, "")
    return _check(cfg, filename)


def load(path) -> Config:
    """Read and validate a config.yml (ConfigError names the line and key of what is wrong)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        cfg = loads(f.read(), filename=path)
    cfg.path = os.path.abspath(path)
    return cfg


# ----------------------------------------------------------------- download
def fetch(url: str, sha256: Optional[str] = None, cache_dir: Optional[str] = None, progress: bool = True) -> str:
    """Fetch an http(s):// or file:// URL into the cache (AIMASS_HOME/cache) and return the local path.

    With `sha256` the file is checked (a mismatch raises aimass.CorruptDataError and nothing is kept)
    and a cached copy with that hash is reused without a download. Writes are atomic."""
    from aimass import CorruptDataError

    from ._io import atomic_path, sha256_file
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in ("http", "https", "file"):
        raise ValueError(f"data_url must be an http(s):// or file:// URL, got {url!r}")
    cache_dir = cache_dir or os.path.join(aimass_home(), "cache")
    os.makedirs(cache_dir, exist_ok=True)
    name = os.path.basename(urllib.parse.urlparse(url).path) or "download"
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    dest = os.path.join(cache_dir, f"{key}-{name}")
    if os.path.exists(dest) and (sha256 is None or sha256_file(dest) == sha256.lower()):
        return dest
    try:
        resp = urllib.request.urlopen(url, timeout=30)  # noqa: S310 - scheme checked above
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConnectionError(f"cannot download {url}: {reason}. Without network, put the data at "
                              "data_path yourself and set 'download: false'") from None
    from tqdm.auto import tqdm
    total = int(resp.headers.get("Content-Length") or 0) or None
    h = hashlib.sha256()
    with resp, atomic_path(dest) as tmp, open(tmp, "wb") as out, \
            tqdm(total=total, unit="B", unit_scale=True, desc=f"download {name}", disable=not progress) as bar:
        while True:
            chunk = resp.read(1 << 20)
            if not chunk:
                break
            out.write(chunk)
            h.update(chunk)
            bar.update(len(chunk))
        if sha256 is not None and h.hexdigest() != sha256.lower():
            raise CorruptDataError(f"download of {url}: sha256 is {h.hexdigest()}, the config expects {sha256}")
    return dest

