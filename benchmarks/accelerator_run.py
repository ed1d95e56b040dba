"""The prepared accelerator run: one command that fits a 9-minute call on one GPU and leaves every
figure it finished in ``OUT/results.json`` and ``OUT/results.md``, even if it is killed.

    PYTHONPATH=. python3 benchmarks/accelerator_run.py --out OUT --data DIR                # the GPU
    PYTHONPATH=. python3 benchmarks/accelerator_run.py --out OUT --dry-run   # the plan, nothing run
    PYTHONPATH=. python3 benchmarks/accelerator_run.py --out OUT --tiny      # the same code on a CPU

**Order** (``--sections``; the figures that matter first). Each task is one framework's step of
one model, mode and batch at 224x224 in bfloat16 (autocast for PyTorch):

1. ``peak``: the best matmul rate (bf16 and float32, JAX and PyTorch), for MFU.
2. ``core``: training and inference at one batch (256) of VGG16, ResNet50, MobileNetV2 and
   EfficientNetB0: imgcls_jax and its PyTorch peer in eager mode, model by model.
3. ``compile``: the same steps with ``torch.compile`` (tens of seconds of compilation each).
4. ``batches``: batches 512 and 128, every framework.
5. ``frozen``: the transfer-learning first phase (head trained on a frozen base).
6. ``e2e``: ``fit`` of ``--data`` (flowers5) at 128x128 from scratch, device augmentation, the
   NumPy input pipeline: each epoch's images/s, the step alone, then the test accuracy.
7. ``families``: one model of every other family (``benchmarks.peers.FAMILY_MODELS`` not in
   ``core``: ResNet50V2, ConvNeXtTiny, EfficientNetV2S, MobileNetV3Large, DenseNet121, Xception,
   InceptionV3, InceptionResNetV2, MobileNet, NASNetMobile), training at the same batch:
   imgcls_jax and its PyTorch peer in eager mode (torchvision's model, else timm's; NASNetMobile
   has none, its row says so), each at 224 px or the model's smallest side if larger.

**Budget** (``--budget-s``, from the process's start). Before every task, every compilation and
every timed phase the run checks that the time left holds ``MARGIN`` times its estimate (priors
below, rescaled by the first calls measured in this run), and lists what does not fit under
"not run" with the reason. ``e2e`` stops between epochs when the next epoch and the evaluation
would not fit. A watchdog ends the process at ``--hard-stop-s`` whatever runs, saying so in the
results; SIGTERM does the same.

**Memory.** JAX's preallocation is limited before JAX starts (``XLA_PYTHON_CLIENT_PREALLOCATE=
false``, ``XLA_PYTHON_CLIENT_MEM_FRACTION=--jax-mem-fraction``), so PyTorch's peers get the rest;
``torch.cuda.empty_cache()`` runs after every PyTorch task. An out-of-memory step is a row with
its batch size, and the run goes on.

**Results.** ``results.json`` (every number, the plan, what each side ran, the memory limits) and
``results.md`` (the tables) are rewritten whole (temporary file + rename) after every task and
every e2e epoch: a kill leaves every finished row and names the task in flight. ``log.txt`` has
one whole line per row. FLOPs are the models' analytic counts (``benchmarks.perf.analytic_flops``,
taps on zero padding left out as XLA counts them), so no compiler quirk can cost a measured rate;
MFU is given against the peak measured here and against the datasheet.

**Compilation caches.** JAX's persistent cache and TorchInductor's cache live in ``--cache-dir``
(default ``CACHE_DIR`` in the system's temporary folder): a second call on the same warm machine
compiles less. Not under ``OUT`` by default: the device tool empties ``$OUT`` before each command
and brings back at most 8 files from it, which a cache's files could crowd out. With
``--resume PREVIOUS/results.json`` a second call skips the rows the first one finished and
carries them into its own results.

Needs JAX, flax, optax, orbax, numpy, Pillow, pytest (PyTorch, torchvision and timm for the
peers); no TensorFlow. ``--tiny`` runs the same code at 32x32 with batches of 8 on a CPU
(tests/test_accelerator_run.py, with TensorFlow made unimportable); its ``families`` section takes
one model (Xception, at its smallest side, 71 px).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

START = time.monotonic()  # the budget counts from here
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.perf, benchmarks.peers, imgcls_jax from this checkout

log = logging.getLogger("accelerator_run")
FLOWERS = ROOT.parent / "shared" / "data" / "flowers5"
SAMPLE = ROOT / "examples" / "data" / "flowers_sample"
CACHE_DIR = Path(tempfile.gettempdir()) / "imgcls_compile_cache"
SECTIONS = ("peak", "core", "compile", "batches", "frozen", "e2e", "families")
FRAMEWORKS = ("imgcls_jax", "torch eager", "torch compile")
E2E_SPLITS = {"train": 0.65, "val": 0.10, "test": 0.25}
MARGIN = 1.25  #: a task starts only if the time left is at least MARGIN x its estimate
IMGCLS_SIDE = (
    "create_model(arch, pooling='avg', 5 classes), bfloat16 compute with float32 parameters; uint8 "
    "images on the device, the model's preprocessing inside the jitted step; optax Adam (lr 1e-4, "
    "eps 1e-7) on every layer (train) or the head (frozen), state buffers donated; forward = the eval "
    "step (logits, loss, correct count); XLA autotunes its convolutions"
)
FLOPS_NOTE = (
    "the model's analytic count per image (benchmarks.perf.analytic_flops: convolutions and dense layers, "
    "a multiply-add = 2, taps on zero padding left out as XLA counts them; training = 3 x forward less "
    "the first convolution's input gradient; the optimizer left out) x images/s; MFU = that over the "
    "peak measured in this run / over the datasheet's dense bf16 figure"
)

#: Seconds of a task's first call (compilation, autotuning and one step) by framework and mode,
#: per model where they differ (a model not listed: the largest of its mode, the default guess).
#: "full": GUESSES for one H100 at 224x224 bf16, batch 256, from compile times of such steps
#: elsewhere and the models' depth (DenseNet121: 121 layers; NASNetMobile: 356 convolutions):
#: no GPU has run this script yet. The run rescales each framework's guesses by the ratio of its
#: own measured first calls to them, so only the first task of each framework relies on them.
#: "tiny": seen on the shared 2-core CPU under a load of ~12 (2026-12-06, the slow test of
#: tests/test_accelerator_run.py); a quiet machine is faster.
FIRST_CALL_S = {
    "full": {
        "imgcls_jax": {
            "train": {"vgg16": 25, "resnet50": 40, "mobilenetv2": 35, "efficientnetb0": 50,
                      "resnet50v2": 40, "convnexttiny": 40, "efficientnetv2s": 70, "mobilenetv3large": 45,
                      "densenet121": 90, "xception": 45, "inceptionv3": 70, "inceptionresnetv2": 120,
                      "mobilenet": 25, "nasnetmobile": 150},
            "forward": {"vgg16": 8, "resnet50": 12, "mobilenetv2": 10, "efficientnetb0": 15},
            "frozen": {"vgg16": 10, "resnet50": 15, "mobilenetv2": 12, "efficientnetb0": 18},
        },
        "torch eager": {
            "train": {"vgg16": 8, "resnet50": 8, "mobilenetv2": 8, "efficientnetb0": 8, "resnet50v2": 8,
                      "convnexttiny": 8, "efficientnetv2s": 12, "mobilenetv3large": 8, "densenet121": 15,
                      "xception": 8, "inceptionv3": 12, "inceptionresnetv2": 20, "mobilenet": 6},
            "forward": 4, "frozen": 5,
        },
        "torch compile": {
            "train": {"vgg16": 35, "resnet50": 60, "mobilenetv2": 55, "efficientnetb0": 80},
            "forward": {"vgg16": 20, "resnet50": 30, "mobilenetv2": 30, "efficientnetb0": 40},
            "frozen": {"vgg16": 20, "resnet50": 30, "mobilenetv2": 30, "efficientnetb0": 40},
        },
    },
    "tiny": {
        "imgcls_jax": {
            "train": {"vgg16": 20, "mobilenetv2": 80, "xception": 30},  # xception: 22 s at load ~4 (12-07)
            "forward": {"vgg16": 6, "mobilenetv2": 12},
            "frozen": {"vgg16": 5, "mobilenetv2": 11},
        },
        "torch eager": {"train": 3, "forward": 1, "frozen": 1},
        "torch compile": {"train": 120, "forward": 18, "frozen": 18},
    },
}  # fmt: skip
#: Other estimates (seconds), same sources: the peak, a timed phase before its step is known, the
#: e2e fit's first epoch (scan, decode, compilations) and each later one, its evaluation.
OTHER_S = {
    "full": {"peak": 25, "timed": 4, "e2e_first_epoch": 60, "e2e_epoch": 3, "e2e_eval": 30},
    "tiny": {"peak": 6, "timed": 2, "e2e_first_epoch": 75, "e2e_epoch": 7, "e2e_eval": 12},
}


def settings(tiny: bool) -> dict:
    """What the run measures: sizes, batches, models, timed runs, the e2e fit, the other families'
    models (``families``; each runs at ``size`` or its smallest side if larger)."""
    from benchmarks.peers import FAMILY_MODELS  # numpy and pytest only: JAX is not started here

    if tiny:
        return {
            "size": 32, "batch": 8, "more_batches": [16], "modes": ["train", "forward"],
            "archs": ["vgg16", "mobilenetv2"],  # VGG and a BatchNorm family: the same code paths
            "families": ["xception"],  # one program family, at its smallest side (71 px)
            "timed": 3, "e2e_size": 32, "e2e_batch": 8, "e2e_epochs": 2,
            "peak_shapes": [(256, 256, 256)], "estimates": "tiny",
        }  # fmt: skip
    archs = ["vgg16", "resnet50", "mobilenetv2", "efficientnetb0"]
    return {
        "size": 224, "batch": 256, "more_batches": [512, 128], "modes": ["train", "forward"],
        "archs": archs, "families": [a for a in FAMILY_MODELS if a not in archs],
        "timed": 10, "e2e_size": 128, "e2e_batch": 256, "e2e_epochs": 30,
        "peak_shapes": None, "estimates": "full",
    }  # fmt: skip


# ------------------------------------------------------------------------------ plan and budget


@dataclass(frozen=True)
class Task:
    """One thing to measure: ``framework`` ("peak", "e2e" or one of :data:`FRAMEWORKS`)."""

    section: str
    framework: str
    model: str = ""
    mode: str = ""
    batch: int = 0

    @property
    def key(self) -> str:
        """The same measurement has the same key in any section (``--resume`` matches on it)."""
        if self.framework in ("peak", "e2e"):
            return self.framework
        return f"{self.framework} {self.model} {self.mode} {self.batch}"


def plan(cfg: dict, sections) -> list[Task]:
    """The tasks of ``sections`` in the order they run."""
    tasks, batch = [], cfg["batch"]
    steps = [(arch, mode) for arch in cfg["archs"] for mode in cfg["modes"]]
    for section in sections:
        if section == "peak":
            tasks.append(Task(section, "peak"))
        elif section == "core":
            tasks += [Task(section, fw, a, m, batch) for a, m in steps for fw in FRAMEWORKS[:2]]
        elif section == "compile":
            tasks += [Task(section, FRAMEWORKS[2], a, m, batch) for a, m in steps]
        elif section == "batches":
            tasks += [
                Task(section, fw, a, m, b) for b in cfg["more_batches"] for a, m in steps for fw in FRAMEWORKS
            ]
        elif section == "frozen":
            tasks += [Task(section, fw, a, "frozen", batch) for a in cfg["archs"] for fw in FRAMEWORKS[:2]]
        elif section == "e2e":
            tasks.append(Task(section, "e2e"))
        elif section == "families":
            tasks += [Task(section, fw, a, "train", batch) for a in cfg["families"] for fw in FRAMEWORKS[:2]]
    return tasks


class Budget:
    """Seconds of the run's budget, counted from the process's start."""

    def __init__(self, seconds: float, start: float = START, clock=time.monotonic):
        self.seconds, self.start, self.clock = seconds, start, clock

    def used(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return self.seconds - self.used()

    def fits(self, estimate: float) -> bool:
        return self.left() >= MARGIN * estimate

    def why_not(self, estimate: float, what: str = "") -> str:
        return f"time budget: {what}~{estimate:.0f} s needed (x{MARGIN:g}), {max(self.left(), 0):.0f} s left"


class Estimates:
    """Seconds each task should take: the priors, each framework's scaled by its measured first calls."""

    def __init__(self, kind: str):
        self.first, self.other = FIRST_CALL_S[kind], OTHER_S[kind]
        self.source = "guesses for one H100" if kind == "full" else "seen on the shared 2-core CPU"
        self.seen: dict[str, list[float]] = {}  # framework -> [measured, prior] sums
        self.measured: dict[tuple, float] = {}  # (framework, model, mode) -> a first call's seconds

    def prior(self, task: Task) -> float:
        value = self.first[task.framework][task.mode]
        return float(value.get(task.model, max(value.values())) if isinstance(value, dict) else value)

    def scale(self, framework: str) -> float:
        measured, prior = self.seen.get(framework, (0.0, 0.0))
        return min(10.0, max(0.1, measured / prior)) if prior else 1.0

    def first_call(self, task: Task) -> float:
        """The same step's first call measured at another batch (compilation hardly depends on
        it), else the prior times the framework's measured/prior ratio so far."""
        same = self.measured.get((task.framework, task.model, task.mode))
        return same if same is not None else self.prior(task) * self.scale(task.framework)

    def observe(self, task: Task, seconds: float) -> None:
        sums = self.seen.setdefault(task.framework, [0.0, 0.0])
        sums[0] += seconds
        sums[1] += self.prior(task)
        self.measured[(task.framework, task.model, task.mode)] = seconds

    def task(self, task: Task) -> float:
        """The whole task: first call and timed runs; e2e: its first epoch and the evaluation."""
        if task.framework == "peak":
            return self.other["peak"]
        if task.framework == "e2e":
            return self.other["e2e_first_epoch"] + self.other["e2e_eval"] + self.other["timed"]
        return self.first_call(task) + self.other["timed"]


