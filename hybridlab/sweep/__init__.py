"""Architecture search: `hybridlab sweep SPACE.yaml`, an Optuna multi-objective study over where
Taipan's Selective Attention Layers go, how many tokens they select (capacity C) and how far they
look (window), against validation perplexity and measured or analytic inference cost.

    space.py      search-space YAML -> SearchSpace (validated before any trial runs)
    params.py     parameters: paths into the architecture, ranges, checks at every bound
    edit.py       parameter values -> an architecture (SAL placement, paths into configs)
    objective.py  one trial: analytic constraints, train, measure, report
    study.py      storage, sampler, workers, stale and failed trials
    report.py     Pareto front table, PNG/HTML plot, best architecture YAML
    run.py        `hybridlab sweep`: the command end to end
"""
