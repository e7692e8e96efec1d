"""The end-to-end serving benchmark: ``python -m benchmarks.serving [--quick] ...`` (the options
and what it measures: :mod:`benchmarks.serving.run`).

* :mod:`~benchmarks.serving.run`: presets, configurations, the phases and the command line;
* :mod:`~benchmarks.serving.client`: requests (vLLM's own benchmark client), ``/metrics``, media;
* :mod:`~benchmarks.serving.offline`: preprocessing and vision-tower timings outside the server;
* :mod:`~benchmarks.serving.launch`: vLLM's API server with its multimodal timing switched on;
* :mod:`~benchmarks.serving.report`: tables, verdicts, plots and ``docs/benchmarks.md``;
* :mod:`~benchmarks.serving.compare`: one table across runs of different presets
  (``python -m benchmarks.serving.compare RUN.json ...``).
"""
