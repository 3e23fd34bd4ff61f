"""Acting on an audit: removal sets, previews, and the Newton-step model edit with its settings
table."""
