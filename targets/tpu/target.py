"""The TPU target: ONNX IR -> JAX -> StableHLO through ``jax.export``, verified on whatever JAX backend is here.

torch_xla does not work with our torch build, so the graph is lowered op by op onto ``jax.numpy``/``jax.lax``
(``lowering.py``) and exported with ``jax.export`` for the spec's ``platforms`` (default TPU and CPU): one
serialized module per shape bucket, runnable by any JAX of a compatible version on any of those platforms,
CPU included, which is how ``llmc compile`` verifies it here without a TPU.

**Static shapes.** XLA on TPU compiles one program per shape. Every symbolic dim of the model's inputs must
have sizes in the spec (``buckets: {batch: [1, 2], sequence: [16]}``); each combination of sizes is one
module (``combinations:`` lists them explicitly instead, e.g. a prefill and a decode bucket of a decoder).
The runner picks the module whose input shapes equal the feeds' shapes; it does not pad.

**The artifact.** ``modules/<bucket>.jax`` (``Exported.serialize()``), ``modules/<bucket>.mlir`` (the same
StableHLO as text, for reading), ``weights.safetensors`` (the weights, once, shared by every bucket: they
are module *arguments*, not constants baked into each module) and ``manifest.json`` (buckets, files and
sizes, input/output signatures, platforms, jax/jaxlib versions, the TPU compile check).

**TPU compile check.** Exporting for "tpu" lowers to StableHLO without a TPU; compiling it needs libtpu.
Where libtpu is importable, each module is compiled ahead of time for the attached TPU (or the spec's
``topology``) and the result goes into the manifest; otherwise the manifest says
"libtpu not installed: TPU compile not checked". llmc never installs libtpu.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import itertools
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmc.errors import ModelError, TargetError
from llmc.ir import Graph, clone, onnx_dtype_to_np
from llmc.pass_manager import Pipeline
from llmc.runtime.runner import TensorSig
from llmc.targets.base import EmitContext, Target, platform_info, read_manifest, versions, write_manifest
from llmc.targets.tpu import jaxenv
from llmc.targets.tpu.options import TpuTargetSpec

WEIGHTS_FILE = "weights.safetensors"
LIBTPU_MISSING = "libtpu not installed: TPU compile not checked"
HOW_TO_RUN = (
    "import jax; jax.config.update('jax_enable_x64', True); from jax import export; "
    "m = export.deserialize(open('modules/<bucket>.jax', 'rb').read()); "
    "outputs = m.call(weights, feeds)  # weights: dict from weights.safetensors, feeds: dict name -> array"
)


# -- buckets -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bucket:
    """One set of concrete sizes: the symbolic dims' values and the resulting input shapes."""

    dims: dict[str, int]
    shapes: dict[str, tuple[int, ...]]
    slug: str


def runtime_inputs(graph: Graph) -> list[str]:
    """Graph inputs that are fed at run time (an input with an initializer is a default: a weight)."""
    return [name for name in graph.inputs if name not in graph.initializers]


def _slug(index: int, dims: dict[str, int]) -> str:
    text = "_".join(f"{re.sub(r'[^A-Za-z0-9]+', '', k)[:24]}-{v}" for k, v in dims.items())
    return f"{index:02d}" + (f"-{text}" if text else "")


def plan_buckets(graph: Graph, options: TpuTargetSpec) -> list[Bucket]:
    """The buckets to export, or a TargetError naming each input dim that has no size (nothing is written)."""
    symbolic: dict[str, list[str]] = {}  # dim name -> "input 'x' dim 0" (first-seen order)
    problems: list[str] = []
    for name in runtime_inputs(graph):
        info = graph.value_info(name)
        if info is None or not info.is_tensor or info.shape is None:
            problems.append(f"input '{name}' has no known rank")
            continue
        if not info.dtype:
            problems.append(f"input '{name}' has no element type")
        for axis, dim in enumerate(info.shape):
            if isinstance(dim, str):
                symbolic.setdefault(dim, []).append(f"input '{name}' dim {axis}")
            elif dim is None or dim < 0:
                problems.append(f"input '{name}' dim {axis} has neither a size nor a name")
    if problems:
        raise TargetError(
            "the tpu target needs static input shapes: " + "; ".join(problems),
            hint="give these dims a name in the model (then a size under targets.tpu.buckets) or a fixed size",
        )
    combos = _combinations(symbolic, options)
    buckets = []
    for index, dims in enumerate(combos):
        shapes = {}
        for name in runtime_inputs(graph):
            shape = graph.value_info(name).shape or ()
            shapes[name] = tuple(dims[d] if isinstance(d, str) else int(d) for d in shape)
        buckets.append(Bucket(dims, shapes, _slug(index, dims)))
    return buckets