def dry_run(tasks: list[Task], est: Estimates, budget_s: float) -> str:
    """The plan as a table: each task's estimate, the running total, where the budget ends."""
    lines = [
        f"plan: {len(tasks)} tasks, budget {budget_s:.0f} s; estimates: {est.source} "
        f"(x{MARGIN:g} must fit; start-up of ~10-20 s not included)",
        f"{'#':>3}  {'section':8} {'task':42} {'est s':>6} {'total s':>8}",
    ]
    total, ended = 0.0, False
    for i, task in enumerate(tasks, 1):
        free = free_skip(task)  # a row saying why, at no cost
        seconds = 0.0 if free else est.task(task)
        if not ended and total + MARGIN * seconds > budget_s:
            lines.append("     --- the budget ends about here; what follows is listed as not run ---")
            ended = True
        total += seconds
        lines.append(f"{i:>3}  {task.section:8} {task.key:42} {seconds:>6.0f} {total:>8.0f}"
                     + (f"  skipped: {free.split(':')[0]}" if free else ""))  # fmt: skip
    return "\n".join(lines)


def free_skip(task: Task, no_torch: bool = False) -> str | None:
    """Why a PyTorch task is skipped without running (PyTorch not installed, no PyTorch peer of
    the model); ``None`` for any other task."""
    from benchmarks.peers import NO_TORCH_PEER

    if not task.framework.startswith("torch"):
        return None
    return "PyTorch not installed" if no_torch else NO_TORCH_PEER.get(task.model)


