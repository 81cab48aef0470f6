"""The verifier: quotes, deep quotes and event logs checked into a verdict. Imports only
`vtpm.tpm`, `vtpm.wire` and `vtpm.errors` (no daemon code, no native library)."""
