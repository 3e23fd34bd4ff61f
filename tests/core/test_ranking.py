"""ecif_core/ranking.py is the one home of the ranking rules: the default rule's name and the
suspicion threshold are written nowhere else in the code, and README states both from it."""
import ast
import re
from pathlib import Path

import numpy as np

import ecif_core
from ecif_core.ranking import DEFAULT_RANK_BY, RANK_BY, RULES, SUSPECT_Z, markdown_table, suspected_flags

ROOT = Path(ecif_core.__file__).parent.parent
HOME = ROOT / "ecif_core" / "ranking.py"
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _code_files() -> list[Path]:
    return sorted(p for package in ("ecif_core", "services", "workers") for p in (ROOT / package).rglob("*.py"))


def _keys_of_stored_data(tree: ast.AST) -> set[int]:
    """ids of string constants used as a mapping key (a dict display's key, a subscript, a .get()
    argument): the validation attribute "evidence" (AUROC per model) is data, not the rule's name."""
    keys = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            keys |= {id(k) for k in node.keys if k is not None}
        elif isinstance(node, ast.Subscript):
            keys.add(id(node.slice))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" and node.args:
            keys.add(id(node.args[0]))
    return keys


def test_the_default_rules_name_is_written_only_in_ranking_py():
    offenders, home = [], 0
    for path in _code_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        keys = _keys_of_stored_data(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value == DEFAULT_RANK_BY and id(node) not in keys:
                if path == HOME:
                    home += 1
                else:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"the default rule's name {DEFAULT_RANK_BY!r} outside ecif_core/ranking.py: {offenders}"
    assert home == 1


def test_the_suspicion_threshold_is_written_only_in_ranking_py():
    """Code, comments and docstrings alike: a flag rule restated next to a number drifts from it."""
    number = re.escape(f"{SUSPECT_Z:g}") + r"(?:\.0+)?(?![\d.])"
    restated = re.compile(rf"(suspic|suspect|flag)\w*\b.{{0,80}}?(>=?|=|above|over|threshold)\s*(z\s*=\s*)?{number}",
                          re.IGNORECASE | re.DOTALL)
    offenders = []
    for path in _code_files():
        text = path.read_text(encoding="utf-8")
        offenders += [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
                      for m in restated.finditer(text) if path != HOME]
    assert not offenders, offenders
    assert re.search(rf"^SUSPECT_Z = {number}", HOME.read_text(encoding="utf-8"), re.MULTILINE)


def test_readme_states_the_threshold_and_the_default_from_ranking_py():
    suspected_row = next(line for line in README.splitlines() if line.startswith("| `suspected` |"))
    stated = re.search(r"`suspicion` > ([0-9.]+)", suspected_row)
    assert stated and float(stated.group(1)) == SUSPECT_Z, suspected_row
    option_row = next(line for line in README.splitlines() if line.startswith("| `rank_by` | `"))
    assert option_row.split("|")[2].strip() == f'`"{DEFAULT_RANK_BY}"`', option_row


def test_readme_table_of_rules_is_the_one_ranking_py_generates():
    block = re.search(r"<!-- ranking-rules:begin -->\n(.*?)\n<!-- ranking-rules:end -->", README, re.DOTALL)
    assert block, "README lost its ranking-rules block"
    assert block.group(1) == markdown_table(), "README is stale: paste `python -m ecif_core.ranking` between the markers"
    listed = re.findall(r'^\| `"([a-z_]+)"`', block.group(1), re.MULTILINE)
    assert listed == list(RANK_BY) == [rule.name for rule in RULES]
    assert RANK_BY[0] == DEFAULT_RANK_BY


def test_suspected_flags_are_suspicion_strictly_above_the_threshold_nan_never():
    values = np.array([SUSPECT_Z - 1e-9, SUSPECT_Z, SUSPECT_Z + 1e-9, np.nan, np.inf])
    assert suspected_flags(values).tolist() == [False, False, True, False, True]


def test_a_judging_reference_ranks_alone_even_with_nothing_to_judge_by():
    """`training` evidence marks a competent reference that judged the training pairs; NaN (its posterior put
    every pair in one class) still marks it: the default score is then the reference's z-score alone, and
    without the mark the audited term is weighed in."""
    import torch

    from ecif_core.ranking import _robust_z, reference_judges, suspicion

    rng = np.random.default_rng(0)
    scores = {"clip_score_loo": torch.as_tensor(rng.normal(0.8, 0.05, 200)),
              "reference_negclip": torch.as_tensor(rng.normal(0.3, 0.05, 200))}
    plain = {"clip_score": {"mean": 0.9}, "reference_clip_score": {"mean": 0.9}}
    judged = {**plain, "clip_score": {"mean": 0.9, "training": float("nan")}}
    assert reference_judges(judged) and not reference_judges(plain) and not reference_judges(None)
    alone = _robust_z(-scores["reference_negclip"]).numpy()
    np.testing.assert_allclose(suspicion(scores, judged).numpy(), alone, atol=1e-12)
    assert not np.allclose(suspicion(scores, plain).numpy(), alone, atol=1e-3)
