"""The kernel autotune: choosing by (injected) timings, the per-machine cache file, rank 0's
decisions reaching every rank, the ``kernels`` switch, and a model under ``kernels=auto``."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from longtail.core.errors import LongtailError
from longtail.models import autotune, build_model, fused_bn, kernels

HERE = Path(__file__).parent
CL = torch.channels_last


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """Each test decides into its own cache folder, with nothing decided in memory."""
    monkeypatch.setenv("LONGTAIL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(autotune.ENV, raising=False)
    autotune.forget()
    yield
    autotune.use_timer(None)
    autotune.forget()
    autotune.machine_id.cache_clear()  # a test may have faked another machine


def scripted(seconds: dict[str, float], calls: list[str]):
    """A timer that runs each candidate once (real work) and reports the given seconds; a whole
    step with the chosen kernels (``"kernels"``) gets the kernel's unless given."""

    def timer(name, fn):
        fn()
        calls.append(name)
        return seconds[name] if name != autotune.STEP else seconds.get(name, seconds["kernel"])

    return timer


def bn_candidates(outputs: dict[str, torch.Tensor]):
    """The fused BatchNorm op and PyTorch's ops on the same real tensors; outputs recorded."""
    x = torch.randn(4, 16, 6, 6).contiguous(memory_format=CL)
    w, b = torch.rand(16) + 0.5, torch.rand(16) - 0.5

    def kernel():
        outputs["kernel"] = fused_bn.bn_relu_forward(x, None, w, b, 1e-5)[0]

    def pytorch():
        outputs["pytorch"] = F.relu(F.batch_norm(x, None, None, w, b, True, 0.0, 1e-5))

    return {"kernel": kernel, "pytorch": pytorch}


@pytest.mark.parametrize(
    "kernel_s,pytorch_s,expected",
    [(1.0, 2.0, "kernel"), (2.0, 1.0, "pytorch"), (0.97, 1.0, "pytorch"), (0.9, 1.0, "kernel")],
)
def test_choose_takes_the_kernel_only_when_timed_faster_by_the_margin(
    kernel_s, pytorch_s, expected
):
    outputs: dict[str, torch.Tensor] = {}
    calls: list[str] = []
    timer = scripted({"kernel": kernel_s, "pytorch": pytorch_s}, calls)
    assert autotune.MARGIN == 0.05  # 0.97 is inside the margin, 0.9 outside
    assert autotune.choose("bn|4x16x6x6", bn_candidates(outputs), timer) == expected
    assert sorted(calls) == ["kernel", "pytorch"]  # both really ran, on the real op
    torch.testing.assert_close(outputs["kernel"], outputs["pytorch"], rtol=1e-4, atol=1e-5)
    d = autotune.decisions()[autotune.full_key("bn|4x16x6x6")]
    assert d.choice == expected and d.seconds == {"kernel": kernel_s, "pytorch": pytorch_s}
    # decided once: asking again neither times nor runs anything
    assert autotune.choose("bn|4x16x6x6", bn_candidates({}), scripted({}, calls)) == expected
    assert len(calls) == 2


def test_choose_needs_the_pytorch_baseline():
    with pytest.raises(LongtailError, match="lack 'pytorch'"):
        autotune.choose("k", {"kernel": lambda: None})


def test_wall_clock_timer_measures_real_work():
    x = torch.randn(256, 256)
    calls = {"slow": 0, "fast": 0}

    def slow():
        calls["slow"] += 1
        return [x @ x for _ in range(20)]

    def fast():
        calls["fast"] += 1
        return x @ x

    seconds = autotune.time_interleaved({"slow": slow, "fast": fast}, seconds=0.02)
    assert 0 < seconds["fast"] < seconds["slow"]
    assert calls["slow"] == calls["fast"] >= 4  # one warm-up, then in turn, at least 3 rounds


