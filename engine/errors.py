"""User-facing errors: one line naming the file or field and what was expected.

Anything raised as an `EngineError` is printed by the CLI and tools as a single
line and turned into a non-zero exit; any other exception is a bug and keeps
its traceback.
"""


class EngineError(Exception):
    """Bad input or a failed precondition the user can fix."""

    exit_code = 2

    def __init__(self, message: str):
        # Keep it to one line whatever the caller passed in.
        super().__init__(" ".join(str(message).split()))


class ConfigError(EngineError):
    """A config file or override that does not fit the typed schema."""


class DataError(EngineError):
    """A data source, shard or beton file that cannot be read as expected."""


class StoreError(EngineError):
    """An artifact location that cannot be read or written."""


def run_guarded(main, *args, **kwargs) -> int:
    """Run a CLI entry point: an EngineError becomes `error: <one line>` and exit code 2."""
    import sys

    try:
        rc = main(*args, **kwargs)
        return 0 if rc is None else int(rc)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
