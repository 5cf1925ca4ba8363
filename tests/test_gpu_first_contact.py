"""A study on a CUDA machine, proved on CPU: no fork after CUDA, one GPU a run, FlashAttention
only where it runs, fp16 loss scaling, loading in the run's precision, GPU memory, GPU-shaped
steps, a packing check that cannot pass by cancellation, Liger only where it patches.

GPUs are faked: `gpus.facts_at_start` (what `Machine.here()` reads) and `gpus.count` are
replaced, or, in a child process, torch.cuda itself (tests/fakecuda/sitecustomize.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import ALPACA_HEAD, DIALOGPT, tiny_model

from loraplace.config import StudyConfig
from loraplace.core.errors import UserError
from loraplace.fast import gpus, hardware
from loraplace.fast.hardware import Machine, pick_attention, pick_precision, resolve_paths
from loraplace.plan.memory import CUDA_CONTEXT_MB, run_memory
from loraplace.study import local, worker
from loraplace.study.prepare import Prepared
from loraplace.study.spec import RunSpec

FAKE_CUDA = Path(__file__).parent / "fakecuda"
H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture
def gpu_host(monkeypatch):
    """fake(n, ...): this process sees `n` GPUs (as Machine.here() reads them)."""

    def fake(n=8, capability=(9, 0), total_mb=81_559.0, free_mb=80_000.0, flash=None, name=H100):
        found = [
            {"id": str(i), "name": name, "capability": list(capability), "total_mb": total_mb,
             "free_mb": free_mb}
            for i in range(n)
        ]  # fmt: skip
        facts = {"gpus": found, "flash_attn": flash or {}}
        monkeypatch.setattr(gpus, "facts_at_start", lambda: facts)
        monkeypatch.setattr(gpus, "count", lambda: n)
        hardware._here.cache_clear()
        return facts

    yield fake
    hardware._here.cache_clear()


# --- 1. no CUDA before a fork ----------------------------------------------------------------


def _preload_in_child(env: dict) -> dict:
    """Import what the fork server imports, in a child process whose torch believes it has 8
    GPUs (and records whether anything initialised CUDA)."""
    code = (
        "import json, torch\n"
        "from loraplace.core.quiet import quiet_libraries\n"
        "quiet_libraries()\n"
        "from loraplace.train import server\n"
        "try:\n"
        "    server._preload()\n"
        "    error = None\n"
        "except Exception as err:  # bitsandbytes' CUDA part cannot load on a CPU build\n"
        "    error = type(err).__name__\n"
        "print(json.dumps({'initialized': torch.cuda.is_initialized(), 'error': error}))\n"
    )
    path = os.pathsep.join([str(FAKE_CUDA), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env | {"PYTHONPATH": path}, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_fork_servers_preload_initialises_no_cuda_since_the_server_sees_no_gpu():
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    served = _preload_in_child(env | worker.HIDE_GPUS)  # as Worker starts the server
    assert served == {"initialized": False, "error": None}
    if importlib.util.find_spec("bitsandbytes"):
        # the fake can tell: with the GPUs visible, PEFT's import of bitsandbytes queries them
        assert _preload_in_child(env)["initialized"] is True


def test_the_server_is_started_without_gpus_and_serves_cpu_runs_only(monkeypatch):
    started = {}

    class Popen:
        def __init__(self, cmd, **kwargs):
            started.update(kwargs)
            raise OSError("not started in this test")

    monkeypatch.setattr(worker.subprocess, "Popen", Popen)
    with pytest.raises(OSError):
        worker.Worker()
    assert started["env"]["CUDA_VISIBLE_DEVICES"] == ""
    assert worker.uses_worker(True, "cpu") == worker.peak_memory_restartable()
    assert not worker.uses_worker(True, "cuda") and not worker.uses_worker(True, "mps")


def _fake_runs(monkeypatch, seconds: float = 0.0) -> list[dict]:
    """Every run a subprocess that only records its command and environment and writes an ok
    result; the fork server may not be used."""
    calls, lock = [], threading.Lock()

    def run(cmd, env=None, **kwargs):
        spec_path = Path(cmd[-1])
        call = {"cmd": cmd, "env": env, "start": time.perf_counter()}
        with lock:
            calls.append(call)
        time.sleep(seconds)
        spec = json.loads(spec_path.read_text())
        result = {"status": "ok", "strategy": spec["strategy"]["name"], "seed": spec["seed"]}
        (spec_path.parent / "result.json").write_text(json.dumps(result))
        call["end"] = time.perf_counter()
        return subprocess.CompletedProcess(cmd, 0)

    def no_worker(*args, **kwargs):
        raise AssertionError("a CUDA run went to the fork server")

    monkeypatch.setattr(worker.subprocess, "run", run)
    monkeypatch.setattr(worker, "Worker", no_worker)
    return calls


def _specs(tmp_path: Path, n: int, device: str = "cuda") -> list[RunSpec]:
    from loraplace.fast.hardware import Paths
    from loraplace.plan.placement import AdapterPlan
    from loraplace.plan.strategies import BUILTINS

    paths = Paths(device, False, False, False, False, "float32", "bf16")
    plan = AdapterPlan({}, 0, {})
    return [
        RunSpec(StudyConfig(), replace(BUILTINS["full"], name=f"s{i}"), 1, plan, paths,
                str(tmp_path / f"s{i}" / "seed-1"), {})
        for i in range(n)
    ]  # fmt: skip


def test_a_cuda_study_starts_every_run_in_a_fresh_process(monkeypatch, tmp_path):
    calls = _fake_runs(monkeypatch)
    cfg = StudyConfig(reuse_process=True)
    local.run_local(
        _specs(tmp_path, 2), cfg, tmp_path, lambda _: None, local.Schedule(1, gpus=("0",))
    )
    assert len(calls) == 2
    for call in calls:
        assert call["cmd"][1:3] == ["-m", "loraplace.train.run"]


# --- 2. one GPU a run -------------------------------------------------------------------------


def _prepared(device="cuda", need_mb=10_000.0):
    from loraplace.fast.hardware import Paths
    from loraplace.plan.memory import RunMemory

    paths = Paths(device, False, False, False, False, "float32", "bf16")
    return Prepared([], paths, {}, {}, ((), None), 500.0,
                    RunMemory(need_mb - CUDA_CONTEXT_MB, 0.0, 0.0, reserve=1.0))  # fmt: skip


def test_on_an_eight_gpu_host_each_run_gets_its_own_gpu_and_all_eight_work(
    gpu_host, monkeypatch, tmp_path
):
    gpu_host(8)
    schedule = local.local_plan(StudyConfig(), 16, _prepared())
    assert schedule.at_once == 8 and schedule.gpus == tuple(str(i) for i in range(8))
    calls = _fake_runs(monkeypatch, seconds=0.2)
    local.run_local(_specs(tmp_path, 16), StudyConfig(), tmp_path, lambda _: None, schedule)
    seen = [c["env"]["CUDA_VISIBLE_DEVICES"] for c in calls]
    assert all(len(s.split(",")) == 1 for s in seen)  # one GPU a run: no DataParallel
    assert sorted(seen) == sorted([str(i) for i in range(8)] * 2)
    for a in calls:  # runs going at the same time are never on the same GPU
        beside = [
            b for b in calls if b is not a and b["start"] < a["end"] and a["start"] < b["end"]
        ]
        assert a["env"]["CUDA_VISIBLE_DEVICES"] not in {
            b["env"]["CUDA_VISIBLE_DEVICES"] for b in beside
        }
    spec = json.loads((tmp_path / "s0" / "seed-1" / "spec.json").read_text())
    assert spec["gpu"] in {str(i) for i in range(8)} and spec["runs_at_once"] == 8


def test_several_runs_share_a_gpu_only_when_asked_and_the_users_gpu_list_is_kept(
    gpu_host, monkeypatch
):
    gpu_host(2)
    monkeypatch.setattr(gpus, "facts_at_start", lambda: {
        "gpus": [{"id": i, "name": H100, "capability": [9, 0], "total_mb": 8e4, "free_mb": 8e4}
                 for i in ("3", "5")], "flash_attn": {}})  # fmt: skip
    hardware._here.cache_clear()
    assert local.local_plan(StudyConfig(), 5, _prepared()).gpus == ("3", "5")
    two = local.local_plan(StudyConfig(runs_per_device="2"), 5, _prepared())
    assert (two.at_once, two.gpus) == (4, ("3", "5", "3", "5"))


def test_a_run_pins_one_gpu_before_cuda_starts(monkeypatch):
    from loraplace.train.run import pin_one_gpu

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    pin_one_gpu(None)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    pin_one_gpu(None)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4"
    pin_one_gpu("6")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "6"


@pytest.mark.slow
def test_a_run_that_sees_several_gpus_refuses_to_train_with_a_changed_batch(
    tiny_gpt2_dir, tmp_path, monkeypatch
):
    from transformers import TrainingArguments

    from loraplace.study.prepare import spec_for
    from loraplace.train import run as train

    cfg = StudyConfig(model=str(tiny_gpt2_dir), data=str(ALPACA_HEAD), train_split="train[:4]",
                      eval_split="train[100:102]", epochs=1, max_length=32, generations=0, loss_on="all",
                      strategies=["full"])  # fmt: skip
    spec = spec_for(cfg, "full", 1, tmp_path / "run")
    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 8))
    with pytest.raises(RuntimeError, match="sees 8 GPUs; a run trains on one"):
        train.train_run(spec)


# --- 3. FlashAttention only where it runs ------------------------------------------------------


def test_flash_attention_only_in_16_bits_and_where_it_imports(gpu_host):
    gpu_host(1, flash={"version": "2.8.3"})
    flash = Machine.here()
    assert pick_attention("auto", "cuda", flash, "bf16") == ("flash_attention_2", "")
    kernel, why = pick_attention("auto", "cuda", flash, "float32")
    assert kernel == "sdpa" and "only in bf16 or fp16" in why
    with pytest.raises(
        UserError, match="flash_attention_2 cannot run here: FlashAttention computes only"
    ):
        resolve_paths(
            "cuda", None, None, "auto", flash, precision="float32", attention="flash_attention_2"
        )
    broken = Machine(devices=("cpu", "cuda"), gpu_bf16=True,
                     flash_attn={"error": "ImportError: undefined symbol: _ZN3c10"})  # fmt: skip
    paths = resolve_paths("cuda", None, None, "auto", broken)
    assert paths.attention == "sdpa" and "does not import against this torch" in paths.attention_why
    with pytest.raises(UserError, match="undefined symbol"):
        pick_attention("flash_attention_2", "cuda", broken, "bf16")
    assert "not installed" in pick_attention("auto", "cuda", Machine(devices=("cpu", "cuda")))[1]


def test_flash_attn_that_does_not_import_against_this_torch_is_told_apart(tmp_path, monkeypatch):
    package = tmp_path / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text(
        "raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("flash_attn", None)
    status = gpus.flash_attn_status()
    assert "undefined symbol" in status["error"] and "version" not in status
    (package / "__init__.py").write_text("__version__ = '2.8.3'\ndef flash_attn_func(): pass\n")
    sys.modules.pop("flash_attn", None)
    assert gpus.flash_attn_status() == {"version": "2.8.3"}
    sys.modules.pop("flash_attn", None)


# --- 4. fp16 that survives loss scaling ---------------------------------------------------------


def test_auto_precision_takes_native_bf16_only(gpu_host):
    gpu_host(1, capability=(7, 5), name="Tesla T4")  # emulates bf16: fp16 with loss scaling
    assert pick_precision("auto", "cuda", Machine.here()) == "fp16"
    gpu_host(1, capability=(8, 0), name="A100")
    assert pick_precision("auto", "cuda", Machine.here()) == "bf16"


class _State:
    global_step, epoch, max_steps = 7, 0.5, 20


def _log(guard, **logs):
    guard.on_log(None, _State(), None, logs=logs)


def test_an_fp16_overflow_step_is_the_scalers_to_skip_but_a_diverged_run_still_fails():
    from loraplace.train.trainer import recorder

    guard = recorder(lambda: [], {"train": [], "eval": []}, each_step=False)
    scale = [32768.0]
    guard.loss_scale = lambda: scale[0]
    _log(guard, loss=2.1, grad_norm=float("inf"))  # skipped by the scaler, the run goes on
    scale[0] = 0.25  # overflow at every step: the scale halved 17 times
    with pytest.raises(FloatingPointError, match="fp16 gradients overflow at every step"):
        _log(guard, loss=2.1, grad_norm=float("inf"))
    with pytest.raises(FloatingPointError, match="train loss became nan"):
        _log(guard, loss=float("nan"), grad_norm=1.0)
    bf16 = recorder(lambda: [], {"train": [], "eval": []}, each_step=False)  # no scaler
    with pytest.raises(FloatingPointError, match="non-finite gradient at step 7"):
        _log(bf16, loss=2.1, grad_norm=float("nan"))


def test_on_a_gpu_the_guard_reads_no_gradient_at_each_step():
    from loraplace.train.trainer import recorder

    class Untouchable(torch.nn.Module):
        def parameters(self, *args, **kwargs):
            raise AssertionError("the gradients were read back at a step")

    guard = recorder(lambda: [], {"train": [], "eval": []}, each_step=False)
    guard.on_pre_optimizer_step(None, _State(), None, model=Untouchable())
    cpu = recorder(lambda: [], {"train": [], "eval": []}, each_step=True)
    with pytest.raises(AssertionError, match="read back"):
        cpu.on_pre_optimizer_step(None, _State(), None, model=Untouchable())


# --- 5. load in the run's precision; memory ------------------------------------------------------


def test_a_base_loads_straight_in_the_runs_precision_and_onto_its_device(
    monkeypatch, tiny_gpt2_dir
):
    from transformers import AutoModelForCausalLM

    from loraplace.plan.models import resolve_model
    from loraplace.train import load

    asked = []

    def from_pretrained(path, **kwargs):
        asked.append(kwargs)
        return tiny_model("llama").to(kwargs["dtype"])

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    model, _ = load.load_model(resolve_model(str(tiny_gpt2_dir)), torch.bfloat16, "none", "cuda",
                               "sdpa")  # fmt: skip
    assert asked[-1]["dtype"] == torch.bfloat16 and asked[-1]["device_map"] == {"": "cuda"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # never 4 bytes a weight
    load.load_model(resolve_model(str(tiny_gpt2_dir)), torch.float32, "none", "cpu")
    assert "device_map" not in asked[-1]  # the CPU path as it was


def test_plan_states_what_a_gpu_run_needs(capsys):
    from loraplace.cli import main

    assert main(["plan", "--model", str(DIALOGPT), "--strategy", "full"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("a GPU run"))
    assert "1,024 tokens a step" in line and "CUDA context 768" in line and "allocator" in line


def test_a_base_that_cannot_fit_the_gpu_is_one_sentence_before_anything_is_written(
    gpu_host, capsys, tmp_path
):
    from loraplace.cli import main

    gpu_host(1, total_mb=1_000.0, free_mb=1_000.0, name="Small GPU")
    out = tmp_path / "out"
    code = main(["study", "--model", str(DIALOGPT), "--data", str(ALPACA_HEAD), "--strategy",
                 "full", "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "the base's weights need 677 MB in bf16" in err
    assert "the GPU Small GPU has 1,000 MB" in err and "Traceback" not in err
    assert not out.exists()


def test_the_memory_estimate_counts_each_process_context_and_the_allocator_reserve():
    from loraplace.plan.memory import Shape

    shape = Shape(base_params=10**9, linear_params=8 * 10**8, n_layers=16, hidden=2048,
                  intermediate=8192, vocab=128_256)  # fmt: skip
    need = run_memory(shape, 10**7, 1024, "bf16")
    assert need.weights_mb == pytest.approx(10**9 * 2 / 2**20)
    assert need.total_mb == pytest.approx(
        need.weights_mb + (need.adapters_mb + need.activations_mb) * need.reserve + CUDA_CONTEXT_MB
    )
    nf4 = 0.5 + 1 / 64 + 4 / (64 * 256)  # bytes a weight, double quantization included
    four_bit = run_memory(shape, 10**7, 1024, "bf16", "4bit").weights_mb
    assert four_bit == pytest.approx((8 * 10**8 * nf4 + 2 * 10**8 * 2) / 2**20)


# --- 6. runs at once on one GPU that compare ------------------------------------------------------


def test_auto_runs_as_many_as_fit_on_each_gpu_from_the_first_round_on(gpu_host):
    gpu_host(1, free_mb=80_000.0)
    schedule = local.local_plan(StudyConfig(runs_per_device="auto"), 12, _prepared(need_mb=10_000))
    assert schedule.at_once == 7 and schedule.gpus == ("0",) * 7  # 0.9 x 80 GB / 10 GB
    assert local.gpu_runs_that_fit(80_000.0, 50_000.0) == 1
    assert local.gpu_runs_that_fit(80_000.0, 1.0) == 8  # at most eight


def test_ray_says_what_a_runs_share_of_a_gpu_must_hold():
    from loraplace.plan.memory import RunMemory
    from loraplace.study.ray import gpu_share_note

    need = RunMemory(3000.0, 100.0, 2000.0)
    note = gpu_share_note(0.25, need)
    assert f"{need.total_mb:,.0f} MB" in note and "0.25 of a GPU" in note
    assert f"{4 * need.total_mb:,.0f} MB" in note  # the GPU it takes to hold four
    assert gpu_share_note(1.0, need) is None


# --- 7. GPU-shaped steps ------------------------------------------------------------------------


def test_on_a_gpu_a_step_is_one_packed_row_and_the_loss_is_read_once_per_log():
    from loraplace.data.rows import PackedCollator
    from loraplace.train.fastpaths import pack_rows
    from loraplace.train.trainer import logging_steps

    cfg = StudyConfig(max_length=256, batch_size=1, grad_accum=4)
    assert pack_rows(cfg, "cpu") == 384 and pack_rows(cfg, "cuda") == 1024
    examples = _examples((250, 240, 200, 230))
    assert len(PackedCollator(pack_rows(cfg, "cuda"))(examples)["chunks"]) == 1
    batch = PackedCollator(pack_rows(cfg, "cpu"))(examples)
    counted = [int((c["labels"][..., 1:] != -100).sum()) for c in batch["chunks"]]
    assert batch["targets"] == counted and all(isinstance(n, int) for n in batch["targets"])
    assert logging_steps("cpu", 75) == 1 and logging_steps("cuda", 500) == 10


def _examples(lengths):
    from loraplace.data.rows import IGNORE, Example

    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 120, (n,), generator=gen).tolist() for n in lengths]
    return [Example(ids, [IGNORE] + ids[1:]) for ids in rows]


# --- 8. a packing check that cannot fail silently -------------------------------------------------


class _Cancelling(torch.nn.Module):
    """A model whose packed row gives every example's tokens the right losses in total but not
    one by one: the first example's tokens lose what the second's gain."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_model("llama")
        self.config = self.inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None, **kwargs):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, labels=labels, **kwargs)  # fmt: skip
        if input_ids.shape[1] > 20:  # the packed row: shift probability between two tokens
            out.logits[0, 2, input_ids[0, 3]] += 3.0
            out.logits[0, 12, input_ids[0, 13]] -= 3.0
        return out


