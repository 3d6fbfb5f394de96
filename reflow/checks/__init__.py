"""Harnesses that run the parallel engines and reallocation against one process: every rank of a
`launch`ed world does the same work under a layout and on its own whole copy, and reports the differences.
Used by `reflow layout --check` and the tests; they sit above the layers they check (parallel, realloc,
engines), so that those layers ship no code that only checks them.

    layouts.py   a layout's train step, log-probs and generation vs the one-process engines
    realloc.py   reallocation between layouts: bit-exact slices, the shard map vs parallelized modules,
                 train -> generate -> train, memory
"""
