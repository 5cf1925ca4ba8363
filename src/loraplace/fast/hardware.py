"""What this machine can run, and which path each `auto` setting takes on it.

    machine = Machine.here()                      # CPU flags, oneDNN, devices, a bfloat16 probe
    paths = resolve_paths(device, onednn, ...)    # auto -> the path taken; impossible -> UserError
    table = product_table(shapes, rows=384)       # oneDNN or the default BLAS, per product shape

Every choice that depends on the hardware is made here, from inputs a test can feed: the CPU's
flags, what torch was built with, which devices it sees and, for the library that runs each
float32 product, timings measured on this machine (cached per machine and library versions).
An explicit setting the hardware cannot run is refused before a study writes anything; `auto`
never picks a path the machine cannot run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from loraplace.core.errors import UserError
from loraplace.fast import gpus

OPTIONAL_PACKAGES = ("bitsandbytes", "flash_attn", "liger_kernel", "triton")
NATIVE_BF16 = ("avx512_bf16", "amx_bf16")  # x86 flags of CPUs that multiply bfloat16 natively
# Set in the environment, these change what the libraries or loraplace take the CPU to have;
# recorded with the machine, so results and caches tell them apart. ASSUME_FLAGS adds flags
# (e.g. "avx512_bf16") to see what `auto` picks on a CPU that has them: what the flags choose
# still runs only where the library does (bfloat16 products: the probe below), never a crash.
ASSUME_FLAGS = "LORAPLACE_ASSUME_CPU_FLAGS"
ISA_VARIABLES = (
    "ONEDNN_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
    "MKL_DEBUG_CPU_TYPE",
    ASSUME_FLAGS,
)
# A library wins a product shape only when it is this much faster: timings of equal libraries
# differ by a few per cent from one measurement to the next.
MARGIN = 0.05


@dataclass(frozen=True)
class Gpu:
    """One GPU this process sees: `id` as CUDA_VISIBLE_DEVICES names it (index or UUID)."""

    id: str
    name: str = "GPU"
    capability: tuple[int, int] = (8, 0)
    total_mb: float = 0.0
    free_mb: float = 0.0

    @property
    def bf16(self) -> bool:
        """Computes in bfloat16 natively (Ampere, compute capability 8.0, and later); older
        GPUs only emulate it, slower than float16 (torch's `including_emulation=False`)."""
        return tuple(self.capability) >= (8, 0)


@dataclass(frozen=True)
class Machine:
    """What the choices depend on. `bf16_products`: a bfloat16 product through oneDNN ran here."""

    cpu: str = "unknown"
    flags: frozenset[str] = frozenset()
    onednn: bool = False
    bf16_products: bool = False
    devices: tuple[str, ...] = ("cpu",)
    isa_limits: dict = field(default_factory=dict)  # ISA_VARIABLES set here: ONEDNN_MAX_CPU_ISA...
    gpu_bf16: bool = False  # every GPU computes in bfloat16 natively
    packages: frozenset[str] = frozenset()  # optional libraries installed: OPTIONAL_PACKAGES
    gpus: tuple[Gpu, ...] = ()
    # flash-attn against this torch: {"version": ...} where it imports, {"error": ...} where it
    # is installed and does not, {} where it is not installed (`gpus.flash_attn_status`)
    flash_attn: dict = field(default_factory=dict)

    @staticmethod
    def here() -> Machine:
        return _here()

    @property
    def native_bf16(self) -> bool:
        return any(flag in self.flags for flag in NATIVE_BF16)

    def describe(self) -> str:
        limits = "".join(f", {k}={v}" for k, v in self.isa_limits.items())
        simd = [
            f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "asimd") if f in self.flags
        ]
        names = sorted({g.name for g in self.gpus})
        gpus = f"; {len(self.gpus)} GPU: {', '.join(names)}" if self.gpus else ""
        return f"{self.cpu} ({' '.join(simd) or 'no SIMD flags read'}{limits}){gpus}"


