"""The search space of ``lightning-noisy search``: dimensions of method choices, their hyperparameters, and the
combinations that do not go together, read from a YAML file and sampled through an Optuna trial.

A space file holds::

    dimensions:              # sampled in this order
      loss:                  # a dimension: its choices
        ce: {}               # a choice that changes nothing in the base config
        gce:
          patch:             # merged into the base config (see merge_config)
            model: {init_args: {loss: gce, loss_kwargs: {q: $q}}}
          params:            # "$q" in the patch is replaced by the sampled value
            q: {type: float, low: 0.1, high: 0.9}
      selection:
        dividemix:
          model_from: ../mnist1d_dividemix.yaml   # the model section of a fit config (path relative to this file)
          patch: {model: {init_args: {lambda_u: $lambda_u}}}
          params: {lambda_u: {type: float, low: 0.0, high: 50.0}}
    invalid:                 # combinations never sampled: every named dimension matches
      - {selection: dividemix, loss: [gce, sce]}
    enqueue:                 # trials to run first (e.g. the package's shipped configs)
      - {choices: {loss: gce}, params: {loss.gce.q: 0.7}}

Optuna names: a dimension's choice is the categorical parameter ``<dimension>``; a hyperparameter is
``<dimension>.<choice>.<name>``, sampled only when its choice is.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PARAM_TYPES = ("float", "int", "categorical")


class SearchSpaceError(ValueError):
    """A search space file or mapping that cannot be used; the message names the place and what was found."""


@dataclass(frozen=True)
class Param:
    """One hyperparameter of a choice: a float or int range (``log`` scale optional, int ``step``) or choices."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: int | None = None
    choices: tuple[Any, ...] = ()

    @classmethod
    def from_spec(cls, name: str, spec: Any, where: str) -> Param:
        if not isinstance(spec, Mapping) or spec.get("type") not in PARAM_TYPES:
            raise SearchSpaceError(f"{where}: a parameter needs type one of {list(PARAM_TYPES)}, got {spec!r}")
        unknown = set(spec) - {"type", "low", "high", "log", "step", "choices"}
        if unknown:
            raise SearchSpaceError(f"{where}: unknown keys {sorted(unknown)}")
        kind = spec["type"]
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise SearchSpaceError(f"{where}: a categorical parameter needs a non-empty list of choices, got {choices!r}")
            return cls(name, kind, choices=tuple(choices))
        low, high, log = spec.get("low"), spec.get("high"), spec.get("log", False)
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high))
        if not numbers or not low < high:
            raise SearchSpaceError(f"{where}: {kind} parameter needs numbers low < high, got low={low!r}, high={high!r}")
        if not isinstance(log, bool) or (log and low <= 0):
            raise SearchSpaceError(f"{where}: log must be a bool and needs low > 0, got log={log!r}, low={low!r}")
        step = spec.get("step")
        if kind == "int":
            if not (isinstance(low, int) and isinstance(high, int)):
                raise SearchSpaceError(f"{where}: an int parameter needs int bounds, got low={low!r}, high={high!r}")
            if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 1 or (log and step != 1)):
                raise SearchSpaceError(f"{where}: step must be an int >= 1 (1 on a log scale), got {step!r}")
        elif step is not None:
            raise SearchSpaceError(f"{where}: step is for int parameters only, got {step!r}")
        return cls(name, kind, float(low) if kind == "float" else low, float(high) if kind == "float" else high, log, step)

    def suggest(self, trial: Any, key: str) -> Any:
        """The value ``trial`` (an ``optuna.Trial``) suggests for this parameter under the name ``key``."""
        if self.type == "categorical":
            return trial.suggest_categorical(key, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(key, int(self.low), int(self.high), step=self.step or 1, log=self.log)
        return trial.suggest_float(key, self.low, self.high, log=self.log)

    def contains(self, value: Any) -> bool:
        """Whether ``value`` lies in this parameter's range (for enqueued trials)."""
        if self.type == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return self.low <= value <= self.high and (self.type == "float" or float(value).is_integer())


@dataclass(frozen=True)
class Choice:
    """One option of a dimension: the config patch it applies and the hyperparameters that fill it."""

    patch: Mapping[str, Any]
    params: tuple[Param, ...] = ()


@dataclass(frozen=True)
class Selection:
    """What a trial picked: a choice per dimension and the hyperparameter values, by Optuna name."""

    choices: dict[str, str]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The combination in one line, e.g. ``selection=codivide loss=gce correction=none mixup=off``."""
        return " ".join(f"{dim}={choice}" for dim, choice in self.choices.items())


class SearchSpace:
    """Dimensions of choices with their patches and hyperparameters, and the invalid combinations."""

    def __init__(
        self,
        dimensions: Mapping[str, Mapping[str, Choice]],
        invalid: Sequence[Mapping[str, frozenset[str]]] = (),
        enqueue: Sequence[Selection] = (),
    ) -> None:
        self.dimensions = {dim: dict(choices) for dim, choices in dimensions.items()}
        self.invalid = [dict(rule) for rule in invalid]
        self.enqueue = list(enqueue)
        if not self.combinations():
            raise SearchSpaceError("the invalid combinations leave no valid combination")
        for selection in self.enqueue:
            self._check_enqueued(selection)

    # -- reading ---------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> SearchSpace:
        """Read a space from a YAML file (see the module docstring)."""
        path = Path(path)
        if not path.is_file():
            raise SearchSpaceError(f"search space file not found: {str(path)!r}")
        return cls.from_dict(yaml.safe_load(path.read_text()), str(path), root=path.parent)

    @classmethod
    def from_dict(cls, spec: Any, where: str = "space", root: str | Path = ".") -> SearchSpace:
        """Build a space from its mapping (the parsed YAML); a choice's ``model_from`` is relative to ``root``."""
        if not isinstance(spec, Mapping) or not isinstance(spec.get("dimensions"), Mapping) or not spec["dimensions"]:
            raise SearchSpaceError(f"{where}: needs a non-empty mapping 'dimensions', got {spec!r:.120}")
        unknown = set(spec) - {"dimensions", "invalid", "enqueue"}
        if unknown:
            raise SearchSpaceError(f"{where}: unknown top-level keys {sorted(unknown)}")
        dimensions: dict[str, dict[str, Choice]] = {}
        for dim, choices in spec["dimensions"].items():
            if not isinstance(choices, Mapping) or not choices:
                raise SearchSpaceError(f"{where}: dimension {dim!r} needs a non-empty mapping of choices, got {choices!r}")
            dimensions[str(dim)] = {
                str(name): _read_choice(body, f"{where}: {dim}.{name}", Path(root)) for name, body in choices.items()
            }
        invalid = [_read_rule(rule, dimensions, f"{where}: invalid[{i}]") for i, rule in enumerate(spec.get("invalid") or [])]
        enqueue = [_read_enqueued(entry, f"{where}: enqueue[{i}]") for i, entry in enumerate(spec.get("enqueue") or [])]
        return cls(dimensions, invalid, enqueue)

    # -- combinations ----------------------------------------------------------------------------
    def is_invalid(self, choices: Mapping[str, str]) -> bool:
        """Whether a rule matches ``choices``: every dimension it names is chosen and among its values."""
        return any(all(dim in choices and choices[dim] in values for dim, values in rule.items()) for rule in self.invalid)

    def allowed(self, dim: str, chosen: Mapping[str, str]) -> list[str]:
        """The choices of ``dim`` that, with the earlier dimensions' ``chosen``, match no rule and leave a way on."""
        later = list(self.dimensions)[list(self.dimensions).index(dim) + 1:]
        return [c for c in self.dimensions[dim] if self._completable({**chosen, dim: c}, later)]

    def _completable(self, chosen: dict[str, str], later: list[str]) -> bool:
        if self.is_invalid(chosen):
            return False
        if not later:
            return True
        return any(self._completable({**chosen, later[0]: c}, later[1:]) for c in self.dimensions[later[0]])

    def combinations(self) -> list[dict[str, str]]:
        """Every valid combination, one choice per dimension."""
        names = list(self.dimensions)
        combos = (dict(zip(names, values)) for values in itertools.product(*(self.dimensions[d] for d in names)))
        return [c for c in combos if not self.is_invalid(c)]

    # -- sampling --------------------------------------------------------------------------------
    def sample(self, trial: Any) -> Selection:
        """The dimensions' choices and their hyperparameters from ``trial`` (an ``optuna.Trial``).

        A dimension left with one allowed choice is not sampled; one whose allowed choices are a strict
        subset is sampled under the name ``<dimension> [a|b]``, as Optuna needs one set of values per name.
        """
        choices: dict[str, str] = {}
        params: dict[str, Any] = {}
        for dim, options in self.dimensions.items():
            allowed = self.allowed(dim, choices)
            key = self._choice_key(dim, allowed)
            choices[dim] = allowed[0] if key is None else trial.suggest_categorical(key, allowed)
            for param in options[choices[dim]].params:
                key = f"{dim}.{choices[dim]}.{param.name}"
                params[key] = param.suggest(trial, key)
        return Selection(choices, params)

    def _choice_key(self, dim: str, allowed: list[str]) -> str | None:
        """The Optuna name of ``dim``'s choice among ``allowed``; ``None`` when there is nothing to choose."""
        if len(allowed) == 1:
            return None
        return dim if len(allowed) == len(self.dimensions[dim]) else f"{dim} [{'|'.join(allowed)}]"

    def optuna_params(self, selection: Selection) -> dict[str, Any]:
        """``selection`` as the Optuna parameters that :meth:`sample` suggests for it (for ``enqueue_trial``)."""
        out: dict[str, Any] = {}
        chosen: dict[str, str] = {}
        for dim, choice in selection.choices.items():
            key = self._choice_key(dim, self.allowed(dim, chosen))
            if key is not None:
                out[key] = choice
            chosen[dim] = choice
        return {**out, **selection.params}

    def patches(self, selection: Selection) -> list[dict[str, Any]]:
        """The patches of the chosen options, in dimension order, with ``$name`` filled by the sampled values."""
        out = []
        for dim, choice in selection.choices.items():
            option = self.dimensions[dim][choice]
            values = {p.name: selection.params[f"{dim}.{choice}.{p.name}"] for p in option.params}
            out.append(_fill(copy.deepcopy(dict(option.patch)), values, f"{dim}.{choice}"))
        return out

    def apply(self, base: Mapping[str, Any], selection: Selection) -> dict[str, Any]:
        """The base config with the selection's patches merged in (a new dict)."""
        config = copy.deepcopy(dict(base))
        for patch in self.patches(selection):
            config = merge_config(config, patch)
        return config

    def _check_enqueued(self, selection: Selection) -> None:
        for dim, choice in selection.choices.items():
            if dim not in self.dimensions or choice not in self.dimensions[dim]:
                raise SearchSpaceError(f"enqueued trial names an unknown choice {dim}={choice!r}")
        missing = [d for d in self.dimensions if d not in selection.choices]
        if missing:
            raise SearchSpaceError(f"enqueued trial {selection.label!r} leaves dimensions {missing} unchosen")
        if self.is_invalid(selection.choices):
            raise SearchSpaceError(f"enqueued trial {selection.label!r} is an invalid combination")
        for dim, choice in selection.choices.items():
            for param in self.dimensions[dim][choice].params:
                key = f"{dim}.{choice}.{param.name}"
                if key not in selection.params or not param.contains(selection.params[key]):
                    raise SearchSpaceError(
                        f"enqueued trial {selection.label!r}: {key} must be given within its range, got "
                        f"{selection.params.get(key)!r}"
                    )


def merge_config(base: Any, patch: Any) -> Any:
    """``patch`` merged into ``base`` (neither is changed).

    Mappings merge key by key; a key ending in ``+`` appends its list to the base's list of that name
    (``callbacks+: [...]`` adds callbacks); a mapping whose ``class_path`` differs from the base's replaces
    it whole, as its ``init_args`` belong to another class; anything else replaces the base's value.
    """
    if not isinstance(base, Mapping) or not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    if "class_path" in patch and base.get("class_path") not in (None, patch["class_path"]):
        return copy.deepcopy(dict(patch))
    out = copy.deepcopy(dict(base))
    for key, value in patch.items():
        if isinstance(key, str) and key.endswith("+"):
            name = key[:-1]
            current = out.get(name) or []
            if not isinstance(value, list) or not isinstance(current, list):
                raise SearchSpaceError(f"{key!r} appends a list to a list, got {value!r:.80} onto {current!r:.80}")
            out[name] = [*current, *copy.deepcopy(value)]
        else:
            out[key] = merge_config(out.get(key), value)
    return out


def _fill(node: Any, values: Mapping[str, Any], where: str) -> Any:
    if isinstance(node, str) and node.startswith("$"):
        if node[1:] not in values:
            raise SearchSpaceError(f"{where}: the patch refers to {node!r}, which is not one of its params {sorted(values)}")
        return values[node[1:]]
    if isinstance(node, dict):
        return {k: _fill(v, values, where) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, values, where) for v in node]
    return node


