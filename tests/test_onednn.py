"""oneDNN's convolutions (``conv_impl="onednn"``, and ``"auto"`` on CPU) against XLA's.

The reference is ``lax.conv_general_dilated`` (XLA's own kernels, independent of oneDNN):
forward, input gradient and weight gradient of every convolution shape the registered families
use, collected from the models by tracing them (:func:`benchmarks.conv_layers.model_convs`), not
listed by hand. float32 results agree to ``F32_TOL`` of the largest reference value (the two
differ only in summation order); bfloat16 to 2e-2, as tests/test_conv.py.

The kernels are built on first use (a C++ compiler and the ``onednn-cpu-gomp`` packages, both
present here and in CI through pyproject.toml). Where they cannot be built the tests that need
them skip, saying why; the fallback test makes them unavailable on purpose and checks that
``"auto"`` falls back to XLA and says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imgcls_jax.models import conv
from imgcls_jax.native import onednn

ROOT = Path(__file__).resolve().parents[1]
F32_TOL = 1e-5
BF16_TOL = 2e-2


def need_kernels():
    status = onednn.status()
    if not status.available:
        pytest.skip(f"oneDNN kernels unavailable: {status.reason}")
    return status


def close(actual, desired, tol, what=""):
    actual, desired = np.asarray(actual, np.float32), np.asarray(desired, np.float32)
    assert actual.shape == desired.shape, what
    scale = max(float(np.abs(desired).max()), 1e-30)
    err = float(np.abs(actual - desired).max()) / scale
    assert err <= tol, f"{what}: max error {err:.2e} of the largest value exceeds {tol:.0e}"


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def conv_and_grads(impl, strides, pads, groups, x, k, g):
    """The convolution and its gradients w.r.t. input and kernel for the cotangent ``g``."""
    y, vjp = jax.vjp(lambda x, k: conv.conv_nhwc(x, k, strides, pads, groups=groups, impl=impl), x, k)
    return (y, *vjp(g))


def case(call, seed=0, batch=None, dtype=None):
    """Random ``x, k, g`` for a :class:`~imgcls_jax.models.conv.ConvCall` (batch replaced)."""
    rng = np.random.default_rng(seed)
    dtype = dtype or call.dtype
    x_shape = (batch or call.x_shape[0], *call.x_shape[1:])
    x = jnp.asarray(rng.normal(size=x_shape), dtype)
    k = jnp.asarray(rng.normal(size=call.kernel_shape), dtype)

    def xla(x, k):
        return conv.conv_nhwc(x, k, call.strides, call.pads, groups=call.groups, impl="xla")

    y = jax.eval_shape(xla, x, k)
    return x, k, jnp.asarray(rng.normal(size=y.shape), dtype)


def check_against_xla(call, batch=2, seed=0):
    x, k, g = case(call, seed, batch)
    args = (call.strides, call.pads, call.groups, x, k, g)
    ours, ref = conv_and_grads("onednn", *args), conv_and_grads("xla", *args)
    for name, a, b in zip(("forward", "input gradient", "weight gradient"), ours, ref):
        assert a.dtype == b.dtype
        close(a, b, F32_TOL, f"{name} of {call}")
    return ours


def call_of(x_shape, kernel_shape, strides=(1, 1), pads=((1, 1), (1, 1)), groups=1, dtype="float32"):
    return conv.ConvCall(x_shape, kernel_shape, strides, pads, groups, dtype, "xla")


#: One of each kind the families have (the full set, collected from the models, is the slow test):
#: VGG's 3x3 on 64 channels and on a 2x2 map, ResNet50's 7x7/2 stem and a strided 1x1, MobileNetV2's
#: stride-2 stem (Keras's uneven SAME padding), depthwise 3x3/1 and 3x3/2 (correct_pad, VALID),
#: EfficientNet's depthwise 5x5/2, squeeze-excite 1x1 on a 1x1 map, a grouped conv, odd sizes.
SAMPLE = [
    call_of((2, 9, 9, 64), (3, 3, 64, 32)),
    call_of((2, 2, 2, 64), (3, 3, 64, 48)),
    call_of((2, 21, 21, 3), (7, 7, 3, 16), (2, 2), ((0, 0), (0, 0))),
    call_of((2, 8, 8, 32), (1, 1, 32, 64), (2, 2), ((0, 0), (0, 0))),
    call_of((2, 16, 16, 3), (3, 3, 3, 8), (2, 2), ((0, 1), (0, 1))),
    call_of((2, 10, 10, 24), (3, 3, 1, 24), (1, 1), ((0, 0), (0, 0)), groups=24),
    call_of((2, 11, 11, 24), (3, 3, 1, 24), (2, 2), ((0, 0), (0, 0)), groups=24),
    call_of((2, 13, 13, 40), (5, 5, 1, 40), (2, 2), ((0, 0), (0, 0)), groups=40),
    call_of((2, 1, 1, 96), (1, 1, 96, 4), (1, 1), ((0, 0), (0, 0))),
    call_of((2, 7, 5, 12), (3, 3, 4, 6), (1, 2), ((1, 1), (2, 0)), groups=3),
]


def test_onednn_equals_xla_on_a_sample_of_family_shapes():
    """Forward and both gradients under jit, float32, and the same numbers on a second run
    (oneDNN's weight gradient reduces over threads in a fixed order)."""
    need_kernels()
    for call in SAMPLE:
        first = check_against_xla(call)
        again = conv_and_grads("onednn", call.strides, call.pads, call.groups, *case(call, 0, 2))
        for a, b in zip(first, again):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


#: Kernels whose reorder into oneDNN's layout is split into output-channel pieces (3 pieces of 64;
#: 4, the last of 8 channels; 5 of a 1x1 kernel), at odd batches (uneven chunks over 2 threads).
PIECES = [
    (call_of((5, 8, 8, 128), (3, 3, 128, 192)), 5),
    (call_of((3, 6, 6, 64), (3, 3, 64, 200)), 3),
    (call_of((7, 4, 4, 256), (1, 1, 256, 320), pads=((0, 0), (0, 0))), 7),
]


def test_reused_buffers_and_split_reorders_give_the_same_bits_after_other_shapes():
    """The kernels keep their temporaries (kernels in oneDNN's layout, partial weight gradients)
    between calls without zeroing them, and reorder kernels in output-channel pieces on the pool's
    threads: each call must equal XLA's, and repeat itself bit for bit after other shapes have
    written over those buffers (a result that read a stale or unwritten byte would differ)."""
    need_kernels()
    first = [check_against_xla(call, batch) for call, batch in PIECES]
    for (call, batch), before in zip(reversed(PIECES), reversed(first)):
        again = conv_and_grads("onednn", call.strides, call.pads, call.groups, *case(call, 0, batch))
        for a, b in zip(before, again):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_onednn_bfloat16_close_to_float32():
    status = need_kernels()
    if "bfloat16" not in status.dtypes:
        with pytest.raises(ValueError, match="conv_impl='onednn' computes in float32"):
            conv.conv_nhwc(jnp.zeros((1, 4, 4, 8), jnp.bfloat16), jnp.zeros((3, 3, 8, 8), jnp.bfloat16),
                           impl="onednn")  # fmt: skip
        pytest.skip("this CPU has no bfloat16 convolutions in oneDNN (the error above is checked)")
    for call in (SAMPLE[0], SAMPLE[6], SAMPLE[3]):
        x, k, g = case(call, 1)
        low = [a.astype(jnp.bfloat16) for a in (x, k, g)]
        ref = conv_and_grads(
            "xla", call.strides, call.pads, call.groups, *[a.astype(jnp.float32) for a in low]
        )
        ours = conv_and_grads("onednn", call.strides, call.pads, call.groups, *low)
        for a, b in zip(ours, ref):
            assert a.dtype == jnp.bfloat16
            close(a, b, BF16_TOL, str(call))


def test_vmap_folds_the_mapped_axis_or_maps():
    """Under vmap: a mapped input with one kernel (folded into the batch) and a mapped kernel (one
    call per element), forward and gradients equal XLA's."""
    need_kernels()
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(3, 2, 6, 6, 4)), jnp.float32)
    ks = jnp.asarray(rng.normal(size=(3, 3, 3, 4, 5)), jnp.float32)

    def loss(impl, k, x):
        return jnp.sum(jnp.tanh(conv.conv_nhwc(x, k, (2, 1), ((1, 1), (0, 2)), impl=impl)))

    for in_axes in ((None, 0), (0, 0), (0, None)):
        k = ks[0] if in_axes[0] is None else ks
        xs = x if in_axes[1] == 0 else x[0]
        for fn in (loss, jax.grad(loss, argnums=(1, 2))):
            got = jax.jit(jax.vmap(partial(fn, "onednn"), in_axes))(k, xs)
            want = jax.vmap(partial(fn, "xla"), in_axes)(k, xs)
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                close(a, b, F32_TOL, f"vmap {in_axes} {fn}")