def cpu_info(text: str) -> tuple[str, frozenset[str]]:
    """(model name, feature flags) from the text of /proc/cpuinfo (x86 `flags`, ARM `Features`)."""
    name = re.search(r"^(?:model name|Hardware|CPU part)\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.M)
    return (
        name.group(1).strip() if name else platform.processor() or platform.machine(),
        frozenset(flags.group(1).split()) if flags else frozenset(),
    )


@lru_cache(maxsize=1)
def _here() -> Machine:
    import torch

    from loraplace.fast.kernels import onednn_available

    try:
        cpu, flags = cpu_info(Path("/proc/cpuinfo").read_text())
    except OSError:
        cpu, flags = platform.processor() or platform.machine(), frozenset()
    flags |= frozenset(os.environ.get(ASSUME_FLAGS, "").split())
    found = gpus.facts_at_start()  # never initialises CUDA in this process
    cards = tuple(
        Gpu(g["id"], g["name"], tuple(g["capability"]), g["total_mb"], g["free_mb"])
        for g in found["gpus"]
    )
    devices = ["cpu"] + (["cuda"] if cards else [])
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        devices.append("mps")
    onednn = onednn_available()
    return Machine(
        cpu=cpu,
        flags=flags,
        onednn=onednn,
        bf16_products=onednn and _bf16_product_runs(),
        devices=tuple(devices),
        isa_limits={k: os.environ[k] for k in ISA_VARIABLES if os.environ.get(k)},
        gpu_bf16=bool(cards) and all(g.bf16 for g in cards),
        packages=frozenset(p for p in OPTIONAL_PACKAGES if importlib.util.find_spec(p)),
        gpus=cards,
        flash_attn=found["flash_attn"],
    )


def _bf16_product_runs() -> bool:
    """Whether oneDNN builds a bfloat16 product here: it refuses where the CPU (or the ISA
    limit set by ONEDNN_MAX_CPU_ISA) has no bfloat16 instructions."""
    import torch

    x = torch.ones(4, 16, dtype=torch.bfloat16)
    try:
        y = torch.ops.mkldnn._linear_pointwise(x, torch.ones(8, 16, dtype=torch.bfloat16), None,
                                               "none", [], "")  # fmt: skip
    except RuntimeError:
        return False
    return bool((y.float() == 16).all())


NUMERIC_PATHS = {"device": None, "product_dtype": None, "precision": "float32", "quantize": "none"}


@dataclass(frozen=True)
class Paths:
    """The resolved paths of a run: what `auto` became here, recorded with every result."""

    device: str
    onednn: bool  # frozen float32 products may go through oneDNN (per shape: `product_table`)
    onednn_measured: bool  # True: per-shape choice by timing; False: every shape through oneDNN
    onednn_head: bool  # the output head's products likewise
    onednn_head_measured: bool
    product_dtype: str  # float32 | bfloat16
    precision: str = "float32"  # the base's dtype and autocast: float32 | bf16 | fp16
    quantize: str = "none"  # none | 4bit | 8bit
    attention: str = "sdpa"  # sdpa | eager | flash_attention_2
    attention_why: str = ""  # why auto took SDPA over FlashAttention-2, where it could not take it
    liger: bool = False  # Liger Kernel's Triton functions in the Trainer (CUDA)

    @property
    def cpu_kernels(self) -> bool:
        """loraplace's own CPU functions (fused LoRA and SwiGLU, blocked head loss, oneDNN
        products) assume float32 weights on the CPU; elsewhere the library's path runs."""
        return self.device == "cpu" and self.precision == "float32" and self.quantize == "none"

    @property
    def packed_rows(self) -> str:
        """How packed rows mark their examples (data.rows.PackedCollator's `form`): our
        block-diagonal mask where our CPU functions run, else transformers' padding-free rows,
        with FlashAttention's varlen arguments under flash_attention_2."""
        if self.cpu_kernels:
            return "mask"
        return "varlen" if self.attention == "flash_attention_2" else "positions"

    def to_dict(self) -> dict:
        return asdict(self) | {"cpu_kernels": self.cpu_kernels, "packed_rows": self.packed_rows}

    @staticmethod
    def from_dict(d: dict) -> Paths:
        return Paths(**{k: v for k, v in d.items() if k in Paths.__dataclass_fields__})

    @staticmethod
    def numbers(recorded: dict) -> dict:
        """Of resolved paths as a result records them, those that change what a run computes
        beyond float32 summation order (a result from before a path existed took its only
        value then): a finished run is reused only where they are this machine's."""
        return {k: recorded.get(k, then) for k, then in NUMERIC_PATHS.items()}


def pick_device(choice: str, machine: Machine) -> str:
    if choice == "auto":
        return next(d for d in ("cuda", "mps", "cpu") if d in machine.devices)
    if choice not in machine.devices:
        hint = (
            "this torch was built without CUDA or sees no GPU"
            if choice == "cuda"
            else "no Apple GPU is available"
        )
        raise UserError(f"device {choice!r} was asked for, but {hint}; use device auto or cpu")
    return choice


def pick_onednn(choice: bool | None, device: str, machine: Machine) -> bool:
    """None (auto): oneDNN on CPU where torch has it. True where it cannot run is refused."""
    if choice is None:
        return device == "cpu" and machine.onednn
    if choice and device != "cpu":
        raise UserError(f"onednn is a CPU path and this study runs on {device}; use onednn auto")
    if choice and not machine.onednn:
        raise UserError("onednn was asked for, but this torch has no oneDNN; use onednn auto")
    return choice


def pick_product_dtype(choice: str, device: str, onednn: bool, machine: Machine) -> str:
    """auto: bfloat16 on a CPU that multiplies it natively and ran the probe, else float32."""
    if choice == "float32":
        return choice
    runnable = device == "cpu" and onednn and machine.bf16_products
    if choice == "auto":
        return "bfloat16" if runnable and machine.native_bf16 else "float32"
    if device != "cpu":
        raise UserError(
            f"product_dtype bfloat16 is a CPU path and this study runs on {device}; "
            "use product_dtype auto or float32"
        )
    if not onednn:
        raise UserError("product_dtype bfloat16 runs through oneDNN, which is off; "
                        "set onednn to auto or true, or product_dtype to auto")  # fmt: skip
    if not machine.bf16_products:
        raise UserError(
            f"this CPU cannot multiply bfloat16 through oneDNN ({machine.describe()}: it needs "
            "AVX-512 BF16 or AMX); use product_dtype auto or float32"
        )
    return choice


def pick_precision(choice: str, device: str, machine: Machine) -> str:
    """auto: bf16 on GPUs that compute in it natively, fp16 (with loss scaling) on older ones
    (which only emulate bf16, slowly), float32 elsewhere. fp16 is refused off CUDA: its loss
    scaling runs only there."""
    if choice == "auto":
        if device == "cuda":
            return "bf16" if machine.gpu_bf16 else "fp16"
        return "float32"
    if choice == "fp16" and device != "cuda":
        raise UserError(
            f"precision fp16 needs a CUDA GPU (its loss scaling runs only there) and this study "
            f"runs on {device}; use precision auto, float32 or bf16"
        )
    if choice == "bf16" and device == "cuda" and not machine.gpu_bf16:
        raise UserError("this GPU does not compute in bfloat16; use precision auto or fp16")
    return choice


def pick_quantize(choice: str, machine: Machine) -> str:
    if choice != "none" and "bitsandbytes" not in machine.packages:
        raise UserError(
            f"quantize {choice} needs bitsandbytes, which is not installed: "
            "pip install 'loraplace[quant]', or use quantize none"
        )
    return choice


def pick_attention(
    choice: str, device: str, machine: Machine, precision: str = "bf16"
) -> tuple[str, str]:
    """(the attention kernel, why, where `auto` did not take FlashAttention-2 or it was asked
    for). auto: FlashAttention-2 on CUDA in bf16 or fp16 where flash-attn imports against this
    torch, else PyTorch's SDPA; flash_attention_2 asked for where it cannot run is refused."""
    if device != "cuda":
        why = f"this study runs on {device}"
    elif precision not in ("bf16", "fp16"):
        why = f"FlashAttention computes only in bf16 or fp16 and this study's precision is {precision}"
    elif "error" in machine.flash_attn:
        why = f"flash-attn is installed but does not import against this torch ({machine.flash_attn['error']})"
    elif "version" not in machine.flash_attn:
        why = "flash-attn is not installed (pip install 'loraplace[gpu]')"
    else:
        why = ""
    if choice == "auto":
        return ("sdpa", why) if why else ("flash_attention_2", "")
    if choice == "flash_attention_2" and why:
        raise UserError(
            f"attention flash_attention_2 cannot run here: {why}; use attention auto or sdpa"
        )
    return choice, "as set"


def pick_liger(choice: bool, device: str, machine: Machine) -> bool:
    """Liger Kernel (fused linear cross-entropy, RMSNorm, SwiGLU, RoPE in Triton): GPU only."""
    if not choice:
        return False
    missing = [p for p in ("liger_kernel", "triton") if p not in machine.packages]
    if device != "cuda" or missing:
        why = f"this study runs on {device}" if device != "cuda" else f"{missing[0]} is missing"
        raise UserError(f"liger_kernel needs a CUDA GPU with liger-kernel and triton ({why}); "
                        "set liger_kernel false")  # fmt: skip
    return True


def resolve_paths(
    device: str,
    onednn: bool | None,
    onednn_head: bool | None,
    product_dtype: str,
    machine: Machine,
    precision: str = "auto",
    quantize: str = "none",
    attention: str = "auto",
    liger: bool = False,
) -> Paths:
    """The paths a run takes here for these settings; UserError for one it cannot take.

    `onednn_head` None follows `onednn`. Where `auto` chose oneDNN, the library of each
    product shape is then measured (`product_table`); where it was asked for, oneDNN runs all.
    oneDNN and bfloat16 products are CPU paths for float32 weights: with another precision or
    a quantized base, `auto` leaves them off and asking for them is refused.
    """
    resolved_device = pick_device(device, machine)
    numbers = pick_precision(precision, resolved_device, machine)
    quantized = pick_quantize(quantize, machine)
    if resolved_device == "cpu" and (numbers, quantized) != ("float32", "none"):
        if onednn or onednn_head or product_dtype == "bfloat16":
            raise UserError(
                f"onednn and product_dtype bfloat16 are paths for float32 weights, and this "
                f"study's base is {quantized if quantized != 'none' else numbers}; "
                "leave them auto"
            )
        onednn = onednn_head = False
        product_dtype = "float32"
    use_onednn = pick_onednn(onednn, resolved_device, machine)
    kernel, kernel_why = pick_attention(attention, resolved_device, machine, numbers)
    head = use_onednn if onednn_head is None else pick_onednn(onednn_head, resolved_device, machine)
    return Paths(
        device=resolved_device,
        onednn=use_onednn,
        onednn_measured=use_onednn and onednn is None,
        onednn_head=head,
        onednn_head_measured=head and onednn_head is None and onednn is None,
        product_dtype=pick_product_dtype(product_dtype, resolved_device, use_onednn, machine),
        precision=numbers,
        quantize=quantized,
        attention=kernel,
        attention_why=kernel_why,
        liger=pick_liger(liger, resolved_device, machine),
    )


# --- which library runs each float32 product -------------------------------------------------


def shape_key(out_features: int, in_features: int) -> str:
    return f"{out_features}x{in_features}"


def choose_libraries(timings: dict[str, dict[str, float]], margin: float = MARGIN) -> dict:
    """Which library runs each product: {shape: [forward on oneDNN, input gradient on oneDNN]}.

    `timings` holds seconds per product, {shape: {"forward": [blas, onednn], "input_grad":
    [blas, onednn]}}; oneDNN is taken where it is faster by more than `margin`."""
    return {
        shape: [times[d][1] < times[d][0] * (1 - margin) for d in ("forward", "input_grad")]
        for shape, times in timings.items()
    }


def _time_products(out_f: int, in_f: int, rows: int, reps: int) -> dict[str, list[float]]:
    """Best-of-`reps` seconds for one product of this shape, per direction and library."""
    import torch

    from loraplace.fast.kernels import linear

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out_f, in_f, generator=generator)
    inputs = {"forward": (torch.randn(rows, in_f, generator=generator), weight),
              "input_grad": (torch.randn(rows, out_f, generator=generator), weight.t())}  # fmt: skip
    found = {}
    for direction, (x, w) in inputs.items():
        best = [float("inf"), float("inf")]
        for _ in range(reps):
            for i, onednn in enumerate((False, True)):  # alternating: both see the same noise
                start = time.perf_counter()
                linear(x, w, onednn=onednn)
                best[i] = min(best[i], time.perf_counter() - start)
        found[direction] = best
    return found