# ---------------------------------------------------------------------------------- recording


class Recorder:
    """The results and their files: rewritten whole after every change, safe from two threads."""

    def __init__(self, out: Path, results: dict, budget: Budget):
        self.out, self.results, self.budget = out, results, budget
        self.lock = threading.RLock()

    def write(self) -> None:
        with self.lock:
            self.results["budget"]["used_s"] = round(self.budget.used(), 1)
            text = json.dumps(self.results, indent=1, default=_jsonable) + "\n"
            _atomic_write(self.out / "results.json", text)
            _atomic_write(self.out / "results.md", markdown(self.results))

    def start(self, task: Task) -> None:
        with self.lock:
            self.results["in_flight"] = {"task": task.key, "since_s": round(self.budget.used(), 1)}
            self.write()

    def row(self, row: dict) -> None:
        with self.lock:
            self.results["rows"].append(row)
            self.results["in_flight"] = None
        log.info("row %s", json.dumps(row, default=_jsonable))
        self.write()

    def done(self) -> None:
        with self.lock:
            self.results["in_flight"] = None
            self.write()

    def not_run(self, task: Task, reason: str) -> None:
        with self.lock:
            self.results["not_run"].append({"key": task.key, "section": task.section, "reason": reason})
        log.info("not run: %s (%s)", task.key, reason)
        self.write()

    def stop(self, status: str) -> None:
        with self.lock:
            self.results["status"] = status
            self.write()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def install_stops(rec: Recorder, hard_stop_s: float) -> None:
    """SIGTERM and a watchdog at ``hard_stop_s`` after the start: results marked, process ended."""

    def stop(why: str, code: int) -> None:
        try:
            flight = (rec.results.get("in_flight") or {}).get("task")
            status = f"{why} at {rec.budget.used():.0f} s" + (f", during {flight}" if flight else "")
            log.warning("%s", status)
            for _ in range(3):  # the main thread may be changing the results outside the lock
                try:
                    rec.stop(status)
                    break
                except RuntimeError:
                    time.sleep(0.05)
            logging.shutdown()
        finally:
            os._exit(code)

    timer = threading.Timer(max(0.0, hard_stop_s - rec.budget.used()), stop, ("stopped by the watchdog", 3))
    timer.daemon = True
    timer.start()
    signal.signal(signal.SIGTERM, lambda *_: stop("terminated (SIGTERM)", 143))


