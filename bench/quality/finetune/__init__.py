"""The realistic fine-tuning benchmark: a pretrained tiny CLIP fine-tuned on corrupted pairs, then audited.

    python -m bench.quality --regime same_domain|domain_shift|all [--quick] [--workers 2] [--out DIR]

Unlike the digits benchmark (a model trained from scratch on the corrupted set), the audited model here is a
fine-tune of a base that already knows vocabulary A, which is how CLIP models are audited in practice.
Modules, one job each: `generator` (synthetic shape images, captions, pair files), `corruptions` (the three
corruption types and the truth they record), `settings` (sizes, grid, quick preset), `base` (the cached
pretrained base), `retrieval` (clean image-to-text accuracy), `baselines` (scores the benchmark computes
itself), `cells` (one cell: data, fine-tune, audit, baselines, scores), `evaluate` (the only code that reads
the truth), `tables` (aggregation and RESULTS.md), `runner` (the grid on a process pool, resume).
"""
