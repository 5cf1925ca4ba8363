"""Precision, 4-bit and 8-bit bases, attention kernels and runs at once on one device: the
paths a GPU study takes, run here on CPU wherever they can run, against the float32 run."""

from __future__ import annotations

import importlib.util
import json
import os
import re

import pytest
import torch
from conftest import tiny_model
from test_study import study

from loraplace.data.rows import (
    IGNORE,
    Example,
    PackedCollator,
    packing_is_exact,
    packing_token_deltas,
)
from loraplace.fast.hardware import Machine, pick_attention, pick_precision, resolve_paths
from loraplace.train.fastpaths import PACKING_TOLERANCE

BNB = importlib.util.find_spec("bitsandbytes") is not None
ONE = ("--strategy", "full", "--set", "reuse_process=false")


def result(out, strategy="full", seed=42) -> dict:
    return json.loads((out / f"runs/{strategy}/seed-{seed}/result.json").read_text())


@pytest.fixture(scope="module")
def float32_run(tiny_gpt2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("f32") / "out"
    capsys = _NoCapture()
    assert study(capsys, tiny_gpt2_dir, out, *ONE)[0] == 0
    return result(out)


class _NoCapture:
    def readouterr(self):
        return "", ""


def test_auto_precision_is_bf16_on_a_bf16_gpu_fp16_on_an_older_one_float32_on_cpu():
    gpu = Machine(devices=("cpu", "cuda"), gpu_bf16=True)
    assert pick_precision("auto", "cuda", gpu) == "bf16"
    assert pick_precision("auto", "cuda", Machine(devices=("cpu", "cuda"))) == "fp16"
    assert pick_precision("auto", "cpu", gpu) == "float32"
    paths = resolve_paths("auto", None, None, "auto", gpu)
    assert (paths.precision, paths.onednn, paths.cpu_kernels) == ("bf16", False, False)
    assert resolve_paths("cpu", None, None, "auto", Machine(onednn=True)).cpu_kernels
    flash = Machine(devices=("cpu", "cuda"), flash_attn={"version": "2.8.3"})
    assert pick_attention("auto", "cuda", flash, "bf16")[0] == "flash_attention_2"
    assert pick_attention("auto", "cuda", Machine(devices=("cpu", "cuda")), "bf16")[0] == "sdpa"


def test_packed_rows_are_ours_on_cpu_float32_and_the_librarys_elsewhere():
    cpu = resolve_paths("cpu", None, None, "auto", Machine())
    assert cpu.packed_rows == "mask"
    assert resolve_paths("cpu", None, None, "auto", Machine(), precision="bf16").packed_rows == (
        "positions"
    )
    gpu = Machine(devices=("cpu", "cuda"), gpu_bf16=True, flash_attn={"version": "2.8.3"})
    assert resolve_paths("cuda", None, None, "auto", gpu).packed_rows == "varlen"
    assert resolve_paths("cuda", None, None, "auto", gpu, attention="sdpa").packed_rows == (
        "positions"
    )


def _examples(lengths=(9, 14, 6)) -> list[Example]:
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 120, (n,), generator=gen).tolist() for n in lengths]
    return [Example(ids, [IGNORE] + ids[1:]) for ids in rows]


def test_the_librarys_packed_rows_hold_the_same_tokens_and_flashattentions_boundaries():
    examples = _examples()
    ours = PackedCollator().pack(examples)
    for form in ("positions", "varlen"):
        theirs = PackedCollator(form=form).pack(examples)
        assert "attention_mask" not in theirs and theirs["use_cache"] is False
        for key in ("input_ids", "position_ids", "labels"):
            assert torch.equal(theirs[key], ours[key]), (form, key)
    varlen = PackedCollator(form="varlen").pack(examples)
    assert varlen["cu_seq_lens_q"].tolist() == [0, 9, 23, 29] and varlen["max_length_q"] == 14