def test_decisions_persist_in_the_machine_cache_file(tmp_path, monkeypatch):
    calls: list[str] = []
    timer = scripted({"kernel": 2.0, "pytorch": 1.0}, calls)
    assert autotune.choose("bn|4x16x6x6", bn_candidates({}), timer) == "pytorch"
    path = autotune.cache_file()
    assert path.parent == tmp_path / "cache" / "kernels"
    assert path.name == f"autotune-{autotune.machine_id()}.json"
    saved = json.loads(path.read_text())
    assert saved[autotune.full_key("bn|4x16x6x6")]["seconds"] == {"kernel": 2.0, "pytorch": 1.0}
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp file left

    autotune.forget()  # a new process: the file answers, nothing is timed
    never = scripted({}, calls)
    assert autotune.choose("bn|4x16x6x6", bn_candidates({}), never) == "pytorch"
    assert len(calls) == 2

    # another torch version (or CPU, or kernel source) is another machine: decided again
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    autotune.machine_id.cache_clear()  # (computed once per process; a new process recomputes)
    assert autotune.cache_file() != path
    timer = scripted({"kernel": 1.0, "pytorch": 2.0}, calls)
    assert autotune.choose("bn|4x16x6x6", bn_candidates({}), timer) == "kernel"
    assert len(calls) == 4


def test_thread_count_is_part_of_the_key():
    n = torch.get_num_threads()
    calls: list[str] = []
    try:
        torch.set_num_threads(1)
        autotune.choose("k", bn_candidates({}), scripted({"kernel": 1.0, "pytorch": 2.0}, calls))
        torch.set_num_threads(2)
        autotune.choose("k", bn_candidates({}), scripted({"kernel": 2.0, "pytorch": 1.0}, calls))
    finally:
        torch.set_num_threads(n)
    table = autotune.decisions()
    assert table["k|threads=1"].choice == "kernel" and table["k|threads=2"].choice == "pytorch"


def test_a_damaged_cache_file_is_decided_again():
    path = autotune.cache_file()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    calls: list[str] = []
    timer = scripted({"kernel": 1.0, "pytorch": 2.0}, calls)
    assert autotune.choose("k", bn_candidates({}), timer) == "kernel"
    assert json.loads(path.read_text())[autotune.full_key("k")]["choice"] == "kernel"


