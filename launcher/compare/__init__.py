"""Run the ways of reaching one global batch side by side, judge whether they agree, and show what each costs.

    python -m launcher.compare --config configs/compare/default.yaml [key=value ...]

A compare config names a base training config and a set of modes. Each mode is one launch (processes,
overrides of the training config) and an expectation: ``equal`` (must give the reference's model within
the dtype's tolerance), ``differ`` (a baseline, whose measured deviation is shown) or ``sweep`` (another
setting on purpose, reported and never judged). Each mode runs as its own ``accelerate launch``
(Accelerate's state is process-global; a mode on N machines is N launches on this host, one per machine
rank, meeting over loopback), from the same seed, so every mode starts from the same weights and walks the
same sample order.

The package follows the comparison's seams: ``config`` (the schema), ``modes`` (planning every mode's
training config), ``preflight`` (warnings), ``session`` (the launches, through ``launcher.launch``),
``judge`` (agreement and cost from the runs' files, as ``results`` records) and ``report`` (terminal,
markdown, plots). ``cli`` is the command; up to the first launch it imports no torch.
"""
