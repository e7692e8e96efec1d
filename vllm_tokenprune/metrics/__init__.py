"""Prometheus metrics of visual-token pruning, on the API server's own ``/metrics``.

Series (labels follow vLLM's ``model_name`` convention, plus ``method`` and ``modality``):

===========================================  =========  ====================================
name                                         type       meaning
===========================================  =========  ====================================
``tokenprune_input_visual_tokens_total``     counter    visual tokens the encoder produced
``tokenprune_kept_visual_tokens_total``      counter    visual tokens given to the LM
``tokenprune_saved_visual_tokens_total``     counter    input - kept
``tokenprune_media_items_total``             counter    media items that went through pruning
``tokenprune_requests_total``                counter    requests with media, by method
``tokenprune_prune_ratio``                   histogram  the ratio requests asked for
``tokenprune_skipped_visual_token_layers``   counter    token-layers skipped by ``alvts``
``tokenprune_scorer_seconds``                histogram  scorer time per batched scorer call
                                                        (CPU: wall time; CUDA: event time,
                                                        :class:`.worker.ScorerTimer`)
``tokenprune_scorer_fallbacks_total``        counter    items served by the fallback (labels
                                                        ``model_name``, ``method``, ``reason``)
===========================================  =========  ====================================

One module per process, and the files between them:

* :mod:`.frontend` (API server): token counts, requests and ratios are exact at preprocessing
  time, where the processor's per-item plans fix every keep-count before the encoder runs, so
  they go straight into the API server's prometheus registry; and the collectors that read the
  workers' files at scrape time. The endpoint plugin switches recording on.
* :mod:`.worker` (worker): the scorer timer and the fallback counter. With one API server
  (vLLM's default) ``/metrics`` serves the API server's in-process registry, so each worker
  publishes its cumulative series as a file; with ``--api-server-count > 1`` vLLM switches
  prometheus_client to multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) in every process and the
  worker records into ordinary prometheus_client series, which vLLM's multiprocess collector
  aggregates.
* :mod:`.exchange` (shared): the directory the workers write and the API server reads
  (``VLLM_TOKENPRUNE_METRICS_DIR``, created by the plugin in the API server before the engine
  starts and inherited by the engine and workers) and the files' format.
"""