def _placeholders(node: Any) -> set[str]:
    if isinstance(node, str) and node.startswith("$"):
        return {node[1:]}
    if isinstance(node, Mapping):
        return set().union(*(_placeholders(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_placeholders(v) for v in node))
    return set()


def _read_choice(body: Any, where: str, root: Path) -> Choice:
    body = {} if body is None else body
    if not isinstance(body, Mapping) or set(body) - {"patch", "params", "model_from"}:
        raise SearchSpaceError(
            f"{where}: a choice is a mapping with 'patch', 'params' and 'model_from', got {body!r:.120}"
        )
    patch = body.get("patch") or {}
    if not isinstance(patch, Mapping):
        raise SearchSpaceError(f"{where}: patch must be a mapping, got {patch!r:.120}")
    if "model_from" in body:
        patch = merge_config({"model": _model_section(body["model_from"], root, where)}, patch)
    specs = body.get("params") or {}
    if not isinstance(specs, Mapping):
        raise SearchSpaceError(f"{where}: params must be a mapping, got {specs!r:.120}")
    params = tuple(Param.from_spec(str(name), spec, f"{where}.{name}") for name, spec in specs.items())
    used, declared = _placeholders(patch), {p.name for p in params}
    if used != declared:
        raise SearchSpaceError(
            f"{where}: the patch's placeholders {sorted(used)} must be exactly its params {sorted(declared)}"
        )
    return Choice(patch, params)


def _model_section(config: Any, root: Path, where: str) -> dict[str, Any]:
    """The ``model`` section of the fit config ``root / config``."""
    path = root / str(config)
    if not isinstance(config, str) or not path.is_file():
        raise SearchSpaceError(f"{where}: model_from must name a fit config file, got {config!r} ({str(path)!r} not found)")
    model = (yaml.safe_load(path.read_text()) or {}).get("model")
    if not isinstance(model, Mapping) or "class_path" not in model:
        raise SearchSpaceError(f"{where}: {str(path)!r} has no model section with a class_path")
    return dict(model)


def _read_rule(rule: Any, dimensions: Mapping[str, Mapping[str, Choice]], where: str) -> dict[str, frozenset[str]]:
    if not isinstance(rule, Mapping) or not rule:
        raise SearchSpaceError(f"{where}: a rule maps dimensions to a choice or a list of choices, got {rule!r}")
    out = {}
    for dim, values in rule.items():
        values = [values] if isinstance(values, str) else values
        if dim not in dimensions:
            raise SearchSpaceError(f"{where}: unknown dimension {dim!r}; the dimensions are {list(dimensions)}")
        if not isinstance(values, list) or not values or any(v not in dimensions[dim] for v in values):
            raise SearchSpaceError(f"{where}: {dim} must name choices of {list(dimensions[dim])}, got {values!r}")
        out[str(dim)] = frozenset(values)
    return out


def _read_enqueued(entry: Any, where: str) -> Selection:
    if not isinstance(entry, Mapping) or not isinstance(entry.get("choices"), Mapping) or set(entry) - {"choices", "params"}:
        raise SearchSpaceError(f"{where}: an enqueued trial is {{choices: {{...}}, params: {{...}}}}, got {entry!r:.120}")
    params = entry.get("params") or {}
    if not isinstance(params, Mapping):
        raise SearchSpaceError(f"{where}: params must be a mapping, got {params!r:.120}")
    return Selection({str(k): str(v) for k, v in entry["choices"].items()}, dict(params))