# ------------------------------------------------------------------------------ measuring


@dataclass
class Context:
    """What every task needs."""

    cfg: dict
    budget: Budget
    est: Estimates
    rec: Recorder
    data: Path | None
    tiny: bool
    peak: float | None = None  #: measured bf16/f32 matmul FLOP/s
    datasheet: float | None = None  #: the vendor's bf16 FLOP/s of this device
    row: dict | None = None  #: the row being measured (kept when the task fails part-way)


def timed(run, warmup: int, timed_runs: int) -> float:
    """Median seconds of one ``run()`` (which waits for its result), after ``warmup`` runs."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(timed_runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def out_of_memory(error: BaseException) -> bool:
    text = f"{type(error).__name__} {error}"
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or "OutOfMemory" in text


def measure(run, task: Task, ctx: Context) -> None:
    """First call (compilation, autotuning, one step), then the timed runs if they fit, into ``ctx.row``."""
    row = ctx.row
    start = time.perf_counter()
    run()
    row["first_call_s"] = round(time.perf_counter() - start, 2)
    ctx.est.observe(task, row["first_call_s"])
    start = time.perf_counter()
    run()
    step = time.perf_counter() - start
    row["second_call_s"] = round(step, 3)  # far above step_ms: the second call compiled again
    needed = step * (1 + ctx.cfg["timed"])
    if not ctx.budget.fits(needed):
        row["not_timed"] = ctx.budget.why_not(needed, "the timed runs, ")
        return
    seconds = timed(run, 1, ctx.cfg["timed"])
    row["step_ms"] = round(1e3 * seconds, 3)
    row["images_per_s"] = round(task.batch / seconds, 1)


def task_size(task: Task, ctx: Context) -> int:
    """The task's image side: the run's, or the model's smallest if larger (recorded in its row)."""
    from benchmarks.peers import image_size

    ctx.row["image_size"] = image_size(task.model, ctx.cfg["size"])
    return ctx.row["image_size"]


def jax_task(task: Task, ctx: Context) -> None:
    from benchmarks.peers import jax_runner

    run, _, _ = jax_runner(task.mode, task_size(task, ctx), task.batch, dtype="bfloat16", arch=task.model)
    measure(run, task, ctx)
    if "images_per_s" in ctx.row:
        add_flops(ctx.row, run.model, task, ctx)


def add_flops(row: dict, model, task: Task, ctx: Context) -> None:
    """The analytic FLOPs of the step, the rate they give and MFU against the measured peak and
    the datasheet; a failure here is recorded beside the rate, never instead of it."""
    from benchmarks.perf import analytic_flops

    try:
        per_image = analytic_flops(model, row.get("image_size", ctx.cfg["size"]), task.mode)
    except Exception as error:  # the measured rate stays
        row["flops_error"] = f"{type(error).__name__}: {error}"
        return
    achieved = per_image * row["images_per_s"]
    row["gflop_per_image"] = round(per_image / 1e9, 3)
    row["tflop_per_s"] = float(f"{achieved / 1e12:.4g}")
    row["mfu_measured_peak"] = round(achieved / ctx.peak, 4) if ctx.peak else None
    row["mfu_datasheet"] = round(achieved / ctx.datasheet, 4) if ctx.datasheet else None


def torch_task(task: Task, ctx: Context) -> None:
    from benchmarks.peers import torch_runner

    compile_ = task.framework == "torch compile"
    run = torch_runner(
        task.mode, task_size(task, ctx), task.batch, compile=compile_, bf16=_torch_gpu(), arch=task.model
    )
    ctx.row["settings"] = run.settings
    measure(run, task, ctx)


