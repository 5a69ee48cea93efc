"""Typed config conversion: instill's hand-written `from_dict` against pydantic, dacite, cattrs.

Every library converts the same dicts into the real `ArithmeticConfig` (nested `FitConfig`,
`DiscoveryConfig`, `MaskConfig`, gates; `__post_init__` checks raising `ConfigError`), starting
from the quick preset as `layered_config` builds it:

* bad inputs: each library's own message, side by side, and whether it names the key path, the
  expected type or choices, the value it got, and (for the unknown key) a "did you mean";
* valid inputs (a YAML string float such as "1e-3", an int for a float, a tuple for a list,
  null for an Optional, each arm of `str | list[str] | None`) and inputs our rules reject though
  a lax converter would coerce them ("yes" for a bool, 1.0 for an int): accepted or not, and
  whether the result equals `from_dict`'s;
* the time to convert the quick preset's dict `--repeat` times (default 1000);
* the code each library needed here to come close to our rules (its hooks, counted in code
  lines) beside the code lines of typed.py's converter.

Each library runs configured as its documentation suggests for strict configs (pydantic:
`extra="forbid"` on every dataclass, lax mode, and strict mode, given JSON since strict Python
mode takes only dataclass instances; dacite: `Config(strict=True)`;
cattrs: `forbid_extra_keys`, `detailed_validation`, `transform_error`), plus the fewest hooks
needed to accept our valid inputs. Messages are the libraries' own: no formatter is written
for them. dacite and cattrs are not project dependencies; a library that is not importable is
skipped with a note (install them outside the project, e.g. `pip install --target /tmp/libs
dacite cattrs`, and pass `--libs /tmp/libs`).

    .venv/bin/python benchmarks/config_libraries.py [--libs DIR] [--repeat N]
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.metadata
import inspect
import json
import re
import sys
import textwrap
import time
import types
import typing
from collections.abc import Callable
from typing import Any

from instill.experiments.arithmetic import PRESETS, ArithmeticConfig
from instill.experiments.common import merge
from instill.runio import from_dict, to_dict
from instill.runio import typed as typed_module

WHERE = "arithmetic config"

# --------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Case:
    """A bad input: an override of the quick preset and what a clear message names."""

    name: str
    override: dict[str, Any]
    path: str  # regex: the key path, in any library's spelling
    expected: str  # regex: the expected type, choices or range
    got: str  # regex: the offending value
    suggest: str | None = None  # regex: the close match, where one exists


BAD = [
    Case("unknown nested key base_fit.lrr", {"base_fit": {"lrr": 0.1}},
         r"base_fit\.lrr|lrr.*base_fit|base_fit.*lrr", r"epochs.*batch_size", r"lrr",
         r"'lr'(?!r)|\"lr\"(?!r)"),
    Case("wrong type layers: 'two'", {"layers": "two"},
         r"layers", r"list", r"'two'|\"two\"|two"),
    Case("loss: 'mse' not in Literal", {"loss": "mse"},
         r"loss", r"lm.*answer", r"mse"),
    Case("grid: [1, 'x']", {"grid": [1, "x"]},
         r"grid(\[1\]|\.1\b)", r"\bint", r"'x'|\"x\""),
    Case("gates.retries: -1 (__post_init__)", {"gates": {"retries": -1}},
         r"gates.*retries", r">= 0", r"-1"),
    Case("discovery.mask.l0_lambda: null (float)",
         {"discovery": {"mask": {"l0_lambda": None}}},
         r"discovery\.mask\.l0_lambda", r"float|number", r"None|null"),
    Case("base_fit given as a list", {"base_fit": [1, 2]},
         r"base_fit", r"FitConfig|mapping|dict", r"\[1, 2\]"),
    Case("mask.targets: ['h.0', 3] (union arm)",
         {"discovery": {"mask": {"targets": ["h.0", 3]}}},
         r"targets(\[1\]|\..*\b1\b)", r"\bstr", r"got 3|input_value=3|value \"3\"|3 \(int\)"),
]

# (name, override, whether our rules accept it)
VALID = [
    ("base_fit.lr: '1e-3' (YAML 1.1 string)", {"base_fit": {"lr": "1e-3"}}, True),
    ("base_fit.lr: 1 (int for a float)", {"base_fit": {"lr": 1}}, True),
    ("layers: (2, 4) (tuple for a list)", {"layers": (2, 4)}, True),
    ("base_fit.stop_at: null (Optional)", {"base_fit": {"stop_at": None}}, True),
    ("mask.targets: 'h\\.0' (union: str)", {"discovery": {"mask": {"targets": r"h\.0"}}}, True),
    ("mask.targets: ['h.0'] (union: list)", {"discovery": {"mask": {"targets": ["h.0"]}}}, True),
    ("freeze: 'yes' (string for a bool)", {"freeze": "yes"}, False),
    ("seed: 1.0 (float for an int)", {"seed": 1.0}, False),
    ("seed: '3' (string for an int)", {"seed": "3"}, False),
    ("seed: true (bool for an int)", {"seed": True}, False),
]


def quick_values() -> dict[str, Any]:
    """The quick preset's dict as `layered_config` builds it: defaults, then the preset."""
    return merge(to_dict(ArithmeticConfig()), PRESETS["quick"])


