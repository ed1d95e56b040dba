"""The prepared accelerator run: one command, within ~8 minutes on one GPU, tables and logs in a folder.

    PYTHONPATH=. python benchmarks/accelerator_run.py --out OUT [--data DIR]   # on the GPU machine
    PYTHONPATH=. python benchmarks/accelerator_run.py --out OUT --tiny          # the same code on a CPU, tiny

What it measures, in this order, each section under a share of the time budget (a section that
runs out of time or memory records why and the run goes on):

1. **peak**: the best matmul rate of several shapes in bfloat16 and float32 (JAX, and PyTorch
   where installed), with the datasheet figure beside it (``benchmarks/perf.py``).
2. **throughput**: every model of ``list_models()`` (VGG16 first) at 224x224 in bfloat16 over a
   batch sweep: the full train step (Adam, every layer), the eval step and the frozen-base step,
   images/s, XLA's FLOPs per step and MFU against the peak; PyTorch peers (torchvision-style VGG16,
   channels_last; eager and ``torch.compile``, bf16 autocast) at the same shapes, and the ratio of
   imgcls_jax to the best PyTorch setting.
3. **e2e**: ``fit`` of flowers5 at 128x128 (the photos' own size) from scratch with augmentation on
   the device, the NumPy input pipeline (no TensorFlow on the GPU machine), bfloat16; images/s of
   the whole epoch beside the same compiled step alone on a batch already on the device, and the
   test accuracy it reaches (the confusion matrix's trace).

Writes ``OUT/results.md`` (the tables), ``OUT/results.json`` (every number) and ``OUT/log.txt``.
Needs only JAX, flax, optax, orbax, numpy, Pillow (PyTorch for the peers). ``--tiny`` runs every
section at 32x32 with tiny batches and 1-2 steps, the code paths unchanged (bfloat16, donation,
device placement, device augmentation): tests/test_accelerator_run.py runs it in CI.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.perf, benchmarks.peers, imgcls_jax from this checkout

log = logging.getLogger("accelerator_run")
FLOWERS = ROOT.parent / "shared" / "data" / "flowers5"
SAMPLE = ROOT / "examples" / "data" / "flowers_sample"


class Budget:
    """Seconds left of the whole run; each section gets a share of what is left."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def settings(tiny: bool) -> dict:
    if tiny:
        return {
            "size": 32,
            "batches": [8],
            "modes": ["train", "forward"],
            "archs": ["vgg16", "mobilenetv2"],  # VGG and one BatchNorm family: the same code path
            "timed": 2,
            "e2e_size": 32,
            "e2e_batch": 8,
            "e2e_epochs": 1,
            "peak_shapes": [(256, 256, 256)],
        }
    return {
        "size": 224,
        "batches": [128, 256, 512],
        "modes": ["train", "forward", "frozen"],
        "archs": ["vgg16", "resnet50", "mobilenetv2", "efficientnetb0"],
        "timed": 10,
        "e2e_size": 128,
        "e2e_batch": 256,
        "e2e_epochs": 30,
        "peak_shapes": None,
    }


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
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def section_peak(results: dict, cfg: dict) -> float:
    from benchmarks.perf import measure_peak

    peak = measure_peak(("bfloat16", "float32"), cfg["peak_shapes"])
    results["peak"] = {
        "flops": peak.flops,
        "best": peak.best,
        "device": peak.device,
        "datasheet": peak.datasheet,
        "rates": peak.rates,
    }
    log.info("%s", peak.describe())
    return peak.flops


def jax_row(mode: str, arch: str, size: int, batch: int, peak: float, timed_runs: int) -> dict:
    from benchmarks.peers import jax_runner
    from benchmarks.perf import compiled_flops, mfu

    run, step, args = jax_runner(mode, size, batch, dtype="bfloat16", arch=arch)
    seconds = timed(run, 2, timed_runs)
    flops = compiled_flops(step, *args)
    return {
        "images_per_s": batch / seconds,
        "step_ms": 1e3 * seconds,
        "flops": flops,
        "mfu": mfu(flops, seconds, peak),
    }


