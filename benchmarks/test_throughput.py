"""Device throughput of VGG16 steps (and of one model of every other family: ``FAMILIES``), with
MFU, side by side with PyTorch and Keras 3.

Groups (pytest-benchmark ``group``):

* ``peak-matmul``: the device's peak matmul rate in this run (``benchmarks.perf.measure_peak``:
  the best of several shapes, of the step's dtype and float32, of JAX and of PyTorch/NumPy where
  they run), the denominator of every MFU below, with the datasheet figure beside it where known.
  ``test_no_mfu_above_one`` fails if any row's MFU exceeds 100% (the peak was not a peak).
* ``eval-step``: imgcls_jax's jitted eval step (forward, masked loss sums, correct count) vs
  PyTorch ``inference_mode`` (eager, ``torch.compile``) vs Keras ``predict_on_batch``.
* ``train-full``: one step training every layer (Adam), vs PyTorch and Keras ``train_on_batch``.
* ``train-frozen``: the frozen-base phase (base forward only, head trained), vs the same in
  PyTorch (``no_grad`` base) and Keras (``base.trainable = False``).
* ``e2e-epoch``: ``imgcls_jax.fit`` for two epochs on real photos; the row is the second
  epoch's training images/s as the loop measures it (cached decoded images, augmentation,
  host-to-device copies and steps sharing the machine; compilation and the cache fill fall in
  the first epoch), and ``fit_wall_s`` the whole call. Needs TensorFlow and
  ``../shared/data/flowers5``.
* the input pipeline alone is ``benchmarks/test_input_pipeline.py`` (group ``input-pipeline``).

Steps run on synthetic batches already on the device, so the device is timed alone; compile
and warm-up are excluded (warm-up rounds), medians of the timed rounds. Each row records images/s,
step ms, the step's FLOPs from XLA's cost analysis of imgcls_jax's compiled step (the same work
for every framework of the row), the analytic count beside it (``imgcls_jax.models.flops.vgg_flops``,
XLA's padding convention), and MFU = XLA FLOPs / step time / measured peak. The last test prints
the table with each imgcls_jax row's ratio to the fastest peer of its row.

Sizes by backend (override with environment variables):

* CPU: ``IMGCLS_BENCH_SIZE=64``, ``IMGCLS_BENCH_BATCHES=16``, float32: the example's shape,
  minutes in all.
* GPU/TPU: 224x224, ``bfloat16`` compute (parameters float32; PyTorch with bf16 autocast,
  Keras with ``mixed_bfloat16``), batches ``64,128,256,512``: a batch that does not fit is
  skipped as out of memory.

``IMGCLS_BENCH_DTYPE`` and ``IMGCLS_BENCH_ROUNDS`` (a multiplier) as usual;
``IMGCLS_BENCH_TABLE=path.md`` also writes the table there. Peers not installed are skipped with
the reason.

    .venv/bin/pytest benchmarks/test_throughput.py -p no:cacheprovider
"""

from __future__ import annotations

import gc
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import jax
import pytest

from benchmarks import peers
from benchmarks.perf import analytic_flops, compiled_flops, measure_peak, mfu
from imgcls_jax.models import create_model
from imgcls_jax.models.flops import vgg_flops

BACKEND = jax.default_backend()
ACCEL = BACKEND != "cpu"
SIZE = int(os.environ.get("IMGCLS_BENCH_SIZE", 224 if ACCEL else 64))
DTYPE = os.environ.get("IMGCLS_BENCH_DTYPE", "bfloat16" if ACCEL else "float32")
BATCHES = [
    int(b) for b in os.environ.get("IMGCLS_BENCH_BATCHES", "64,128,256,512" if ACCEL else "16").split(",")
]
ROUNDS = max(2, round((20 if ACCEL else 3) * float(os.environ.get("IMGCLS_BENCH_ROUNDS", "1"))))
FRAMEWORKS = ("imgcls_jax", "torch-eager", "torch-compile", "keras")
GROUPS = {"forward": "eval-step", "train": "train-full", "frozen": "train-frozen"}
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flowers5"