# --------------------------------------------------------------------------- converters
# Each `make_*` returns (convert(dict) -> ArithmeticConfig, message(exception) -> str, hooks):
# `hooks` are the functions written only to make the library follow our rules.


def _dataclasses_under(cls: type) -> list[type]:
    """`cls` and every dataclass its fields nest (the classes a library must configure)."""
    seen: list[type] = []

    def visit(tp: Any) -> None:
        if dataclasses.is_dataclass(tp) and isinstance(tp, type) and tp not in seen:
            seen.append(tp)
            for hint in typing.get_type_hints(tp).values():
                visit(hint)
        for arg in typing.get_args(tp):
            visit(arg)

    visit(cls)
    return seen


def make_instill() -> tuple[Callable, Callable, list]:
    return (lambda data: from_dict(ArithmeticConfig, data, where=WHERE), str, [])


def _pydantic_forbid_extra(strict: bool) -> None:
    """Hook: `extra="forbid"` (and strict mode) on every nested stdlib dataclass."""
    import pydantic

    for cls in _dataclasses_under(ArithmeticConfig):
        cls.__pydantic_config__ = pydantic.ConfigDict(extra="forbid", strict=strict)


def make_pydantic(strict: bool) -> tuple[Callable, Callable, list]:
    import pydantic

    _pydantic_forbid_extra(strict)
    adapter = pydantic.TypeAdapter(ArithmeticConfig)
    for cls in _dataclasses_under(ArithmeticConfig):  # leave the classes as they were
        del cls.__pydantic_config__

    def message(err: Exception) -> str:
        lines = [line.strip() for line in str(err).splitlines()
                 if not line.strip().startswith("For further information")]
        return " | ".join(lines)

    if not strict:
        return adapter.validate_python, message, [_pydantic_forbid_extra]

    def convert(data: dict[str, Any]) -> ArithmeticConfig:
        # Strict mode in Python takes only dataclass instances, not dicts; JSON input is the
        # documented way to validate plain data strictly.
        return adapter.validate_json(json.dumps(data))

    return convert, message, [_pydantic_forbid_extra]


