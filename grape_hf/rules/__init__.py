"""The learning rules, one file each. `RULES[name](model, args)` installs the rule on `model` and
returns it (a `grape_hf.rule.Rule`); 'bp' installs nothing (None): the stock Trainer step.

- `dfa.py`: DFA, and the base of the direct rules (one error projected to many points);
- `grape.py`: GrAPE, DFA whose matrices follow forward-mode Jacobian estimates;
- `drtp.py`: DRTP, DFA projecting the one-hot target;
- `fa.py`, `pepita.py`: the layer-by-layer baselines for MLPs and CNNs;
- `mezo.py`: MeZO, zeroth-order SGD from two perturbed forwards (the fine-tuning baseline);
- `fg.py`: the forward gradient (Baydin et al. 2022), g v from one forward-mode pass along a random v;
- `random_direction.py`: what MeZO and the forward gradient share (the seeded direction, the projected gradient).
"""

from ..arguments import RULE_NAMES
from ..diagnostics.audit import LocalityReport, audit_network
from .bp import no_rule
from .drtp import DRTP
from .dfa import DFA
from .fa import FA
from .fg import ForwardGradient
from .grape import GrAPE
from .mezo import MeZO
from .pepita import PEPITA


RULES = {"bp": no_rule, "dfa": DFA, "grape": GrAPE, "fa": FA, "drtp": DRTP, "pepita": PEPITA, "mezo": MeZO,
         "fg": ForwardGradient}
assert tuple(RULES) == RULE_NAMES, "grape_hf.arguments.RULE_NAMES must list the rules of RULES"


def audit_locality(model, batch: dict, args, raise_on_leak: bool = True) -> LocalityReport:
    """Install the rule of `args` (a `GrapeTrainingArguments`) on `model`, audit it on `batch`
    (`grape_hf.diagnostics.audit.audit_network`), and remove it again. Raises `LocalityError`
    naming the leaking parameters."""
    rule = RULES[args.rule](model, args)
    if rule is None:
        raise ValueError(f"rule={args.rule!r} has no feedback points to audit; use a feedback rule such as 'dfa'.")
    try:
        return audit_network(model, rule, batch, raise_on_leak)
    finally:
        rule.remove()