def _combinations(symbolic: dict[str, list[str]], options: TpuTargetSpec) -> list[dict[str, int]]:
    names = list(symbolic)

    def unknown(keys: list[str], where: str) -> None:
        for key in keys:
            if key not in symbolic:
                close = difflib.get_close_matches(key, names, n=1)
                hint = (
                    f"did you mean '{close[0]}'?"
                    if close
                    else f"the inputs' symbolic dims: {names or 'none'}"
                )
                raise TargetError(f"{where} names dim '{key}', which no model input has", hint=hint)

    if options.combinations is not None:
        combos: list[dict[str, int]] = []
        for i, combo in enumerate(options.combinations):
            unknown(list(combo), f"targets.tpu.combinations[{i}]")
            missing = [n for n in names if n not in combo]
            if missing:
                raise TargetError(
                    f"targets.tpu.combinations[{i}] gives no size for "
                    + ", ".join(f"'{n}' ({symbolic[n][0]})" for n in missing)
                )
            dims = {n: int(combo[n]) for n in names}
            if dims not in combos:
                combos.append(dims)
        if not combos:
            raise TargetError("targets.tpu.combinations is empty: list at least one bucket")
        return combos
    unknown(list(options.buckets), "targets.tpu.buckets")
    missing = [n for n in names if n not in options.buckets]
    if missing:
        where = "; ".join(f"dim '{n}' of {', '.join(symbolic[n])}" for n in missing)
        example = ", ".join(f"{n}: [1]" for n in missing)
        raise TargetError(
            f"the tpu target needs static shapes, but no bucket gives sizes for {where}",
            hint=f"add them to the spec: targets: {{tpu: {{buckets: {{{example}}}}}}}",
        )
    return [
        dict(zip(names, sizes, strict=True))
        for sizes in itertools.product(*(options.buckets[n] for n in names))
    ]


# -- weights file ------------------------------------------------------------------------------------
_SAFETENSORS_NATIVE = {
    "float64",
    "float32",
    "float16",
    "int64",
    "uint64",
    "int32",
    "uint32",
    "int16",
    "uint16",
    "int8",
    "uint8",
    "bool",
}
_CARRIER = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _safetensors() -> Any:
    try:
        import safetensors.numpy
    except ImportError as exc:
        raise TargetError(f"the tpu target needs safetensors ({exc})", hint=jaxenv.INSTALL_HINT) from exc
    return safetensors.numpy


def save_weights(path: Path, weights: dict[str, np.ndarray]) -> None:
    """Weights in safetensors; dtypes it lacks (bfloat16, int4, float8) travel as same-width unsigned ints with
    their real dtype in the metadata (``llmc.dtype.<name>``)."""
    tensors, metadata = {}, {"format": "llmc-tpu-weights"}
    for name, array in weights.items():
        array = np.ascontiguousarray(array)
        if array.dtype.name not in _SAFETENSORS_NATIVE:
            metadata[f"llmc.dtype.{name}"] = array.dtype.name
            array = array.view(_CARRIER[array.dtype.itemsize])
        tensors[name] = array
    _safetensors().save_file(tensors, str(path), metadata=metadata)
    path.chmod(0o644)  # safetensors creates the file private; artifacts are shared like the other files


def load_weights(path: Path) -> dict[str, np.ndarray]:
    st = _safetensors()
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata() or {}
    tensors = st.load_file(str(path))
    out = {}
    for name, array in tensors.items():
        real = metadata.get(f"llmc.dtype.{name}")
        out[name] = array.view(np.dtype(_ml_dtype(real))) if real else array
    return out


def _ml_dtype(name: str) -> Any:
    import ml_dtypes

    return getattr(ml_dtypes, name, name)


