"""The lecture's claims as rerunnable experiments (``python jobs/experiment.py <name>``).

One module per concern; the first three import no torch, so a bad experiment fails before anything loads:

- ``spec``: load ``configs/experiments/<name>.yaml`` with its ``scale=`` preset and overrides; resolve every
  (arm, seed) into the PretrainConfig / FinetuneConfig it trains with.
- ``stats``: means and spreads over seeds, and the rule that a difference counts only beyond the spread.
- ``verdicts``: one verdict function per claim, by name.
- ``matching``: scaling arms at matched FLOPs (the profiler's MACs).
- ``data``: the embedded data at the experiment's sizes, cached; ``source``: the cached pre-trained source.
- ``arm``: one arm trained in-process with ``build_run`` + ``fit`` and its summary numbers.
- ``report``: the Markdown page and the plot; ``runner``: the MLflow parent/child runs around all of it.
"""
