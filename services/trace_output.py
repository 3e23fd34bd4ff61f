"""`ecif trace` on a terminal: the model's prediction, then the top-k pairs, harmful first, with
the pairs the audit flagged marked; the same rows as the API's trace CSV."""
from __future__ import annotations

import csv
import math


def print_trace(result: dict) -> None:
    """`result`: one test example's trace as the API answers it (test_loss, prediction, top)."""
    prediction = result.get("prediction")
    print(f"test loss {result['test_loss']:.4f}")
    if prediction:
        verdict = "correct" if prediction["correct"] else "wrong"
        print(f"model predicts {prediction['text'][:80]!r} (probability {prediction['probability']:.3f}; {verdict})")
    top = result["top"]
    print(f"top {len(top)} training pairs by relative-IS, harmful first (sign(influence) x relative-IS); "
          "`suspected`: flagged by the audit")
    print(f"{'rank':>4}  {'effect':<7}  {'signed_ris':>10}  {'influence':>10}  {'pos':>10}  {'neg':>10}  "
          f"{'flag':<9}  id / caption")
    for rank, p in enumerate(top, start=1):
        signed = p.get("signed_relative_is", math.copysign(p["relative_is"], p["influence"]))
        effect = "harmful" if p["influence"] < 0 else "helpful"
        flag = "suspected" if p.get("suspected") else ""
        print(f"{rank:>4}  {effect:<7}  {signed:>10.4g}  {p['influence']:>10.3g}  {p['influence_pos']:>10.3g}  "
              f"{p['influence_neg']:>10.3g}  {flag:<9}  {p['id']}  {p['caption'][:60]}")


def write_trace_csv(path: str, top: list[dict]) -> None:
    from ecif_core.trace.query import TRACE_COLUMNS, trace_row

    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(TRACE_COLUMNS)
        writer.writerows([trace_row(0, rank, p) for rank, p in enumerate(top, start=1)])
