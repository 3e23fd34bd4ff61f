"""bench.fix: acting on the audit against acting on CLIPScore (issue 24, item 1).

Modules, one job each: `settings` (lists, actions, presets), `evaluate` (clean test metrics of a model),
`actions` (one action on one list of one cell, resumable), `tables` (aggregation, decision, targets),
`report` (RESULTS.md), `runner` (the grid on a process pool; `python -m bench.fix`). Run `python -m bench.fix --help`.
"""
