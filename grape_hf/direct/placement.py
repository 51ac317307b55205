"""Where the feedback points, the cuts and the error tap go in a Hugging Face model.

Macro: one point per block (the residual stream after the block). Blocks are the modules whose
class is listed in the model's own `_no_split_modules` and that sit in an `nn.ModuleList`, so
any model that declares its block class gets macro for free.
Micro: one point per residual branch (attention, MLP), named per block class in `MICRO_SUBLAYERS`.
Both add a point on the embeddings (the input of the first block) unless told not to.
Every block input is a cut: its tensor inputs are detached, so no path (a residual stream, a
position tensor or mask shared by all blocks) carries true gradient from one segment to another.
A model may instead declare its points per setting in `_feedback_points` (the grape_hf.models
MLP, CNN, AlexNet, VGG and ResNet do: one point per weight layer in micro, per block in macro);
it then has no embeddings point, and its `_no_split_modules` blocks are still cuts.
"""

import logging
import re
from dataclasses import dataclass

from torch import nn

logger = logging.getLogger(__name__)

EMBEDDINGS = "embeddings"  # name of the point on the first block's input

# Block class -> names of its residual-branch modules (the micro setting's points).
MICRO_SUBLAYERS = {
    "GPT2Block": ("attn", "mlp"),
    "LlamaDecoderLayer": ("self_attn", "mlp"),
    "MistralDecoderLayer": ("self_attn", "mlp"),
    "Qwen2DecoderLayer": ("self_attn", "mlp"),
    "Qwen3DecoderLayer": ("self_attn", "mlp"),
    "ViTLayer": ("attention", "mlp"),  # transformers >= 5.9 layout
}

# Class attribute of a model that declares its own points: setting -> module-name patterns
# (grape_hf.models: MLP, CNN, AlexNet, VGG, ResNet); it overrides the block discovery above.
DECLARED_POINTS = "_feedback_points"

# Causal LM class -> its final norm, whose input error_point="residual" reads: the pre-LN residual stream.
FINAL_NORMS = {
    "GPT2LMHeadModel": "transformer.ln_f",
    "LlamaForCausalLM": "model.norm",
    "MistralForCausalLM": "model.norm",
    "Qwen2ForCausalLM": "model.norm",
    "Qwen3ForCausalLM": "model.norm",
}

# Attributes that hold a classifier head when the model has no output embeddings.
HEAD_ATTRIBUTES = ("classifier", "score")


def tap_name(head: str, error_point: str) -> str:
    """'<head>:input' for error_point 'head_input', '<head>:output' for 'logits'."""
    return f"{head}:{'input' if error_point == 'head_input' else 'output'}"


