"""falflow's flows and the languages that build them.

- :mod:`falflow.flows.dsl` — generation DAGs in Python (``generate``, ``ref``, ``retained``);
- :mod:`falflow.flows.spec` — declarative pipeline specs (schema, templates, compiler, loader,
  executor) and :mod:`falflow.flows.pipeline`, the deployable ``run_pipeline`` flow;
- :mod:`falflow.flows.scope` — the retention scope every request runs in, and
  :mod:`falflow.flows.summary`, what a run reports;
- :mod:`falflow.flows.shards` — a big batch split into shards, each a child flow run with its
  own run key, gathered into one report;
- :mod:`falflow.flows.janitor` — the flow that finishes what crashed runs left behind.

Kept import-free so ``falflow --help`` starts fast and the CLI can quiet Prefect before importing it.
"""
