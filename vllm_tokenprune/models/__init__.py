"""The model integration: one family module per architecture (``TokenPrune<Arch>``: the
processor side runs in the API server, the model side in the worker) and the mixins they
combine (:mod:`.processor`, API server; :mod:`.model_hooks` and its helpers, worker), plus the
per-item wire format both sides read (:mod:`.wire`).
"""
