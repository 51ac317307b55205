"""The mechanism shared by the direct rules (DFA, GrAPE, DRTP): one error, projected to many points.

- `placement.py`: where the points, the cuts and the error tap go in a model;
- `matrices.py`: the feedback matrices `B_k` (seeded, created on first use);
- `network.py`: the point, cut and tap hooks and the `ErrorTap` Function, with their modes;
- `estimate.py`: forward-mode Jacobian estimates at the points (GrAPE, DFA's probe);
- `forward_ad.py`: explicit-jvp kernels for the estimating forward (attention, linear layers).
"""
