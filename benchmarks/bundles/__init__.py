"""Air-gapped bundles benchmark: export and import of a bundle with a model against sha256sum and tar."""
