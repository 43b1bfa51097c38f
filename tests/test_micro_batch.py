"""train.micro_batch_tokens: auto: the search, the CPU memory check, and a run that loses its first tries to
(injected) out-of-memory errors and goes on with a smaller micro batch, taking the same steps."""

import json

import pytest
import torch
from conftest import metrics, run_tiny

from gl_ray.errors import UserError
from gl_ray.schedule import divisors
from gl_ray.train.micro_batch import find_micro_batch, largest_fitting, try_fits


@pytest.mark.parametrize("rows, limit, want", [(32, 5, 4), (32, 32, 32), (32, 1, 1), (24, 13, 12), (24, 0, 0),
                                               (12, 7, 6), (1, 1, 1)])
def test_find_micro_batch_takes_the_largest_divisor_that_fits(rows, limit, want):
    tried = []

    def fits(n):
        tried.append(n)
        return n <= limit

    assert find_micro_batch(rows, fits) == want
    assert all(rows % n == 0 for n in tried)
    assert len(tried) <= 2 * len(divisors(rows)).bit_length() + 1  # doubling then bisection, not a linear scan


@pytest.mark.parametrize("n", [1, 2, 12, 36, 97, 1024, 3 * 5 * 7 * 11 * 13])
def test_divisors_are_every_divisor_ascending(n):
    assert divisors(n) == [d for d in range(1, n + 1) if n % d == 0]


@pytest.mark.parametrize("limit", [0, 1, 5, 64, 100, 4096])
def test_largest_fitting_over_every_size_as_bench_searches(limit):
    """gl-ray bench's Table 3 searches every size up to a cap with the same function as the training loop."""
    tried = []

    def fits(n):
        tried.append(n)
        return n <= limit

    assert largest_fitting(range(1, 4097), fits) == limit
    assert len(tried) <= 2 * (4096).bit_length() + 1


def test_cpu_fit_is_judged_by_the_peak_memory_of_the_try():
    """The budget is set 128 MiB above this process's resident memory: a try that touches 16 MiB fits, one that
    touches 512 MiB does not, and the next small try fits again (the peak is reset before each try)."""
    from gl_ray.train.micro_batch import peak_rss_bytes, reset_peak_rss

    cpu = torch.device("cpu")

    def touch(mib: int):
        return lambda: torch.ones(mib << 20 >> 2).sum()  # float32: mib MiB, written, so resident

    touch(16)()  # warm up whatever a first torch.ones allocates once
    reset_peak_rss()
    baseline = peak_rss_bytes()
    budget = baseline + (128 << 20)
    assert try_fits(touch(16), 1, cpu, budget_bytes=budget)
    assert not try_fits(touch(512), 1, cpu, budget_bytes=budget)
    assert try_fits(touch(16), 1, cpu, budget_bytes=budget)  # the 512 MiB peak of the try before does not count
    assert try_fits(touch(512), 1, cpu, budget_bytes=0)  # no budget: anything that runs

    def oom():
        raise torch.OutOfMemoryError("no room")

    assert not try_fits(oom, 1, cpu, budget_bytes=0)


def test_auto_micro_batch_recovers_from_oom_and_keeps_the_steps(baseline, tiny_data, tmp_path, monkeypatch):
    """Tries above 5 sequences run out of memory: each stage goes on with 4 (the largest divisor of its 32 and 16
    rows per step that fits), logged in metrics and summary, and the losses are those of the fixed micro batch."""
    monkeypatch.setenv("GL_RAY_OOM_ABOVE_SEQS", "5")
    _, summary = run_tiny(tiny_data, tmp_path, "auto", **{"train.micro_batch_tokens": "auto"})
    got, want = metrics(tmp_path / "auto"), metrics(baseline[2])
    assert [m["step"] for m in got] == [m["step"] for m in want]
    assert {m["micro_batch"] for m in got} == {4}
    assert [s["micro_batch"] for s in summary["stages"]] == [4, 4]
    assert [m["micro_batch"] for m in want][:1] == [16]  # the baseline's fixed 512 tokens at L=32
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["step"]
    plan = json.loads((tmp_path / "auto" / "plan.json").read_text())
    assert plan["auto_micro_batch"] is True


def test_a_memory_budget_below_the_model_is_refused_before_the_run(tiny_data, tmp_path):
    with pytest.raises(UserError, match="train.memory_budget .* does not fit one sequence"):
        run_tiny(tiny_data, tmp_path, "small", **{"train.micro_batch_tokens": "auto", "train.memory_budget": "1KiB"})
    assert not (tmp_path / "small").exists()
