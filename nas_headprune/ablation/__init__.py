"""``nas-headprune ablate``: a declared grid of search runs, executed resumably into a results store.

An ablation file (YAML) names a base run config and the axes to sweep::

    name: my_sweep
    base: default                    # a run-config preset or YAML file
    set: {finetune.max_steps_per_epoch: 100}   # dotted overrides for every trial
    strategies: [magnitude, taylor]
    budgets: [0.5, 0.7]
    seeds: [0, 1, 2]
    strategy_options:                # per strategy, applied only to that strategy's trials
      taylor: {calib_batches: 2}
    grid:                            # dotted key -> values, crossed with everything above
      reweight.mode: [none, lstsq]
    variants:                        # or/and named variants, each a set of dotted overrides
      - {name: plain, set: {strategy_options.alpha: 0}}
    quick: {budgets: [0.5], seeds: [0], set: {data.test_subset: 500}}   # what --quick changes

Every trial is one :func:`nas_headprune.runner.run_search` run in ``DIR/runs/<trial id>``. The parent
process owns the store (:mod:`nas_headprune.store`): it skips finished trials, retries failed or
interrupted ones and records each outcome as soon as it arrives, so a killed ablation loses no
finished trial and its search/fine-tune checkpoints let an interrupted trial resume mid-way.

The modules: :mod:`~nas_headprune.ablation.spec` (the file's model and loading),
:mod:`~nas_headprune.ablation.trials` (expansion into trials, shards, validation),
:mod:`~nas_headprune.ablation.execute` (one trial), :mod:`~nas_headprune.ablation.pool` (trials in
worker processes) and :mod:`~nas_headprune.ablation.sweep` (``run_ablation`` and its store);
:mod:`nas_headprune.ablate` re-exports their public names.
"""