ROWS: dict[tuple[str, int, str], dict] = {}  # (group, batch, framework) -> extra_info
_STATE: dict = {}  # peak FLOP/s and XLA FLOPs per (mode, batch), measured once per session


def _measure_peak():
    """The best matmul rate over shapes, dtypes (the step's and float32) and frameworks."""
    if "peak_info" not in _STATE:
        _STATE["peak_info"] = measure_peak((DTYPE,) if DTYPE == "float32" else (DTYPE, "float32"))
    return _STATE["peak_info"]


def _peak() -> float:
    return _measure_peak().flops


def _out_of_memory(error: BaseException) -> bool:
    text = f"{type(error).__name__} {error}"
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or "OutOfMemory" in text


def _jax_flops(mode: str, batch: int) -> dict:
    """XLA's FLOPs of imgcls_jax's compiled step and the analytic count, per step. Counted on the
    step with XLA's convolutions (the same work): XLA's cost analysis does not count the oneDNN
    custom calls ``conv_impl="auto"`` runs on CPU."""
    key = (mode, batch)
    if key not in _STATE:
        _, step, args = peers.jax_runner(mode, SIZE, batch, dtype=DTYPE, impl="xla")
        if "arch" not in _STATE:  # the analytic count reads the architecture and head shapes
            _STATE["arch"] = create_model(
                "vgg16", num_classes=peers.NUM_CLASSES, pooling="avg", input_shape=(SIZE, SIZE, 3)
            )
        arch = _STATE["arch"]
        _STATE[key] = {
            "xla": compiled_flops(step, *args),
            "analytic": batch * vgg_flops(arch, SIZE, mode, padding="valid"),
        }
    return _STATE[key]


def _build(framework: str, mode: str, batch: int):
    bf16 = DTYPE == "bfloat16"
    if framework == "imgcls_jax":
        run = peers.jax_runner(mode, SIZE, batch, dtype=DTYPE)[0]
        _jax_flops(mode, batch)
        return run
    if framework.startswith("torch"):
        return peers.torch_runner(mode, SIZE, batch, compile=framework == "torch-compile", bf16=bf16)
    return peers.keras_runner(mode, SIZE, batch, bf16=bf16)


def _record(benchmark, group: str, batch: int, framework: str, flops: dict | None, size: int = SIZE):
    median = benchmark.stats.stats.median
    info = {
        "device": str(jax.devices()[0].device_kind) if ACCEL else platform.processor() or "cpu",
        "dtype": DTYPE,
        "image_size": size,
        "batch": batch,
        "images_per_s": round(batch / median, 2),
        "step_ms": round(1e3 * median, 3),
    }
    if flops:
        info.update(
            gflop_per_image_xla=round(flops["xla"] / batch / 1e9, 3),
            gflop_per_image_analytic=round(flops["analytic"] / batch / 1e9, 3),
            tflops=round(flops["xla"] / median / 1e12, 3),
            peak_tflops=round(_peak() / 1e12, 3),
            mfu=round(mfu(flops["xla"], median, _peak()), 4),
        )
    benchmark.extra_info.update(info)
    ROWS[(group, batch, framework)] = info


def test_peak_matmul(benchmark):
    """Measure the peak once, as its own row: every shape's rate goes into ``extra_info``."""
    benchmark.group = f"peak-matmul {DTYPE}"
    benchmark.pedantic(_measure_peak, rounds=1, iterations=1)
    peak = _measure_peak()
    benchmark.extra_info.update(
        dtype=DTYPE, peak_tflops=round(peak.flops / 1e12, 3), best=peak.best, device=peak.device,
        datasheet_tflops=None if peak.datasheet is None else round(peak.datasheet / 1e12, 1),
        rates_tflops={k: round(v / 1e12, 4) for k, v in peak.rates.items()},
    )  # fmt: skip
    assert peak.flops > 0


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("mode", list(GROUPS))
def test_step(benchmark, mode, batch, framework):
    group = GROUPS[mode]
    benchmark.group = f"{group} {SIZE}px {DTYPE} batch {batch}"
    try:
        run = _build(framework, mode, batch)
        benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=2 if framework == "torch-compile" else 1)
        flops = _jax_flops(mode, batch)
    except Exception as error:  # a batch that does not fit is a skip, anything else a failure
        if _out_of_memory(error):
            pytest.skip(f"{framework} {group} batch {batch}: out of memory ({type(error).__name__})")
        raise
    finally:
        run = None
        _release_device_memory()
    _record(benchmark, group, batch, framework, flops)


