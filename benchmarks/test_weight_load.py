"""Loading Keras weights: first load (md5, HDF5 parse, validation, finiteness scan, cache write)
vs. second load from the converted-parameter cache, on a full-size VGG16 (top, 528 MB) file of
random weights under the published name.

Each measured load ends with every parameter read once (a sum over all of them), since cached
arrays are memory-mapped and page in on first use.
"""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import pytest

import imgcls_jax
from imgcls_jax.weights import load_weights, store
from tests.helpers import write_random_legacy

MEDIANS: dict[str, float] = {}
KEY = ("vgg16", True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("weights")
    pub = store.IMAGENET[KEY]
    path = tmp / "mirror" / pub.filename
    path.parent.mkdir()
    write_random_legacy(path, include_top=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(store.IMAGENET, KEY, dataclasses.replace(pub, file_hash=store.md5sum(path)))
        mp.setenv("IMGCLS_JAX_WEIGHTS_DIR", str(path.parent))
        mp.setenv("IMGCLS_JAX_CACHE", str(tmp / "cache"))
        yield imgcls_jax.create_model("vgg16"), tmp / "cache"


def load_and_touch(model):
    info = load_weights(model, "imagenet")
    total = sum(jnp.sum(leaf) for leaf in jax.tree.leaves(model))
    jax.block_until_ready(total)
    return info


def test_first_load(benchmark, setup):
    model, cache = setup
    info = benchmark.pedantic(
        load_and_touch,
        args=(model,),
        setup=lambda: shutil.rmtree(cache, ignore_errors=True),
        rounds=3,
        warmup_rounds=1,
    )
    assert not info.from_cache
    MEDIANS["first"] = benchmark.stats.stats.median


def test_cached_load(benchmark, setup):
    model, _ = setup
    load_and_touch(model)  # make sure the cache exists
    info = benchmark.pedantic(load_and_touch, args=(model,), rounds=5, warmup_rounds=1)
    assert info.from_cache
    MEDIANS["cached"] = benchmark.stats.stats.median


def test_cached_load_at_least_3x_faster():
    if set(MEDIANS) != {"first", "cached"}:
        pytest.skip("needs test_first_load and test_cached_load in the same run")
    ratio = MEDIANS["first"] / MEDIANS["cached"]
    first, cached = MEDIANS["first"], MEDIANS["cached"]
    print(f"\nweights load: first {first:.3f} s, cached {cached:.3f} s, ratio {ratio:.1f}x")
    assert ratio >= 3.0