# -- the target --------------------------------------------------------------------------------------
def _signature(graph: Graph, names: list[str], dtypes: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        info = graph.value_info(name)
        shape = None if info is None or info.shape is None else list(info.shape)
        dtype = dtypes.get(name) or (
            str(np.dtype(onnx_dtype_to_np(info.dtype))) if info and info.dtype else "unknown"
        )
        rows.append({"name": name, "dtype": dtype, "shape": shape})
    return rows


class TpuTarget(Target):
    name = "tpu"

    def __init__(self, options: TpuTargetSpec | None = None) -> None:
        super().__init__(options or TpuTargetSpec())

    def legalize_pipeline(self) -> Pipeline:
        # The standard ops (Attention, RMSNormalization, RotaryEmbedding, blocked DequantizeLinear) lower
        # directly onto jax.numpy/lax in lowering.py; no graph rewrite is needed before that.
        return Pipeline([])

    def emit(self, graph: Graph, out_dir: Path, ctx: EmitContext) -> dict[str, Any]:
        buckets = plan_buckets(graph, self.options)  # user errors before anything is written
        jax = jaxenv.require_jax()
        from jax import export

        from llmc.targets.tpu import lowering, sharding

        mesh = self.options.mesh
        if mesh is not None:  # merged q/k/v and gate/up weights cannot be split by head: split them back
            graph = clone(graph)
            sharding.unmerge_projections(graph, self.options.inline_limit)
        lowering.check_supported(graph)
        weights = lowering.weight_arguments(graph, self.options.inline_limit)
        inputs = runtime_inputs(graph)
        plan = sharding.plan_sharding(graph, weights, mesh) if mesh is not None else None
        jit_options = {"in_shardings": sharding.jit_shardings(jax, plan, weights, inputs)} if plan else {}
        fn = jax.jit(lowering.lower_graph(graph, weights), **jit_options)
        weight_specs = {n: jax.ShapeDtypeStruct(a.shape, a.dtype) for n, a in weights.items()}
        input_dtypes = {n: np.dtype(onnx_dtype_to_np(graph.dtype(n))) for n in inputs}

        exported_all = []  # every bucket is traced and exported before anything is written
        for bucket in buckets:
            specs = {n: jax.ShapeDtypeStruct(bucket.shapes[n], input_dtypes[n]) for n in inputs}
            try:
                with _export_settings(jax, self.options.precision):
                    exported = export.export(fn, platforms=list(self.options.platforms))(weight_specs, specs)
            except TargetError as exc:
                raise TargetError(f"bucket {bucket.dims}: {exc.message}", hint=exc.hint) from exc
            exported_all.append((bucket, exported))

        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "modules").mkdir(exist_ok=True)
        rows: list[dict[str, Any]] = []
        output_dtypes: dict[str, str] = {}
        for bucket, exported in exported_all:
            blob = bytes(exported.serialize())
            module_path = out_dir / "modules" / f"{bucket.slug}.jax"
            mlir_path = out_dir / "modules" / f"{bucket.slug}.mlir"
            module_path.write_bytes(blob)
            mlir_path.write_text(exported.mlir_module())
            out_avals = _output_avals(jax, exported)
            for name, aval in out_avals.items():
                output_dtypes.setdefault(name, str(np.dtype(aval.dtype)))
            rows.append(
                {
                    "dims": bucket.dims,
                    "inputs": {n: list(s) for n, s in bucket.shapes.items()},
                    "outputs": {n: list(a.shape) for n, a in out_avals.items()},
                    "module": f"modules/{module_path.name}",
                    "mlir": f"modules/{mlir_path.name}",
                    "module_bytes": len(blob),
                    "nr_devices": exported.nr_devices,
                    "mlir_bytes": mlir_path.stat().st_size,
                }
            )
        save_weights(out_dir / WEIGHTS_FILE, weights)
        assets = _copy_assets(ctx.assets, out_dir) if ctx.assets else {}
        files = {
            str(p.relative_to(out_dir)): p.stat().st_size for p in sorted(out_dir.rglob("*")) if p.is_file()
        }
        manifest: dict[str, Any] = {
            "format": 1,
            "target": self.name,
            "runtime": {"name": "jax.export", "platforms": list(self.options.platforms)},
            "platforms": list(self.options.platforms),
            "precision": self.options.precision,
            "buckets": rows,
            **({"sharding": plan.to_json()} if plan else {}),  # tensor parallel: the mesh and the splits
            "weights": {
                "file": WEIGHTS_FILE,
                "count": len(weights),
                "bytes": int(sum(a.nbytes for a in weights.values())),
                "names": list(weights),
            },
            "files": files,
            "sizes": {
                "weights_bytes": files.get(WEIGHTS_FILE, 0),
                "modules_bytes": sum(r["module_bytes"] for r in rows),
                "mlir_bytes": sum(r["mlir_bytes"] for r in rows),
            },
            "inputs": _signature(graph, inputs, {n: str(d) for n, d in input_dtypes.items()}),
            "outputs": _signature(graph, list(graph.outputs), output_dtypes),
            "tpu_compile": tpu_compile_check(jax, exported_all, weight_specs, self.options),
            "how_to_run": HOW_TO_RUN,
            "ops": dict(sorted(Counter(n.op_type for _g, n in graph.walk()).items())),
            "task": ctx.task,
            "assets": assets,
            "decoder": ctx.decoder,
            "source": ctx.source,
            "spec": {"name": ctx.spec_name, "digest": ctx.spec_digest},
            "pipeline": {"text": ctx.pipeline_text, "passes": ctx.pipeline_report},
            "versions": {**versions(), **jaxenv.versions()},
            "platform": platform_info(),
            "opsets": dict(sorted(graph.opset_imports.items())),
        }
        write_manifest(out_dir, manifest)
        return manifest

    def can_run(self) -> str | None:
        """Why the modules cannot run here (a mesh larger than this machine's devices), or None."""
        if self.options.mesh is None:
            return None
        from llmc.targets.tpu import sharding

        return sharding.devices_missing(jaxenv.require_jax(), self.options.mesh.size)

    def load(self, artifact_dir: Path) -> JaxRunner:
        return load_runner(artifact_dir)


