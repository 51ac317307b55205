"""Where the feedback points, the cuts and the error tap go in a Hugging Face model.

Macro: one point per block (the residual stream after the block). Blocks are the modules whose
class is listed in the model's own `_no_split_modules` and that sit in an `nn.ModuleList` (the outer
ones where such blocks nest: ConvNeXt's stages, not their layers), so any model that declares its
block class gets macro for free. A model whose declared classes sit deeper (HF ResNet declares its
conv layers) has as blocks the children of an `nn.ModuleList` that hold them (its stages). A block
that holds repeated residual units of its own (the layers of a ConvNeXt or HF ResNet stage, the
blocks of a Swin stage) has those units as its points instead, plus itself when it holds parameters
after them (Swin's patch merging), in both settings (`unit_points`); the blocks stay the cuts.
Micro: one point per residual branch, named per block class in `MICRO_SUBLAYERS`: the module whose
output is added to the block's input stream (after a post-branch norm or layer-scale module, so that
module trains in the branch's segment), or the block itself for its last branch where no module ends
that branch.
Both add a point on the embeddings (the input of the first block) unless told not to.
A point whose segment holds no trainable parameter (a frozen base under PEFT adapters: the embeddings, a
block without adapters) is dropped at install (`trainable_points`): its output is detached with no
feedback, like a cut, so a frozen segment costs no matrix, no estimate and no matmul.
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

# Block class -> the modules (names inside the block) whose outputs are its residual branches, in forward
# order; "" is the block itself, the point of a last branch that no module ends: a bare layer-scale parameter
# multiplies it (BEiT), it is reshaped around its add (OPT's fc2 runs on (tokens, d)), or its module adds the
# stream itself (BERT's output). The block's output is then that branch plus a stream that carries no gradient
# (the earlier branches' points and the block's input cut detach it), so the point trains the same segment.
MICRO_SUBLAYERS = {
    "GPT2Block": ("attn", "mlp"),
    "LlamaDecoderLayer": ("self_attn", "mlp"),
    "MistralDecoderLayer": ("self_attn", "mlp"),
    "Qwen2DecoderLayer": ("self_attn", "mlp"),
    "Qwen3DecoderLayer": ("self_attn", "mlp"),
    "GemmaDecoderLayer": ("self_attn", "mlp"),
    "Phi3DecoderLayer": ("self_attn", "mlp"),
    "StableLmDecoderLayer": ("self_attn", "mlp"),
    "OlmoDecoderLayer": ("self_attn", "mlp"),
    "MixtralDecoderLayer": ("self_attn", "mlp"),
    "Qwen2MoeDecoderLayer": ("self_attn", "mlp"),
    "GPTNeoXLayer": ("attention", "mlp"),
    "ViTLayer": ("attention", "mlp"),  # transformers >= 5.9 layout
    "DeiTLayer": ("attention", "mlp"),
    "ModernBertEncoderLayer": ("attn", "mlp"),
    # The residual add happens inside these branch modules: their output is the stream after the branch.
    "BloomBlock": ("self_attention", "mlp"),
    "BertLayer": ("attention", ""),
    # Post-branch norms and layer-scales: the point sits after them, so they train with their branch.
    "Gemma2DecoderLayer": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "Gemma3DecoderLayer": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "Olmo2DecoderLayer": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "Dinov2Layer": ("layer_scale1", "layer_scale2"),
    "BeitLayer": ("attention", ""),  # lambda_1 then trains with the second point, lambda_2 with its own
    "OPTDecoderLayer": ("self_attn", ""),
    # Parallel attention and MLP on one input norm (`SHARED_INPUTS`).
    "PhiDecoderLayer": ("self_attn", "mlp"),
    "GPTJBlock": ("attn", "mlp"),
    "FalconDecoderLayer": ("self_attention", "mlp"),
}

# Block class -> its input norm that feeds several branches at once (parallel attention and MLP): that norm's
# parameters legitimately receive the feedback of every point of its block, as tied weights receive one per holder.
SHARED_INPUTS = {
    "PhiDecoderLayer": "input_layernorm",
    "GPTJBlock": "ln_1",
    "FalconDecoderLayer": "input_layernorm",  # absent with two norms (new_decoder_architecture): then nothing shared
    "StableLmDecoderLayer": "input_layernorm",  # shared with use_parallel_residual=True
}

# Class attribute of a model that declares its own points: setting -> module-name patterns
# (grape_hf.models: MLP, CNN, AlexNet, VGG, ResNet); it overrides the block discovery above.
DECLARED_POINTS = "_feedback_points"

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
        shared: (module name, the points whose feedback may all reach its parameters) for each module
            that feeds several points at once (the input norm of parallel branches); the audit knows them.
        frozen: the points dropped because their segments hold no trainable parameter (`trainable_points`),
            `EMBEDDINGS` among them for frozen embeddings: no matrix, no feedback; each module's output is
            detached (the first block's input, the embeddings' tensor, is a cut already).
    """

    points: tuple[str, ...]
    embedding_block: str | None
    cuts: tuple[str, ...]
    head: str
    error_point: str
    shared: tuple[tuple[str, tuple[str, ...]], ...] = ()
    frozen: tuple[str, ...] = ()

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
    stage (its downsampling too) then lies in one segment, and no point sits inside another (micro
    points at the inner ones, `sub_units`). Where no declared module sits in an `nn.ModuleList` (HF
    ResNet declares its conv layers, inside `nn.Sequential`s), the children of an `nn.ModuleList` that
    hold declared modules (its stages)."""
    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    if not block_classes:
        return []
    lists = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]
    blocks = [f"{name}.{child_name}" if name else child_name for name, parent in lists
              for child_name, child in parent.named_children() if type(child).__name__ in block_classes]
    if not blocks:
        blocks = [f"{name}.{child_name}" if name else child_name for name, parent in lists
                  for child_name, child in parent.named_children()
                  if any(type(inner).__name__ in block_classes for inner in child.modules())]
    return [block for block in blocks if not any(block.startswith(outer + ".") for outer in blocks)]


def sub_units(block: nn.Module) -> tuple[list[str], bool]:
    """The repeated units a block holds (names inside it), and whether the block holds parameters after them.

    The units are the children of the block's `nn.ModuleList` or `nn.Sequential` children whose members are
    all of one class and hold parameters (a ConvNeXt stage's `layers`, a Swin stage's `blocks`, an HF ResNet
    stage's `layers`); none for a transformer block. The parameters of the block outside its units join the
    first unit's segment when they are registered before the units (ConvNeXt's downsampling runs first: the
    block's input cut is above it), and need the block itself as a point when registered after (Swin's patch
    merging runs last); forward order is read from registration order, and the audit checks the result.
    """
    children = list(block.named_children())
    for index, (name, child) in enumerate(children):
        members = list(child.children()) if isinstance(child, (nn.ModuleList, nn.Sequential)) else []
        if members and len({type(m) for m in members}) == 1 and any(True for _ in child.parameters()):
            after = any(True for _, later in children[index + 1:] for _ in later.parameters())
            return [f"{name}.{member}" for member, _ in child.named_children()], after
    return [], False


def find_final_norm(model: nn.Module, blocks: list[str]) -> str | None:
    """The norm after the last block (`transformer.ln_f`, `model.norm`, `model.decoder.final_layer_norm`): a
    child, whose class name has 'Norm' in it, of the module that holds the blocks' `nn.ModuleList`; the first
    one registered after that list, else the last one (OPT registers its final norm before its layers); None
    when there is none. Its input is the residual stream that error_point="residual" reads."""
    if not blocks:
        return None
    parent_name, _, list_name = blocks[-1].rsplit(".", 1)[0].rpartition(".")
    names = [name for name, _ in model.get_submodule(parent_name).named_children()]
    norms = [name for name in names if "Norm" in type(model.get_submodule(parent_name).get_submodule(name)).__name__]
    after = [name for name in norms if names.index(name) > names.index(list_name)]
    chosen = after[0] if after else (norms[-1] if norms else None)
    return None if chosen is None else f"{parent_name}.{chosen}" if parent_name else chosen


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


def default_error_point(model: nn.Module, blocks: list[str]) -> str:
    """'residual' for models with output embeddings (causal LMs) and a final norm (`find_final_norm`), else
    'head_input' for them; 'logits' for classifiers. The residual stream is where DFA and GrAPE learn LMs
    best (docs: how-to/language-models, `benchmarks/lm_fidelity.py`)."""
    has_output_embeddings = hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None
    if not has_output_embeddings:
        return "logits"
    return "residual" if find_final_norm(model, blocks) is not None else "head_input"


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
    for error messages; else the names of its top-level modules (names it has, never a generic example)."""
    lists = [f"{name}.*" for name, module in model.named_modules()
             if name and isinstance(module, nn.ModuleList) and len(module) > 1]
    return lists[:2] or [name for name, _ in model.named_children()][:2]


