"""The op registry, derived from the op table (table.py): `OPS[op][implementation] -> callable`, the typed
selection (`OpSelection`, in the engine config: an implementation name per op and GEMM site, or "auto"), and
`resolve`, which turns a selection into `Ops` once, when the model is built.

Optional implementations (Triton, CuTeDSL) are imported when present: a missing module or toolchain leaves
them out and `UNAVAILABLE` says why, so selecting one fails with that reason. `resolve` also reads the tuned
launch settings for this runtime (space.py) and records what it chose: `Ops.names` (auto resolved to a
concrete implementation) and `Ops.tuned` (every selected implementation's parameter values).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Callable

import torch
from pydantic import BaseModel, ConfigDict, create_model

from ..core.errors import EngineError
from . import space
from .table import SPECS, TABLE, UNFUSED, OpSpec, check_tuned

OPS: dict[str, dict[str, Callable | None]] = {s.name: {} for s in TABLE}
UNAVAILABLE: dict[tuple[str, str], str] = {}  # (op, implementation) -> why it is not registered
GEMM_SITES: tuple[str, ...] = SPECS["gemm"].sites
DEVICE_DEFAULTS: dict[str, dict[str, tuple[str, ...]]] = {
    d: {s.name: s.defaults[d] for s in TABLE if d in s.defaults} for d in ("cpu", "cuda")}
DTYPES: dict[tuple[str, str], tuple[torch.dtype, ...]] = {
    (s.name, i.name): tuple(getattr(torch, t) for t in i.dtypes) for s in TABLE for i in s.impls if i.dtypes}


def _unavailable(module: Any, path: str) -> str | None:
    if getattr(module, "HAS_TRITON", True) is False:  # importable, but its kernels cannot launch
        return f"ops/{path}.py: triton is not installed"
    if getattr(module, "UNAVAILABLE_REASON", None):  # importable, but its toolchain is missing
        return f"ops/{path}.py: {module.UNAVAILABLE_REASON}"
    return None


def _register() -> None:
    for s in TABLE:
        for impl in s.impls:
            if impl.module is None:
                OPS[s.name][impl.name] = None
                continue
            path = impl.module.replace(".", "/")
            try:
                module = importlib.import_module(f"{__package__}.{impl.module}")
            except ImportError as e:
                if not impl.optional:
                    raise
                UNAVAILABLE[(s.name, impl.name)] = f"{type(e).__name__}: {e}"
                continue
            if not hasattr(module, s.name):
                raise EngineError(f"ops/{path}.py defines no {s.name} (the op table's row {s.name}={impl.name})")
            why = _unavailable(module, path) if impl.optional else None
            if why:
                UNAVAILABLE[(s.name, impl.name)] = why
            else:
                OPS[s.name][impl.name] = getattr(module, s.name)


_register()


class _SelectionBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def parse(cls, text: str) -> "OpSelection":
        """From `op=impl,...` (CLI form): `gemm=impl` sets every GEMM site, `gemm.qkv=impl` one site."""
        values: dict = {}
        sited: dict[str, dict[str, str]] = {s.name: {} for s in TABLE if s.sites}
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, sep, impl = item.partition("=")
            if not sep or not impl:
                raise EngineError(f"--ops: {item!r} is not op=implementation")
            op, dot, site = key.partition(".")
            if op in sited:
                sited[op] |= {site: impl} if dot else dict.fromkeys(SPECS[op].sites, impl)
            else:
                values[key] = impl
        try:
            return cls(**values, **{op: _SITES[op](**sites) for op, sites in sited.items()})
        except ValueError as e:
            raise EngineError(f"--ops: {e}") from None


_SITES: dict[str, type[BaseModel]] = {
    s.name: create_model(f"{s.name.title()}Sites", __config__=ConfigDict(extra="forbid", frozen=True),
                         **{site: (str, "auto") for site in s.sites}) for s in TABLE if s.sites}
GemmSites = _SITES["gemm"]
OpSelection = create_model(  # one field per op of the table: an implementation name or "auto"
    "OpSelection", __base__=_SelectionBase,
    **{s.name: ((_SITES[s.name], _SITES[s.name]()) if s.sites else (str, "auto")) for s in TABLE})
OpSelection.__doc__ = "Which implementation runs each op: a name in OPS[op], or \"auto\" (the device's default)."


def refuse_unrun(selection: BaseModel, runs: tuple[str, ...], engine: str) -> None:
    """An engine whose model calls only the registry ops `runs` refuses a selection naming any other op (an
    implementation that would not run is an error, never silently ignored); `unfused`, what runs there, is
    accepted. Raises EngineError."""
    default, named = type(selection)(), []
    for op in (op for op in type(selection).model_fields if op not in runs):
        chosen, base = getattr(selection, op), getattr(default, op)
        if isinstance(chosen, BaseModel):  # a sited op: gemm.qkv=...
            named += [f"{op}.{site}={getattr(chosen, site)}" for site in type(chosen).model_fields
                      if getattr(chosen, site) != getattr(base, site)]
        elif chosen not in (base, UNFUSED):
            named.append(f"{op}={chosen}")
    if named:
        raise EngineError(f"--ops {','.join(named)}: {engine} does not run "
                          f"{'this op' if len(named) == 1 else 'these ops'} through the op registry; it runs "
                          f"{', '.join(runs)} (`info` lists their implementations)")


def _field(label: str) -> str:
    return label.replace(".", "_")


@dataclass(frozen=True)
class _OpsBase:
    names: dict[str, str] = field(default_factory=dict)  # label -> implementation ("(in mlp=...)" when fused away)
    tuned: dict[str, dict[str, Any]] = field(default_factory=dict)  # "op=impl" -> parameter values it runs with
    tuned_key: dict[str, Any] = field(default_factory=dict)  # the runtime key looked up in the tuned configs
    selection: Any = None  # the OpSelection these were resolved from

    def record(self) -> dict[str, Any]:
        """What ran, for logs and checkpoints."""
        return {"names": dict(self.names), "tuned": {k: dict(v) for k, v in self.tuned.items()},
                "tuned_key": dict(self.tuned_key)}


# The resolved callables the model and optimizer call, one field per label (gemm_qkv, attention, ...); a fused
# op is None when UNFUSED, residual_scale None for its reference (add_rms_norm applies r).
Ops = make_dataclass("Ops", [(_field(label), Callable | None) for s in TABLE for label in s.labels],
                     bases=(_OpsBase,), frozen=True, kw_only=True)


def _cannot(s: OpSpec, name: str, dims: Any) -> str | None:
    """Why implementation `name` of op `s` cannot run the model's shapes `dims` (its declared `supports`), or None."""
    impl = next((i for i in s.impls if i.name == name), None)
    return impl.supports(dims) if dims is not None and impl is not None and impl.supports else None


