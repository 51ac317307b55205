"""The learning rules, one file each. `RULES[name](model, args)` installs the rule's feedback on
`model` and returns its `FeedbackNetwork`, or None for plain backpropagation."""

from . import bp, dfa, grape

RULES = {"bp": bp.build, "dfa": dfa.build, "grape": grape.build}
