"""The one place that imports JAX for the TPU target, lazily, with 64-bit types switched on.

JAX is an optional dependency (``pip install 'llmc[stablehlo]'``): ``require_jax`` raises a ``TargetError``
that says so instead of an ImportError, and nothing imports jax at module level outside this function, so
that ``llmc.targets.tpu.target`` imports (and the CLI lists the target) without it.

**64-bit on purpose.** JAX truncates int64/float64 to 32 bits unless ``jax_enable_x64`` is set. ONNX graphs
carry int64 token ids, positions and shapes everywhere, and a silent narrowing would change results (ids
above 2**31, int64 outputs compared with onnxruntime). So the target switches x64 on, process-wide, the first
time it needs JAX; lowerings never rely on JAX's default dtypes (every constant carries its ONNX dtype), so
32-bit models still lower to 32-bit StableHLO.
"""

from __future__ import annotations

from typing import Any

from llmc.errors import TargetError

INSTALL_HINT = "install llmc[stablehlo] (the 'stablehlo' extra of llmc: pinned jax and jaxlib)"


def require_jax() -> Any:
    """The ``jax`` module, with x64 enabled; a TargetError naming the extra when it is missing."""
    try:
        import jax
        import jax.export  # noqa: F401  (the submodule the target serializes with)
    except ImportError as exc:
        raise TargetError(
            f"the tpu target needs JAX, which is not installed ({exc})", hint=INSTALL_HINT
        ) from exc
    if not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)
    return jax


def versions() -> dict[str, str]:
    """jax/jaxlib versions, for manifests (empty when JAX is missing)."""
    try:
        import jax
        import jaxlib
    except ImportError:
        return {}
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__}
