"""Evaluation: reward-model metrics, the steerability grid, sampling with scoring, and the report.

- ``steerray.eval.steerability``: build the grid (each attribute at each value 0-4, the others at their
  defaults) and summarise it (per-attribute Spearman between requested and measured value, verbosity
  against answer length, the cross-attribute matrix). Pure functions.
- ``steerray.eval.sampling``: ``SampleScorer``, a callable class that generates answers with a policy
  and scores them with the reward model in batches (a Ray Data ``map_batches`` actor; usable without Ray).
- ``steerray.eval.report``: ``write_report(results, out_dir)`` writes eval.json, report.md, report.html
  (self-contained, PNGs inlined) and the PNG plots.
"""
