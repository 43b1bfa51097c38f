"""train.micro_batch_tokens: auto: the search, the CPU and GPU memory checks (what a step holds that a try cannot
see, and the margin), two FSDP ranks that agree when only one runs out of memory mid-try, and a run that loses its
first tries to (injected) out-of-memory errors and goes on with a smaller micro batch, taking the same steps."""

import contextlib
import json
import multiprocessing
import os
import time

import pytest
import torch
from conftest import metrics, run_tiny

from gl_ray.errors import UserError
from gl_ray.schedule import divisors
from gl_ray.train import micro_batch as mb
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
    assert not try_fits(touch(16), 1, cpu, budget_bytes=budget, unseen_bytes=256 << 20)  # AdamW's moments to come

    def oom():
        raise torch.OutOfMemoryError("no room")

    assert not try_fits(oom, 1, cpu, budget_bytes=0)


MiB = 1 << 20


def test_unseen_bytes_are_adamw_moments_to_come_and_fsdp_accumulation(monkeypatch):
    model = torch.nn.Linear(100, 10)  # 1010 fp32 parameters
    optimizer = torch.optim.AdamW(model.parameters())
    assert mb.unseen_step_bytes(model, optimizer, accumulates=True) == 8 * 1010  # unsharded: grads add up in place
    monkeypatch.setattr(mb, "is_sharded", lambda m: True)  # FSDP2 keeps unsharded fp32 gradients between micro batches
    assert mb.unseen_step_bytes(model, optimizer, accumulates=True) == 12 * 1010
    assert mb.unseen_step_bytes(model, optimizer, accumulates=False) == 8 * 1010
    model(torch.ones(1, 100)).sum().backward()
    optimizer.step()  # now the moments exist, and a try's peak counts them
    assert mb.unseen_step_bytes(model, optimizer, accumulates=False) == 0


def test_gpu_fit_leaves_room_for_adamw_accumulation_and_the_margin(monkeypatch):
    """A fake GPU: 1000 MiB reachable, so 900 MiB usable with the 10% margin, and a try of n sequences peaks at
    700 + 20n MiB before AdamW's moments and FSDP's accumulated gradients (12 B/param of 4 Mi parameters: 48 MiB,
    the gradients only while the 16 rows of a step take more than one micro batch). 8 sequences peak at 860 MiB:
    below the device and the margin alone, but not with the 48 MiB still to come, so 4 (780 + 48) is taken; 16
    (1020 MiB) did not fit the device at all. Each try's outcome is agreed through host_sum."""
    params = 4 * MiB
    model = torch.nn.Linear(params, 1, bias=False)
    optimizer = torch.optim.AdamW(model.parameters())
    monkeypatch.setattr(mb, "is_sharded", lambda m: True)
    monkeypatch.setattr(mb, "local_collectives", lambda m: contextlib.nullcontext())  # no real FSDP here
    tried, agreed = [], []
    monkeypatch.setattr(mb, "reset_device_peak", lambda device: None)
    monkeypatch.setattr(mb, "device_memory", lambda device: ((700 + 20 * tried[-1]) * MiB, 1000 * MiB))
    assert mb.PROBE_MARGIN == 0.10

    def host_sum(values):
        agreed.append(values)
        return values

    cuda = torch.device("cuda")  # only its type: every reading of the device is faked above
    seqs = mb.probe_micro_batch(model, optimizer, rows_per_step=16, seq_len=64, run=tried.append, device=cuda,
                                budget_bytes=0, host_sum=host_sum)
    assert seqs == 4
    assert 8 in tried and len(agreed) == len(tried)
    unseen = mb.unseen_step_bytes(model, optimizer, accumulates=True)
    assert unseen == 48 * MiB
    assert try_fits(lambda: tried.append(8), 8, cuda, budget_bytes=0)  # the peak alone would have been taken
    assert not try_fits(lambda: tried.append(8), 8, cuda, budget_bytes=0, unseen_bytes=unseen)
    assert not try_fits(lambda: tried.append(11), 11, cuda, budget_bytes=0)  # 920 MiB: on the device, in the margin
    assert try_fits(lambda: tried.append(10), 10, cuda, budget_bytes=0)  # 900 MiB: just leaves the margin


def test_gpu_refuses_a_model_whose_first_sequence_does_not_fit(monkeypatch):
    model = torch.nn.Linear(1000, 1000)
    monkeypatch.setattr(mb, "reset_device_peak", lambda device: None)
    monkeypatch.setattr(mb, "device_memory", lambda device: (950 * MiB, 1000 * MiB))
    with pytest.raises(UserError, match=r"one sequence of 64 tokens .* does not fit in 0.88 GiB of GPU memory "
                                        r"\(90% of what PyTorch can reach"):
        mb.probe_micro_batch(model, torch.optim.AdamW(model.parameters()), rows_per_step=4, seq_len=64,
                             run=lambda n: None, device=torch.device("cuda"), budget_bytes=0, host_sum=lambda v: v)


