"""compute: model loading, RelP attribution graphs, projections and effects (torch).

Writes graph shards through :mod:`circuit_atlas.lake`; imports torch only here.
"""
