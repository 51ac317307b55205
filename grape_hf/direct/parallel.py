"""The layer-parallel backward (`parallel_backward`): the segments' local backwards at the same time.

Once the error tap has `e`, every segment's backward is independent of the others: it needs only
`B_k e` and its own saved tensors (that is DFA's reason to exist). The autograd engine still runs
them one after another, as one backward. With `parallel_backward=N`, the tap's backward instead hands
each segment (its recorded point tensors, not inputs of the tap, so the engine never reaches them) to
one of N threads, each calling `torch.autograd.backward` on its segments, and returns once all are
done. On CPU the engine runs a backward on the thread that calls it, so the segments really run side
by side, and each parameter receives exactly the sequential backward's gradient
(`tests/test_parallel_backward.py`: bitwise against the one backward on one intra-op thread, as each
segment thread uses, since CPU reductions depend on the thread count; a parameter shared with the head,
such as GPT-2's tied embedding, under gradient accumulation adds its two contributions in another
order). Each thread uses one intra-op thread while they run; on 2 cores that is as fast as the one backward on 2 intra-op
threads, not faster (docs: results/speed). On CUDA the engine runs every backward of a device on one
thread, so threads would gain nothing there (the segments would need one CUDA stream each: docs,
results/speed); `GrapeTrainer` refuses it there.

Points whose backward graphs share a node (the one input norm of parallel branches,
`Placement.shared`, or a weight tied across segments) go to one thread together: two threads must
not run one node, and the shared node must sum its gradients before its own backward, as in the
sequential backward.
"""

import concurrent.futures

import torch


def _node_key(node):
    # A leaf's gradient accumulator is keyed by the leaf itself: two segments reaching one weight share it.
    variable = getattr(node, "variable", None)
    return ("leaf", id(variable)) if variable is not None else node


def independent_groups(points: list[torch.Tensor]) -> list[list[int]]:
    """Indices of `points` (tensors with a backward graph) grouped so that no node of the graph, nor any
    leaf, is reached from two groups; in the order of their first point."""
    parent = list(range(len(points)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict = {}  # node key -> index of the first point whose graph reached it
    for i, point in enumerate(points):
        stack, seen = [point.grad_fn], set()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            first = owner.setdefault(_node_key(node), i)
            if root(first) != root(i):
                parent[root(first)] = root(i)
            stack.extend(next_node for next_node, _ in node.next_functions)
    groups: dict[int, list[int]] = {}
    for i in range(len(points)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


class SegmentThreads:
    """`threads` worker threads that run the segments' local backwards (see the module docstring).

    Attributes:
        anchor: a leaf that requires grad, the tap's one tensor input besides `z` in place of the points, so
            that the tap's backward runs even where `z` has no gradient path of its own (the residual stream,
            `error_point='residual'`, is cut at every block); it never receives a gradient.
    """

    def __init__(self, threads: int):
        self.anchor = torch.zeros((), requires_grad=True)
        self._executor = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="grape-segment")

    def backward(self, points: list[torch.Tensor], feedback) -> None:
        """For every point i, `torch.autograd.backward(points[i], feedback(i))` (no backward where `feedback(i)`
        is None), each group of points sharing a graph node on one thread, the groups at once (each thread
        computes its own points' feedback, `B_k e`, too); returns when all are done, raising the first error."""
        def run(group: list[int]) -> None:
            pairs = [(points[i], grad) for i in group if (grad := feedback(i)) is not None]
            if pairs:
                torch.autograd.backward(*zip(*pairs))

        # One intra-op thread per segment thread while they run (torch's count is global): the part above
        # the tap, before, and the optimizer step, after, keep the process's threads.
        intra_op = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            futures = [self._executor.submit(run, group) for group in independent_groups(points)]
            concurrent.futures.wait(futures)
        finally:
            torch.set_num_threads(intra_op)
        for future in futures:
            future.result()  # raises that group's error, once every group has stopped

    def close(self) -> None:
        """Stop the threads (after the running backwards)."""
        self._executor.shutdown(wait=True)