def test_rank0_decisions_reach_every_rank(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = subprocess.run(
        [*cmd, str(HERE / "autotune_worker.py"), str(tmp_path)],
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rank0, rank1 = json.loads((tmp_path / "out.json").read_text())
    assert rank0["own"] == "kernel" and rank1["own"] == "pytorch"  # they measured differently
    assert rank0["after"] == rank1["after"] == "kernel"  # and both follow rank 0
    assert rank1["keys"] == rank0["keys"] and rank0["keys"]
    assert sorted(rank0["calls"]) == sorted(rank1["calls"]) == ["kernel", "pytorch"]


def _counting(monkeypatch) -> list[int]:
    """Counts calls of the fused kernel path (the real one still runs)."""
    calls: list[int] = []
    real = fused_bn._kernel_path

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(fused_bn, "_kernel_path", counted)
    return calls


@pytest.mark.parametrize("kernel_faster", [False, True])
def test_model_under_auto_uses_the_op_the_timer_ranks_first(monkeypatch, kernel_faster):
    """ResNet-32 with kernels=auto: every fused-BN shape is timed (real runs, injected
    seconds); the kernel runs only if it was ranked faster, and both give the same step."""
    assert fused_bn.load_kernel() is not None, "the fused BatchNorm kernel failed to build"
    calls = _counting(monkeypatch)
    timed: list[str] = []
    seconds = {"kernel": 1.0, "pytorch": 2.0} if kernel_faster else {"kernel": 2.0, "pytorch": 1.0}
    autotune.use_timer(scripted(seconds, timed))
    torch.manual_seed(0)
    model = build_model("resnet32", 10, kernels="auto").to(memory_format=CL).train()
    ref = copy.deepcopy(model)
    ref.kernels = "off"
    x = torch.randn(8, 3, 16, 16).contiguous(memory_format=CL)
    table = autotune.tune_model(model, x)
    bn_keys = [k for k in table if k.startswith("fused_bn|")]
    assert len(bn_keys) == 6  # 16/32/64 channels, with and without the residual
    assert {table[k].choice for k in bn_keys} == {"kernel" if kernel_faster else "pytorch"}
    step_keys = [k for k in table if k.startswith("step|")]
    assert len(step_keys) == (1 if kernel_faster else 0)  # the whole step checked too
    assert len(timed) == 2 * (len(bn_keys) + len(step_keys))
    assert not autotune.apply_step_verdict(model, table)
    calls.clear()
    for m in (model, ref):
        F.cross_entropy(m(x), torch.arange(8)).backward()
    assert (len(calls) == 31) if kernel_faster else not calls  # every BN layer, or none
    assert len(timed) == 2 * (len(bn_keys) + len(step_keys))  # decided once
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_a_step_slower_with_the_kernels_turns_them_off(monkeypatch):
    """Every pass timed faster in the kernel, but the whole step slower (as when two OpenMP
    runtimes take turns): the model ends with kernels off and runs PyTorch's ops only."""
    calls = _counting(monkeypatch)
    autotune.use_timer(scripted({"kernel": 1.0, "pytorch": 2.0, autotune.STEP: 3.0}, []))
    model = build_model("resnet32", 10, kernels="auto").to(memory_format=CL).train()
    x = torch.randn(8, 3, 16, 16).contiguous(memory_format=CL)
    table = autotune.tune_model(model, x)
    (step,) = [d for k, d in table.items() if k.startswith("step|")]
    assert step.choice == "pytorch" and step.seconds == {"kernels": 3.0, "pytorch": 2.0}
    assert any(d.choice == "kernel" for d in table.values())  # the passes alone did win
    assert autotune.apply_step_verdict(model, table) and model.kernels == "off"
    calls.clear()
    F.cross_entropy(model(x), torch.arange(8)).backward()
    assert not calls


def test_tune_model_leaves_the_model_untouched():
    autotune.use_timer(scripted({"kernel": 1.0, "pytorch": 2.0}, []))
    model = build_model("resnet32", 10).to(memory_format=CL).train()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=CL)
    rng = torch.get_rng_state()
    assert autotune.tune_model(model, x)  # decided something
    assert torch.equal(torch.get_rng_state(), rng)  # a cached decision must not change a run
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_nn_module_bn_is_not_timed_for_shapes_the_kernel_does_not_cover():
    calls: list[str] = []
    autotune.use_timer(scripted({}, calls))
    bn = nn.BatchNorm2d(8)  # channels not a multiple of 16
    fused_bn.bn_relu(bn, torch.randn(2, 8, 4, 4).contiguous(memory_format=CL))
    assert not calls and not autotune.used()


def test_stage1_records_the_choices_in_run_json(tmp_path):
    """A kernels=auto run decides (rank 0, one step of a copy) before training and writes every
    choice with both timings to run.json."""
    from longtail.config import load_config
    from longtail.core.rundir import RunDir
    from longtail.train.loop import Stage1

    autotune.use_timer(scripted({"kernel": 2.0, "pytorch": 1.0}, []))
    overrides = ["device=cpu", "precision=fp32", "optim.epochs=1", "swa.enabled=false"]
    stage = Stage1(load_config("digits_lt", [*overrides, "kernels=auto"]), tmp_path / "run")
    info = RunDir(tmp_path / "run").info()
    assert info["kernels"] == "auto"
    choices = info["kernel_choices"]
    assert choices and all(k.startswith("fused_bn|") for k in choices)
    want = {"choice": "pytorch", "seconds": {"kernel": 2.0, "pytorch": 1.0}, "noisy": False}
    assert all(v == want for v in choices.values())
    bs = stage.loaders["train"].batch_size
    assert all(f"|{bs}x" in k for k in choices)  # the real per-process batch shape


@pytest.mark.parametrize("kernel_faster", [False, True])
def test_torch_compile_sees_the_op_the_autotune_chose(kernel_faster):
    """Traced by torch.compile (dynamo), the model is one graph with no break, holding the fused
    BatchNorm custom op at every layer where the eager autotune chose it, and nowhere else."""
    assert fused_bn.load_kernel() is not None, "the fused BatchNorm kernel failed to build"
    seconds = {"kernel": 1.0, "pytorch": 2.0} if kernel_faster else {"kernel": 2.0, "pytorch": 1.0}
    autotune.use_timer(scripted(seconds, []))
    model = build_model("resnet32", 10, kernels="auto").to(memory_format=CL).train()
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=CL)
    autotune.tune_model(model, x)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    ops = [n for n in explained.graphs[0].graph.nodes if "bn_relu_forward" in str(n.target)]
    assert len(ops) == (31 if kernel_faster else 0)


