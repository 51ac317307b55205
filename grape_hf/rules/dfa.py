"""DFA (Nøkland 2016): every feedback point receives `B_k e`, with `B_k` fixed and random."""

from ..feedback import FeedbackMatrices
from ..placement import resolve_placement
from ..points import FeedbackNetwork


def build(model, args) -> FeedbackNetwork:
    """Install points, cuts and the error tap of `args.setting` on `model`, with fixed random matrices."""
    placement = resolve_placement(model, args)
    return FeedbackNetwork(model, placement, FeedbackMatrices(args.feedback_init, args.feedback_seed))
