"""What `auto` picks on which CPU, and what an impossible explicit setting gets: one sentence."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ALPACA_HEAD, tiny_model

from loraplace.core.errors import UserError
from loraplace.fast import hardware
from loraplace.fast.hardware import Machine, choose_libraries, cpu_info, resolve_paths

# Excerpts of /proc/cpuinfo from real CPUs (model name and the SIMD part of the flags).
CPUINFO = {
    "epyc-zen3-avx2": "model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse sse2 ssse3 fma sse4_1 "
    "sse4_2 avx f16c avx2 bmi2 sha_ni vaes vpclmulqdq\n",
    "epyc-zen4-bf16": "model name\t: AMD EPYC 9B14\nflags\t\t: fpu sse2 fma avx avx2 avx512f "
    "avx512dq avx512cd avx512bw avx512vl avx512_bf16 avx512_vnni avx512_vbmi2\n",
    "sapphire-rapids-amx": "model name\t: Intel(R) Xeon(R) Platinum 8481C\nflags\t\t: fpu avx "
    "avx2 fma avx512f avx512bw avx512vl avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8\n",
    "skylake-avx512": "model name\t: Intel(R) Xeon(R) Platinum 8175M CPU @ 2.50GHz\nflags\t\t: "
    "fpu avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl\n",
    "graviton3-arm": "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd evtstrm aes "
    "pmull sha1 sha2 crc32 atomics asimdrdm sve asimdfhm bf16 i8mm svebf16\nCPU part\t: 0xd40\n",
}


def machine(kind: str, onednn: bool = True, runs_bf16: bool | None = None, devices=("cpu",)):
    """A machine with this CPU's flags; whether oneDNN built a bfloat16 product there, as
    oneDNN does on x86 with AVX-512 (natively with BF16, emulated without) and not below."""
    name, flags = cpu_info(CPUINFO[kind])
    if runs_bf16 is None:
        runs_bf16 = "avx512f" in flags
    return Machine(name, flags, onednn, onednn and runs_bf16, tuple(devices))


def test_cpuinfo_is_read_on_x86_and_arm():
    name, flags = cpu_info(CPUINFO["epyc-zen4-bf16"])
    assert name == "AMD EPYC 9B14" and {"avx2", "avx512_bf16"} <= flags
    name, flags = cpu_info(CPUINFO["graviton3-arm"])
    assert name == "0xd40" and "asimd" in flags
    assert cpu_info("")[1] == frozenset()


# (CPU, what auto takes for the frozen products)
AUTO = [
    ("epyc-zen3-avx2", "float32"),  # no bfloat16 instructions: oneDNN refuses the product
    ("epyc-zen4-bf16", "bfloat16"),
    ("sapphire-rapids-amx", "bfloat16"),
    ("skylake-avx512", "float32"),  # oneDNN emulates bfloat16 there: it runs, but not faster
    ("graviton3-arm", "float32"),
]


@pytest.mark.parametrize("kind,dtype", AUTO)
def test_auto_products_follow_the_cpu(kind, dtype):
    paths = resolve_paths("auto", None, None, "auto", machine(kind))
    assert paths.product_dtype == dtype and paths.device == "cpu"
    assert paths.onednn and paths.onednn_measured and paths.onednn_head_measured


@pytest.mark.parametrize("kind", [k for k, _ in AUTO])
def test_auto_never_takes_a_path_the_machine_cannot_run(kind):
    no_onednn = resolve_paths("auto", None, None, "auto", machine(kind, onednn=False))
    assert no_onednn.product_dtype == "float32" and not no_onednn.onednn
    gpu = resolve_paths("auto", None, None, "auto", machine(kind, devices=("cpu", "cuda")))
    assert gpu.device == "cuda" and gpu.product_dtype == "float32" and not gpu.onednn


@pytest.mark.parametrize("kind", ["epyc-zen3-avx2", "graviton3-arm"])
def test_explicit_bfloat16_where_it_cannot_run_is_refused(kind):
    with pytest.raises(UserError, match="cannot multiply bfloat16 through oneDNN"):
        resolve_paths("auto", None, None, "bfloat16", machine(kind))


def test_explicit_settings_are_never_silently_replaced():
    bf16 = machine("epyc-zen4-bf16", devices=("cpu", "cuda"))
    with pytest.raises(UserError, match="bfloat16 is a CPU path"):
        resolve_paths("cuda", None, None, "bfloat16", bf16)
    with pytest.raises(UserError, match="runs through oneDNN, which is off"):
        resolve_paths("cpu", False, None, "bfloat16", bf16)
    with pytest.raises(UserError, match="no oneDNN"):
        resolve_paths("cpu", True, None, "auto", machine("epyc-zen3-avx2", onednn=False))
    with pytest.raises(UserError, match="device 'cuda' was asked for"):
        resolve_paths("cuda", None, None, "auto", machine("epyc-zen3-avx2"))
    explicit = resolve_paths("cpu", True, False, "bfloat16", machine("skylake-avx512"))
    assert explicit.product_dtype == "bfloat16"  # it runs there: asked for, so taken
    assert explicit.onednn and not explicit.onednn_measured and not explicit.onednn_head


def test_the_faster_library_wins_each_shape_by_a_margin():
    timings = {
        "576x576": {"forward": [1.0, 0.80], "input_grad": [1.0, 0.97]},  # 3 %: within noise
        "1536x576": {"forward": [1.0, 1.30], "input_grad": [1.0, 0.50]},
    }
    assert choose_libraries(timings) == {"576x576": [True, False], "1536x576": [False, True]}


def test_product_table_is_measured_once_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path))
    first = hardware.product_table([(16, 8), (8, 16), (16, 8)], rows=4, reps=1)
    assert set(first) == {"16x8", "8x16"}
    assert all(len(pair) == 2 and all(isinstance(b, bool) for b in pair) for pair in first.values())
    monkeypatch.setattr(hardware, "_time_products", lambda *a: pytest.fail("measured again"))
    assert hardware.product_table([(8, 16), (16, 8)], rows=4) == first
    other_rows = tmp_path / "products"
    assert len(list(other_rows.iterdir())) == 1


def test_a_measured_table_sends_each_direction_to_its_library():
    from loraplace.fast.kernels import accelerate, onednn_available

    if not onednn_available():
        pytest.skip("torch here has no oneDNN")
    layer = torch.nn.Linear(8, 16, bias=False).requires_grad_(False)
    model = torch.nn.Sequential(layer)
    taken = accelerate(model, fused_lora=False, onednn=True, table={"16x8": [False, True]})
    assert taken["onednn_frozen"] == 1 and layer._onednn == (False, True)
    x = torch.randn(5, 8, requires_grad=True)
    y = model(x)
    torch.testing.assert_close(y, x @ layer.weight.t())
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, torch.ones(5, 16) @ layer.weight)


def test_the_isa_cap_hides_bfloat16_from_the_probe():
    """ONEDNN_MAX_CPU_ISA=AVX2 is how the suite sees an AVX2-only CPU on an AVX-512 one: under
    it oneDNN must refuse bfloat16 products, so `auto` and the tests take the float32 path."""
    code = "from loraplace.fast.hardware import Machine; m = Machine.here(); print(m.bf16_products)"
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_assumed_flags_choose_as_that_cpu_would_and_only_where_the_library_runs():
    """LORAPLACE_ASSUME_CPU_FLAGS=avx512_bf16 is how the suite sees an AVX-512 BF16 CPU's
    defaults on another one: `auto` takes bfloat16 where oneDNN builds the product, the machine
    says it was assumed (so caches and results keep it apart), and under an AVX2 cap it still
    takes float32 instead of a product that would fail."""
    code = (
        "from loraplace.fast.hardware import Machine, resolve_paths; m = Machine.here(); "
        "print(resolve_paths('auto', None, None, 'auto', m).product_dtype, m.bf16_products, "
        "'|', m.describe())"
    )
    for cap in ({}, {"ONEDNN_MAX_CPU_ISA": "AVX2"}):
        env = dict(os.environ, LORAPLACE_ASSUME_CPU_FLAGS="avx512_bf16", **cap)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        chosen, described = out.stdout.strip().split(" | ")
        assert "avx512_bf16" in described and "LORAPLACE_ASSUME_CPU_FLAGS" in described
        # the probe decides: bfloat16 wherever oneDNN builds the product, never under the cap
        assert chosen in ("bfloat16 True", "float32 False"), (cap, chosen)
        assert not cap or chosen == "float32 False"


def _study(capsys, model_dir, out, *extra) -> tuple[int, str]:
    from loraplace.cli import main

    argv = ["study", "--model", str(model_dir), "--data", str(ALPACA_HEAD), "--train-split",
            "train[:4]", "--eval-split", "train[100:102]", "--epochs", "1", "--strategy",
            "full", "--set", "max_length=32", "--set", "loss_on=all", "--set", "generations=0", "--out", str(out),
            *extra]  # fmt: skip
    code = main(argv)
    return code, capsys.readouterr().err


REFUSED = [
    (["--set", "device=cuda"], "device 'cuda' was asked for"),
    (["--set", "device=mps"], "device 'mps' was asked for"),
    (["--set", "product_dtype=bfloat16"], "cannot multiply bfloat16"),
    (["--set", "product_dtype=bfloat16", "--set", "onednn=false"], "oneDNN, which is off"),
]


@pytest.mark.parametrize("extra,message", REFUSED)
def test_settings_the_hardware_cannot_run_end_in_one_sentence(
    capsys, tiny_gpt2_dir, tmp_path, monkeypatch, extra, message
):
    """On an AVX2-only CPU without a GPU, whatever CPU the test runs on; OUT stays untouched."""
    fake = machine("epyc-zen3-avx2", onednn=True, runs_bf16=False)
    monkeypatch.setattr(Machine, "here", staticmethod(lambda: fake))
    out = tmp_path / "out"
    code, err = _study(capsys, tiny_gpt2_dir, out, *extra)
    assert code == 2 and message in err, err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not out.exists()


def test_a_run_records_resolved_paths_and_is_redone_where_they_differ(
    capsys, tiny_gpt2_dir, tmp_path
):
    out = tmp_path / "out"
    code, err = _study(capsys, tiny_gpt2_dir, out)
    assert code == 0, err
    path = out / "runs/full/seed-42/result.json"
    result = json.loads(path.read_text())
    assert result["config"]["product_dtype"] == "auto"
    assert result["paths"]["product_dtype"] in ("float32", "bfloat16")  # resolved, never auto
    assert result["paths"]["product_dtype"] == result["product_dtype"]
    assert isinstance(result["phases_s"]["load"], float)
    # as if made on a CPU that took the other dtype: this machine redoes it
    other = "float32" if result["paths"]["product_dtype"] == "bfloat16" else "bfloat16"
    result["paths"]["product_dtype"] = other
    path.write_text(json.dumps(result))
    code, err = _study(capsys, tiny_gpt2_dir, out)
    assert code == 0, err
    assert json.loads(path.read_text())["paths"]["product_dtype"] != other


def _never_exact(model, device="cpu", tolerance=1e-4, segments=False, form="mask"):
    return False


def test_a_path_that_fails_its_check_falls_back_and_says_so(
    tiny_gpt2_dir, tmp_path, monkeypatch, capsys
):
    from loraplace.config import StudyConfig
    from loraplace.study.prepare import spec_for
    from loraplace.train import fastpaths
    from loraplace.train import run as train

    monkeypatch.setattr(fastpaths, "packing_is_exact", _never_exact)
    cfg = StudyConfig(model=str(tiny_gpt2_dir), data=str(ALPACA_HEAD), train_split="train[:4]",
                      eval_split="train[100:102]", epochs=1, max_length=32, generations=0, loss_on="all",
                      strategies=["full"])  # fmt: skip
    result = train.train_run(spec_for(cfg, "full", 1, tmp_path / "run"))
    assert result["packed"] is False and result["packed_eval"] is False
    assert {n["switch"] for n in result["fallbacks"]} >= {"packing", "pack_eval"}
    assert "note: packing is off for this run" in capsys.readouterr().out


def test_a_remembered_check_is_asked_again_for_the_same_model_in_another_dtype(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path))
    asked = []

    def check(model, device):
        asked.append(next(model.parameters()).dtype)
        return next(model.parameters()).dtype == torch.float32

    model = tiny_model("llama")
    assert hardware.remembered_check("probe", model, "cpu", check)
    assert hardware.remembered_check("probe", model, "cpu", check)  # from the cache
    assert not hardware.remembered_check("probe", model.to(torch.bfloat16), "cpu", check)
    assert asked == [torch.float32, torch.bfloat16]