def test_disturbed_timings_decide_this_run_only(tmp_path, monkeypatch):
    """Guards the decision cached forever from a busy spell: on 2026-12-03 a pass that takes
    4 ms was timed at 1,000 ms while another job had the cores, and that cached verdict kept the
    kernels off in every later run. Calls whose median is far above their fastest (here: every
    other call 10x slower, sleeps standing in for a contended core) decide in memory only; steady
    calls are written to the cache file."""
    autotune.use_timer(None)
    rounds = {"n": 0}

    def steady():
        time.sleep(0.02)

    def disturbed():
        rounds["n"] += 1
        time.sleep(0.02 if rounds["n"] % 2 else 0.2)

    noisy = autotune.choose("noisy|shape", {"kernel": steady, "pytorch": disturbed})
    assert noisy == "kernel"
    calm = autotune.choose("calm|shape", {"kernel": steady, "pytorch": steady})
    assert calm == "pytorch"  # a tie goes to PyTorch
    on_disk = json.loads(autotune.cache_file().read_text())
    assert [k.split("|")[0] for k in on_disk] == ["calm"]
    assert autotune.decisions()[autotune.full_key("noisy|shape")].noisy
    autotune.forget()  # a new process: the disturbed key is timed again, the steady one is not
    assert autotune.full_key("noisy|shape") not in autotune.decisions()

    def quick():
        time.sleep(0.002)

    assert autotune.choose("noisy|shape", {"kernel": steady, "pytorch": quick}) == "pytorch"
    assert autotune.choose("calm|shape", {"kernel": quick, "pytorch": steady}) == "pytorch"


def test_a_decided_shape_costs_no_timing_setup_per_call(monkeypatch):
    """Guards the per-call cost of kernels=auto that made the default lose to kernels=on by
    ~15 % of a training step (2026-12-03): every call re-read /proc/cpuinfo and hashed the kernel
    sources (machine_id), and the fused BatchNorm built its timing candidates (copies of the real
    tensors) before asking whether the shape was decided. Once decided, a call reads neither."""
    calls: list[str] = []
    autotune.use_timer(scripted({"kernel": 1.0, "pytorch": 2.0}, calls))
    bn = nn.BatchNorm2d(16).train()
    x = torch.randn(4, 16, 6, 6).contiguous(memory_format=CL).requires_grad_()
    fused_bn.bn_relu(bn, x).sum().backward()
    assert calls == ["kernel", "pytorch"]  # decided once, by the timer

    def no_timing(*_args, **_kwargs):
        raise AssertionError("a decided shape was timed or its candidates were built")

    monkeypatch.setattr(autotune, "choose", no_timing)
    monkeypatch.setattr(kernels, "cpu_flags", no_timing)
    monkeypatch.setattr(kernels, "cpu_model", no_timing)
    clones = []
    real_clone = torch.Tensor.clone
    monkeypatch.setattr(
        torch.Tensor, "clone", lambda t, *a, **k: clones.append(1) or real_clone(t, *a, **k)
    )
    for _ in range(3):
        fused_bn.bn_relu(bn, x).sum().backward()
    assert clones == []