def probe_on_rank(rank: int, *, world_size: int, init_file: str, out_dir: str, rows: int,
                  limits: tuple[int, ...]) -> None:
    """One of two gloo ranks (a spawned process): the tiny model sharded with FSDP2, whose block 1 raises
    OutOfMemoryError on rank 1 alone, inside its forward, in every try above a limit of sequences. Writes to
    out_dir/RANK.json the agreed micro batch (or the UserError) of a probe per limit; before and after them,
    the loss and gradient norm of one step on this rank's own row, taken with the real collectives; and the
    UserError of a probe before any forward, whose every try fails (GL_RAY_OOM_ABOVE_SEQS=0)."""
    import torch.distributed as dist

    from gl_ray.model import build_model, lm_loss
    from gl_ray.train.parallel import shard_model, transformer_blocks

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    model = build_model("tiny", vocab_size=256, max_position_embeddings=64)
    shard_model(model, bf16=False)
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.arange(rows * 32).reshape(rows, 32) % 256  # [rows, seq_len 32]
    trying, limit = [0], [0]

    def oom_in_block_1(module, args):  # runs after FSDP's own pre-forward hook has gathered the block
        if rank == 1 and trying[0] > limit[0]:
            raise torch.OutOfMemoryError(f"injected on rank 1 in block 1: {trying[0]} sequences")

    transformer_blocks(model)[1].register_forward_pre_hook(oom_in_block_1)

    def run(seqs: int) -> None:
        trying[0] = seqs
        try:
            lm_loss(model, x[:seqs]).backward()
        finally:
            optimizer.zero_grad(set_to_none=True)

    def host_sum(values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def step() -> list[float]:  # rows differ by rank: a reduce-scatter left local would change the gradients
        loss = lm_loss(model, x[rank:rank + 1])
        loss.backward()
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).full_tensor()
        optimizer.zero_grad(set_to_none=True)
        return [loss.item(), norm.item()]

    def probe() -> int | str:  # the agreed micro batch, or the UserError
        try:
            return mb.probe_micro_batch(model, optimizer, rows_per_step=rows, seq_len=32, run=run,
                                        device=torch.device("cpu"), budget_bytes=0, host_sum=host_sum)
        except UserError as e:
            return str(e)

    os.environ["GL_RAY_OOM_ABOVE_SEQS"] = "0"  # first every try fails before FSDP's first forward: nothing to reset
    out = {"unready": probe()}
    del os.environ["GL_RAY_OOM_ABOVE_SEQS"]
    out |= {"before": step(), "unseen": mb.unseen_step_bytes(model, optimizer, accumulates=True),
            "local": sum(p.to_local().numel() for p in model.parameters()),
            "full": sum(p.numel() for p in model.parameters())}
    out["seqs"] = []
    for limit[0] in limits:
        out["seqs"].append(probe())
    trying[0] = 0  # the probe is over: no more injected errors
    out["after"] = step()
    with open(f"{out_dir}/{rank}.json", "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


def test_fsdp_ranks_agree_when_one_runs_out_of_memory_mid_forward(tmp_path):
    """Two gloo ranks, FSDP2: rank 1 alone runs out of memory inside block 1's forward in every try above a limit
    of the 8 rows per step. Both end within the timeout (no rank is left inside a collective the other abandoned)
    with the same answer: the largest divisor of 8 up to the limit (3: 2), or (limit 0) the same one-line
    UserError. After the probes both train with the real collectives and a clean FSDP state (each rank's loss
    and gradient norm as before them)."""
    spawn = multiprocessing.get_context("spawn")
    procs = [spawn.Process(target=probe_on_rank, args=(rank,), kwargs={
        "world_size": 2, "init_file": str(tmp_path / "init"), "out_dir": str(tmp_path), "rows": 8, "limits": (3, 0)})
        for rank in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 180  # two interpreters importing torch on a busy machine; a hang is 30 min
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"ranks {hung} still running after the timeout"
    assert [p.exitcode for p in procs] == [0, 0]
    out = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    assert out[0]["seqs"] == out[1]["seqs"]
    fits, none = out[0]["seqs"]
    assert fits == 2
    assert none.startswith("one sequence of 32 tokens") and "\n" not in none
    for o in out:
        assert o["unready"].startswith("one sequence of 32 tokens")
        assert o["after"] == pytest.approx(o["before"], rel=1e-6)
        assert o["unseen"] == 8 * o["local"] + 4 * o["full"]  # fresh AdamW on this shard; unsharded fp32 grads
        assert o["local"] < o["full"]


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
