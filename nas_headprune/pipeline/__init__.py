"""The search pipeline, the same for every strategy, as four resumable stages over a run folder:

1. ``search``: load model and data, build the space, ``strategy.search``, validate the selection
   (``search.json``, ``search_scales.safetensors``, ``search_weights.safetensors``, ``search_state/``);
2. ``reweight``: materialise (fold scales) and refit the layers that consume pruned channels
   (``reweighted/``, a :func:`nas_headprune.save_pruned` folder, and ``reweight.json``);
3. ``finetune``: train the pruned model, with distillation from the dense one when configured
   (``finetune/`` epoch checkpoints, ``finetune.json``, and ``model/``, the final pruned model);
4. ``evaluate``: dense and pruned accuracy, MACs, parameters, throughput (``result.json``).

Every stage records in ``stages.json`` a fingerprint of what it depends on (its config section, the
seed, the dense weights' hash and the previous stage's fingerprint; see
:mod:`nas_headprune.runfolder`). Running the same command again reuses finished stages and resumes
the unfinished one from its checkpoints; running another config in the folder stops with exit 2 and
names the stage and keys that differ, or with ``restart=True`` redoes that stage and the later ones.
A process holds the folder's lock while it works in it. Every file is written atomically.

The modules, in the order a run meets them: :mod:`~nas_headprune.pipeline.run` (``run_search``: the
fingerprints and the order of the stages), :mod:`~nas_headprune.pipeline.loading` (the dense model,
its data section, hashes and versions), :mod:`~nas_headprune.pipeline.state` (what the stages share),
:mod:`~nas_headprune.pipeline.search`, :mod:`~nas_headprune.pipeline.latency` (the latency table of a
``budget_kind: latency`` run and its check), :mod:`~nas_headprune.pipeline.reweight`,
:mod:`~nas_headprune.pipeline.finetune` and :mod:`~nas_headprune.pipeline.evaluate`;
:mod:`~nas_headprune.pipeline.train` trains a dense model (``nas-headprune train``).
:mod:`nas_headprune.runner` re-exports the entry points.
"""
