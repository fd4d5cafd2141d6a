"""The steps the commands share, below them: a command composes these and never calls another
command.

    fit.py         the scan pass and the fit before it (train, and nightly when it trains), the
                   config as a given tokenizer runs it
    collisions.py  the collision policy (suffix | relocate) and its typed summary
    relocation.py  relocate in Ray tasks, a bucket of prefixes each (the driver keeps no candidates)
    quality.py     the quality figures that need the items' codes: group sizes, coherence
    ids.py         a catalog's IDs end to end: encode pass, policy, export, report, publish
"""