_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _dacite_float(value: Any) -> Any:
    """Hook: ints and YAML 1.1 strings like '1e-3' for floats (dacite checks isinstance)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        return float(value)
    return value


def make_dacite() -> tuple[Callable, Callable, list]:
    import dacite

    config = dacite.Config(strict=True, type_hooks={float: _dacite_float}, cast=[list])

    def convert(data: dict[str, Any]) -> ArithmeticConfig:
        return dacite.from_dict(ArithmeticConfig, data, config=config)

    return convert, lambda err: f"{type(err).__name__}: {err}", [_dacite_float]


def _cattrs_scalar_hooks(converter: Any) -> None:
    """Hooks: int, bool and str as given (cattrs calls int(), bool(), str() on anything), and
    floats from numbers or YAML 1.1 strings only."""

    def exact(tp: type) -> Callable:
        def structure(value: Any, _: Any) -> Any:
            if type(value) is not tp:
                raise ValueError(f"expected {tp.__name__}, got {value!r}")
            return value
        return structure

    def to_float(value: Any, _: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f"expected float, got {value!r}")
        if isinstance(value, str) and not _FLOAT_TEXT.fullmatch(value.strip()):
            raise ValueError(f"expected float, got {value!r}")
        return float(value)

    for tp in (int, bool, str):
        converter.register_structure_hook(tp, exact(tp))
    converter.register_structure_hook(float, to_float)


def _cattrs_union_hook(converter: Any) -> None:
    """Hook: unions cattrs has no strategy for (`str | list[str] | None`): first arm that fits."""

    def is_union(tp: Any) -> bool:
        return typing.get_origin(tp) in (typing.Union, types.UnionType)

    def structure(value: Any, tp: Any) -> Any:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return converter.structure(value, arg)
            except Exception as err:  # any arm's failure: try the next
                errors.append(err)
        raise errors[-1]

    converter.register_structure_hook_func(is_union, structure)


def _cattrs_no_str_for_list(converter: Any) -> None:
    """Hook: a string is not a list of characters (cattrs iterates any iterable)."""
    for list_type in (list[int], list[str]):
        default = converter.get_structure_hook(list_type)

        def structure(value: Any, tp: Any, default: Callable = default) -> Any:
            if isinstance(value, str | bytes):
                raise ValueError(f"expected a list, got {value!r}")
            return default(value, tp)

        converter.register_structure_hook_func(lambda tp, lt=list_type: tp == lt, structure)


def make_cattrs() -> tuple[Callable, Callable, list]:
    import cattrs

    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    hooks = [_cattrs_scalar_hooks, _cattrs_union_hook, _cattrs_no_str_for_list]
    for hook in hooks:
        hook(converter)

    def message(err: Exception) -> str:
        if isinstance(err, cattrs.BaseValidationError):
            return "; ".join(cattrs.transform_error(err))
        return f"{type(err).__name__}: {err}"

    return (lambda data: converter.structure(data, ArithmeticConfig)), message, hooks


def cattrs_without_hooks() -> str:
    """What cattrs does with our types before any hook: the reason for the hooks above."""
    import cattrs

    from instill.training import FitConfig

    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    fit = converter.structure({"epochs": 2.7, "fused": "no"}, FitConfig)
    _, err = attempt(lambda data: converter.structure(data, ArithmeticConfig), quick_values())
    return (f"FitConfig from {{'epochs': 2.7, 'fused': 'no'}} -> epochs={fit.epochs!r}, "
            f"fused={fit.fused!r}; the quick preset -> "
            f"{'; '.join(cattrs.transform_error(err)) if err else 'accepted'}")


LIBRARIES: dict[str, tuple[str | None, Callable]] = {
    "instill": (None, make_instill),
    "pydantic lax": ("pydantic", lambda: make_pydantic(strict=False)),
    "pydantic strict": ("pydantic", lambda: make_pydantic(strict=True)),  # JSON mode
    "dacite": ("dacite", make_dacite),
    "cattrs": ("cattrs", make_cattrs),
}

# --------------------------------------------------------------------------- measuring


def code_lines(obj: Any) -> int:
    """Lines of code in a function or class: no blank lines, comments or docstrings."""
    lines, _ = inspect.getsourcelines(obj)
    tree = ast.parse(textwrap.dedent("".join(lines)))
    docs: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, ast.FunctionDef | ast.ClassDef) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            docs.update(range(body[0].lineno, body[0].end_lineno + 1))
    return sum(1 for number, line in enumerate(lines, 1)
               if line.strip() and not line.strip().startswith("#") and number not in docs)


def converter_lines() -> int:
    """Code lines of typed.py's dict -> dataclass converter (all but `to_dict`, `_plain`)."""
    parts = [typed_module._Mismatch, typed_module._show, typed_module._type_name,
             typed_module._mismatch, typed_module._suggest, typed_module._convert_scalar,
             typed_module._convert_union, typed_module._convert_literal,
             typed_module._convert_sequence, typed_module._convert_dict, typed_module._convert,
             typed_module._build, typed_module.from_dict]
    return sum(code_lines(part) for part in parts) + 1  # + the _FLOAT_TEXT pattern


def attempt(convert: Callable, data: dict[str, Any]) -> tuple[Any, Exception | None]:
    try:
        return convert(data), None
    except Exception as err:  # any library's error is a result here
        return None, err


