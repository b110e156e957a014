"""The YAML spec: pydantic models, loading with line/column locations, and the JSON Schema.

YAML is read with ``yaml.compose`` on the safe loader (never ``yaml.load``) so that every mapping key and
value keeps its position; pydantic's error locations are then mapped back onto the file, and unknown keys or
pass names get a did-you-mean suggestion. Relative paths resolve against the spec file's folder.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from llmc.errors import Location, SpecError
from llmc.targets.cuda.options import CudaTargetSpec
from llmc.targets.tpu.options import TpuTargetSpec

Source = Literal["onnx", "torch", "hf", "gguf"]
Task = Literal["generic", "text-generation", "feature-extraction", "classification"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputSpec(_Strict):
    """One model input, for the torch frontend's signature and for verification inputs."""

    name: str
    shape: list[int | str]
    dtype: str = "float32"


class ModelSpec(_Strict):
    """Which model to import. ``path`` is a file or folder (relative to the spec), ``package://pkg/sub/path``
    for a file shipped inside an installed Python package, or ``pkg.module:factory`` for ``source: torch``."""

    source: Source = "onnx"
    path: str
    task: Task = "generic"
    inputs: list[InputSpec] | None = Field(default=None, description="input signature (torch frontend)")
    max_length: int | None = Field(default=None, description="decoders: longest prompt + generation")


class CpuTargetSpec(_Strict):
    """The onnxruntime CPU target."""

    contrib_ops: bool = Field(default=True, description="legalize into onnxruntime com.microsoft contrib ops")
    threads: int | None = Field(default=None, ge=1, description="intra-op threads (default: all cores)")
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = "all"
    external_data: bool | None = Field(
        default=None, description="weights in model.onnx.data (default: when > 1 GB)"
    )


class TargetsSpec(_Strict):
    cpu: CpuTargetSpec | None = None
    tpu: TpuTargetSpec | None = None
    cuda: CudaTargetSpec | None = None


class Tolerances(_Strict):
    """An output passes when every element has |out - ref| <= max_abs + max_rel * |ref| and the cosine
    similarity of the flattened outputs is at least ``cosine``. Integer and bool outputs must be equal."""

    max_abs: float = Field(default=1e-4, ge=0)
    max_rel: float = Field(default=1e-3, ge=0)
    cosine: float = Field(default=0.9999, ge=-1, le=1)


class VerifySpec(_Strict):
    """How the compiled model is checked against the reference (the imported, unoptimized model): outputs
    within ``tolerances`` (for encoders, ``tolerances.cosine`` is also the lowest cosine per sample), and
    accuracy metrics against the thresholds below; a missed one fails the compile."""

    enabled: bool = True
    reference: Literal["onnx", "pytorch", "both"] = Field(
        default="onnx", description="decoders: the unoptimized ONNX import, PyTorch eager (hf/gguf), or both"
    )
    prompts: list[str] = Field(
        default_factory=lambda: ["The capital of France is", "def fibonacci(n):"],
        description="decoders: prompts for prefill logits and greedy token agreement",
    )
    new_tokens: int = Field(default=16, ge=1, description="decoders: greedy tokens compared per prompt")
    min_token_agreement: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="decoders: share of teacher-forced greedy tokens that must match (every prompt)",
    )
    min_free_running_agreement: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="decoders: share of greedy tokens, generated free-running, equal to the reference's "
        "before the first difference (all prompts together); None: reported only",
    )
    max_perplexity_ratio: float | None = Field(
        default=None,
        gt=0,
        description="decoders: highest perplexity of the compiled model / the reference's (e.g. 1.05); "
        "None: reported only",
    )
    perplexity_text: str | None = Field(
        default=None, description="decoders: text file for perplexity (default: llmc's shipped eval.txt)"
    )
    perplexity_tokens: int = Field(
        default=128, ge=0, description="decoders: tokens of the text scored for perplexity (0: skip it)"
    )
    perplexity_window: int = Field(
        default=128, ge=2, description="decoders: perplexity window; each window starts a fresh KV cache"
    )
    min_top1_agreement: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="classification: share of samples whose top-1 class equals the reference's; "
        "None: reported only",
    )
    inputs: str | None = Field(default=None, description=".npz file of inputs (else seeded random inputs)")
    samples: int = Field(default=2, ge=1, description="random input sets")
    seed: int = 0
    dims: dict[str, int] = Field(default_factory=dict, description="values for symbolic dims, e.g. batch: 2")
    shapes: dict[str, list[int]] = Field(default_factory=dict, description="full shapes per input name")
    ranges: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="[low, high) of random values per input name"
    )
    tolerances: Tolerances = Field(default_factory=Tolerances)
    per_output: dict[str, Tolerances] = Field(default_factory=dict)


