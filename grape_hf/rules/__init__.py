"""The learning rules, one file each. `RULES[name](model, args)` installs the rule on `model` and returns
the object the trainer drives (a `FeedbackNetwork` for the error-hub rules dfa, grape and drtp; a
`HookedRule` for fa and pepita), or None for plain backpropagation."""

from . import bp, dfa, drtp, fa, grape, pepita

RULES = {"bp": bp.build, "dfa": dfa.build, "grape": grape.build, "fa": fa.build, "drtp": drtp.build,
         "pepita": pepita.build}
