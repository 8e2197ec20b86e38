"""The early-exit math of E2CM (Görmez & Koyuncu), free of HTTP, disk and image decoding.

Only torch and numpy. Equation numbers refer to "Class Means as an Early Exit Decision Mechanism"
(arXiv 2103.01148): Eq. 2 class means, Eq. 3 distances, Eq. 4 normalisation, Eq. 5 probabilities,
Eq. 6-7 the exit rule.
"""

from service.earlyexit.accumulators import ClassStatsAccumulator, NormaliserAccumulator
from service.earlyexit.costs import ExitCosts
from service.earlyexit.decision_table import DecisionTable
from service.earlyexit.distances import euclidean_distances
from service.earlyexit.exit_head import ExitHead, fit_exit_head
from service.earlyexit.hull import Operating, Profile, select_by_target, upper_hull
from service.earlyexit.probabilities import class_probabilities
from service.earlyexit.reduction import reduce_feature, reduced_dim
from service.earlyexit.search import SEARCH_MODES, search_thresholds
from service.earlyexit.timesharing import TimeSharingRouter

__all__ = [
    "SEARCH_MODES", "ClassStatsAccumulator", "DecisionTable", "ExitCosts", "ExitHead", "NormaliserAccumulator",
    "Operating", "Profile", "TimeSharingRouter", "class_probabilities", "euclidean_distances",
    "fit_exit_head", "reduce_feature", "reduced_dim", "search_thresholds", "select_by_target", "upper_hull",
]