@pytest.mark.parametrize("kind", ["llama", "gpt2", "mistral"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_librarys_packed_rows_give_each_example_its_own_loss(kind, attention, dtype):
    model = tiny_model(kind).to(dtype)
    model.set_attn_implementation(attention)
    tolerance = PACKING_TOLERANCE["float32" if dtype == torch.float32 else "bf16"]
    assert packing_is_exact(model, tolerance=tolerance, form="positions")
    # the check can fail: the same row with positions that never restart lets examples see
    # the ones before them (in 16 bits, tiny random models leak less than real ones: below)
    leaked = packing_token_deltas(model, form="positions", leak=True)
    if dtype == torch.float32:
        assert float(leaked.abs().mean()) > tolerance


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float32", "bf16", "fp16"])
def test_the_packing_tolerances_lie_between_a_real_models_rounding_and_a_leak(precision):
    """What PACKING_TOLERANCE rests on: the embedded model, its real weights, in each precision
    (fp16 computed on the CPU here, as a GPU would)."""
    from loraplace.plan.models import resolve_model
    from loraplace.train.load import DTYPES, load_model

    model, _ = load_model(resolve_model("embedded"), DTYPES[precision])
    tolerance = PACKING_TOLERANCE[precision]
    exact = float(packing_token_deltas(model, form="positions").abs().mean())
    leaked = float(packing_token_deltas(model, form="positions", leak=True).abs().mean())
    assert exact < tolerance / 3 and leaked > 3 * tolerance, (exact, leaked)


@pytest.mark.parametrize(
    "setting, words",
    [
        ("precision=fp16", "precision fp16 needs a CUDA GPU"),
        (
            "attention=flash_attention_2",
            "attention flash_attention_2 cannot run here: this study runs on cpu",
        ),
        ("runs_per_device=0", "'runs_per_device' must be a positive whole number or auto"),
        ("liger_kernel=true", "liger_kernel needs a CUDA GPU with liger-kernel and triton"),
    ],
)
def test_settings_this_machine_cannot_run_end_in_one_sentence_before_anything_is_written(
    capsys, tiny_gpt2_dir, tmp_path, setting, words
):
    out = tmp_path / "out"
    code, _, err = study(capsys, tiny_gpt2_dir, out, *ONE, "--set", setting)
    assert code == 2 and words in err and "Traceback" not in err
    assert not out.exists()


def test_quantize_without_bitsandbytes_is_refused_with_what_to_install():
    with pytest.raises(Exception, match=r"pip install 'loraplace\[quant\]'"):
        resolve_paths("cpu", None, None, "auto", Machine(), quantize="4bit")
    with pytest.raises(Exception, match="paths for float32 weights"):
        resolve_paths("cpu", True, None, "auto", Machine(onednn=True), precision="bf16")


@pytest.mark.slow
def test_bf16_autocast_on_cpu_trains_close_to_float32_and_says_so(
    capsys, tiny_gpt2_dir, tmp_path, float32_run
):
    out = tmp_path / "out"
    assert study(capsys, tiny_gpt2_dir, out, *ONE, "--set", "precision=bf16")[0] == 0
    got = result(out)
    assert got["paths"]["precision"] == "bf16" and not got["paths"]["cpu_kernels"]
    assert got["product_dtype"] == "float32" and not got["fused_mlp"]
    # off our CPU functions, packing runs through transformers' padding-free rows
    assert got["packed"] and got["paths"]["packed_rows"] == "positions"
    assert not got["segment_attention"] and not got["fallbacks"]  # off by design, not a fallback
    base, trained = float32_run["metrics"], got["metrics"]
    # bfloat16 keeps 8 bits of mantissa: losses agree to about 1 %, not to float32's digits
    assert trained["base_eval_loss"] == pytest.approx(base["base_eval_loss"], rel=0.01)
    assert trained["eval_loss"] == pytest.approx(base["eval_loss"], rel=0.01)
    assert trained["eval_loss"] != base["eval_loss"]


@pytest.mark.slow
@pytest.mark.skipif(
    not BNB, reason="bitsandbytes is not installed (pip install 'loraplace[quant]')"
)
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_a_quantized_base_trains_the_planned_adapters_close_to_float32(
    capsys, tiny_gpt2_dir, tmp_path, float32_run, bits
):
    out = tmp_path / "out"
    code, stdout, err = study(capsys, tiny_gpt2_dir, out, *ONE, "--set", f"quantize={bits}")
    assert code == 0, stdout + err
    got = result(out)
    assert got["paths"]["quantize"] == bits
    assert got["metrics"]["trainable_params"] == float32_run["metrics"]["trainable_params"]
    assert got["placement"]["modules"] == float32_run["placement"]["modules"]
    # NF4 / int8 weights of a random tiny model: the same loss to within a few per cent
    base = float32_run["metrics"]["base_eval_loss"]
    assert got["metrics"]["base_eval_loss"] == pytest.approx(base, rel=0.05)
    assert got["metrics"]["eval_loss"] < got["metrics"]["base_eval_loss"]


@pytest.mark.slow
def test_two_runs_at_once_give_what_they_give_one_by_one(capsys, tiny_gpt2_dir, tmp_path):
    two = ("--strategy", "full", "--strategy", "attention", "--set", "threads=1")
    one_by_one, at_once = tmp_path / "a", tmp_path / "b"
    assert study(capsys, tiny_gpt2_dir, one_by_one, *two)[0] == 0
    code, stdout, _ = study(capsys, tiny_gpt2_dir, at_once, *two, "--set", "runs_per_device=2")
    assert code == 0 and "2 at a time" in stdout
    for s in ("full", "attention"):
        a, b = result(one_by_one, s), result(at_once, s)
        assert a["metrics"]["eval_loss"] == b["metrics"]["eval_loss"]
        assert a["curves"]["train"] == b["curves"]["train"]
    # both runs were started before either ended (the runs' own clocks start after loading,
    # so a short run can end before the other's training starts: the study's lines are the witness)
    lines = stdout.splitlines()
    first_end = next(i for i, line in enumerate(lines) if re.match(r"\s+\w+ seed \d+: ok", line))
    assert sum(line.startswith("run ") for line in lines[:first_end]) == 2, stdout
    assert {result(at_once, s)["runs_at_once"] for s in ("full", "attention")} == {2}
    servers = {result(at_once, s)["parent_process"] for s in ("full", "attention")}
    assert len(servers) == 2 and os.getpid() not in servers  # each forked by a server of its own


@pytest.mark.slow
def test_a_cpu_study_of_two_runs_runs_them_at_once_with_half_the_cores_each(
    capsys, tiny_gpt2_dir, tmp_path, monkeypatch
):
    from loraplace.study import local as runner

    monkeypatch.setattr(runner, "cpu_cores", lambda: 2)
    monkeypatch.setattr(runner, "available_mb", lambda: 64 * 1024.0)
    out = tmp_path / "out"
    code, stdout, _ = study(capsys, tiny_gpt2_dir, out, "--strategy", "full", "--strategy", "ffn")
    assert code == 0 and "2 at a time on this device, each its own process, 1 thread each" in stdout
    for s in ("full", "ffn"):
        got = result(out, s)
        assert (got["threads"], got["runs_at_once"]) == (1, 2)


def test_plan_states_the_base_memory_in_the_chosen_precision_and_bits(capsys):
    from conftest import DIALOGPT

    from loraplace.cli import main

    assert main(["plan", "--model", str(DIALOGPT), "--strategy", "full", "--json"]) == 0
    memory = json.loads(capsys.readouterr().out)["base_memory_mb"]
    params = 354_823_168  # DialoGPT-medium, tied embeddings once
    assert memory["float32"] == pytest.approx(params * 4 / 2**20, abs=0.1)
    assert memory["bf16"] == pytest.approx(memory["float32"] / 2, abs=0.1)
    assert memory["bf16+8bit"] < memory["bf16"] and memory["bf16+4bit"] < memory["bf16+8bit"]
    main(["plan", "--model", str(DIALOGPT), "--set", "quantize=4bit", "--set", "precision=bf16"])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("base weights"))
    assert f"{memory['bf16+4bit']:,.0f} MB in bf16" in line and "4bit" in line
