"""``lightning-noisy search``: the method combination and its hyperparameters, chosen from noisy data alone.

Needs the ``search`` extra (Optuna): ``pip install -e '.[search]'``.
"""

from lightning_noisy.search.space import Param, SearchSpace, SearchSpaceError, Selection, merge_config

__all__ = ["Param", "SearchSpace", "SearchSpaceError", "Selection", "merge_config"]