def _torch_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def release(task: Task) -> None:
    """Free the task's device memory for the next one (PyTorch's cache, JAX's executables)."""
    gc.collect()
    if task.framework == "imgcls_jax":
        import jax

        jax.clear_caches()
    torch = sys.modules.get("torch")
    if task.framework.startswith("torch") and torch is not None:
        if task.framework == "torch compile":
            torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def peak_task(task: Task, ctx: Context) -> None:
    from benchmarks.perf import measure_peak

    peak = measure_peak(("bfloat16", "float32"), ctx.cfg["peak_shapes"])
    ctx.rec.results["peak"] = {
        "flops": peak.flops, "best": peak.best, "device": peak.device, "datasheet_bf16": peak.datasheet,
        "rates": {k: round(v, 1) for k, v in peak.rates.items()},
    }  # fmt: skip
    ctx.peak = peak.flops
    log.info("%s", peak.describe())


def run_task(task: Task, ctx: Context) -> None:
    """One task, its failure recorded as its row (out of memory: with the batch size)."""
    import pytest  # its skip exception: a peer that is not installed

    ctx.row = {"key": task.key, "section": task.section, "framework": task.framework, "model": task.model,
               "mode": task.mode, "batch": task.batch}  # fmt: skip
    ctx.rec.start(task)
    try:
        runner = {"peak": peak_task, "e2e": e2e_task, "imgcls_jax": jax_task}.get(task.framework, torch_task)
        runner(task, ctx)
        if task.framework in ("peak", "e2e"):
            ctx.rec.done()
        else:
            ctx.rec.row(ctx.row)
    except pytest.skip.Exception as skip:
        ctx.rec.row({**ctx.row, "skipped": str(skip)})
    except Exception as error:
        oom = out_of_memory(error) and task.framework not in ("peak", "e2e")
        log.log(logging.INFO if oom else logging.ERROR, "%s failed", task.key, exc_info=not oom)
        detail = f"{type(error).__name__}: {str(error)[:600]}"
        if task.framework in ("peak", "e2e"):
            ctx.rec.results["errors"][task.key] = detail
            ctx.rec.done()
        else:
            failed = {"error": "out of memory", "oom_batch": task.batch} if oom else {"error": detail}
            ctx.rec.row({**ctx.row, **failed})
    finally:
        ctx.row = None
        release(task)


def run_plan(tasks: list[Task], ctx: Context, done: set[str]) -> None:
    import importlib.util

    no_torch = importlib.util.find_spec("torch") is None
    for task in tasks:
        if task.key in done:
            continue
        why = free_skip(task, no_torch)
        if why:  # costs nothing: no budget check
            ctx.rec.row({"key": task.key, "section": task.section, "framework": task.framework,
                         "model": task.model, "mode": task.mode, "batch": task.batch,
                         "skipped": why})  # fmt: skip
            continue
        estimate = ctx.est.task(task)
        if not ctx.budget.fits(estimate):
            ctx.rec.not_run(task, ctx.budget.why_not(estimate))
            continue
        run_task(task, ctx)


# ------------------------------------------------------------------------------------- e2e


class BudgetStop(Exception):
    """Raised by the e2e epoch callback when another epoch and the evaluation would not fit."""


def e2e_config(data: Path, work: Path, cfg: dict):
    """``fit``'s configuration for the e2e section: from scratch, device augmentation, NumPy input."""
    from imgcls_jax import PhaseConfig, TrainConfig

    return TrainConfig(
        data=str(data), run_dir=str(work / "e2e_run"), image_size=cfg["e2e_size"],
        batch_size=cfg["e2e_batch"], dtype="bfloat16", splits=dict(E2E_SPLITS), pooling="avg",
        head_units=(256,), dropout=0.5,
        augment={"flip": "horizontal", "rotation": 0.05, "zoom": 0.1, "translation": 0.1},
        augment_on="device", data_backend="numpy", label_smoothing=0.1, keep_checkpoints=1,
        phases=[PhaseConfig(epochs=cfg["e2e_epochs"], trainable="all", optimizer="adam", learning_rate=1e-3,
                            warmup_epochs=min(2, cfg["e2e_epochs"]), schedule="cosine")],
    )  # fmt: skip


def e2e_task(task: Task, ctx: Context) -> None:
    with tempfile.TemporaryDirectory() as work:  # checkpoints stay out of OUT
        source = tiny_subset(ctx.data, Path(work) / "data") if ctx.tiny else ctx.data
        e2e(source, Path(work), ctx)


def e2e(data: Path, work: Path, ctx: Context) -> None:
    """``fit`` (each epoch recorded as it ends; stopped between epochs by the budget), then the
    compiled step alone on a batch already on the device, then the test split's accuracy."""
    from imgcls_jax.train import Trainer

    config, other = e2e_config(data, work, ctx.cfg), ctx.est.other
    record = ctx.rec.results["e2e"] = {"config": json.loads(config.to_json()), "epochs": [], "status": "fit"}
    reserve = other["e2e_eval"] + other["timed"]
    clock = [time.perf_counter()]

    def after_epoch(epoch: int, row: dict) -> None:
        now = time.perf_counter()
        kept = {k: row[k] for k in ("images_per_s", "train_loss", "val_accuracy")}
        record["epochs"].append({"epoch": epoch, "wall_s": round(now - clock[0], 2), **kept})
        ctx.rec.write()
        # the next epoch takes as long as this one, except after the first (scan, decode, compile)
        needed = (other["e2e_epoch"] if epoch == 0 else now - clock[0]) + reserve
        if epoch + 1 < ctx.cfg["e2e_epochs"] and not ctx.budget.fits(needed):
            raise BudgetStop(ctx.budget.why_not(needed, "another epoch and the evaluation, "))
        clock[0] = now

    start = time.perf_counter()
    trainer = Trainer(config, resume=False, callbacks=[after_epoch])
    try:
        trainer.run()
        record["status"] = f"fit: all {ctx.cfg['e2e_epochs']} epochs"
    except BudgetStop as stop:
        record["status"] = f"fit stopped after {len(record['epochs'])} epochs: {stop}"
    record["fit_wall_s"] = round(time.perf_counter() - start, 1)
    ctx.rec.write()
    if ctx.budget.fits(other["timed"]):
        record["step_alone_images_per_s"] = round(ctx.cfg["e2e_batch"] / e2e_step_alone(trainer, ctx), 1)
        ctx.rec.write()
    if not ctx.budget.fits(other["e2e_eval"]):
        record["test"] = ctx.budget.why_not(other["e2e_eval"], "the evaluation, ")
        return
    record.update(test_accuracy(config.run_dir))