@dataclass(frozen=True)
class Placement:
    """Where one rule's feedback goes.

    Attributes:
        points: names of the modules whose output is a feedback point, in forward order.
        embedding_block: the block whose input is the `EMBEDDINGS` point, or None for no such point.
        cuts: names of the modules whose tensor inputs are detached (every block).
        head: name of the output head around which the error tap sits.
        error_point: "head_input" (the tap is the head's input) or "logits" (the head's output).
    """

    points: tuple[str, ...]
    embedding_block: str | None
    cuts: tuple[str, ...]
    head: str
    error_point: str

    @property
    def tap_name(self) -> str:
        """Where the error is read, e.g. 'lm_head:input' (`tap_name`)."""
        return tap_name(self.head, self.error_point)

    @property
    def point_names(self) -> tuple[str, ...]:
        """All feedback points in forward order: the embeddings point first when there is one."""
        return ((EMBEDDINGS,) if self.embedding_block is not None else ()) + self.points


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the repeated blocks: modules of a `_no_split_modules` class inside an `nn.ModuleList`.
    Where such blocks nest (ConvNeXt's layers inside its stages), the outer ones: every parameter of a
    stage (its downsampling too) then lies in one segment, and no point sits inside another."""
    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    blocks = []
    for parent_name, parent in model.named_modules():
        if isinstance(parent, nn.ModuleList):
            for child_name, child in parent.named_children():
                if type(child).__name__ in block_classes:
                    blocks.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return [block for block in blocks if not any(block.startswith(outer + ".") for outer in blocks)]


def find_head(model: nn.Module, head_module: str | None = None) -> str:
    """Name of the output head: `head_module`, else the output embeddings, else `classifier`/`score`."""
    if head_module is not None:
        model.get_submodule(head_module)  # raises AttributeError naming the missing module
        return head_module
    candidates = []
    if hasattr(model, "get_output_embeddings"):
        candidates.append(model.get_output_embeddings())
    candidates += [getattr(model, name, None) for name in HEAD_ATTRIBUTES]
    names = {id(module): name for name, module in model.named_modules()}
    for module in candidates:
        if isinstance(module, nn.Module) and id(module) in names:
            return names[id(module)]
    raise ValueError(
        f"{type(model).__name__} has no output head (looked for its output embeddings and the attributes "
        f"{', '.join(HEAD_ATTRIBUTES)}), so there are no logits or head input to read the error from. Use a model "
        "with a head (e.g. GPT2LMHeadModel, ViTForImageClassification) or name the head with `head_module`."
    )


def default_error_point(model: nn.Module) -> str:
    """'head_input' for models with output embeddings (causal LMs), 'logits' for classifiers."""
    has_output_embeddings = hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None
    return "head_input" if has_output_embeddings else "logits"


def _glob(pattern: str) -> re.Pattern:
    """A module-name glob: `*` stands for one dotted component ('h.*' matches 'h.0', not 'h.0.attn')."""
    return re.compile(".".join("[^.]+" if part == "*" else re.escape(part).replace(r"\*", "[^.]*")
                               for part in pattern.split(".")))


def match_modules(model: nn.Module, patterns: list[str], every_pattern: bool = True) -> list[str]:
    """Module names matching any of `patterns` (exact names or globs), in forward (registration) order.
    With `every_pattern`, a pattern that matches nothing (a user's typo) raises."""
    names = [name for name, _ in model.named_modules() if name]
    globs = [_glob(pattern) for pattern in patterns]
    for pattern, glob in zip(patterns, globs):
        if every_pattern and not any(glob.fullmatch(name) for name in names):
            examples = ", ".join(names[:12])
            raise ValueError(f"feedback_modules pattern {pattern!r} matches no module of {type(model).__name__}; "
                             f"module names look like: {examples}, ...")
    return [name for name in names if any(glob.fullmatch(name) for glob in globs)]


def _suggested_points(model: nn.Module) -> list[str]:
    """Globs over the model's own repeated modules (`<list>.*` for each nn.ModuleList of several children),
    for error messages; a generic example when it has none."""
    lists = [f"{name}.*" for name, module in model.named_modules()
             if name and isinstance(module, nn.ModuleList) and len(module) > 1]
    return lists[:2] or ["encoder.layers.*"]


def resolve_placement(model: nn.Module, args) -> Placement:
    """Build the `Placement` of `args.setting` (or `args.feedback_modules`) for `model`.

    Raises a `ValueError` that names the block class and shows `feedback_modules` when the model's
    blocks or sub-layers are unknown.
    """
    blocks = find_blocks(model)
    model_class = type(model).__name__
    declared = getattr(model, DECLARED_POINTS, None)
    if args.feedback_modules:
        points = match_modules(model, args.feedback_modules)
        if not blocks and not declared:
            logger.warning(f"No blocks found in {model_class}: no cuts and no embeddings point. Check that nothing "
                           "bypasses your feedback_modules with grape_hf.audit_locality.")
    elif declared:
        # A declared pattern may match nothing in a small variant (a CNN without dense layers).
        points = match_modules(model, list(declared[args.setting]), every_pattern=False)
    elif not blocks:
        raise ValueError(
            f"No blocks found in {model_class}: its _no_split_modules is "
            f"{getattr(model, '_no_split_modules', None)!r} and no module of those classes sits in an nn.ModuleList. "
            f"Name the feedback points yourself, e.g. feedback_modules={_suggested_points(model)} (names from "
            "model.named_modules(), where '*' stands for one dotted component)."
        )
    elif args.setting == "macro":
        points = blocks
    else:
        points = []
        for block in blocks:
            block_class = type(model.get_submodule(block)).__name__
            if block_class not in MICRO_SUBLAYERS:
                children = [name for name, _ in model.get_submodule(block).named_children()]
                raise ValueError(
                    f"The micro setting does not know the sub-layers of {block_class} (known: "
                    f"{', '.join(sorted(MICRO_SUBLAYERS))}). Name its residual branches yourself with "
                    f"feedback_modules, '*' standing for the block index, e.g. "
                    f"['{block.rsplit('.', 1)[0]}.*.<branch>'] for <branch> among its children {children}."
                )
            points += [f"{block}.{sub}" for sub in MICRO_SUBLAYERS[block_class]]

    error_point = args.error_point or default_error_point(model)
    if error_point == "residual":  # a head_input tap on the final norm: the error is read on the residual stream
        head = args.head_module or FINAL_NORMS.get(model_class)
        if head is None:
            raise ValueError(f"error_point='residual' does not know the final norm of {model_class} (known: "
                             f"{', '.join(sorted(FINAL_NORMS))}); name it with head_module.")
        model.get_submodule(head)  # raises AttributeError naming a missing module
        error_point = "head_input"
    else:
        head = find_head(model, args.head_module)
    if head in points:
        raise ValueError(f"The output head {head!r} cannot also be a feedback point.")
    return Placement(
        points=tuple(points),
        # A model that declares its points declares its first one too (a stem or first layer is a unit).
        embedding_block=blocks[0] if (args.feedback_embeddings and blocks and not declared) else None,
        cuts=tuple(blocks),
        head=head,
        error_point=error_point,
    )
