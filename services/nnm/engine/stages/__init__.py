"""One module per stage; each exposes one `run_*` function with a typed config."""

from .assign import assign_images
from .cluster import run_cluster
from .estimate import run_estimate
from .evaluate import run_evaluate
from .mine import run_mine
from .pretext import run_pretext
from .selflabel import run_selflabel

__all__ = ["assign_images", "run_cluster", "run_estimate", "run_evaluate", "run_mine", "run_pretext", "run_selflabel"]
