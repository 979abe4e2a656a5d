"""falflow's flows: generation DAGs in Python (:mod:`flows.dag`), declarative pipeline specs
(:mod:`flows.spec`, the deployable ``run_pipeline`` flow) and the ``falflow`` CLI (:mod:`flows.cli`).

Kept import-free so ``falflow --help`` starts fast and the CLI can quiet Prefect before importing it.
"""