def _cache_file(shapes: list[tuple[int, int]], rows: int, threads: int) -> Path:
    import torch

    from loraplace.plan.models import cache_dir

    machine = Machine.here()
    key = json.dumps([machine.cpu, sorted(machine.flags), machine.isa_limits, torch.__version__,
                      threads, rows, sorted(shapes)])  # fmt: skip
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "products" / f"{digest}.json"


def product_table(
    shapes: list[tuple[int, int]], rows: int, threads: int | None = None, reps: int = 5
) -> dict:
    """For each (out, in) product shape, whether its forward and input-gradient products run
    faster through oneDNN than through the default BLAS on this machine, for `rows` tokens.

    Measured once (about a second for a model's handful of shapes) and cached per CPU, ISA
    limits, torch version, thread count and shapes."""
    import torch

    from loraplace.core.results import write_json

    shapes = sorted(set(shapes))
    threads = threads or torch.get_num_threads()
    path = _cache_file(shapes, rows, threads)
    try:
        return json.loads(path.read_text())["table"]
    except (OSError, ValueError, KeyError):
        pass
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        timings = {shape_key(o, i): _time_products(o, i, rows, reps) for o, i in shapes}
    finally:
        torch.set_num_threads(before)
    table = choose_libraries(timings)
    write_json(path, {"machine": Machine.here().describe(), "rows": rows, "threads": threads,
                      "timings_s": timings, "table": table})  # fmt: skip
    return table


