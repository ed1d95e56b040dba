"""The prepared accelerator run (benchmarks/accelerator_run.py) rehearsed on this CPU at tiny sizes
as the GPU machine will run it: TensorFlow unimportable, a time budget that cuts the plan, a kill
part-way. Whatever stops it, results.json and results.md must be whole and hold every row it
finished; the data folder is checked before anything runs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import accelerator_run as accel
from benchmarks import peers
from tests import helpers

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "accelerator_run.py"
# As on the GPU machine: `import tensorflow` fails (see tests/test_no_tensorflow.py), and so do
# tensorboardX and optuna (not there either); at the end, nothing of TensorFlow or Keras was loaded.
NO_TF = """
import runpy, sys
for name in ("tensorflow", "tensorflow_datasets", "tensorboardX", "optuna"):
    sys.modules[name] = None
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    loaded = sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in
                    ("tensorflow", "tensorflow_datasets", "keras"))
    if loaded:
        print("loaded without need:", loaded, file=sys.stderr)
        sys.exit(97)
    raise
"""


def start(out: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-c", NO_TF, str(SCRIPT), "--out", str(out), "--tiny",
               "--data", str(helpers.SAMPLE), "--cache-dir", str(out.parent / "cache"), *args]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def whole_files(out: Path) -> dict:
    """results.json parses; results.md is whole and shows every measured row of the json (the
    last one may be missing: a kill can fall between the two files' renames); every row line
    of log.txt is whole json."""
    results = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text()
    assert table.startswith("# Accelerator run") and table.endswith("\n")
    measured = [r for r in results["rows"] if "images_per_s" in r]
    size = results["settings"]["size"]
    for row in measured[:-1]:
        side = row.get("image_size", size)  # a model's smallest side, where larger, is in its name
        line = f"| {row['model']}{f' ({side} px)' if side != size else ''} | {row['mode']} | {row['batch']} |"
        shown = [x for x in table.splitlines() if x.startswith(line)]
        assert shown and f" {accel._rate(row['images_per_s'])} |" in shown[0], (row, table)
    lines = (out / "log.txt").read_text().splitlines()
    logged = [json.loads(line.split(" row ", 1)[1])["key"] for line in lines if " row {" in line]
    assert set(logged[:-1]) <= {r["key"] for r in results["rows"]}  # the last may be logged, not yet written
    return results


def test_a_budget_cut_leaves_whole_files_and_lists_what_did_not_fit(tmp_path):
    """A simulated deadline: 20 s cannot hold the e2e fit (~89 s x 1.25 on this CPU) whatever the
    load, so it is listed as not run (the steps before it run or are cut, as the time allows);
    the run ends by itself, every planned task accounted for."""
    out = tmp_path / "out"
    run = start(out, "--sections", "peak,core,e2e", "--budget-s", "20")
    log = run.communicate(timeout=300)[0]
    assert run.returncode == 0, log[-4000:]
    results = whole_files(out)
    assert results["status"] == "finished" and results["in_flight"] is None and not results["errors"]
    cut = {n["key"]: n["reason"] for n in results["not_run"]}
    assert "e2e" in cut and all(why.startswith("time budget") for why in cut.values()), cut
    assert "- e2e: time budget" in (out / "results.md").read_text().split("## Not run", 1)[1]
    done = [r["key"] for r in results["rows"]] + ["peak"] * ("peak" in results)
    assert sorted(done + list(cut)) == sorted(p["key"] for p in results["plan"])
    memory = results["environment"]["memory"]
    assert memory["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false" and memory["set_before_jax_started"]
    assert results["environment"]["compile_cache"].startswith(f"jax {tmp_path / 'cache' / 'jax'}")
    # the device tool brings back at most 8 files from $OUT: only these are written there
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "results.json", "results.md"]


def test_the_watchdog_ends_the_run_and_says_during_what(tmp_path):
    out = tmp_path / "out"
    run = start(out, "--sections", "core,e2e", "--hard-stop-s", "8")
    log = run.communicate(timeout=300)[0]
    assert run.returncode == 3, log[-4000:]
    results = whole_files(out)
    status = results["status"]  # at 8 s, or as soon as it is set up if that took longer
    assert status.startswith("stopped by the watchdog at ") and int(status.split()[5]) >= 8, status
    assert "stopped by the watchdog" in (out / "log.txt").read_text()


def test_a_kill_part_way_leaves_every_finished_row(tmp_path):
    out = tmp_path / "out"
    run = start(out, "--sections", "peak,frozen", "--budget-s", "600")  # the cheapest steps
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and run.poll() is None:
            try:
                if json.loads((out / "results.json").read_text())["rows"]:
                    break
            except (FileNotFoundError, json.JSONDecodeError):
                pass  # not written yet (a torn file would fail below, after the kill)
            time.sleep(0.2)
        assert run.poll() is None, run.communicate()[0][-3000:]
        run.send_signal(signal.SIGKILL)
    finally:
        run.kill()
        run.communicate()
    results = whole_files(out)
    assert results["status"] == "running" and results["rows"]
    first = results["rows"][0]
    assert (
        first["key"] == "imgcls_jax vgg16 frozen 8"
        and first["images_per_s"] > 0
        and first["first_call_s"] > 0
    )
    assert first["gflop_per_image"] > 0 and 0 < first["mfu_measured_peak"] <= 1  # the analytic count
    assert first["mfu_datasheet"] is None  # a CPU has no datasheet figure
    table = (out / "results.md").read_text()
    assert "not reached" in table and "Status: running" in table
    assert any((tmp_path / "cache" / "jax").iterdir())  # the step's compilation, in the persistent cache


def test_data_that_cannot_fill_the_batch_fails_before_any_work(tmp_path):
    """The full-size run's e2e batch is 256: the 200-image sample holds 130 train images."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "out"
    command = [
        sys.executable,
        str(SCRIPT),
        "--out",
        str(out),
        "--data",
        str(helpers.SAMPLE),
        "--sections",
        "e2e",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert str(helpers.SAMPLE) in result.stderr and "fewer than one batch of 256" in result.stderr
    assert not (out / "results.json").exists()
    # the full-size run where JAX sees no GPU: refused, not hours of CPU figures
    result = subprocess.run(command[:-1] + ["peak"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "JAX sees no accelerator" in result.stderr, result.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["status"].startswith("refused")


def test_the_plan_puts_the_figures_that_matter_first():
    tasks = accel.plan(accel.settings(tiny=False), accel.SECTIONS)
    keys = [t.key for t in tasks]
    assert keys[:5] == ["peak", "imgcls_jax vgg16 train 256", "torch eager vgg16 train 256",
                        "imgcls_jax vgg16 forward 256", "torch eager vgg16 forward 256"]  # fmt: skip
    sections = [t.section for t in tasks]
    assert sections == sorted(sections, key=accel.SECTIONS.index)
    assert sections[-1] == "families" and keys[sections.index("families") - 1] == "e2e"
    core = [t for t in tasks if t.section == "core"]
    core_archs = ("vgg16", "resnet50", "mobilenetv2", "efficientnetb0")
    assert {(t.model, t.mode) for t in core} == {(a, m) for a in core_archs for m in ("train", "forward")}
    # after e2e: the training step of every other family's model, imgcls_jax and PyTorch eager
    families = [t.key for t in tasks if t.section == "families"]
    others = [a for a in peers.FAMILY_MODELS if a not in core_archs]
    assert families == [f"{fw} {a} train 256" for a in others for fw in ("imgcls_jax", "torch eager")]
    assert len(others) == 10 and len(keys) == len(set(keys))
    est = accel.Estimates("full")
    text = accel.dry_run(tasks, est, 480)
    assert "the budget ends about here" in text and text.count("\n") == len(tasks) + 2
    # a model without a PyTorch peer: its row says so at no cost, in the plan and in the run
    nasnet = accel.Task("families", "torch eager", "nasnetmobile", "train", 256)
    assert accel.free_skip(nasnet).startswith("no PyTorch peer known for nasnetmobile")
    last = text.splitlines()[-1]
    assert last.split()[7] == "0" and last.endswith("skipped: no PyTorch peer known for nasnetmobile")
    assert accel.free_skip(accel.Task("families", "imgcls_jax", "nasnetmobile", "train", 256)) is None
    tiny = accel.plan(accel.settings(tiny=True), ["families"])
    assert [t.key for t in tiny] == ["imgcls_jax xception train 8", "torch eager xception train 8"]
    row = {"key": tiny[0].key, "framework": "imgcls_jax", "model": "xception", "mode": "train", "batch": 8,
           "image_size": 71, "images_per_s": 12.5}  # fmt: skip
    assert accel.throughput_table([row], 32)[2].startswith("| xception (71 px) | train | 8 | 12.5 |")


def test_every_family_has_a_benchmark_model_and_its_peers():
    """benchmarks/peers.py names one model of every registered family but VGG, each with its
    Keras application and a PyTorch peer (or why it has none): a family added to the registry
    without one fails here."""
    import inspect

    from imgcls_jax import list_models
    from imgcls_jax.models import model_info

    def family(name):  # the builder's class; ResNet v1 and v2 share one, told apart by preprocessing
        cls = inspect.getclosurevars(model_info(name).build).nonlocals["cls"]
        return cls.__name__ + (f" {model_info(name).preprocessing}" if cls.__name__ == "ResNet" else "")

    registered = {family(n) for n in list_models()} - {"VGG"}
    assert len(registered) == 13 and sorted(map(family, peers.FAMILY_MODELS)) == sorted(registered)
    for name in peers.FAMILY_MODELS:
        keras_app = peers.KERAS_APPS[name]
        assert keras_app.lower() == name, name  # the Keras application of that very model
        assert (name in peers.TORCH_PEERS) != (name in peers.NO_TORCH_PEER), name
    assert set(peers.TORCH_PEERS) <= set(peers.KERAS_APPS) <= set(list_models())
    # the image side of each: the run's, or the model's smallest where larger
    assert peers.image_size("xception", 32) == 71 and peers.image_size("inceptionv3", 32) == 75
    assert peers.image_size("xception", 224) == 224 and peers.image_size("densenet121", 32) == 32


def test_estimates_follow_what_the_run_measures():
    est = accel.Estimates("full")
    vgg = accel.Task("core", "imgcls_jax", "vgg16", "train", 256)
    resnet = accel.Task("core", "imgcls_jax", "resnet50", "train", 256)
    est.observe(vgg, 2 * est.prior(vgg))  # compilation twice as slow as guessed
    assert est.first_call(resnet) == pytest.approx(2 * est.prior(resnet))
    assert est.first_call(accel.Task("batches", "imgcls_jax", "vgg16", "train", 512)) == 2 * est.prior(vgg)
    budget = accel.Budget(100.0, start=time.monotonic() - 50)
    assert budget.fits(39) and not budget.fits(41)  # 50 s left, x1.25


def test_what_does_not_fit_is_listed_and_the_run_goes_on(monkeypatch):
    """On a simulated clock: a 60 s task leaves 40 s; the next (~54 s) is not run, the one after
    it (~12 s) is."""
    now = [0.0]
    ran, cut = [], []

    def fake_task(task, ctx):
        ran.append(task.key)
        now[0] += 60

    class Record:
        def not_run(self, task, reason):
            cut.append((task.key, reason))

    monkeypatch.setattr(accel, "run_task", fake_task)
    steps = (("vgg16", "train"), ("efficientnetb0", "train"), ("vgg16", "forward"))
    tasks = [accel.Task("core", "imgcls_jax", arch, mode, 256) for arch, mode in steps]
    budget = accel.Budget(100.0, start=0.0, clock=lambda: now[0])
    ctx = accel.Context({}, budget, accel.Estimates("full"), Record(), None, False)
    accel.run_plan(tasks, ctx, done=set())
    assert ran == [tasks[0].key, tasks[2].key]
    assert cut == [(tasks[1].key, "time budget: ~54 s needed (x1.25), 40 s left")]


def test_an_out_of_memory_step_is_a_row_and_the_run_goes_on(monkeypatch):
    rows = []

    class Record:
        results = {"errors": {}}

        def start(self, task):
            pass

        def row(self, row):
            rows.append(row)

    def fail(task, ctx):
        ctx.row["first_call_s"] = 1.0  # what was measured before the failure stays
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 31.2GiB")

    monkeypatch.setattr(accel, "jax_task", fail)
    task = accel.Task("batches", "imgcls_jax", "vgg16", "train", 512)
    accel.run_task(task, accel.Context({}, None, None, Record(), None, False))
    assert rows == [{"key": task.key, "section": "batches", "framework": "imgcls_jax", "model": "vgg16",
                     "mode": "train", "batch": 512, "first_call_s": 1.0, "error": "out of memory",
                     "oom_batch": 512}]  # fmt: skip
    assert "out of memory (batch 512)" in accel.throughput_table(rows)[2]


def test_analytic_flops_is_the_family_count():
    from flax import nnx

    from benchmarks.perf import analytic_flops
    from imgcls_jax import create_model
    from imgcls_jax.models import mobilenet
    from imgcls_jax.models.flops import vgg_flops

    def abstract(arch):  # the structure without initialising weights
        return nnx.eval_shape(
            lambda: create_model(arch, num_classes=5, pooling="avg", input_shape=(32, 32, 3))
        )

    vgg = abstract("vgg16")
    assert analytic_flops(vgg, 32, "train") == vgg_flops(vgg, 32, "train", padding="valid")
    net = abstract("mobilenetv2")
    assert analytic_flops(net, 32, "forward") == mobilenet.flops(net, 32, "forward", padding="valid")

    class Unknown:
        pass

    with pytest.raises(NotImplementedError, match="has no analytic FLOP count"):
        analytic_flops(Unknown(), 32, "forward")


def test_resume_carries_finished_rows(tmp_path):
    previous = {
        "environment": {"device": "NVIDIA H100 80GB HBM3"},
        "peak": {"flops": 7e14, "device": "NVIDIA H100 80GB HBM3"},
        "rows": [
            {"key": "imgcls_jax vgg16 train 256", "images_per_s": 1000.0},
            {"key": "torch eager vgg16 train 512", "error": "out of memory", "oom_batch": 512},
            {"key": "torch compile vgg16 train 256", "error": "RuntimeError: boom"},
        ],
        "e2e": {"epochs": [], "status": "fit"},  # not evaluated: runs again
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(previous))
    results = {"environment": {"device": "NVIDIA H100 80GB HBM3"}, "rows": []}
    ctx = accel.Context({}, None, None, None, None, False)
    done = accel.carry_previous(path, results, ctx)
    assert done == {"imgcls_jax vgg16 train 256", "torch eager vgg16 train 512", "peak"}
    assert ctx.peak == 7e14 and len(results["rows"]) == 2 and "e2e" not in results


@pytest.mark.slow
def test_accelerator_run_tiny_every_section(tmp_path):
    """Every section but torch.compile (minutes on this CPU), e2e fit and evaluation included, and
    the other families' section (one model here: Xception at its smallest side, 71 px)."""
    out = tmp_path / "out"
    run = start(out, "--sections", "peak,core,batches,frozen,e2e,families", "--budget-s", "1200")
    log = run.communicate(timeout=1500)[0]
    assert run.returncode == 0, log[-4000:]
    results = whole_files(out)
    assert results["status"] == "finished" and not results["not_run"] and not results["errors"]
    assert results["in_flight"] is None
    e2e = results["e2e"]
    assert e2e["config"]["augment_on"] == "device" and e2e["config"]["dtype"] == "bfloat16"
    assert [x["epoch"] for x in e2e["epochs"]] == [0, 1] and e2e["status"] == "fit: all 2 epochs"
    assert e2e["test_count"] > 0 and e2e["test_correct"] == round(e2e["test_accuracy"] * e2e["test_count"])
    assert e2e["step_alone_images_per_s"] > 0
    modes = {(r["model"], r["mode"], r["batch"]) for r in results["rows"] if "images_per_s" in r}
    assert ("vgg16", "frozen", 8) in modes and ("mobilenetv2", "train", 16) in modes
    assert "## End to end" in (out / "results.md").read_text()
    families = {r["key"]: r for r in results["rows"] if r["section"] == "families"}
    assert sorted(families) == ["imgcls_jax xception train 8", "torch eager xception train 8"]
    xception = families["imgcls_jax xception train 8"]
    assert xception["image_size"] == 71 and xception["images_per_s"] > 0 and xception["gflop_per_image"] > 0
    assert "| xception (71 px) | train | 8 |" in (out / "results.md").read_text()


@pytest.mark.slow
def test_each_pytorch_peer_has_the_architecture_of_its_model():
    """Where PyTorch, torchvision and timm are installed (the GPU machine; not this project's
    environment): every peer of benchmarks/peers.py builds, splits into a base ending at the pooled
    features and a Linear head, and has the parameter count of imgcls_jax's model (= Keras's) to
    0.15% (torchvision's ResNet50 has no convolution biases, InceptionV3's BatchNorms have a scale
    where Keras's have none)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    pytest.importorskip("timm")
    from functools import partial

    import jax
    import numpy as np
    from flax import nnx

    from imgcls_jax import create_model

    for arch in peers.TORCH_PEERS:
        base, head, what = peers._torch_family(arch, torch.nn)
        size = peers.image_size(arch, 32)
        with torch.no_grad():
            features = base.eval()(torch.zeros(1, 3, size, size))
        assert isinstance(head, torch.nn.Linear) and features.shape == (1, head.in_features), (arch, what)
        ours = nnx.eval_shape(
            partial(create_model, arch, num_classes=5, pooling="avg", input_shape=(size,) * 2 + (3,))
        )
        expected = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(ours, nnx.Param)))
        count = sum(p.numel() for p in [*base.parameters(), *head.parameters()])
        assert abs(count / expected - 1) < 1.5e-3, (arch, what, count, expected)