def unit_points(model: nn.Module, block: str) -> list[str]:
    """The points of a block that holds repeated residual units (a ConvNeXt, HF ResNet or Swin stage): its
    `sub_units`, plus the block itself when it holds parameters after them; none for a transformer block
    (`MICRO_SUBLAYERS`) or a block without units. Both settings put these points: the units are the residual
    blocks of such models, and each has one residual branch (ConvNeXt, ResNet) or a windowed attention
    branch whose positions are not the error's (Swin), so micro has nothing finer."""
    module = model.get_submodule(block)
    if type(module).__name__ in MICRO_SUBLAYERS:
        return []
    units, after = sub_units(module)
    return [f"{block}.{unit}" for unit in units] + ([block] if units and after else [])


def micro_points(model: nn.Module, block: str) -> list[str]:
    """The micro points of `block`: its residual branches (`MICRO_SUBLAYERS`), else its `unit_points`.
    Raises a `ValueError` naming `feedback_modules` for a block it does not know."""
    module = model.get_submodule(block)
    block_class = type(module).__name__
    if block_class in MICRO_SUBLAYERS:
        return [f"{block}.{sub}" if sub else block for sub in MICRO_SUBLAYERS[block_class]]
    units = unit_points(model, block)
    if units:
        return units
    children = [name for name, _ in module.named_children()]
    raise ValueError(
        f"The micro setting does not know the sub-layers of {block_class} (its residual branches; known: "
        f"{', '.join(sorted(MICRO_SUBLAYERS))}), and it holds no repeated units. Name its residual branches (the "
        f"modules whose outputs are added to the block's input) yourself with feedback_modules, '*' standing for "
        f"the block index, e.g. ['{block.rsplit('.', 1)[0]}.*.<branch>'] for <branch> among its children "
        f"{children}, or use setting='macro'."
    )