def clarity(case: Case, text: str) -> str:
    """P E G S: path, expected, got, suggestion named (S only where a close match exists)."""
    checks = [("P", case.path), ("E", case.expected), ("G", case.got), ("S", case.suggest)]
    return " ".join(mark if pattern is None or re.search(pattern, text) else "-"
                    for mark, pattern in checks if pattern is not None or mark != "S")


def shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--libs", metavar="DIR",
                        help="a folder with dacite/cattrs installed (appended to sys.path)")
    parser.add_argument("--repeat", type=int, default=1000,
                        help="conversions of the quick preset to time (default 1000)")
    parser.add_argument("--width", type=int, default=240, help="cut messages to this width")
    args = parser.parse_args(argv)
    if args.libs:
        sys.path.append(args.libs)  # after the venv: its own packages stay first

    converters: dict[str, tuple[Callable, Callable, list]] = {}
    for name, (module, make) in LIBRARIES.items():
        try:
            converters[name] = make()
        except ImportError as err:
            print(f"{name}: skipped, not importable ({err}); install it outside the project "
                  f"(pip install --target DIR {module}) and pass --libs DIR")
    versions = {name: importlib.metadata.version(module) for name, (module, _) in
                LIBRARIES.items() if module and name in converters}
    print("versions: " + ", ".join(f"{n} {v}" for n, v in versions.items()))
    base = quick_values()
    reference = from_dict(ArithmeticConfig, base, where=WHERE)

    print("\n== bad inputs: each library's message; P E G S = names the key path, the expected"
          " type/choices, the value got, a close match ('-': missing) ==")
    score: dict[str, list[int]] = {name: [0, 0] for name in converters}
    for case in BAD:
        print(f"\n{case.name}   override {case.override}")
        for name, (convert, message, _) in converters.items():
            result, err = attempt(convert, merge(base, case.override))
            if err is None:
                print(f"  {name:15} ACCEPTED (no error)")
                continue
            text = message(err)
            marks = clarity(case, text)
            score[name][0] += marks.count("-")
            score[name][1] += 1
            print(f"  {name:15} [{marks}] {type(err).__name__}: {shorten(text, args.width)}")

    print("\n== valid inputs (and inputs our rules reject): accepted? same config as from_dict? ==")
    for label, override, ours in VALID:
        data = merge(base, override)
        expected = from_dict(ArithmeticConfig, data, where=WHERE) if ours else None
        cells = []
        for name, (convert, _, _) in converters.items():
            result, err = attempt(convert, data)
            if err is not None:
                cell = "rejected"
            elif expected is None:
                cell = "accepted"
            else:
                cell = "accepted" + ("" if result == expected else " (differs)")
            cells.append(f"{name}: {cell}")
        print(f"  {label:38} ours {'accept' if ours else 'reject'} | " + ", ".join(cells))

    if "cattrs" in converters:
        print(f"  cattrs without the hooks: {cattrs_without_hooks()}")

    print(f"\n== time to convert the quick preset {args.repeat} times (includes __post_init__) "
          "==")
    for name, (convert, _, _) in converters.items():
        result, err = attempt(convert, base)
        if err is not None:
            print(f"  {name:15} fails on the quick preset: {shorten(str(err), 120)}")
            continue
        start = time.perf_counter()
        for _ in range(args.repeat):
            convert(base)
        seconds = time.perf_counter() - start
        same = "" if result == reference else "  (differs from from_dict's result!)"
        print(f"  {name:15} {seconds:6.3f} s  ({1e6 * seconds / args.repeat:6.1f} us each){same}")

    print(f"\n== code: typed.py's converter is {converter_lines()} code lines ==")
    for name, (_, _, hooks) in converters.items():
        if name == "instill":
            continue
        missing, messages = score[name]
        print(f"  {name:15} hooks written here: {sum(code_lines(h) for h in hooks):3d} code lines"
              f" ({', '.join(h.__name__ for h in hooks) or 'none'}); messages missing "
              f"{missing} of the P/E/G/S items over {messages} errors")
    print(f"  {'instill':15} messages missing {score['instill'][0]} of the P/E/G/S items over "
          f"{score['instill'][1]} errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
