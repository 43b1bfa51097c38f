"""The lowest torch and transformers that gl-ray runs on, checked when gl_ray is imported.

    torch >= 2.6          FSDP2 (`torch.distributed.fsdp.fully_shard`, `MixedPrecisionPolicy`, `FSDPModule`) and
                          `torch.nn.utils.get_total_norm` became public in 2.6; flex attention needs 2.5.
    transformers >= 5.0   RoPE settings are read from `config.rope_parameters` (v5); on 4.x a model would keep
                          its default base and ignore `schedule.rope_theta` without a word.

pyproject.toml states the same bounds (a test ties them together). `make test-lowest` installs exactly these
versions in .venv-lowest and runs the core tests there (tests/test_versions.py).
The check reads installed metadata only (importing torch takes seconds): an older version is one line on stderr
and exit code 2, not a traceback deep inside FSDP.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys

LOWEST = {"torch": "2.6", "transformers": "5.0"}


def release(version: str) -> tuple[int, ...]:
    """The release numbers of a version string: "2.13.0+cpu" -> (2, 13, 0), "5.0.0rc1" -> (5, 0, 0)."""
    numbers = [int(x) for x in re.match(r"\d+(\.\d+)*", version)[0].split(".")[:3]]
    return tuple(numbers + [0] * (3 - len(numbers)))


def too_old(installed: dict[str, str | None]) -> list[str]:
    """`name>=lowest (found X)` for each package below its lowest version; a package that is not installed is left
    to its import (the install line names all of them)."""
    return [f"{name}>={low} (found {installed[name]})" for name, low in LOWEST.items()
            if installed.get(name) and release(installed[name]) < release(low)]


def installed_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in LOWEST:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def check_versions() -> None:
    old = too_old(installed_versions())
    if old:
        print(f"error: gl-ray needs {' and '.join(old)}: upgrade with pip install "
              f"{' '.join(repr(o.split(' ')[0]) for o in old)}", file=sys.stderr)
        raise SystemExit(2)
