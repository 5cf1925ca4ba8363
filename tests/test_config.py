"""The study config: shipped files, precedence, --set parsing and the errors a user can cause."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from loraplace.config import StudyConfig, load_config
from loraplace.core.errors import UserError
from loraplace.plan.strategies import resolve_strategies

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))

# The seed document's setup, value for value.
SEED_SETUP = {
    "model": "microsoft/DialoGPT-medium",
    "data": "tatsu-lab/alpaca",
    "train_split": "train[:100]",
    "eval_split": "train[100:120]",
    "rank": 16,
    "alpha": 32,
    "dropout": 0.1,
    "bias": "none",
    "epochs": 3,
    "batch_size": 1,
    "grad_accum": 4,
    "lr": 2e-4,
    "scheduler": "cosine",
    "warmup_ratio": 0.1,
    "weight_decay": 0.01,
    "optimizer": "adamw_torch",
    "max_length": 256,
    "seeds": [42],
    "strategies": ["full", "seed-attention", "seed-ffn", "attention", "ffn"],
}
# What decides the numbers a run produces (the offline study must match the seed's).
HYPERPARAMETERS = (
    "train_split",
    "eval_split",
    "rank",
    "alpha",
    "dropout",
    "bias",
    "epochs",
    "batch_size",
    "grad_accum",
    "lr",
    "scheduler",
    "warmup_ratio",
    "weight_decay",
    "optimizer",
    "max_length",
    "loss_on",
    "seeds",
    "strategies",
)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------- shipped configs


def test_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"seed.yaml", "offline.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_validates(path):
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(str(path))
    assert isinstance(cfg, StudyConfig)
    # every key written in the file is what the study runs with (none silently dropped)
    for key, value in raw.items():
        assert getattr(cfg, key) == value, key
    # the strategies it names exist, and the names it refers to are among them
    names = [s.name for s in resolve_strategies(cfg.strategies, cfg.layer_study)]
    assert cfg.reference in names
    if cfg.equal_budget:
        assert cfg.equal_budget in names


def test_seed_config_is_the_seed_setup():
    cfg = load_config(str(REPO / "configs" / "seed.yaml"))
    got = {key: getattr(cfg, key) for key in SEED_SETUP}
    assert got == SEED_SETUP
    assert isinstance(cfg.lr, float) and isinstance(cfg.rank, int)


def test_offline_config_is_the_seed_study_offline():
    seed = load_config(str(REPO / "configs" / "seed.yaml")).to_dict()
    offline = load_config(str(REPO / "configs" / "offline.yaml")).to_dict()
    assert offline["model"] == "embedded"
    assert offline["data"] == "embedded"
    differing = {k: (seed[k], offline[k]) for k in HYPERPARAMETERS if seed[k] != offline[k]}
    # the one difference: loraplace compares the response's loss (the seed's all-token loss is
    # reported beside it); the seed's own config keeps the seed's loss
    assert differing == {"loss_on": ("all", "response")}


# ---------------------------------------------------------------- precedence


def test_defaults_without_file():
    assert load_config() == StudyConfig()


def test_precedence_defaults_file_overrides_sets(tmp_path):
    path = write(tmp_path, "rank: 8\nepochs: 2\nlr: 0.001\nmodel: from-file\n")
    cfg = load_config(
        path,
        overrides={"epochs": 5, "lr": 0.005, "model": None},  # None: flag not given
        sets=["lr=0.0003"],
    )
    assert cfg.max_length == 256  # default (nowhere else)
    assert cfg.rank == 8  # file beats default
    assert cfg.epochs == 5.0  # override beats file
    assert cfg.lr == 0.0003  # --set beats override and file
    assert cfg.model == "from-file"  # a None override leaves the file's value


def test_later_set_wins():
    assert load_config(sets=["rank=4", "rank=12"]).rank == 12


def test_set_accepts_dashes_for_underscores():
    assert load_config(sets=["grad-accum=8"]).grad_accum == 8


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing here\n")) == StudyConfig()


# ---------------------------------------------------------------- --set values and types


@pytest.mark.parametrize(
    "item, key, expected, kind",
    [
        ("seeds=[1,2]", "seeds", [1, 2], int),
        ("seeds=7", "seeds", [7], int),
        ("epochs=1", "epochs", 1.0, float),
        ("lr=0.0001", "lr", 1e-4, float),
        ("lr=1.0e-4", "lr", 1e-4, float),
        ("alpha=16", "alpha", 16.0, float),
        ("rank=8", "rank", 8, int),
        ("fuse_accumulation=false", "fuse_accumulation", False, bool),
        ("strategies=[attention, ffn]", "strategies", ["attention", "ffn"], str),
        ("layer_study=attn,mlp", "layer_study", "attn,mlp", str),
        ("threads=", "threads", None, type(None)),
    ],
)
def test_set_values_are_yaml_with_types(item, key, expected, kind):
    value = getattr(load_config(sets=[item]), key)
    assert value == expected
    assert all(type(v) is kind for v in value) if isinstance(value, list) else type(value) is kind


def test_set_lr_in_e_notation_is_a_float_or_a_clear_error():
    # YAML 1.1 reads "1e-4" (no dot) as a string; the user must never get a silent string lr.
    try:
        cfg = load_config(sets=["lr=1e-4"])
    except UserError as err:
        assert "lr" in str(err)
    else:
        assert isinstance(cfg.lr, float) and cfg.lr == pytest.approx(1e-4)


@pytest.mark.parametrize("where", ["set", "file"])
def test_lr_in_e_notation_is_accepted(tmp_path, where):
    if where == "set":
        cfg = load_config(sets=["lr=1e-4"])
    else:
        cfg = load_config(write(tmp_path, "lr: 1e-4\n"))
    assert cfg.lr == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "item, key",
    [
        ("rank=abc", "rank"),
        ("rank=2.5", "rank"),
        ("seeds=[1, x]", "seeds"),
        ("epochs=three", "epochs"),
        ("fuse_accumulation=maybe", "fuse_accumulation"),
        ("batch_size=true", "batch_size"),
    ],
)
def test_set_wrong_type_names_the_key(item, key):
    with pytest.raises(UserError, match=repr(key)):
        load_config(sets=[item])


def test_set_without_equals_sign():
    with pytest.raises(UserError, match="KEY=VALUE"):
        load_config(sets=["rank"])


# ---------------------------------------------------------------- unknown keys


def test_unknown_key_in_file_suggests_the_close_one(tmp_path):
    with pytest.raises(UserError, match=r"unknown config key 'epoch'.*did you mean 'epochs'"):
        load_config(write(tmp_path, "epoch: 2\n"))


def test_unknown_key_in_set_suggests_the_close_one():
    with pytest.raises(UserError, match=r"unknown config key 'epoch'.*did you mean 'epochs'"):
        load_config(sets=["epoch=2"])


def test_unknown_key_in_overrides():
    with pytest.raises(UserError, match="unknown config key 'nonsense_key'"):
        load_config(overrides={"nonsense_key": 1})


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "item, key",
    [
        ("rank=0", "rank"),
        ("rank=-4", "rank"),
        ("epochs=0", "epochs"),
        ("epochs=-1", "epochs"),
        ("lr=0", "lr"),
        ("batch_size=0", "batch_size"),
        ("max_length=0", "max_length"),
    ],
)
def test_non_positive_values_are_rejected(item, key):
    with pytest.raises(UserError, match=rf"'{key}' must be positive"):
        load_config(sets=[item])


def test_non_positive_in_file_is_rejected(tmp_path):
    with pytest.raises(UserError, match="'rank' must be positive"):
        load_config(write(tmp_path, "rank: 0\n"))


@pytest.mark.parametrize(
    "item, choices",
    [
        ("pad_to=foo", "longest, max_length"),
        ("bias=all", "none, lora_only"),
        ("loss_on=prompt", "all, response"),
        ("scheduler=step", "cosine, linear, constant, constant_with_warmup"),
    ],
)
def test_bad_choice_lists_the_choices(item, choices):
    key, _, value = item.partition("=")
    with pytest.raises(UserError) as err:
        load_config(sets=[item])
    message = str(err.value)
    assert repr(key) in message and choices in message and repr(value) in message


@pytest.mark.parametrize(
    "item, words",
    [
        ("dropout=1", "dropout"),
        ("warmup_ratio=-0.1", "warmup_ratio"),
        ("smallest_effect=0", "smallest_effect"),
        ("smallest_effect=5", "fraction above 0 and at most 1"),
        ("seeds=[]", "seed"),
        ("report_to=[mlflow]", "mlflow"),
    ],
)
def test_other_invalid_values(item, words):
    with pytest.raises(UserError, match=words):
        load_config(sets=[item])


@pytest.mark.parametrize(
    "text, words",
    [
        ("- rank: 4\n- epochs: 2\n", "must hold a mapping"),
        ("just a string\n", "must hold a mapping"),
        ("rank: [1, 2\n", "not valid YAML"),
        ("rank: 4\n  epochs: 2\n", "not valid YAML"),
    ],
    ids=["list", "scalar", "unclosed-list", "bad-indent"],
)
def test_bad_yaml_file(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(UserError, match=words) as err:
        load_config(path)
    assert path in str(err.value)


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="does not exist") as err:
        load_config(path)
    assert path in str(err.value)


def test_to_dict_round_trips():
    cfg = load_config(sets=["rank=8", "seeds=[1,2]"])
    assert load_config(overrides=cfg.to_dict()) == cfg


def test_every_fast_path_is_in_the_readme_and_the_ones_that_change_numbers_say_so():
    from loraplace.config import FAST_PATHS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Fast paths", 1)[1].split("\n## ", 1)[0]
    missing = [p.key for p in FAST_PATHS if f"`{p.key}`" not in section]
    assert not missing, f"README's Fast paths section does not name {missing}"
    changes = section.split("change numbers", 1)[1]
    assert {p.key for p in FAST_PATHS if p.changes} == {
        p.key for p in FAST_PATHS if f"`{p.key}" in changes
    }


def test_plain_turns_every_fast_path_off_and_nothing_else():
    from loraplace.config import FAST_PATHS, StudyConfig

    cfg = StudyConfig(rank=8, packing=True)
    plain = cfg.plain()
    assert all(getattr(plain, p.key) == p.plain for p in FAST_PATHS)
    # every default is a fast path (runs at once: decided per machine and study, runner.local_plan)
    assert {p.key for p in FAST_PATHS if getattr(cfg, p.key) == p.plain} == set()
    assert plain.rank == 8 and plain.to_dict().keys() == cfg.to_dict().keys()


def test_a_fast_path_whose_prerequisite_is_off_is_named():
    from loraplace.config import StudyConfig, idle_fast_paths

    assert idle_fast_paths(StudyConfig()) == []
    lines = idle_fast_paths(StudyConfig(packing=False))
    assert lines == [
        "segment_attention does nothing in this study: it needs packing",
        "fused_head_loss does nothing in this study: it needs packing",
    ]
    assert idle_fast_paths(StudyConfig(pad_to="max_length"))[0].endswith("it needs pad_to")
    assert idle_fast_paths(StudyConfig(onednn=False)) == [
        "product_dtype does nothing in this study: it needs onednn"
    ]


def test_only_settings_that_change_a_run_decide_whether_it_is_reused():
    from loraplace.config import run_settings

    base = run_settings({})
    assert run_settings({"reuse_process": False, "seeds": [1, 2], "max_retries": 5}) == base
    assert run_settings({"smallest_effect": 0.05}) == base  # the report's power plan only
    assert run_settings({"packing": False}) != base
    assert run_settings({"fused_lora": False}) != base


def test_the_reference_table_of_every_key_is_the_configs_own():
    from loraplace.config import FIELDS, reference_table

    table = reference_table()
    assert table in (REPO / "docs" / "reference.md").read_text()
    assert all(f"| `{key}` |" in table for key in FIELDS)  # every key, in its group
