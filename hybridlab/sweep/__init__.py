"""Architecture search: `hybridlab sweep SPACE.yaml`, an Optuna multi-objective study over where a
block type goes (its Placement hook) and how its layers, the model and the training are set (for
Taipan: selective attention placement, capacity, window; search_spaces/), against validation
perplexity and measured or analytic inference cost. No block type is named here.

    space.py      search-space YAML -> SearchSpace (validated before any trial runs)
    params.py     parameters: paths into the architecture, ranges, checks at every bound
    edit.py       parameter values -> an architecture (placement, paths into configs)
    objective.py  one trial: analytic constraints, train, measure, report
    study.py      storage, sampler, workers, stale and failed trials
    report.py     Pareto front table, PNG/HTML plot, best architecture YAML
    run.py        `hybridlab sweep`: the command end to end
"""