def test_memo_recomputes_whenever_a_decision_or_the_cache_can_have_changed(tmp_path, monkeypatch):
    """The per-call routing memo (what made a decided convolution cost ~2 us instead of ~13 us)
    never serves a route that a later decision, install, forget, another cache folder or thread
    count would change, and steps aside while tune_model collects the keys a step meets."""
    computed: list[int] = []

    def route():
        computed.append(1)
        return autotune.cached("some|key")

    site = ("test", 1)
    assert autotune.memo(site, route) is None and autotune.memo(site, route) is None
    assert len(computed) == 1  # remembered
    autotune.use_timer(scripted({"kernel": 1.0, "pytorch": 2.0}, []))
    autotune.choose("some|key", {"kernel": lambda: None, "pytorch": lambda: None})
    assert autotune.memo(site, route) == "kernel" and len(computed) == 2  # a new decision
    key = autotune.full_key("some|key")
    autotune.install({key: autotune.Decision("pytorch", {"kernel": 2.0, "pytorch": 1.0})})
    assert autotune.memo(site, route) == "pytorch" and len(computed) == 3  # installed
    monkeypatch.setenv("LONGTAIL_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert autotune.memo(site, route) is None and len(computed) == 4  # another cache folder
    monkeypatch.setenv("LONGTAIL_CACHE_DIR", str(tmp_path / "cache"))
    # back: the file holds the timed decision (an install is this process's only)
    assert autotune.memo(site, route) == "kernel" and len(computed) == 5
    autotune.forget()
    assert autotune.memo(site, route) == "kernel" and len(computed) == 6  # reread
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert autotune.memo(site, route) is None and len(computed) == 7  # undecided there
    finally:
        torch.set_num_threads(threads)
    model = build_model("resnet32", 10, kernels="auto").to(memory_format=CL).train()
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=CL)
    first = autotune.tune_model(model, x)
    F.cross_entropy(model(x), torch.arange(4)).backward()  # every route now remembered
    again = autotune.tune_model(model, x)  # as a second run of one `sweep` process does
    bn_keys = {k for k in first if k.startswith("fused_bn|")}
    assert bn_keys and bn_keys <= set(again)  # the recorder still saw every key of the step
    n = len(computed)
    assert autotune.memo(site, route) == "kernel" and autotune.memo(site, route) == "kernel"
    assert len(computed) in (n, n + 1)  # tune_model's decisions may start one recompute


def test_a_shape_decided_again_is_routed_by_the_new_decision(monkeypatch):
    """bn_relu remembers its route per shape; installing rank 0's contrary decision for that
    shape (as DDP workers do) takes effect on the very next call."""
    calls = _counting(monkeypatch)
    autotune.use_timer(scripted({"kernel": 2.0, "pytorch": 1.0}, []))
    bn = nn.BatchNorm2d(16).train()
    x = torch.randn(4, 16, 6, 6).contiguous(memory_format=CL).requires_grad_()
    for _ in range(2):
        fused_bn.bn_relu(bn, x).sum().backward()
    assert calls == []  # decided for PyTorch, remembered
    (key,) = [k for k in autotune.decisions() if k.startswith("fused_bn|")]
    autotune.install({key: autotune.Decision("kernel", {"kernel": 1.0, "pytorch": 2.0})})
    fused_bn.bn_relu(bn, x).sum().backward()
    assert calls == [1]


def test_the_whole_step_is_timed_with_the_routes_remembered():
    """tune_model collects keys with the memo aside, but times the whole step as training runs
    it, routes remembered: otherwise the step with the kernels would pay a per-call look-up
    that training does not, and the check would lean towards PyTorch."""
    seen: dict[str, int] = {}

    def timer(name, fn):
        fn()
        seen[name] = autotune._collecting
        return {"kernel": 1.0, "pytorch": 2.0, autotune.STEP: 1.0}[name]

    autotune.use_timer(timer)
    model = build_model("resnet32", 10, kernels="auto").to(memory_format=CL).train()
    table = autotune.tune_model(model, torch.randn(4, 3, 8, 8).contiguous(memory_format=CL))
    assert any(k.startswith("step|") for k in table)
    assert seen[autotune.STEP] == 0 and autotune._collecting == 0


def test_a_bf16_step_and_an_fp32_step_are_decided_apart():
    """The whole-step check's key names the autocast dtype. Guards: it read ``autocast=1`` for
    any context manager, so a bf16 run's verdict (cached per machine) served later fp32 runs."""

    def timer(name, fn):
        fn()
        return {"kernel": 1.0, "pytorch": 2.0, autotune.STEP: 1.0}[name]

    autotune.use_timer(timer)
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=CL)
    keys = []
    for autocast in (nullcontext(), torch.autocast("cpu", dtype=torch.bfloat16)):
        model = build_model("resnet32", 10, kernels="auto").to(memory_format=CL).train()
        table = autotune.tune_model(model, x, autocast)
        keys += [k for k in table if k.startswith("step|")]
    assert len(keys) == 2, keys
    assert "|autocast=off|" in keys[0] and "|autocast=bfloat16|" in keys[1]
