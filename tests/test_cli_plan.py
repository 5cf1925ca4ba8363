"""`loraplace plan` through the real CLI: tables, JSON, and the errors a user can cause."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import DIALOGPT

from loraplace.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_dialogpt_table_names_the_c_proj_overlap(capsys):
    code, out, _ = run_cli(capsys, "plan", "--model", str(DIALOGPT))
    assert code == 0
    assert "354,823,168" in out
    for name in ("full", "attention", "ffn", "seed-attention", "seed-ffn"):
        assert f"\n{name} " in out
    assert "6,291,456" in out  # full, r=16
    assert "mlp.c_proj in every layer" in out


def test_plan_json_schema(capsys):
    code, out, _ = run_cli(
        capsys,
        "plan",
        "--model",
        str(DIALOGPT),
        "--json",
        "--strategy",
        "attention",
        "--strategy",
        "top=ffn@top:6",
    )
    assert code == 0
    data = json.loads(out)
    assert data["model"] == str(DIALOGPT) and data["base_params"] == 354_823_168
    att, top = data["strategies"]
    assert set(att) >= {
        "name",
        "roles",
        "layers",
        "modules",
        "trainable_params",
        "trainable_by_role",
    }
    assert att["layers"] is None and len(att["modules"]) == 48
    assert att["modules"][0] == "transformer.h.0.attn.c_attn"
    assert top["layers"] == list(range(18, 24))
    assert top["trainable_params"] == 6 * 16 * (5120 + 5120)
    assert sum(top["trainable_by_role"].values()) == top["trainable_params"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--strategy", "atention"], "unknown strategy 'atention'; valid: full, attention"),
        (["--strategy", "x=attn.qq"], "did you mean"),
        (["--strategy", "x=attn.q"], "matches no module of this model, which has roles attn.qkv"),
        (["--strategy", "x=attn@0:40"], "out of bounds for a model with 24 layers"),
        (["--strategy", "x=attn@top:30"], "the model has 24"),
    ],
)
def test_plan_user_errors(capsys, argv, message):
    code, out, err = run_cli(capsys, "plan", "--model", str(DIALOGPT), *argv)
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err
    assert err.count("\n") == 1  # one sentence, one line


def test_missing_path_unreachable_hub_and_bad_gguf(capsys, tmp_path):
    code, _, err = run_cli(capsys, "plan", "--model", str(tmp_path / "nope"))
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(capsys, "plan", "--model", "nobody-org/no-such-model")
    assert code == 2 and "cannot reach the Hugging Face hub" in err and "--model embedded" in err
    fake = tmp_path / "model.gguf"
    fake.write_text("not a gguf")
    code, _, err = run_cli(capsys, "plan", "--model", str(fake))
    assert code == 2 and "is not a GGUF file" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, "plan", "--model", str(empty))
    assert code == 2 and "has no config.json" in err


def test_console_script_exit_status_and_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "loraplace", "plan", "--model", str(DIALOGPT), "--strategy", "nope"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("loraplace: error: unknown strategy 'nope'")
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_plan_embedded(capsys):
    code, out, _ = run_cli(capsys, "plan", "--model", "embedded")
    assert code == 0
    assert "SmolLM2-135M-Instruct" in out and "134,515,008" in out and "30 layers" in out
    assert "no modules named ['c_attn', 'c_proj']" in out  # seed lists fall back to roles


def test_plan_reads_the_study_config_so_it_plans_what_study_runs(capsys, tmp_path):
    config = tmp_path / "study.yaml"
    config.write_text(f"model: {DIALOGPT}\nstrategies: [full, deep=attn@top:6]\nrank: 8\n")
    code, out, _ = run_cli(capsys, "plan", "--config", str(config), "--json")
    planned = json.loads(out)
    assert code == 0 and [s["name"] for s in planned["strategies"]] == ["full", "deep"]
    full = planned["strategies"][0]
    code, out, _ = run_cli(capsys, "plan", "--config", str(config), "--rank", "16", "--json")
    assert json.loads(out)["strategies"][0]["trainable_params"] == 2 * full["trainable_params"]
    code, _, err = run_cli(capsys, "plan", "--config", str(config), "--set", "rnak=4")
    assert code == 2 and "unknown config key 'rnak'" in err and "did you mean 'rank'" in err


def test_a_layer_studys_long_names_keep_the_table_in_columns(capsys):
    argv = ["plan", "--model", str(DIALOGPT), "--strategy", "full", "--layer-study", "attn,mlp"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(out) if line.startswith("strategy"))
    rows = [line.split() for line in out[header + 1 :] if line.strip()][:12]
    names = [r[0] for r in rows]
    assert "attn+mlp-bottom-third" in names and "attn+mlp-block3of4" in names
    layers = {r[0]: r[1] for r in rows}
    assert layers["attn+mlp-bottom-third"] == "block:0/3" and layers["full"] == "all"
    assert len({line.index("block:") for line in out if "-third " in line}) == 1  # one column