def test_bad_calls_are_errors():
    need_kernels()
    x = jnp.zeros((1, 6, 6, 4))
    with pytest.raises(ValueError, match=r"does not fit input \(1, 6, 6, 4\) with 3 groups"):
        onednn.conv(x, jnp.zeros((3, 3, 2, 6)), groups=3)
    with pytest.raises(ValueError, match="float32.*got x float32 and kernel float16"):
        onednn.conv(x, jnp.zeros((3, 3, 4, 6), jnp.float16))
    with pytest.raises(ValueError, match="padding >= 0"):
        onednn.conv(x, jnp.zeros((3, 3, 4, 6)), pads=((-1, 0), (0, 0)))
    layer = conv.ConvGeneralDilated("onednn")
    with pytest.raises(ValueError, match="without dilation"):
        layer(x, jnp.zeros((3, 3, 4, 6)), (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=conv._NHWC)


def test_auto_chooses_onednn_on_cpu_and_xla_elsewhere():
    status = need_kernels()
    assert conv.choose_impl((16, 64, 64, 64), "gpu", kernel_shape=(3, 3, 64, 64)) == "xla"
    expected = "onednn" if conv.onednn_wins((16, 64, 64, 64), (3, 3, 64, 64), (1, 1), 1, "float32") else "xla"
    assert conv.choose_impl((16, 64, 64, 64), "cpu", kernel_shape=(3, 3, 64, 64)) == expected
    assert conv.choose_impl((16, 8, 8, 64), "cpu", kernel_shape=(3, 3, 64, 64), dtype=None) == "xla"
    assert status.version and Path(status.path).is_file()


FALLBACK = """
import logging, sys
import jax, jax.numpy as jnp, numpy as np
from jax import lax
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record)
logging.getLogger("imgcls_jax").addHandler(Keep())
logging.getLogger("imgcls_jax").setLevel(logging.DEBUG)
from imgcls_jax.models import conv
x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 16)), jnp.float32)
k = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 16, 8)), jnp.float32)
impls = [conv.choose_impl(x.shape, "cpu", kernel_shape=k.shape) for _ in range(3)]
y = jax.jit(lambda x, k: conv.conv_nhwc(x, k, (1, 1), "SAME", impl="auto"))(x, k)
ref = lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
try:
    conv.conv_nhwc(x, k, (1, 1), "SAME", impl="onednn")
    error = None
except RuntimeError as e:
    error = str(e)
said = [r.getMessage() for r in records if "unavailable" in r.getMessage()]
print(json.dumps({"impls": impls, "equal": bool(np.array_equal(y, ref)), "error": error, "said": said,
                  "levels": sorted({r.levelname for r in records if "unavailable" in r.getMessage()})}))
"""


@pytest.mark.parametrize("how", ["no compiler", pytest.param("switched off", marks=pytest.mark.slow)])
def test_auto_falls_back_to_xla_without_the_kernels(tmp_path, how):
    """Without a compiler (an empty cache, ``CXX`` not a program) or with ``IMGCLS_JAX_ONEDNN=0``,
    ``"auto"`` runs XLA's convolution (the same numbers as ``lax``), says why once at debug level,
    and ``"onednn"`` asked for by name is an error with the reason."""
    env = {**os.environ, "IMGCLS_JAX_NATIVE_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    if how == "no compiler":
        env.update(CXX=str(tmp_path / "no-such-compiler"), PATH="/nonexistent")
        env.pop("IMGCLS_JAX_ONEDNN", None)
    else:
        env["IMGCLS_JAX_ONEDNN"] = "0"
    code = "import json\n" + FALLBACK
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["impls"] == ["xla"] * 3 and out["equal"]
    reason = "no C++ compiler found" if how == "no compiler" else "IMGCLS_JAX_ONEDNN=0"
    assert reason in out["error"] and out["error"].startswith("conv_impl='onednn' is unavailable here")
    assert len(out["said"]) == 1 and reason in out["said"][0] and out["levels"] == ["DEBUG"]
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.so"))


OPENMP = """
import ctypes, json
import jax, jax.numpy as jnp, numpy as np
gomp = ctypes.CDLL("libgomp.so.1")  # the process's OpenMP runtime, loaded first as PyTorch does
seen = {"start": gomp.omp_get_max_threads()}
from imgcls_jax.models import conv
from imgcls_jax.native import onednn
assert onednn.status().available, onednn.status().reason
seen["after loading"] = gomp.omp_get_max_threads()
x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 16)), jnp.float32)
k = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 16, 8)), jnp.float32)
loss = lambda x, k: jnp.sum(conv.conv_nhwc(x, k, (1, 1), "SAME", impl="onednn") ** 2)
jax.block_until_ready(jax.jit(jax.grad(loss, argnums=(0, 1)))(x, k))
onednn.impl_name("fwd", (2, 8, 8, 16), (3, 3, 16, 8), (1, 1), ((1, 1), (1, 1)))
seen["after convolutions"] = gomp.omp_get_max_threads()
print(json.dumps(seen))
"""


def test_kernels_leave_the_process_openmp_setting_alone():
    """oneDNN runs single-threaded inside the kernels, but the calling thread's OpenMP setting is
    the process's (PyTorch shares the same ``libgomp.so.1``): loading the kernels, running them and
    asking for an implementation must leave it as it was (it was left at one thread, which made
    PyTorch's operators on the main thread run on one core)."""
    need_kernels()
    env = {**os.environ, "OMP_NUM_THREADS": "3", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", OPENMP], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"start": 3, "after loading": 3, "after convolutions": 3}


SHARDED = """
import json, os
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from imgcls_jax.models import conv
assert len(jax.devices()) == 4
mesh = Mesh(np.asarray(jax.devices()), ("data",))
rng = np.random.default_rng(0)
out = {}
for name, (xs, ks, strides, pads, groups) in {
    "3x3": ((8, 10, 10, 16), (3, 3, 16, 8), (1, 1), ((1, 1), (1, 1)), 1),
    "depthwise/2": ((8, 11, 11, 16), (3, 3, 1, 16), (2, 2), ((0, 0), (0, 0)), 16),
}.items():
    x = jnp.asarray(rng.normal(size=xs), jnp.float32)
    k = jnp.asarray(rng.normal(size=ks), jnp.float32)
    def loss(k, x, impl):
        y = conv.conv_nhwc(x, k, strides, pads, groups=groups, impl=impl)
        return jnp.sum(jnp.tanh(y) * jnp.arange(y.shape[-1])), y
    grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
    ref = jax.jit(grad, static_argnums=2)(k, x, "xla")
    split, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    step = jax.jit(grad, static_argnums=2, in_shardings=(whole, split))
    xs_ = jax.device_put(x, split)
    got = step(k, xs_, "onednn")
    hlo = step.lower(k, xs_, "onednn").compile().as_text()
    pairs = zip(jax.tree.leaves(got), jax.tree.leaves(ref))
    errs = [float(jnp.abs(a - b).max() / jnp.abs(b).max()) for a, b in pairs]
    out[name] = {"errs": errs, "y_sharding": str(got[1].sharding.spec), "all_reduce": hlo.count("all-reduce"),
                 "all_gather": hlo.count("all-gather"), "calls": hlo.count("imgcls_onednn_conv")}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_sharded_batch_on_four_cpu_devices():
    """Under jit with the batch split over 4 CPU devices: the same forward and gradients as XLA's
    convolution on one device; each device convolves its own quarter (no all-gather: the
    forward output stays split), and the weight gradient is summed across devices (all-reduce)."""
    need_kernels()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name, result in json.loads(done.stdout.strip().splitlines()[-1]).items():
        assert max(result["errs"]) <= F32_TOL, (name, result)
        assert "('data'" in result["y_sharding"], (name, result)
        assert result["all_gather"] == 0 and result["all_reduce"] >= 1 and result["calls"] == 3, (
            name,
            result,
        )


@pytest.mark.slow
def test_onednn_equals_xla_on_every_family_shape():
    """Every distinct convolution of VGG16, ResNet50, MobileNetV2 and EfficientNetB0 at 64x64
    (collected by tracing the models; batch 2 instead of 16), forward and both gradients."""
    need_kernels()
    from benchmarks.conv_layers import model_convs

    seen = set()
    for arch in ("vgg16", "resnet50", "mobilenetv2", "efficientnetb0"):
        calls = model_convs(arch, 64, 2)
        assert calls and any(c.kernel_shape[0] == 3 for c in calls)
        for call in calls:
            if call.key() not in seen:
                seen.add(call.key())
                check_against_xla(call)
    assert len(seen) > 90  # 9 + 20 + 30 + 46 distinct, a few shared


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["vgg16", "resnet50", "mobilenetv2", "efficientnetb0"])
def test_family_train_step_onednn_equals_xla(arch):
    """Loss and the gradient of every parameter of each family at 64x64 (inference-mode BatchNorm,
    so the two runs share their statistics): ``conv_impl="onednn"`` against ``"xla"``. The loss
    agrees to 1e-5; gradients to 5e-2 of the largest gradient of the model (random-init
    EfficientNetB0's late BatchNorm biases get gradients of ~1e-7 against a largest of 1.3e-6,
    sums whose terms cancel: there oneDNN and XLA differ by 2e-8). Through 13-50 random-init layers
    rounding-size differences grow (and flip ReLU gates near zero): measured on VGG16 at 64 px,
    batch 4, im2col against XLA differ by 2.0e-3 and oneDNN against XLA by 1.6e-2, while per layer
    against a float64 reference oneDNN's forward is off by 1.1-2.7e-6 (XLA's 5-9e-7) and its
    weight gradient by 1.5-6.3e-7 (XLA's 6e-7-6e-6), all float32 rounding (see
    ``test_onednn_equals_xla_on_every_family_shape``). A wrong gradient would be off by O(1)."""
    need_kernels()
    from flax import nnx

    from imgcls_jax.models import create_model

    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8))
    labels = jnp.asarray([0, 1, 2, 3])
    results = {}
    for impl in ("xla", "onednn"):
        model = create_model(arch, num_classes=4, pooling="avg", input_shape=(64, 64, 3), conv_impl=impl)
        graph, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params, graph=graph, rest=rest):
            logits = nnx.merge(graph, params, rest)(images)
            return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

        results[impl] = jax.jit(jax.value_and_grad(loss))(params)
    (loss_x, grads_x), (loss_o, grads_o) = results["xla"], results["onednn"]
    close(loss_o, loss_x, 1e-5, "loss")
    flat_x, flat_o = dict(nnx.to_flat_state(grads_x)), dict(nnx.to_flat_state(grads_o))
    assert flat_x.keys() == flat_o.keys()
    scale = max(float(np.abs(np.asarray(v.get_value())).max()) for v in flat_x.values())
    for path in flat_x:
        ours, ref = np.asarray(flat_o[path].get_value()), np.asarray(flat_x[path].get_value())
        assert ours.shape == ref.shape
        err = float(np.abs(ours - ref).max()) / scale
        assert err <= 5e-2, f"{path}: max error {err:.2e} of the model's largest gradient exceeds 5e-2"


@pytest.mark.slow
def test_concurrent_first_builds_make_one_library(tmp_path):
    """Three processes building into one empty cache at once: all load a complete library, and
    one file is left (the lock; the atomic rename)."""
    need_kernels()
    env = {**os.environ, "IMGCLS_JAX_NATIVE_CACHE": str(tmp_path), "PYTHONPATH": str(ROOT)}
    code = textwrap.dedent("""
        from imgcls_jax.native import onednn
        s = onednn.status()
        assert s.available, s.reason
        print(s.path)
    """)
    command = [sys.executable, "-c", code]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1 and [p.name for p in tmp_path.glob("*.so")] == [Path(paths.pop()).name]
    assert not list(tmp_path.glob("*.tmp"))
