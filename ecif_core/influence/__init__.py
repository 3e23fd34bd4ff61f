"""The math of ECIF (docs/METHOD.md, "Influence"): contrastive terms, LoGra projections, per-pair gradients,
the memory plan, the curvature and its damped inverse, influence scores."""
