"""The planner: every way to reach a global batch on hardware you do not have, predicted from what is measured
on the hardware you do, and held against measurement.

    python -m launcher.plan --config configs/runs/tiny_lm.yaml [key=value ...] [--validate]

The package follows the planner's seams: ``config`` (its keys), ``enumerate`` (every valid split), ``profile``
(measuring compute, memory and the link with the real trainer, through compare), ``model`` (the cost model),
``rank`` (predicting every split, the recommendation and why), ``validate`` (the splits this machine can run,
through compare), ``results`` (what plan.json holds) and ``report`` (terminal, plan.md, the plot). ``cli`` is
the command; nothing imports torch in this process: the launches do.
"""
