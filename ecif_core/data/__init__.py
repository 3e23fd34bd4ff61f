"""What an audit reads and writes: manifests, pair sources and images, data-root checks, local
and bucket storage, the seeded partition, the audit folder and its Zarr store (`store.AuditStore`)."""
