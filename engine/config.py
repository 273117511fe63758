"""Typed configuration: dataclass sections, YAML recipes, dotted overrides.

OmegaConf's structured configs do the type checking and reject unknown keys;
this module turns their multi-line errors into one line naming the key, and
saves the resolved config next to every output.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


@dataclass
class DataConfig:
    # Raw source the `prepare` stage turns into shards when `train` is empty:
    # `fashion-mnist:DIR`, `imagefolder:DIR`, `digits:` (see engine.data.sources).
    source: str = f"fashion-mnist:{FASHION_MNIST_DIR}"
    source_train_split: str = "train"
    source_val_split: str = "test"
    # Shard locations (a WebDataset shard directory or an FFCV .beton, any
    # fsspec URL). Empty: use the shards `prepare` wrote under OUT/data.
    train: str = ""
    val: str = ""
    train_split: str = "train"
    val_split: str = "val"
    format: str = "wds"  # reader for prepared data: wds | ffcv
    channels: int = 1  # 1 (grey) or 3 (RGB); readers convert to this
    image_size: int = 28
    crop_pct: float = 1.0  # eval preset: resize to size/crop_pct, centre-crop size
    train_preset: str = "train"  # train | eval | raw
    eval_preset: str = "eval"
    mean: list[float] = field(default_factory=lambda: [0.2860])
    std: list[float] = field(default_factory=lambda: [0.3530])
    shard_size: int = 5000
    shuffle_buffer: int = 2000
    batch_size: int = 256
    num_workers: int = 0
    write_workers: int = 2
    ffcv: bool = True  # prepare also writes .beton files


@dataclass
class EngineConfig:
    name: str = "demo"
    seed: int = 0
    method: str = "scdd"
    data: DataConfig = field(default_factory=DataConfig)


def _one_line(exc: OmegaConfBaseException, origin: str) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(getattr(exc, "msg", None) or exc).splitlines()[0]
    where = f"{origin}: " if origin else ""
    if key:
        return f"{where}config key '{key}': {msg}"
    return f"{where}config: {msg}"


def _merge(base, other, origin: str):
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc, origin)) from None


def _parse_value(raw: str) -> Any:
    """YAML scalars and lists (`3`, `0.5`, `[1, 2]`, `true`); anything else is a string.

    URIs such as `digits:` or `s3://b/x` stay strings (YAML would read a
    trailing colon as a mapping)."""
    import yaml

    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, dict) and not raw.lstrip().startswith("{"):
        return raw
    return raw if value is None and raw.strip() not in ("null", "~") else value


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                schema: type = EngineConfig) -> Any:
    """Schema defaults <- YAML file <- `key=value` overrides, type-checked.

    Returns an OmegaConf structured config (attribute access, typed)."""
    cfg = OmegaConf.structured(schema)
    if path:
        from .store import read_text

        try:
            loaded = OmegaConf.create(read_text(path))
        except OmegaConfBaseException as exc:
            raise ConfigError(_one_line(exc, path)) from None
        except Exception as exc:  # yaml.YAMLError and friends
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"{path}: not a valid YAML config ({first})") from None
        if not isinstance(loaded, type(OmegaConf.create({}))):
            raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
        cfg = _merge(cfg, loaded, path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value (e.g. data.channels=3)")
        key, raw = item.split("=", 1)
        value: Any = _parse_value(raw)
        for part in reversed(key.strip().split(".")):
            value = {part: value}
        cfg = _merge(cfg, OmegaConf.create(value), f"override '{item}'")
    OmegaConf.set_readonly(cfg, False)
    return cfg


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_dict(cfg) -> dict:
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return OmegaConf.to_container(cfg, resolve=True)


def config_hash(cfg) -> str:
    import hashlib

    return hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:16]
