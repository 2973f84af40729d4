"""Released cxr-batch models. Installed as the package ``cxr_batch.models`` (the embedded default)."""