class CalibrationSpec(_Strict):
    """Data that data-aware passes (GPTQ, static int8, sensitivity) run the model on while compiling.

    Decoders take text: ``prompts`` and/or a ``text`` file cut into windows of ``max_tokens`` tokens;
    other models take ``inputs``: an ``.npz`` (keys ``name`` or ``name@k``) or a folder of them.
    """

    prompts: list[str] = Field(default_factory=list, description="decoders: calibration prompts")
    text: str | None = Field(default=None, description="decoders: a text file cut into token windows")
    inputs: str | None = Field(default=None, description="other models: an .npz file or a folder of them")
    samples: int = Field(default=8, ge=1, description="at most this many calibration samples")
    max_tokens: int = Field(default=128, ge=2, description="decoders: tokens per sample")


class OutputSpec(_Strict):
    dir: str = Field(description="the artifact folder (one per target under it when several targets)")
    keep_reference: bool = Field(
        default=False, description="also store the unoptimized model (for baselines)"
    )


class DebugSpec(_Strict):
    dump_ir: Literal["none", "after-each", "after-change"] = "none"
    dump_dir: str | None = Field(default=None, description="default: <output.dir>.dumps")
    verify_each: bool = True


class Spec(_Strict):
    """An llmc compilation plan."""

    name: str | None = None
    model: ModelSpec
    pipeline: list[Any] = Field(
        default_factory=list, description="pass names, {name: {options}}, {fixpoint: [...]}"
    )
    targets: TargetsSpec = Field(default_factory=lambda: TargetsSpec(cpu=CpuTargetSpec()))
    verify: VerifySpec = Field(default_factory=VerifySpec)
    calibration: CalibrationSpec | None = Field(
        default=None, description="data for data-aware passes (gptq, quantize-static, sensitivity)"
    )
    output: OutputSpec
    debug: DebugSpec = Field(default_factory=DebugSpec)

    @field_validator("targets")
    @classmethod
    def _at_least_one_target(cls, value: TargetsSpec) -> TargetsSpec:
        if not any(getattr(value, k) is not None for k in TargetsSpec.model_fields):
            raise ValueError("name at least one target (cpu)")
        return value

    # -- filled by load_spec ------------------------------------------------------------------------
    _file: Path | None = PrivateAttr(default=None)
    _locations: dict[tuple[Any, ...], tuple[int, int]] = PrivateAttr(default_factory=dict)
    _text: str = PrivateAttr(default="")

    @property
    def file(self) -> Path | None:
        return self._file

    @property
    def base_dir(self) -> Path:
        return self._file.parent if self._file else Path.cwd()

    def resolve(self, path: str) -> Path:
        """A path from the spec, relative to the spec's folder (``package://`` resolved too)."""
        return resolve_path(path, self.base_dir)

    def locate(self, path: tuple[Any, ...]) -> Location:
        return _locate(self._locations, path, self._file)

    def target_names(self) -> list[str]:
        return [k for k in TargetsSpec.model_fields if getattr(self.targets, k) is not None]

    def digest(self) -> str:
        return hashlib.sha256(self._text.encode()).hexdigest()[:16]


def resolve_path(path: str, base_dir: Path) -> Path:
    if path.startswith("package://"):
        rest = path[len("package://") :]
        package, _, inner = rest.partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise SpecError(
                f"package '{package}' is not installed",
                hint=f"pip install --no-deps {package.replace('_', '-')}",
            )
        return Path(list(spec.submodule_search_locations)[0]) / inner
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base_dir / p)


# -- YAML with locations ---------------------------------------------------------------------------------
def _construct(node: yaml.Node, path: tuple[Any, ...], locations: dict, file: Path | None) -> Any:
    locations[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node)
            if key in out:
                loc = Location(file, key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                raise SpecError(f"duplicate key '{key}'", location=loc)
            out[key] = _construct(value_node, (*path, key), locations, file)
            locations[(*path, key)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, (*path, i), locations, file) for i, item in enumerate(node.value)]
    return _scalar(node)