def _copy_assets(assets: dict[str, Path], out_dir: Path) -> dict[str, str]:
    import shutil

    (out_dir / "assets").mkdir(exist_ok=True)
    copied = {}
    for name, src in sorted(assets.items()):
        shutil.copy2(src, out_dir / "assets" / name)
        copied[name] = f"assets/{name}"
    return copied


@contextlib.contextmanager
def _export_settings(jax: Any, precision: str) -> Iterator[None]:
    """The precision to bake in, and StableHLO locations without Python file:line frames (those depend on
    who called llmc, which would make the same spec give different bytes); ONNX node names stay."""
    saved = jax.config.jax_traceback_in_locations_limit
    jax.config.update("jax_traceback_in_locations_limit", 0)
    try:
        if precision == "default":
            yield
        else:
            with jax.default_matmul_precision(precision):
                yield
    finally:
        jax.config.update("jax_traceback_in_locations_limit", saved)


def _output_avals(jax: Any, exported: Any) -> dict[str, Any]:
    """Output name -> aval of an exported module whose result is a dict."""
    leaves = exported.out_avals
    tree = exported.out_tree
    names = jax.tree_util.tree_unflatten(tree, list(range(len(leaves))))
    return {name: leaves[i] for name, i in names.items()}


def tpu_compile_check(
    jax: Any, exported: list[tuple[Bucket, Any]], weight_specs: dict[str, Any], options: TpuTargetSpec
) -> dict[str, Any]:
    """Compile each module for a TPU where libtpu is importable; otherwise say that it was not checked."""
    if "tpu" not in options.platforms:
        return {"checked": False, "reason": "tpu is not among the export platforms"}
    if importlib.util.find_spec("libtpu") is None:
        return {"checked": False, "reason": LIBTPU_MISSING}
    try:
        if options.topology:
            from jax.experimental import topologies

            device = topologies.get_topology_desc(options.topology, "tpu").devices[0]
        else:
            device = jax.devices("tpu")[0]
        results = []
        for bucket, module in exported:
            shardings = [jax.sharding.SingleDeviceSharding(device)] * len(module.in_avals)
            if options.mesh is not None:  # a sharded module compiles for a mesh of that many TPU devices
                devices = jax.devices("tpu")[: options.mesh.size]
                mesh = jax.make_mesh(
                    tuple(options.mesh.shape.values()), tuple(options.mesh.shape), devices=devices
                )
                shardings = module.in_shardings_jax(mesh)
            args = [
                jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
                for a, s in zip(module.in_avals, shardings, strict=True)
            ]
            w_tree, i_tree = jax.tree_util.tree_unflatten(module.in_tree, args)[0]
            jax.jit(module.call).lower(w_tree, i_tree).compile()
            results.append(bucket.slug)
        return {"checked": True, "device": str(device), "compiled": results}
    except Exception as exc:  # the check reports; it never fails a compile that verified on CPU
        return {"checked": False, "reason": f"TPU compile failed: {type(exc).__name__}: {str(exc)[:500]}"}


