"""Building models from local files only: one factory for every caller (audit, reference, edit,
trace, training), the per-process model cache, LoRA adapters and the meta-device model check."""