#: One model of each other family (``IMGCLS_BENCH_FAMILIES``, comma-separated; empty: none; default
#: :data:`benchmarks.peers.FAMILY_MODELS`, every family but VGG), at the first batch size and at
#: ``SIZE`` or the model's smallest side if larger: eval and full training steps against Keras and
#: the PyTorch peer (torchvision's, else timm's; none known: the PyTorch rows skip saying so).
FAMILIES = [a for a in os.environ.get("IMGCLS_BENCH_FAMILIES", ",".join(peers.FAMILY_MODELS)).split(",") if a]


def _family_flops(arch: str, mode: str, batch: int) -> dict:
    """XLA's FLOPs of imgcls_jax's compiled step of ``arch`` (with XLA's convolutions, as
    :func:`_jax_flops`) and the family's analytic count (:func:`benchmarks.perf.analytic_flops`:
    the ``flops`` of the family's module; the program families' is ``models/program.py``'s)."""
    key = ("family", arch, mode, batch)
    if key not in _STATE:
        size = peers.image_size(arch, SIZE)
        run, step, args = peers.jax_runner(mode, size, batch, dtype=DTYPE, arch=arch, impl="xla")
        _STATE[key] = {
            "xla": compiled_flops(step, *args),
            "analytic": batch * analytic_flops(run.model, size, mode, padding="valid"),
        }
    return _STATE[key]


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("mode", ["forward", "train"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_family_step(benchmark, arch, mode, framework):
    """The other families' eval and full training steps, with their Keras and PyTorch peers at
    the same shapes (MFU from imgcls_jax's XLA count, the same work for every row)."""
    batch, size = BATCHES[0], peers.image_size(arch, SIZE)
    group = f"{GROUPS[mode]} {arch}" + (f" {size}px" if size != SIZE else "")  # its smallest side
    benchmark.group = f"{GROUPS[mode]} {arch} {size}px {DTYPE} batch {batch}"
    bf16 = DTYPE == "bfloat16"
    try:
        if framework == "imgcls_jax":
            run = peers.jax_runner(mode, size, batch, dtype=DTYPE, arch=arch)[0]
            _family_flops(arch, mode, batch)
        elif framework.startswith("torch"):
            compile_ = framework == "torch-compile"
            run = peers.torch_runner(mode, size, batch, compile=compile_, bf16=bf16, arch=arch)
        else:
            run = peers.keras_runner(mode, size, batch, bf16=bf16, arch=arch)
        benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=2 if framework == "torch-compile" else 1)
    except Exception as error:
        if _out_of_memory(error):
            pytest.skip(f"{framework} {group} batch {batch}: out of memory ({type(error).__name__})")
        raise
    finally:
        run = None
        _release_device_memory()
    _record(benchmark, group, batch, framework, _STATE.get(("family", arch, mode, batch)), size)


def _release_device_memory():
    """Drop the last runner's buffers so the next framework gets the whole device (PyTorch's
    caching allocator keeps freed blocks reserved until asked)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def test_e2e_epoch(benchmark, tmp_path):
    """One epoch of ``fit`` (the second: the first compiles and fills the cache) on 60 photos a
    class of flowers5, 80/20 train/val, augmentation on."""
    pytest.importorskip("tensorflow", reason="the input pipeline needs TensorFlow")
    if not DATA.is_dir():
        pytest.skip(f"{DATA} not found (shared real-photo data)")
    from imgcls_jax.config import PhaseConfig, TrainConfig
    from imgcls_jax.train.loop import fit

    data = tmp_path / "flowers"
    for folder in sorted(p for p in DATA.iterdir() if p.is_dir()):
        (data / folder.name).mkdir(parents=True)
        for file in sorted(folder.iterdir())[:60]:
            shutil.copy(file, data / folder.name / file.name)
    batch = BATCHES[0]
    config = TrainConfig(
        data=str(data), run_dir=str(tmp_path / "run"), image_size=SIZE, batch_size=batch,
        dtype=DTYPE, splits={"train": 0.8, "val": 0.2}, keep_checkpoints=1,
        phases=[PhaseConfig(epochs=2, trainable="all", optimizer="adam", learning_rate=1e-4)],
        augment={"flip": "horizontal", "rotation": 0.05, "zoom": 0.1, "translation": 0.1},
    )  # fmt: skip
    benchmark.group = f"e2e-epoch {SIZE}px {DTYPE} batch {batch}"
    history = []

    def run():
        start = time.perf_counter()
        result = fit(config)
        history.append((result.history, time.perf_counter() - start))
        shutil.rmtree(config.run_dir)

    benchmark.pedantic(run, rounds=1, iterations=1)
    epochs, wall = history[-1]
    rate = epochs[-1]["images_per_s"]  # training images/s of the second epoch (loop's own clock)
    ROWS[("e2e-epoch", batch, "imgcls_jax")] = info = {
        "device": "cpu" if not ACCEL else str(jax.devices()[0].device_kind),
        "images_per_s": round(rate, 2),
        "step_ms": round(1e3 * batch / rate, 3),
        "fit_wall_s": round(wall, 1),
    }
    benchmark.extra_info.update(info)
    assert rate > 0


def _table() -> list[str]:
    lines = [
        f"Steps at {SIZE}x{SIZE} {DTYPE} on {BACKEND} ({jax.devices()[0].device_kind}) (VGG16 unless "
        "the group names the model); "
        f"{_STATE['peak_info'].describe() if 'peak_info' in _STATE else 'peak not measured'}",
        "",
        "| group | batch | framework | img/s | step ms | GFLOP/img XLA | analytic | TFLOP/s | MFU "
        "| vs best peer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (group, batch, framework), info in sorted(ROWS.items()):
        peers_ = [
            v["images_per_s"]
            for (g, b, f), v in ROWS.items()
            if (g, b) == (group, batch) and f != "imgcls_jax"
        ]
        ratio = ""
        if framework == "imgcls_jax" and peers_:
            ratio = f"{info['images_per_s'] / max(peers_):.2f}x"
        cells = [
            f"{info['images_per_s']:.1f}", f"{info['step_ms']:.1f}",
            f"{info['gflop_per_image_xla']:.2f}" if "mfu" in info else "-",
            f"{info['gflop_per_image_analytic']:.2f}" if "mfu" in info else "-",
            f"{info['tflops']:.3f}" if "mfu" in info else "-",
            f"{100 * info['mfu']:.1f}%" if "mfu" in info else "-",
        ]  # fmt: skip
        lines.append(f"| {group} | {batch} | {framework} | {' | '.join(cells)} | {ratio} |")
    return lines


def test_print_table(capsys):
    if not ROWS:
        pytest.skip("needs the step benchmarks in the same run")
    lines = _table()
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    if os.environ.get("IMGCLS_BENCH_TABLE"):
        Path(os.environ["IMGCLS_BENCH_TABLE"]).write_text("\n".join(lines) + "\n")
    assert len(lines) > 4


def test_no_mfu_above_one():
    """An MFU above 100% means the peak was not the device's peak: fail, naming the rows."""
    if not ROWS:
        pytest.skip("needs the step benchmarks in the same run")
    over = {f"{g} batch {b} {f}": info["mfu"] for (g, b, f), info in ROWS.items() if info.get("mfu", 0) > 1}
    peak = _STATE["peak_info"].describe() if "peak_info" in _STATE else "no peak"
    assert not over, f"MFU above 100% against {peak}: {over}"
