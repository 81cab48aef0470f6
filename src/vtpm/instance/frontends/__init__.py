"""Socket adapters that drive the `wire/` codecs against a `Device`."""
