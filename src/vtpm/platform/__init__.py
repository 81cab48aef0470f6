"""Platform files: xl-style guest configuration (.cfg) parsing."""
