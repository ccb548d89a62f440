"""The harvest stage (`ghsae harvest`): token stream, similarity probe, partition, shards.

What other stages may use (the grouping method, to show and compare partitions): the names below.
Everything else in harvest/ is the stage's own; ghsae.pipeline runs its steps.
"""

from ghsae.harvest.partition import METHODS, OBJECTIVES, amad, complete_linkage, partition_scope, solve, solve_grouping
from ghsae.harvest.similarity import DISTANCES, canonical_distance, distance_matrix

__all__ = [
    "DISTANCES",
    "METHODS",
    "OBJECTIVES",
    "amad",
    "canonical_distance",
    "complete_linkage",
    "distance_matrix",
    "partition_scope",
    "solve",
    "solve_grouping",
]