def shared_inputs(model: nn.Module, blocks: list[str], points: list[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(norm, the points inside its block) for every block whose `SHARED_INPUTS` norm feeds two or more of
    `points` (the micro branches, or the user's `feedback_modules` on them)."""
    shared = []
    for block in blocks:
        norm = SHARED_INPUTS.get(type(model.get_submodule(block)).__name__)
        inside = tuple(point for point in points if point.startswith(block + "."))
        if norm is not None and len(inside) > 1 and isinstance(getattr(model.get_submodule(block), norm, None),
                                                                nn.Module):
            shared.append((f"{block}.{norm}", inside))
    return tuple(shared)


def _parameter_ids(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


def segment_candidates(model: nn.Module, points: list[str], embeddings: bool, cuts: list[str],
                       head: str) -> dict[str, set[int]]:
    """For each point (and `EMBEDDINGS` when `embeddings`), the ids of the parameters that may lie in its
    segment, read from the module tree: a superset of the segment, so no point with a trainable segment is
    ever found frozen.

    Where a point looks: inside its block (the cut that holds it) when it has one, else (the embeddings, a
    point of `feedback_modules` outside the blocks) everything outside the blocks it does not hold and below
    the error tap (less what only the tap's module or the output head holds); less, in both cases, the
    parameters of the other points that do not hold it (the micro points before it, the units of its
    stage), whose outputs are detached.
    """
    heads = [head]
    try:
        heads.append(find_head(model))
    except ValueError:  # no output head besides `head`
        pass
    holders: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(p), []).append(name)
    # Held only above the tap; a tied weight (GPT-2's input embedding is its output head) is below it too.
    above = {pid for pid, names in holders.items()
             if all(any(name.startswith(h + ".") for h in heads) for name in names)}
    everything = _parameter_ids(model)
    cut_ids = {cut: _parameter_ids(model.get_submodule(cut)) for cut in cuts}
    point_ids = {point: _parameter_ids(model.get_submodule(point)) for point in points}
    candidates = {}
    for point in ([EMBEDDINGS] if embeddings else []) + list(points):
        enclosing = [cut for cut in cuts if point == cut or point.startswith(cut + ".")]
        if enclosing:
            scope = set(cut_ids[max(enclosing, key=len)])
        else:
            own = point_ids.get(point, set())
            scope = everything - above - set().union(*(ids for cut, ids in cut_ids.items()
                                                       if not cut.startswith(point + "."))) | own
        for other, ids in point_ids.items():
            if other != point and not point.startswith(other + "."):
                scope -= ids
        candidates[point] = scope
    return candidates


def trainable_points(model: nn.Module, points: list[str], embeddings: bool, cuts: list[str],
                     head: str) -> tuple[list[str], bool, list[str]]:
    """(the points whose `segment_candidates` hold a trainable parameter, whether the embeddings point does,
    the points that do not): resolved from `requires_grad` when the rule is installed (PEFT freezes its base
    model when it wraps it, before any trainer sees it)."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    candidates = segment_candidates(model, points, embeddings, cuts, head)
    live = {point for point, ids in candidates.items() if ids & trainable}
    frozen = [point for point in candidates if point not in live]
    if frozen:
        logger.info("Feedback points whose segments hold no trainable parameter, cut with no feedback: %s", frozen)
    return [point for point in points if point in live], EMBEDDINGS in live, frozen


def refuse_prompt_learning(model: nn.Module) -> None:
    """Raise a `ValueError` for a PEFT prompt-learning adapter (prompt tuning, prefix tuning, P-tuning): feedback
    cannot train it. Prompt tuning's virtual tokens act on the output only through attention from the real
    tokens, and a point's feedback `B_k e_n` reaches position n's own input only: the virtual tokens' positions
    carry no label (PEFT gives them -100; a classifier reads one real token), so all of them but, in a causal LM,
    the last get no signal at all while the run looks fine. Prefix tuning's keys and values enter every block's
    attention past its cut, from one table shared by all blocks."""
    configs = getattr(model, "peft_config", None)
    methods = sorted({str(getattr(config, "peft_type", type(config).__name__)).removeprefix("PeftType.")
                      for config in (configs.values() if isinstance(configs, dict) else ())
                      if getattr(config, "is_prompt_learning", False)})
    if methods:
        raise ValueError(
            f"The direct rules (dfa, grape, drtp) cannot train the PEFT prompt-learning adapter {', '.join(methods)}: "
            "feedback reaches each position's own input only, and virtual tokens act on the output only through "
            "attention from the real tokens. Prompt tuning's virtual tokens carry no label, so (but for the last one "
            "in a causal LM) they would get no signal at all; prefix tuning's keys and values bypass the blocks' "
            "cuts. Use an adapter inside the blocks (LoRA, DoRA, IA3: LoraConfig, IA3Config), or rule='bp'.")


def resolve_placement(model: nn.Module, args) -> Placement:
    """Build the `Placement` of `args.setting` (or `args.feedback_modules`) for `model`.

    Raises a `ValueError` that names the block class and shows `feedback_modules` when the model's
    blocks or sub-layers are unknown, and one that gives the reason for a PEFT prompt-learning adapter
    (`refuse_prompt_learning`). Points whose segments hold no trainable parameter become `frozen` cuts
    (`trainable_points`).
    """
    refuse_prompt_learning(model)
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
            f"{getattr(model, '_no_split_modules', None)!r} and no module of those classes sits in (a child of) an "
            "nn.ModuleList. "
            f"Name the feedback points yourself, e.g. feedback_modules={_suggested_points(model)} (names from "
            "model.named_modules(), where '*' stands for one dotted component)."
        )
    elif args.setting == "macro":
        points = [point for block in blocks for point in (unit_points(model, block) or [block])]
    else:
        points = [point for block in blocks for point in micro_points(model, block)]

    error_point = args.error_point or default_error_point(model, blocks)
    if error_point == "residual":  # a head_input tap on the final norm: the error is read on the residual stream
        head = args.head_module or find_final_norm(model, blocks)
        if head is None:
            raise ValueError(f"error_point='residual' found no final norm in {model_class} (a module whose class name "
                             "has 'Norm' in it, registered after its blocks): name it with head_module.")
        model.get_submodule(head)  # raises AttributeError naming a missing module
        error_point = "head_input"
    else:
        head = find_head(model, args.head_module)
    if head in points:
        raise ValueError(f"The output head {head!r} cannot also be a feedback point.")
    # A model that declares its points declares its first one too (a stem or first layer is a unit).
    embeddings = bool(args.feedback_embeddings and blocks and not declared)
    points, embeddings, frozen = trainable_points(model, points, embeddings, blocks, head)
    return Placement(
        points=tuple(points),
        embedding_block=blocks[0] if embeddings else None,
        cuts=tuple(blocks),
        head=head,
        error_point=error_point,
        shared=shared_inputs(model, blocks, points),
        frozen=tuple(frozen),
    )
