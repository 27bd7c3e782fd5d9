"""Import checkpoints written by the official RIDE code (``frank-xwang/RIDE-LongTailRecognition``): a loader
that runs no code from the file (:mod:`~training.official.safe_load`), the parameter names in both directions
(:mod:`~training.official.keys`), the architecture read from the name and shapes (:mod:`~training.official.arch`)
and the command that writes one of our checkpoint folders (:mod:`~training.official.importer`)."""
