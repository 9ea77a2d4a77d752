"""Fine-tuning study and diagnostics of GHN initializations (``timm-ghn study``, ``timm-ghn diagnose``).

* :mod:`~timm_ghn.study.splits`: seeded training, validation and test splits.
* :mod:`~timm_ghn.study.inits`: the compared inits (Rand, Orth, GHN, GHN-orth, a pretrained oracle).
* :mod:`~timm_ghn.study.training`: fine-tuning one model and measuring accuracy.
* :mod:`~timm_ghn.study.runner`: tuning on the validation set, repeated seeds, resumable results.
* :mod:`~timm_ghn.study.report`: results JSON, Markdown table and accuracy curves.
* :mod:`~timm_ghn.study.presets`: the ``cpu`` and ``paper`` settings.
* :mod:`~timm_ghn.study.diagnose`: channel correlations, tiled values and graph embeddings.
"""
