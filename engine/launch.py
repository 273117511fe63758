"""What a `ray job submit` entry point does before handing over to `engine run`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python launchers/imagenet_scdd.py --config FILE --out /shared/or/s3://... [key=value ...]

The entrypoint runs in an uploaded copy of the working directory on the head,
and git-ignored data is not uploaded: `--out` and every data or checkpoint
location must be an absolute path or a URL, checked here before any work.
Outside a job the same command starts a local Ray cluster (engine.cluster.session).
"""
from __future__ import annotations

import argparse
import os

from .errors import ConfigError, run_guarded

# config keys holding locations, and whether their value carries a `scheme:` prefix before the path
LOCATION_KEYS = (("data.train", "wds/ffcv"), ("data.val", "wds/ffcv"), ("data.source", "source"),
                 ("teacher.checkpoint", None), ("experts.location", None))


def is_absolute_location(value: str) -> bool:
    return "://" in value or os.path.isabs(value)


def _path_part(value: str, kind: str | None) -> str:
    if "://" in value or kind is None:
        return value
    if kind == "wds/ffcv":
        from .data import parse_location

        return parse_location(value)[1]
    return value.split(":", 1)[1] if ":" in value else value  # `fashion-mnist:DIR`, `digits:` has none


def check_locations(cfg, out: str) -> None:
    if not is_absolute_location(out):
        raise ConfigError(f"--out '{out}': expected an absolute path or a URL (under `ray job submit` the job runs "
                          "in an uploaded copy of the working directory)")
    for key, kind in LOCATION_KEYS:
        section, name = key.split(".")
        value = str(getattr(getattr(cfg, section), name) or "")
        path = _path_part(value, kind) if value else ""
        if path and not is_absolute_location(path):
            raise ConfigError(f"config key '{key}' is '{value}': expected an absolute path or a URL "
                              "(a relative one is not uploaded with the job)")


def launch(argv, default_config: str, description: str) -> int:
    from .cli import STAGES, main
    from .config import load_config

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=default_config, help=f"YAML recipe (default: {default_config})")
    p.add_argument("--out", required=True, help="output root: an absolute path on shared storage or a URL")
    p.add_argument("--stage", default="run", choices=sorted(STAGES), help="one stage instead of the whole pipeline")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = p.parse_args(argv)

    def check(_):
        check_locations(load_config(args.config, args.overrides), args.out)

    rc = run_guarded(check, None)
    if rc:
        return rc
    return main([args.stage, "--config", args.config, "--out", args.out, *(["--quiet"] if args.quiet else []),
                 *args.overrides])
