"""A prose corpus from text that ships inside the installed packages, for `gl-ray prepare` (issue 39's second
corpus: short documents of English, where the stdlib corpus has long files of Python):

    python -m benchmarks.prose_corpus --out data/prose-src
    gl-ray prepare --source data/prose-src --out data/prose --no-ray --val-fraction 0.05

One document per file:
- `dist-NAME.md`: each installed distribution's long description (the README its METADATA carries), if it has at
  least --min-chars characters of it;
- `topic-NAME.txt`: each topic of Python's own documentation that pydoc ships (`pydoc_data.topics`: the language
  reference's sections as plain text).
File names are the distribution's or topic's name, so two machines with the same packages write the same corpus;
`index.json` beside them lists each file's name, characters and SHA-256, and the package versions. The folder must
be new or empty (nothing is overwritten); bad input is one line and exit 2.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import re
import sys
from pathlib import Path

SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def descriptions(min_chars: int) -> dict[str, str]:
    """{file name: text} of every installed distribution's long description of at least min_chars characters."""
    out: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        meta = dist.metadata
        name = meta.get("Name")
        text = meta.get_payload() or meta.get("Description") or ""  # Metadata 2.1+: the body; older: a header
        if not name or len(text.strip()) < min_chars:
            continue
        out[f"dist-{SAFE.sub('_', name.lower())}.md"] = text.strip() + "\n"
    return out


def topics() -> dict[str, str]:
    """{file name: text} of pydoc's topics (Python's reference documentation as plain text)."""
    from pydoc_data.topics import topics as pydoc_topics

    return {f"topic-{SAFE.sub('_', k)}.txt": v.strip() + "\n" for k, v in pydoc_topics.items() if v.strip()}


def write_corpus(out: Path, min_chars: int) -> dict:
    """Write the documents and index.json into out (new or empty); returns the index."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        fail(f"--out {out} exists and is not an empty folder; pass a new one")
    docs = {**descriptions(min_chars), **topics()}
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name in sorted(docs):
        data = docs[name].encode("utf-8", errors="replace")
        (out / name).write_bytes(data)
        files.append({"file": name, "chars": len(docs[name]), "sha256": hashlib.sha256(data).hexdigest()})
    index = {"python": sys.version.split()[0], "min_chars": min_chars, "files": files,
             "packages": sorted(f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
                                if d.metadata.get("Name"))}
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return index


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prose_corpus", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="a new or empty folder for the documents")
    p.add_argument("--min-chars", type=int, default=500, help="shortest package description kept (characters)")
    a = p.parse_args(argv)
    if a.min_chars < 1:
        fail(f"--min-chars must be at least 1 (got {a.min_chars})")
    index = write_corpus(Path(a.out), a.min_chars)
    chars = sum(f["chars"] for f in index["files"])
    dists = sum(f["file"].startswith("dist-") for f in index["files"])
    print(f"{len(index['files'])} documents ({dists} package descriptions, {len(index['files']) - dists} pydoc "
          f"topics), {chars:,} characters -> {a.out}")


if __name__ == "__main__":
    main()
