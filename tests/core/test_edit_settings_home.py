"""Each edit setting's default has one home, ecif_core/edit/settings.py (EDIT_SETTINGS): no other
module of the packages writes a setting's name next to its default value."""
from __future__ import annotations

import ast
from pathlib import Path

import ecif_core
from ecif_core.edit import settings as settings_module
from ecif_core.edit.settings import EDIT_SETTINGS, EditSettings, renamed_settings

ROOT = Path(ecif_core.__file__).parent.parent
PACKAGES = ("ecif_core", "services", "workers", "bench")
# name (and old name) -> default; a None default means "not given", not a decision, so it is not searched
DEFAULTS = {name: spec.default for spec in EDIT_SETTINGS if spec.default is not None
            for name in (spec.name, spec.old_name) if name is not None}


def _same(node: ast.AST | None, name: str) -> bool:
    value = getattr(node, "value", None) if isinstance(node, ast.Constant) else None
    return value is not None and not isinstance(value, bool) and value == DEFAULTS[name]


def restated_defaults(path: Path) -> list[str]:
    """`name=default`, `"name": default`, `name: T = default`, `def f(name=default)` and
    `add_argument("--name", default=default)` of an edit setting in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        pairs: list[tuple[str | None, ast.AST | None]] = []
        if isinstance(node, ast.keyword):
            pairs.append((node.arg, node.value))
        elif isinstance(node, ast.Dict):
            pairs += [(k.value if isinstance(k, ast.Constant) else None, v) for k, v in zip(node.keys, node.values)]
        elif isinstance(node, (ast.AnnAssign, ast.Assign)):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            pairs += [(getattr(t, "id", getattr(t, "attr", None)), node.value) for t in targets]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            positional = node.args.posonlyargs + node.args.args
            pairs += [(a.arg, d) for a, d in zip(positional[len(positional) - len(node.args.defaults):],
                                                 node.args.defaults)]
            pairs += [(a.arg, d) for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults)]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and node.args[0].value.startswith("--"):
            flag = node.args[0].value[2:].replace("-", "_")
            pairs += [(flag, k.value) for k in node.keywords if k.arg == "default"]
        found += [f"{path}:{node.lineno}: {name} = {DEFAULTS[name]!r}" for name, value in pairs
                  if isinstance(name, str) and name in DEFAULTS and _same(value, name)]
    return found


def test_no_edit_setting_default_outside_the_settings_table():
    home = Path(settings_module.__file__).resolve()
    offenders = [hit for package in PACKAGES if (ROOT / package).is_dir()
                 for path in sorted((ROOT / package).rglob("*.py")) if path.resolve() != home
                 for hit in restated_defaults(path)]
    assert not offenders, "edit defaults belong in ecif_core/edit/settings.py (EDIT_SETTINGS):\n" + "\n".join(offenders)


def test_the_scan_sees_each_form_of_a_restated_default(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("solve(max_iterations=50)\nX = {'tolerance': 0.0001}\nclass S:\n    damping_factor: float = 0.1\n"
                     "def f(a, damping_per_removal_curvature=0.1):\n    pass\n"
                     "parser.add_argument('--max-iterations', default=50)\nsolve(max_iterations=60)\n")
    assert len(restated_defaults(probe)) == 5


def test_old_setting_names_are_read_once_and_refused_beside_the_new_one():
    """damping_factor (the edit's, renamed damping_per_removal_curvature) still works where it was typed."""
    import pytest

    from ecif_core.errors import ConfigError

    with pytest.warns(FutureWarning, match="damping_factor is deprecated.*damping_per_removal_curvature"):
        assert EditSettings.from_mapping({"damping_factor": 0.5}).damping_per_removal_curvature == 0.5
    assert EditSettings.from_mapping({"damping_factor": 0.5}, deprecated=False).damping_per_removal_curvature == 0.5
    with pytest.raises(ConfigError) as error:
        renamed_settings({"damping_factor": 0.5, "damping_per_removal_curvature": 0.2})
    assert error.value.field == "damping_factor"
    assert renamed_settings({"damping_factor": None}) == {}  # an API body's unset old field
