"""DFA (Nøkland 2016): every feedback point receives `B_k e`, with `B_k` fixed and random."""

from ..points import FeedbackNetwork, install
from .grape import GrapeAligner


def build(model, args) -> FeedbackNetwork:
    """Install points, cuts and the error tap of `args.setting` on `model`, with fixed random matrices.
    With `alignment_probe_steps`, a measuring-only `GrapeAligner` logs cos(B_k, T_k) as GrAPE does."""
    network = install(model, args)
    if args.alignment_probe_steps:
        network.aligner = GrapeAligner(network, args, learn=False)
    return network