def _scalar(node: yaml.Node) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def _locate(locations: dict, path: tuple[Any, ...], file: Path | None) -> Location:
    path = tuple(path)
    while path and path not in locations:
        path = path[:-1]
    line, col = locations.get(path, (None, None))
    return Location(file, line, col)


def parse_yaml(text: str, file: Path | None = None) -> tuple[Any, dict]:
    locations: dict[tuple[Any, ...], tuple[int, int]] = {}
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        loc = Location(file, mark.line + 1, mark.column + 1) if mark else Location(file)
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"malformed YAML: {problem}", location=loc) from exc
    if node is None:
        raise SpecError("the spec is empty", location=Location(file, 1, 1), hint="see specs/ for examples")
    return _construct(node, (), locations, file), locations


def _model_for_path(path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model whose fields live at ``path`` (to suggest close key names)."""
    model: Any = Spec
    for part in path:
        if isinstance(part, int):
            continue
        field = (
            model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        )
        if field is None:
            return None
        ann = field.annotation
        candidates = [
            a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if not candidates:
            inner = [a for x in getattr(ann, "__args__", ()) for a in getattr(x, "__args__", ())]
            candidates = [a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return None
        model = candidates[0]
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _error_to_spec_error(err: dict[str, Any], locations: dict, file: Path | None) -> SpecError:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    # pydantic puts union/literal member names into loc; keep only parts that exist in the YAML
    clean: list[Any] = []
    for part in loc:
        candidate = (*clean, part)
        if candidate in locations or not clean or isinstance(part, int):
            clean.append(part)
    where = ".".join(str(p) for p in clean) or "<spec>"
    location = _locate(locations, tuple(clean), file)
    hint = None
    if err["type"] == "extra_forbidden" and clean:
        owner = _model_for_path(tuple(clean[:-1]))
        if owner is not None:
            close = difflib.get_close_matches(str(clean[-1]), list(owner.model_fields), n=1, cutoff=0.5)
            allowed = ", ".join(owner.model_fields)
            hint = f"did you mean '{close[0]}'?" if close else f"allowed keys here: {allowed}"
        return SpecError(f"unknown key '{where}'", location=location, hint=hint)
    if err["type"] == "missing":
        return SpecError(f"'{where}' is required", location=location)
    msg = err["msg"]
    if err["type"] == "literal_error":
        hint = re.sub(r"^Input should be ", "expected ", msg)
        return SpecError(f"'{where}' has an invalid value {err.get('input')!r}", location=location, hint=hint)
    return SpecError(f"'{where}': {msg}", location=location)


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file; every problem is a SpecError with file, line and column."""
    file = Path(path)
    if not file.exists():
        raise SpecError("spec file not found", location=Location(file))
    if file.is_dir():
        raise SpecError("expected a YAML file, got a folder", location=Location(file))
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read the spec: {exc}", location=Location(file)) from exc
    return parse_spec(text, file.resolve())


def parse_spec(text: str, file: Path | None = None) -> Spec:
    data, locations = parse_yaml(text, file)
    if not isinstance(data, dict):
        raise SpecError(
            "the spec must be a mapping (model:, pipeline:, targets:, ...)", location=Location(file, 1, 1)
        )
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = _error_to_spec_error(errors[0], locations, file)
        if len(errors) > 1:
            more = [str(_error_to_spec_error(e, locations, file)) for e in errors[1:4]]
            first.message += "\n  also: " + "\n  also: ".join(more)
        raise first from None
    spec._file = file
    spec._locations = locations
    spec._text = text
    _check_pipeline(spec)
    return spec


def _check_pipeline(spec: Spec) -> None:
    from llmc.pass_manager import Pipeline, PipelineSyntaxError

    try:
        Pipeline.parse(spec.pipeline)
    except PipelineSyntaxError as exc:
        raise SpecError(exc.message, location=spec.locate(("pipeline", *exc.path)), hint=exc.hint) from None


def json_schema() -> dict[str, Any]:
    schema = Spec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "llmc spec"
    return schema
