"""The run configs and Tune spaces that ship with gl-ray, found by name or by path.

    gl-ray plan --config pythia-160m-growlength        # a shipped config, by name
    gl-ray plan --config my-runs/160m.yaml             # any file, by path
    gl-ray tune --space ladders                        # a shipped search space

Where they live:
    a clone          pipelines/configs/NAME.yaml and tune_spaces/NAME.yaml at the top of the repo;
    an installed     gl_ray/configs/NAME.yaml and gl_ray/tune_spaces/NAME.yaml inside the package: pyproject's
    wheel            `package-dir` maps the two repo folders there, so the files exist once in the repo.
A path that names an existing file always wins over a name.
"""

from __future__ import annotations

from pathlib import Path

from gl_ray.errors import UserError

PACKAGE = Path(__file__).resolve().parent
# kind -> (folder inside the installed package, folder in a clone), one entry per pyproject `package-dir` line
KINDS = {"configs": ("configs", "pipelines/configs"), "tune_spaces": ("tune_spaces", "tune_spaces")}
WHAT = {"configs": "config file", "tune_spaces": "search space"}


def shipped_folder(kind: str) -> Path | None:
    """The folder holding the shipped YAML files of `kind` ("configs" or "tune_spaces"), or None."""
    installed, clone = KINDS[kind]
    for folder in (PACKAGE / installed, PACKAGE.parent / clone):
        if folder.is_dir():
            return folder
    return None


def shipped_names(kind: str) -> list[str]:
    folder = shipped_folder(kind)
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder else []


def find_shipped(name_or_path: str | Path, kind: str) -> Path:
    """An existing file as given, else the shipped file of that name (with or without .yaml, and the old
    repo-relative spelling `pipelines/configs/NAME.yaml` too). UserError listing the shipped names if neither."""
    given = Path(name_or_path)
    if given.is_file():
        return given
    folder = shipped_folder(kind)
    if folder is not None and given.parent in (Path("."), Path(KINDS[kind][1])):
        candidate = folder / (given.name if given.suffix in (".yaml", ".yml") else f"{given.name}.yaml")
        if candidate.is_file():
            return candidate
    names = ", ".join(shipped_names(kind)) or "none found"
    raise UserError(f"{WHAT[kind]} {str(name_or_path)!r} not found: give a path to a YAML file or a shipped "
                    f"name ({names})")
