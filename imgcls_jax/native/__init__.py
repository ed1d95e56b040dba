"""Native (C++) kernels, optional: oneDNN's convolutions for JAX on the CPU.

:mod:`imgcls_jax.native.build` builds ``onednn_conv.cc`` into a cache folder on first use;
:mod:`imgcls_jax.native.onednn` loads it and defines the JAX op. Nothing is built or loaded on
import; :mod:`imgcls_jax.models.conv` asks for it at trace time (``conv_impl``).
"""