# -- the runner --------------------------------------------------------------------------------------
class JaxRunner:
    """Runs the exported modules of a tpu artifact on the JAX backend at hand (TPU, or CPU for checks)."""

    def __init__(self, artifact_dir: Path, manifest: dict[str, Any]) -> None:
        self.jax = jax = jaxenv.require_jax()
        from jax import export

        self.artifact_dir = Path(artifact_dir)
        self.manifest = manifest
        backend = jax.default_backend()
        platforms = manifest.get("platforms", [])
        if not {"gpu": {"cuda", "rocm"}}.get(backend, {backend}) & set(platforms):
            raise TargetError(
                f"{artifact_dir}: exported for {platforms}, but this machine's JAX backend is '{backend}'",
                hint="export with targets.tpu.platforms including it (the default is [tpu, cpu])",
            )
        self.inputs = [_tensor_sig(row) for row in manifest["inputs"]]
        self.outputs = [_tensor_sig(row) for row in manifest["outputs"]]
        self.buckets: list[dict[str, Any]] = manifest["buckets"]
        weights = load_weights(self.artifact_dir / manifest["weights"]["file"])
        if manifest.get("sharding"):  # tensor parallel: each weight split over the mesh as exported
            from llmc.targets.tpu import sharding

            self._weights = sharding.place_weights(jax, manifest["sharding"], weights)
        else:
            self._weights = {name: jax.device_put(array) for name, array in weights.items()}
        self._export = export
        self._calls: dict[int, Any] = {}

    def bucket_index(self, shapes: dict[str, tuple[int, ...]]) -> int:
        for i, bucket in enumerate(self.buckets):
            if all(tuple(bucket["inputs"][n]) == tuple(shapes[n]) for n in bucket["inputs"]):
                return i
        got = ", ".join(f"{n}{list(s)}" for n, s in shapes.items())
        have = "; ".join(", ".join(f"{n}{s}" for n, s in b["inputs"].items()) for b in self.buckets)
        raise TargetError(
            f"no compiled bucket matches the input shapes {got} (buckets: {have})",
            hint="add the sizes to targets.tpu.buckets and compile again",
        )

    def _call(self, index: int) -> Any:
        if index not in self._calls:
            path = self.artifact_dir / self.buckets[index]["module"]
            exported = self._export.deserialize(bytearray(path.read_bytes()))
            self._calls[index] = self.jax.jit(exported.call)
        return self._calls[index]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        args = {}
        for sig in self.inputs:
            if sig.name not in feeds:
                raise ModelError(f"missing input '{sig.name}' (inputs: {[s.name for s in self.inputs]})")
            value = np.asarray(feeds[sig.name])
            want = np.dtype(_ml_dtype(sig.dtype))
            if value.dtype != want:
                if not np.can_cast(value.dtype, want, "same_kind"):
                    raise ModelError(f"input '{sig.name}' is {value.dtype}, the model wants {want}")
                value = value.astype(want)
            args[sig.name] = value
        index = self.bucket_index({n: v.shape for n, v in args.items()})
        result = self._call(index)(self._weights, args)
        names = list(outputs) if outputs is not None else [o.name for o in self.outputs]
        unknown = [n for n in names if n not in result]
        if unknown:
            raise ModelError(f"unknown outputs {unknown} (outputs: {[o.name for o in self.outputs]})")
        return {n: np.asarray(result[n]) for n in names}


def _tensor_sig(row: dict[str, Any]) -> TensorSig:
    shape = None if row.get("shape") is None else tuple(row["shape"])
    return TensorSig(row["name"], row["dtype"], shape)


def load_runner(artifact_dir: Path, manifest: dict[str, Any] | None = None) -> JaxRunner:
    manifest = manifest or read_manifest(artifact_dir)
    return JaxRunner(Path(artifact_dir), manifest)