def e2e_step_alone(trainer, ctx: Context) -> float:
    """Median seconds of the fit's compiled train step on one batch already on the device."""
    import jax

    from imgcls_jax.parallel import prefetch_to_device

    phase = trainer.phase
    batch = next(iter(prefetch_to_device(phase.train.epoch(0), mesh=trainer.mesh)))
    holder = {"state": phase.state}

    def step():
        holder["state"], metrics = phase.train_step(holder["state"], phase.split.frozen, batch)
        jax.block_until_ready(metrics["loss"])

    return timed(step, 2, ctx.cfg["timed"])


def test_accuracy(run_dir) -> dict:
    """The best checkpoint's accuracy on the run's test split (the one use of the evaluation API)."""
    import numpy as np

    from imgcls_jax import evaluate_run

    report = evaluate_run(run_dir, split="test", which="best")
    return {
        "test_accuracy": report.top1,
        "test_correct": int(np.trace(report.confusion)),
        "test_count": report.count,
    }


def tiny_subset(data: Path, to: Path, classes: int = 3, per_class: int = 12) -> Path:
    """The first ``per_class`` images of the first ``classes`` classes of ``data``, copied."""
    import shutil

    for folder in sorted(p for p in data.iterdir() if p.is_dir())[:classes]:
        (to / folder.name).mkdir(parents=True)
        for file in sorted(folder.iterdir())[:per_class]:
            shutil.copy(file, to / folder.name / file.name)
    return to


class DataError(ValueError):
    """``--data`` cannot serve the e2e section (found before any GPU work)."""


def check_data(data: Path | None, cfg: dict) -> dict:
    """The e2e data folder's images and its train split against the batch, before any GPU work.

    Raises :class:`DataError` naming the folder, what it holds and what to do."""
    from imgcls_jax.data import DatasetError, scan_folder, split_records

    if data is None:
        raise DataError(
            f"no --data and no {FLOWERS}: the e2e section needs flowers5 (4,317 photos; the 200-image "
            "sample cannot fill a batch of 256). Pass --data DIR, or leave e2e out of --sections"
        )
    try:
        found = scan_folder(data, verify=False)
    except DatasetError as error:
        raise DataError(f"--data {data}: {error}") from error
    records = found.records if found.presplit else split_records(found.records, E2E_SPLITS)
    train = sum(r.split == "train" for r in records)
    need = cfg["e2e_batch"]
    if train < need:
        raise DataError(
            f"--data {data}: {len(records)} images, of which the e2e train split "
            f"({E2E_SPLITS['train']:.0%}) holds {train}, fewer than one batch of {need}: pass a folder with "
            f"at least {int(need / E2E_SPLITS['train']) + 1} images (flowers5 has 4,317), or leave e2e out "
            "of --sections"
        )
    return {"folder": str(data), "images": len(records), "classes": len(found.class_names), "train": train}


# ---------------------------------------------------------------------------------- markdown


