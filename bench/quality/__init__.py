"""Quality benchmark of the ECIF audit on digits: detection, removal, fidelity and cost.

    python -m bench.quality [--quick] [--out bench/out/quality]

Modules, one job each: `settings` (sizes and presets), `pipeline` (all experiments on a pool of
worker processes), `runs` (build data, train, audit),
`tensors` (a run's splits as preprocessed batches), `baselines` (TracIn, negCLIPLoss,
embeddings), `evaluation` (clean zero-shot accuracy and test loss), `scoring` (the only code
that reads the ground truth: detection metrics and ROC curves), `detection`, `removal`,
`feature_cache` (the frozen-tower retraining oracle), `fidelity` (LDS), `plots`, `report`.
"""