def torch_rows(mode: str, size: int, batch: int, timed_runs: int, arch: str = "vgg16") -> dict:
    """PyTorch's peer of ``arch`` (torchvision's for the BatchNorm families), each setting: eager /
    compiled, bf16 autocast (float32 on a CPU)."""
    import pytest

    from benchmarks.peers import torch_runner

    rows = {}
    for name, options in (("torch eager", {}), ("torch compile", {"compile": True})):
        try:
            import torch

            bf16 = torch.cuda.is_available()
            run = torch_runner(mode, size, batch, bf16=bf16, arch=arch, **options)
            seconds = timed(run, 3 if options else 2, timed_runs)
            rows[f"{name}{' bf16' if bf16 else ''}"] = {
                "images_per_s": batch / seconds,
                "step_ms": 1e3 * seconds,
            }
        except pytest.skip.Exception as skip:
            rows[name] = {"skipped": str(skip)}
        except Exception as error:  # a peer failing must not end the run; recorded
            rows[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    return rows


def section_throughput(results: dict, peak: float, cfg: dict, budget: Budget, share: float) -> None:
    from imgcls_jax.models import list_models

    deadline = time.monotonic() + share * budget.left()
    rows = results.setdefault("throughput", [])
    archs = [m for m in cfg["archs"] if m in list_models()]
    for arch in archs:
        for mode in cfg["modes"]:
            for batch in cfg["batches"]:
                row = {"model": arch, "mode": mode, "batch": batch, "size": cfg["size"]}
                if time.monotonic() > deadline:
                    rows.append({**row, "skipped": "time budget"})
                    continue
                try:
                    row["imgcls_jax"] = jax_row(mode, arch, cfg["size"], batch, peak, cfg["timed"])
                except Exception as error:
                    row["imgcls_jax"] = {
                        "error": (
                            "out of memory"
                            if out_of_memory(error)
                            else f"{type(error).__name__}: {str(error)[:300]}"
                        )
                    }
                row["peers"] = torch_rows(mode, cfg["size"], batch, cfg["timed"], arch)
                rows.append(row)
                log.info("throughput %s", json.dumps(row, default=float)[:400])


def section_e2e(results: dict, data: Path, out: Path, cfg: dict) -> None:
    """``fit`` from scratch at the e2e size with device augmentation; the step alone after it."""
    import jax

    from imgcls_jax import PhaseConfig, TrainConfig, evaluate_run
    from imgcls_jax.parallel import prefetch_to_device
    from imgcls_jax.train import Trainer

    shutil.rmtree(out / "e2e_run", ignore_errors=True)  # a run from scratch each time
    config = TrainConfig(
        data=str(data),
        run_dir=str(out / "e2e_run"),
        image_size=cfg["e2e_size"],
        batch_size=cfg["e2e_batch"],
        dtype="bfloat16",
        splits={"train": 0.65, "val": 0.10, "test": 0.25},
        pooling="avg",
        head_units=(256,),
        dropout=0.5,
        augment={"flip": "horizontal", "rotation": 0.05, "zoom": 0.1, "translation": 0.1},
        augment_on="device",
        data_backend="numpy",
        label_smoothing=0.1,
        keep_checkpoints=1,
        phases=[
            PhaseConfig(
                epochs=cfg["e2e_epochs"],
                trainable="all",
                optimizer="adam",
                learning_rate=1e-3,
                warmup_epochs=min(2, cfg["e2e_epochs"]),
                schedule="cosine",
            )
        ],
    )
    trainer = Trainer(config, resume=False)
    start = time.perf_counter()
    fit_result = trainer.run()
    wall = time.perf_counter() - start
    phase = trainer.phase
    batch = next(iter(prefetch_to_device(phase.train.epoch(0), mesh=trainer.mesh)))
    holder = {"state": phase.state}

    def step():
        holder["state"], metrics = phase.train_step(holder["state"], phase.split.frozen, batch)
        jax.block_until_ready(metrics["loss"])

    step_s = timed(step, 2, 10)
    report = evaluate_run(fit_result.run_dir, split="test", which="best")
    epochs = fit_result.history
    results["e2e"] = {
        "config": json.loads(config.to_json()),
        "fit_wall_s": wall,
        "epochs": len(epochs),
        "epoch_images_per_s": [round(h["images_per_s"], 1) for h in epochs],
        "step_alone_images_per_s": cfg["e2e_batch"] / step_s,
        "best_val_accuracy": max(h["val_accuracy"] for h in epochs),
        "test_accuracy": report.top1,
        "test_correct": int(np.trace(report.confusion)),
        "test_count": report.count,
    }
    log.info("e2e %s", json.dumps({k: v for k, v in results["e2e"].items() if k != "config"}))


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        f"# Accelerator run, {env['date']}",
        "",
        f"Device: {env['device']} ({env['platform']}); "
        f"jax {env['jax']}, torch {env.get('torch', 'not installed')}; command: `{env['command']}`",
        "",
    ]
    if "peak" in results:
        p = results["peak"]
        sheet = f"{p['datasheet'] / 1e12:.0f}" if p["datasheet"] else "unknown"
        lines += [
            f"Peak matmul: {p['flops'] / 1e12:.1f} TFLOP/s measured ({p['best']}); datasheet {sheet}",
            "",
        ]
    lines += [
        "| model | mode | batch | imgcls_jax img/s | MFU | best PyTorch (setting) img/s | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results.get("throughput", []):
        ours = row.get("imgcls_jax", {})
        peers = {k: v for k, v in row.get("peers", {}).items() if "images_per_s" in v}
        best = max(peers, key=lambda k: peers[k]["images_per_s"]) if peers else None
        mine = ours.get("images_per_s")
        cells = [
            row["model"],
            row["mode"],
            str(row["batch"]),
            f"{mine:.0f}" if mine else (row.get("skipped") or ours.get("error", ""))[:40],
            f"{100 * ours['mfu']:.1f}%" if "mfu" in ours else "",
            f"{peers[best]['images_per_s']:.0f} ({best})" if best else "",
            f"{mine / peers[best]['images_per_s']:.2f}x" if best and mine else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if "e2e" in results:
        e = results["e2e"]
        lines += [
            "",
            f"e2e fit ({e['epochs']} epochs, {e['fit_wall_s']:.0f} s): last epoch "
            f"{e['epoch_images_per_s'][-1]} img/s, step alone {e['step_alone_images_per_s']:.0f} img/s; "
            f"best val {100 * e['best_val_accuracy']:.2f}%, test {100 * e['test_accuracy']:.2f}% "
            f"({e['test_correct']}/{e['test_count']})",
        ]
    for name, error in results.get("errors", {}).items():
        lines.append(f"\nsection {name} failed: {error}")
    return "\n".join(lines) + "\n"


def tiny_subset(data: Path, to: Path, classes: int = 3, per_class: int = 12) -> Path:
    """The first ``per_class`` images of the first ``classes`` classes of ``data``, copied."""
    import shutil

    for folder in sorted(p for p in data.iterdir() if p.is_dir())[:classes]:
        (to / folder.name).mkdir(parents=True)
        for file in sorted(folder.iterdir())[:per_class]:
            shutil.copy(file, to / folder.name / file.name)
    return to


def environment(args) -> dict:
    import jax

    env = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.default_backend(),
        "jax": jax.__version__,
        "command": " ".join(sys.argv),
    }
    try:
        import torch

        env["torch"] = torch.__version__
    except ImportError:
        pass
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="folder for results.md, results.json, log.txt")
    parser.add_argument("--data", help="flowers5 folder (default ../shared/data/flowers5, else the sample)")
    parser.add_argument(
        "--tiny", action="store_true", help="32x32, tiny batches: a CPU check of the same code"
    )
    parser.add_argument("--budget-s", type=float, default=450, help="the whole run's time budget (seconds)")
    parser.add_argument("--sections", default="peak,throughput,e2e", help="comma-separated sections to run")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        handlers=[logging.StreamHandler(), logging.FileHandler(out / "log.txt")],
    )
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    budget, cfg = Budget(args.budget_s), settings(args.tiny)
    data = Path(args.data) if args.data else (FLOWERS if FLOWERS.is_dir() else SAMPLE)
    results = {"environment": environment(args), "settings": cfg, "data": str(data), "errors": {}}
    sections = args.sections.split(",")
    peak = None
    for name in sections:
        try:
            if name == "peak":
                peak = section_peak(results, cfg)
            elif name == "throughput":
                section_throughput(results, peak or section_peak(results, cfg), cfg, budget, share=0.55)
            elif name == "e2e":
                with tempfile.TemporaryDirectory() as work:  # checkpoints stay out of OUT
                    source = tiny_subset(data, Path(work) / "data") if args.tiny else data
                    section_e2e(results, source, Path(work), cfg)
        except Exception as error:
            log.exception("section %s failed", name)
            results["errors"][name] = f"{type(error).__name__}: {str(error)[:500]}"
        (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
        (out / "results.md").write_text(markdown(results))
    print((out / "results.md").read_text())
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