def _pick(s: OpSpec, choice: str, device: str, label: str, dtype: torch.dtype | None, dims: Any) -> str:
    if choice != "auto":
        name = choice
        if name in OPS[s.name] and (why := _cannot(s, name, dims)):
            raise EngineError(f"ops.{label}: {name} cannot run this model: {why}")
    else:
        def runs(n: str) -> bool:
            return (dtype is None or dtype in DTYPES.get((s.name, n), (dtype,))) and not _cannot(s, n, dims)
        name = next((n for n in s.defaults.get(device, ()) if n in OPS[s.name] and runs(n)), s.fallback)
    if name in OPS[s.name]:
        return name
    if (s.name, name) in UNAVAILABLE:
        raise EngineError(f"ops.{label}: implementation {name!r} is unavailable ({UNAVAILABLE[(s.name, name)]})")
    raise EngineError(f"ops.{label}: unknown implementation {name!r}; registered: {', '.join(sorted(OPS[s.name]))}")


def resolve(selection: BaseModel, device: str, dtype: torch.dtype | None = None,
            tuned: dict[str, dict[str, dict]] | None = None, dims: Any = None) -> Any:
    """`Ops` for `selection` on `device` ("cpu" or "cuda") computing in `dtype` (None: any). `tuned`: the
    elected values ({op: {impl: {param: value}}}); None reads the tuned-config file's entry for this runtime.
    `dims` (cases.Dims, None: any): the model's shapes; "auto" passes over implementations that declare they
    cannot run them, and a named one that cannot is an error before any step.
    Raises EngineError naming the op, implementation or parameter."""
    key = space.runtime_key(device)
    elected = check_tuned(space.elected_for(space.read_tuned(), key) if tuned is None else tuned)
    names: dict[str, str] = {}
    for s in TABLE:
        for label in s.labels:
            chosen = getattr(selection, s.name)
            choice = getattr(chosen, label.partition(".")[2]) if s.sites else chosen
            names[label] = _pick(s, choice, device, label, dtype, dims)
    fns = {_field(label): OPS[label.partition(".")[0]][impl] for label, impl in names.items()}
    values: dict[tuple[str, str], dict] = {}
    for label, impl in names.items():
        op = label.partition(".")[0]
        declared = next((i.space for i in SPECS[op].impls if i.name == impl), {})  # tests register spies
        if declared:
            values[(op, impl)] = {n: p.default for n, p in declared.items()} | elected.get((op, impl), {})
    for s in TABLE:  # a fused op runs instead of its parts: the logs say so, and their values are not used
        if s.replaces and names[s.name] != UNFUSED:
            for part in s.replaces:
                values.pop((part.partition(".")[0], names[part]), None)
            names.update(dict.fromkeys(s.replaces, f"(in {s.name}={names[s.name]})"))
    space.activate(values)
    return Ops(**fns, names=names, tuned={f"{op}={impl}": v for (op, impl), v in sorted(values.items())},
               tuned_key=key.model_dump(), selection=selection)