def test_the_packing_check_compares_every_token_so_differences_cannot_cancel():
    from loraplace.data.rows import packing_is_exact, packing_token_deltas

    model = _Cancelling()
    deltas = packing_token_deltas(model)
    assert abs(float(deltas.sum())) < 0.5 * float(deltas.abs().max())  # a sum would hide it
    assert not packing_is_exact(model, tolerance=1e-3)
    assert packing_is_exact(model.inner, tolerance=1e-3)


def test_the_checks_cache_names_the_gpus_and_kernels_and_never_keeps_a_check_that_raised(
    gpu_host, tmp_path, monkeypatch
):
    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path))
    asked = []

    def check(model, device):
        asked.append(device)
        return True

    model = tiny_model("llama")
    gpu_host(1, name="NVIDIA H100 80GB HBM3")
    assert hardware.remembered_check("probe", model, "cpu", check)
    assert hardware.remembered_check("probe", model, "cpu", check)
    gpu_host(1, name="NVIDIA H200")  # another GPU: asked again
    assert hardware.remembered_check("probe", model, "cpu", check)
    assert len(asked) == 2
    monkeypatch.setattr(hardware, "_versions", lambda names: {"flash_attn": "2.8.3"})
    assert hardware.remembered_check("probe", model, "cpu", check)  # another flash-attn
    assert len(asked) == 3

    def raising(model, device):
        asked.append("raised")
        raise RuntimeError("CUDA out of memory")

    for _ in range(2):  # never remembered as "not exact": asked again each time
        with pytest.raises(RuntimeError):
            hardware.remembered_check("flaky", model, "cpu", raising)
    assert asked.count("raised") == 2


def test_a_run_whose_check_raised_falls_back_for_itself_and_says_why(monkeypatch):
    from loraplace.train import fastpaths

    def raising(*args):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    notes = fastpaths.Notes()
    monkeypatch.setattr(fastpaths, "remembered_check", raising)
    assert fastpaths.checked(notes, "packing", "packing", None, "cuda", None) is None
    assert notes == [{"switch": "packing", "why": "its start-of-run check raised RuntimeError: "
                      "CUDA out of memory. Tried to allocate 2.00 GiB"}]  # fmt: skip


# --- 9. Liger only where it applies ---------------------------------------------------------------


def test_liger_is_taken_only_for_architectures_it_patches(monkeypatch):
    import types

    from loraplace.train.fastpaths import liger_applies

    patch = types.ModuleType("liger_kernel.transformers.monkey_patch")
    patch.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": None, "mistral": None}
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, patch.__name__, patch)
    assert liger_applies(tiny_model("llama")) and not liger_applies(tiny_model("gpt2"))
