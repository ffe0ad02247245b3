"""Model directories: the on-disk format, the ``tiny`` preset and converters from released checkpoints."""
