"""`gl-ray prepare` at corpus scale: driver memory, tokens/s with 1 vs 2 tokenize workers, later-epoch read speed.

    python -m benchmarks.prepare_scale --work /tmp/prep-bench [--gb 2] [--small-gb 0.25] [--tokenizer DIR]

Generates a jsonl corpus of about --gb GB (32 MB files of Zipf-distributed words; kept in --work for reruns,
never committed), then runs `gl-ray prepare` on it in fresh processes: a small slice of it (--small-gb) and the
whole of it with 2 tokenize workers (driver peak RSS should not grow with the corpus), and the small slice with
1 worker (the 2/1 tokens/s ratio is the scaling on this machine). Last, reads of the prepared train stream:
epoch 0 (manifest order) against epoch 1 (shuffled by blocks of documents) and against the document-by-document
shuffle that blocks replaced. Each result is printed as it comes (stderr) and all of them as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FILE_BYTES = 32 << 20
NEOX = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tokenizers" / "gpt-neox-20b"


def generate(folder: Path, gb: float) -> int:
    """jsonl files of documents (20-1,500 words from a 20k-word Zipf vocabulary) up to gb GB; returns bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    target = int(gb * 1e9)
    have = sum(p.stat().st_size for p in folder.glob("*.jsonl"))
    if have >= target:
        return have
    rng = np.random.default_rng(0)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    words = ["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(20_000)]
    i, total = 0, 0
    while total < target:
        lines, size = [], 0
        while size < FILE_BYTES:
            ids = np.minimum(rng.zipf(1.2, int(rng.integers(20, 1500))) - 1, len(words) - 1)
            line = json.dumps({"text": " ".join(words[k] for k in ids)}) + "\n"
            lines.append(line)
            size += len(line)
        (folder / f"part-{i:05d}.jsonl").write_text("".join(lines))
        total, i = total + size, i + 1
    return total


RUN = """
import json, resource, sys, time
from gl_ray.data.prepare import prepare
t0 = time.perf_counter()
m = prepare(sys.argv[1], sys.argv[2], tokenizer=sys.argv[3], workers=int(sys.argv[4]), overwrite=True)
wall = time.perf_counter() - t0
tokens = m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
print("RESULT " + json.dumps({"tokens": tokens, "wall_s": round(wall, 1), "tokens_per_s": round(tokens / wall),
      "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
      "shards": len(m["splits"]["train"]["shards"])}))
"""


def run_prepare(src: Path, out: Path, tokenizer: str, workers: int) -> dict:
    r = subprocess.run([sys.executable, "-c", RUN, str(src), str(out), tokenizer, str(workers)],
                       capture_output=True, text=True, env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode or not line:
        raise SystemExit(f"prepare failed:\n{r.stderr[-3000:]}")
    return json.loads(line[0][7:])


def read_speed(data: str, tokens: int, seq_len: int = 2048) -> dict:
    """Tokens/s reading rows of epoch 0, of epoch 1, and of epoch 1 shuffled document by document."""
    from gl_ray.data.packing import block_pieces
    from gl_ray.data.stream import TokenStream

    def speed(stream: TokenStream, first: int) -> float:
        starts = first + np.arange(0, tokens, seq_len, dtype=np.int64)
        stream.rows(starts[:1], seq_len)
        t0 = time.perf_counter()
        for i in range(0, len(starts), 64):
            stream.rows(starts[i:i + 64], seq_len)
        return len(starts) * seq_len / (time.perf_counter() - t0)

    s = TokenStream(data, "train")
    out = {"epoch0": speed(s, 0), "epoch1_blocks": speed(TokenStream(data, "train"), s.tokens)}
    by_doc = TokenStream(data, "train")  # blocks of one token: every document a block of its own
    by_doc.block_lengths, by_doc.block_offsets, by_doc.shard_blocks = block_pieces(
        by_doc.doc_lengths, by_doc.doc_offsets, by_doc.shard_docs, block_tokens=1)
    out["epoch1_documents"] = speed(by_doc, s.tokens)
    out = {k: round(v) for k, v in out.items()}
    out["epoch1_over_epoch0"] = round(out["epoch1_blocks"] / out["epoch0"], 2)
    out["documents_over_epoch0"] = round(out["epoch1_documents"] / out["epoch0"], 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="folder for the generated corpus and outputs")
    p.add_argument("--gb", type=float, default=2.0)
    p.add_argument("--small-gb", type=float, default=0.25)
    p.add_argument("--tokenizer", default=str(NEOX))
    p.add_argument("--read-tokens", type=int, default=1 << 25)
    a = p.parse_args()
    work = Path(a.work)
    res: dict = {"cpus": os.cpu_count(), "tokenizer": Path(a.tokenizer).name}
    res["corpus_bytes"] = generate(work / "corpus", a.gb)
    small = work / "small"
    small.mkdir(exist_ok=True)
    files = sorted((work / "corpus").glob("*.jsonl"))
    for f in files[: max(1, round(len(files) * a.small_gb / a.gb))]:
        if not (small / f.name).exists():
            os.link(f, small / f.name)
    res["small_bytes"] = sum(f.stat().st_size for f in small.glob("*.jsonl"))
    for name, src, workers in [("small_2_workers", small, 2), ("full_2_workers", work / "corpus", 2),
                               ("small_1_worker", small, 1)]:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        res[name] = run_prepare(src, work / f"out-{name}", a.tokenizer, workers)
        print(f"[bench] {name}: {json.dumps(res[name])}", file=sys.stderr, flush=True)
    res["scaling_2_over_1"] = round(res["small_2_workers"]["tokens_per_s"] / res["small_1_worker"]["tokens_per_s"],
                                    2)
    res["read"] = read_speed(str(work / "out-full_2_workers"), a.read_tokens)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