def products_for(
    paths: Paths,
    shapes: list[tuple[int, int]],
    head_shape: tuple[int, int] | None,
    rows: int,
    head_rows: int,
    threads: int | None = None,
) -> dict:
    """The measured library choices a run with these paths needs: {"decoder": table, "head":
    [forward, input gradient]}, each only where `auto` left the choice to a measurement."""
    found = {}
    if paths.onednn_measured and shapes:
        found["decoder"] = product_table(shapes, rows, threads)
    if paths.onednn_head_measured and head_shape:
        found["head"] = product_table([head_shape], head_rows, threads, reps=3)[
            shape_key(*head_shape)
        ]
    return found


# --- checks remembered per model architecture, device and library versions -----------------


# Kernels a check's answer depends on beyond torch and transformers
CHECK_PACKAGES = ("flash_attn", "liger_kernel", "peft")


def remembered_check(name: str, model, device: str, check, *args) -> bool:
    """`check(model, device, *args)`, answered from the cache where this architecture (its
    config and its weights' dtypes, not their values) was checked before with the same
    arguments on this machine (its CPU and GPUs) and the same library versions; the
    start-of-run exactness checks cost a few forward passes.

    Only an answer is remembered: a check that raised (a forward that failed, out of memory)
    raises here too and leaves nothing behind, so a passing error never turns a path off for
    good."""
    import sys

    import torch
    import transformers

    from loraplace import __version__
    from loraplace.plan.models import cache_dir

    code = Path(sys.modules[check.__module__].__file__).read_bytes()  # the check's own code
    attention = getattr(model.config, "_attn_implementation", None)
    # packing is checked on the weights as they train: bf16 and fp16 runs get their own answer
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    key = json.dumps(
        [name, type(model).__name__, model.config.to_json_string(), attention, dtypes, device,
         repr(args), torch.__version__, transformers.__version__, __version__,
         hashlib.sha256(code).hexdigest(), Machine.here().describe(), _versions(CHECK_PACKAGES)],
    )  # fmt: skip
    path = cache_dir() / "checks" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
    try:
        return bool(json.loads(path.read_text())["ok"])
    except (OSError, ValueError, KeyError):
        pass
    ok = bool(check(model, device, *args))
    from loraplace.core.results import write_json

    write_json(path, {"check": name, "ok": ok})
    return ok


def _versions(packages: tuple[str, ...]) -> dict:
    from importlib import metadata

    found = {}
    for name in packages:
        try:
            found[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            found[name] = None
    return found