def _rate(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _cell(row: dict | None) -> str:
    if row is None:
        return ""
    if "images_per_s" in row:
        return _rate(row["images_per_s"])
    if row.get("error") == "out of memory":
        return f"out of memory (batch {row['oom_batch']})"
    if "not_timed" in row:
        return f"compiled in {row['first_call_s']:.0f} s, not timed (budget)"
    if "skipped" in row:
        return "skipped: " + row["skipped"][:40]
    return "error (see results.json)" if "error" in row else ""


def _mfu(row: dict | None) -> str:
    if not row or "images_per_s" not in row or "tflop_per_s" not in row:
        return ""
    parts = [
        f"{100 * row[k]:.1f}%" if row.get(k) is not None else "-"
        for k in ("mfu_measured_peak", "mfu_datasheet")
    ]
    return f"{row['tflop_per_s']:.3g} TFLOP/s, {parts[0]} / {parts[1]}"


def throughput_table(rows: list[dict], size: int | None = None) -> list[str]:
    """One line per (model, mode, batch): imgcls_jax beside its PyTorch peers, in run order; a
    model run at another side than ``size`` (its smallest) says so beside its name."""
    groups: dict[tuple, dict] = {}
    for row in rows:
        groups.setdefault((row["model"], row["mode"], row["batch"]), {})[row["framework"]] = row
    lines = [
        "| model | mode | batch | imgcls_jax img/s | TFLOP/s, MFU (measured peak / datasheet) "
        "| torch eager img/s | torch.compile img/s | imgcls_jax / best torch "
        "| first calls s (jax, eager, compile) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (model, mode, batch), by in groups.items():
        ours, peers = by.get("imgcls_jax"), [by.get(f) for f in FRAMEWORKS[1:]]
        rates = [p["images_per_s"] for p in peers if p and "images_per_s" in p]
        ratio = (
            f"{ours['images_per_s'] / max(rates):.2f}x" if rates and ours and "images_per_s" in ours else ""
        )
        firsts = ", ".join(
            f"{by[f]['first_call_s']:.0f}" if "first_call_s" in by.get(f, {}) else "-" for f in FRAMEWORKS
        )
        sides = {r["image_size"] for r in by.values() if "image_size" in r} - {size}
        name = model + "".join(f" ({side} px)" for side in sorted(sides)) if size else model
        cells = [name, mode, str(batch), _cell(ours), _mfu(ours), *map(_cell, peers), ratio, firsts]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def e2e_lines(e: dict) -> list[str]:
    epochs = e.get("epochs", [])
    lines = ["", "## End to end: fit from scratch", "", f"Status: {e.get('status', '')}."]
    if epochs:
        rates = [x["images_per_s"] for x in epochs]
        lines.append(
            f"{len(epochs)} epochs ({e.get('fit_wall_s', '?')} s): first epoch {_rate(rates[0])} img/s, last "
            f"{_rate(rates[-1])}, best {_rate(max(rates))}; best val accuracy "
            f"{100 * max(float(x['val_accuracy'] or 0) for x in epochs):.2f}%"
        )
    if "step_alone_images_per_s" in e:
        lines.append(
            f"The compiled step alone on a batch on the device: {_rate(e['step_alone_images_per_s'])} img/s."
        )
    if "test_accuracy" in e:
        lines.append(
            f"Test accuracy (best checkpoint): {100 * e['test_accuracy']:.2f}% "
            f"({e['test_correct']}/{e['test_count']})."
        )
    elif "test" in e:
        lines.append(f"Test: not evaluated ({e['test']}).")
    return lines


def _memory(env: dict) -> str:
    memory = dict(env["memory"])
    before = memory.pop("set_before_jax_started")
    text = ", ".join(f"{k}={v}" for k, v in memory.items())
    text += " (set before JAX started)" if before else " (set AFTER JAX started: not in force)"
    if "jax_bytes_limit_gib" in env:
        text += f"; JAX's allocator limit {env['jax_bytes_limit_gib']} GiB"
    return text


def markdown(results: dict) -> str:
    """``results.md``: a whole file, whatever part of the plan has run."""
    env, budget = results["environment"], results["budget"]
    lines = [
        f"# Accelerator run, {env['date']}", "",
        f"Device: {env.get('device', '?')} ({env.get('platform', '?')}); jax {env.get('jax', '?')}, torch "
        f"{env.get('torch', 'not installed')}. Command: `{env['command']}`", "",
        f"Memory: {_memory(env)}. Compile caches: {env['compile_cache']}.", "",
        f"Status: {results['status']}; budget {budget['budget_s']:.0f} s, used {budget['used_s']:.0f} s"
        + (f"; in flight: {results['in_flight']['task']}" if results.get("in_flight") else "") + ".", "",
    ]  # fmt: skip
    if "peak" in results:
        p = results["peak"]
        sheet = f"{p['datasheet_bf16'] / 1e12:.0f}" if p.get("datasheet_bf16") else "unknown"
        lines += [
            f"Peak matmul: {p['flops'] / 1e12:.1f} TFLOP/s measured ({p['best']}); bf16 datasheet {sheet}.",
            "",
        ]
    lines += [f"imgcls_jax: {IMGCLS_SIDE}.", "", f"FLOPs: {FLOPS_NOTE}.", ""]
    torch_side = next((r["settings"] for r in results["rows"] if "settings" in r), None)
    if torch_side:
        lines += [
            "PyTorch: " + "; ".join(f"{k} {v}" for k, v in torch_side.items() if k != "model") + ".",
            "",
        ]
    size = results["settings"]["size"]
    lines += [f"## Steps at {size}x{size} (a model's smallest side where larger), bfloat16", ""]
    lines += throughput_table(results["rows"], size)
    peer_models = {r["model"]: r["settings"]["model"] for r in results["rows"] if "settings" in r}
    if peer_models:
        lines += ["", "PyTorch peers: " + "; ".join(f"{m}: {what}" for m, what in peer_models.items()) + "."]
    if "e2e" in results:
        lines += e2e_lines(results["e2e"])
    finished = {r["key"] for r in results["rows"]} | {n["key"] for n in results["not_run"]}
    flight = (results.get("in_flight") or {}).get("task")
    pending = [p["key"] for p in results["plan"] if p["key"] not in finished and p["key"] != flight
               and p["key"] not in results.get("carried", [])]  # fmt: skip
    pending = [k for k in pending if not (k in ("peak", "e2e") and k in results)]
    if results["not_run"] or pending:
        lines += ["", "## Not run", ""]
        lines += [f"- {n['key']}: {n['reason']}" for n in results["not_run"]]
        lines += [f"- {k}: not reached" for k in pending]
    for name, error in results["errors"].items():
        lines += ["", f"{name} failed: {error}"]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------- main


def limit_memory(fraction: float) -> dict:
    """Before JAX starts: JAX allocates on demand up to ``fraction`` of the GPU (not 75% at its first
    use), PyTorch's allocator grows in expandable segments. Returns what is in force."""
    started = "jax" in sys.modules
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{fraction:g}"
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    names = ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION", "PYTORCH_CUDA_ALLOC_CONF")
    memory = {name: os.environ[name] for name in names}
    memory["set_before_jax_started"] = not started
    return memory


def compile_caches(folder: Path, min_compile_s: float = 1.0) -> str:
    """JAX's persistent compilation cache (compilations of at least ``min_compile_s``) and
    TorchInductor's cache under ``folder``."""
    import jax

    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder / "torchinductor"))
    jax.config.update("jax_compilation_cache_dir", str(folder / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
    return f"jax {folder / 'jax'}, torchinductor {os.environ['TORCHINDUCTOR_CACHE_DIR']}"


def environment(memory: dict, cache: str) -> dict:
    import importlib.util

    import jax

    device = jax.devices()[0]
    env = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": str(device.device_kind), "platform": jax.default_backend(), "jax": jax.__version__,
        "python": sys.version.split()[0], "command": " ".join(sys.argv), "memory": memory,
        "compile_cache": cache,
    }  # fmt: skip
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        env["jax_bytes_limit_gib"] = round(stats["bytes_limit"] / 2**30, 1)
    if importlib.util.find_spec("torch") is not None:
        import torch

        env["torch"] = torch.__version__
    return env


def carry_previous(path: Path, results: dict, ctx: Context) -> set[str]:
    """``--resume``: the finished rows, peak and e2e of an earlier run's results, carried over."""
    previous = json.loads(path.read_text())
    done = {
        r["key"] for r in previous.get("rows", []) if "images_per_s" in r or r.get("error") == "out of memory"
    }
    results["rows"] += [{**r, "from": str(path)} for r in previous["rows"] if r["key"] in done]
    if "peak" in previous and previous["peak"]["device"] == results["environment"]["device"]:
        results["peak"], ctx.peak = previous["peak"], previous["peak"]["flops"]
        done.add("peak")
    if "test_accuracy" in previous.get("e2e", {}):
        results["e2e"] = {**previous["e2e"], "from": str(path)}
        done.add("e2e")
    results["carried"] = sorted(done)
    return done


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="folder for results.md, results.json, log.txt")
    parser.add_argument("--data", help=f"the e2e photos (default {FLOWERS} if there; --tiny: the sample)")
    parser.add_argument("--tiny", action="store_true", help="32x32, batches of 8, on a CPU: the same code")
    parser.add_argument(
        "--budget-s", type=float, default=480, help="the run's time budget from its start (s)"
    )
    parser.add_argument(
        "--hard-stop-s", type=float, help="the watchdog ends the run here (default budget + 50 s)"
    )
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, run in this order: {SECTIONS}"
    )
    parser.add_argument(
        "--cache-dir", default=str(CACHE_DIR), help=f"compilation caches (default {CACHE_DIR})"
    )
    parser.add_argument("--jax-mem-fraction", type=float, default=0.45, help="JAX's share of the GPU memory")
    parser.add_argument("--resume", help="an earlier results.json: its finished rows are carried, not rerun")
    parser.add_argument("--dry-run", action="store_true", help="print the plan with estimates; run nothing")
    args = parser.parse_args(argv)
    if args.resume and not Path(args.resume).is_file():
        parser.error(f"--resume {args.resume}: no such file (an earlier run's results.json)")
    unknown = [s for s in args.sections.split(",") if s not in SECTIONS]
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    cfg, sections = settings(args.tiny), args.sections.split(",")
    tasks, est = plan(cfg, sections), Estimates(cfg["estimates"])
    if args.dry_run:
        print(dry_run(tasks, est, args.budget_s))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    memory = limit_memory(args.jax_mem_fraction)  # before anything imports JAX
    data = Path(args.data) if args.data else (SAMPLE if args.tiny else FLOWERS if FLOWERS.is_dir() else None)
    try:
        data_info = check_data(data, cfg) if "e2e" in sections else None
    except DataError as error:
        print(f"accelerator_run: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(out / "log.txt")])  # fmt: skip
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cache = compile_caches(Path(args.cache_dir), 0.0 if args.tiny else 1.0)  # tiny: every compilation
    budget = Budget(args.budget_s)
    planned = [{"key": t.key, "section": t.section, "estimate_s": round(est.task(t), 1)} for t in tasks]
    results = {"environment": environment(memory, cache), "settings": cfg, "data": data_info,
               "status": "running", "budget": {"budget_s": args.budget_s, "margin": MARGIN, "used_s": 0.0},
               "in_flight": None, "plan": planned, "sides": {"imgcls_jax": IMGCLS_SIDE, "flops": FLOPS_NOTE},
               "rows": [], "not_run": [], "errors": {}}  # fmt: skip
    rec = Recorder(out, results, budget)
    ctx = Context(cfg, budget, est, rec, data, args.tiny)
    from benchmarks.perf import datasheet_peak

    ctx.datasheet = datasheet_peak(results["environment"]["device"], "bfloat16")
    if results["environment"]["platform"] == "cpu" and not args.tiny:
        rec.stop("refused: JAX sees no accelerator (its GPU plugin did not load?); --tiny runs on a CPU")
        print(f"accelerator_run: {results['status']}", file=sys.stderr)
        return 2
    done = carry_previous(Path(args.resume), results, ctx) if args.resume else set()
    install_stops(rec, args.hard_stop_s or args.budget_s + 50)
    rec.write()
    run_plan(tasks, ctx, done)
    rec.stop("finished")
    print((out / "results.md").read_text())
    return (
        1
        if results["errors"] or any("error" in r and r["error"] != "out of memory" for r in results["rows"])
        else 0
    )


if __name__ == "__main__":
    sys.exit(main())
