"""`GrapeTrainingArguments` checks the type and range of every field it adds when it is built, as the command
line does: a Python caller or a JSON/YAML file can pass anything, and a wrong type must not train silently
wrong (inf turns GrAPE's feedback NaN, "no" is a true string, a string is read letter by letter)."""

import math
import re

import numpy as np
import pytest
from transformers import HfArgumentParser

from grape_hf import GrapeTrainer, GrapeTrainingArguments
from tiny_models import tiny_gpt2

COMMON = dict(report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)


def make_args(tmp_path, **kwargs) -> GrapeTrainingArguments:
    return GrapeTrainingArguments(output_dir=str(tmp_path / "out"), **{**COMMON, **kwargs})


# Numbers: finite, and integers where a count is meant ---------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("grape_lr", math.inf),  # GrAPE's update would make every matrix NaN while the logged loss reads 0.0
    ("grape_lr", -math.inf),
    ("grape_lr", math.nan),
    ("grape_ema_decay", math.nan),
    ("pepita_f_scale", math.inf),
    ("pepita_mirror_lr", math.inf),
    ("pepita_mirror_weight_decay", math.nan),
    ("pepita_mirror_noise", math.inf),
])
def test_non_finite_numbers_refused(tmp_path, field, value):
    with pytest.raises(ValueError, match="^" + re.escape(f"{field}={value!r}") + " must be a finite number "):
        make_args(tmp_path, **{field: value})


@pytest.mark.filterwarnings("ignore:feedback_lr is deprecated:FutureWarning")
def test_non_finite_deprecated_name_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^grape_lr=inf must be a finite number > 0"):
        make_args(tmp_path, feedback_lr=math.inf)


@pytest.mark.parametrize("field, value", [
    ("grape_lr", "abc"),  # was a bare TypeError: '>' not supported between 'str' and 'int'
    ("grape_lr", "1e-3"),  # a YAML file's 1e-3 is a string: named, not guessed
    ("grape_lr", True),  # a bool is not a step size although Python counts it a number
    ("grape_ema_decay", "0.9"),
    ("pepita_f_scale", None),
    ("pepita_mirror_noise", [0.1]),
])
def test_non_numbers_refused(tmp_path, field, value):
    with pytest.raises(ValueError, match="^" + re.escape(f"{field}={value!r}") + " must be a finite number "):
        make_args(tmp_path, **{field: value})


@pytest.mark.parametrize("field, value", [
    ("grape_update_steps", 2.5),
    ("grape_update_steps", 2.0),  # a count is an int: `step % 2.0` would work, `step % 2.5` never hits 0
    ("bp_calibration_steps", 1.5),
    ("alignment_probe_steps", 1.5),
    ("alignment_probe_steps", "2"),
    ("feedback_seed", "x"),
    ("feedback_seed", 1.5),
])
def test_counts_and_seed_must_be_integers(tmp_path, field, value):
    # grape_smoothing is set so that grape_update_steps > 1 is otherwise valid.
    with pytest.raises(ValueError, match="^" + re.escape(f"{field}={value!r}") + " must be an integer"):
        make_args(tmp_path, grape_smoothing="cma", **{field: value})


def test_range_messages_name_field_value_and_valid_range(tmp_path):
    with pytest.raises(ValueError, match=r"^grape_update_steps=0 must be >= 1\.$"):
        make_args(tmp_path, grape_update_steps=0)
    with pytest.raises(ValueError, match=r"^pepita_mirror_noise=0\.0 must be > 0\.$"):
        make_args(tmp_path, pepita_mirror_noise=0.0)


def test_numbers_of_other_types_are_converted(tmp_path):
    args = make_args(tmp_path, grape_lr=1, grape_update_steps=np.int64(2), grape_smoothing="ema",
                     grape_ema_decay=np.float32(0.5), feedback_seed=np.int32(7))
    assert type(args.grape_lr) is float and args.grape_lr == 1.0
    assert type(args.grape_update_steps) is int and args.grape_update_steps == 2
    assert type(args.grape_ema_decay) is float and args.grape_ema_decay == 0.5
    assert type(args.feedback_seed) is int and args.feedback_seed == 7


# feedback_embeddings: a bool, or a string as the command line reads it ----------------------------------
@pytest.mark.parametrize("value, expected", [
    (True, True), (False, False),
    ("no", False), ("false", False), ("False", False), ("0", False), ("N", False),
    ("yes", True), ("TRUE", True), ("1", True),
])
def test_feedback_embeddings_reads_bool_strings_as_the_command_line(tmp_path, value, expected):
    assert make_args(tmp_path, feedback_embeddings=value).feedback_embeddings is expected


@pytest.mark.parametrize("value", ["maybe", "", 1, None])
def test_feedback_embeddings_refuses_other_values(tmp_path, value):
    with pytest.raises(ValueError, match="^" + re.escape(f"feedback_embeddings={value!r}") + " is not valid; give True or False"):
        make_args(tmp_path, feedback_embeddings=value)


# feedback_modules: a list of names; one name alone is a one-element list ---------------------------------
def test_feedback_modules_string_is_one_name(tmp_path):
    args = make_args(tmp_path, feedback_modules="transformer.h.*")
    assert args.feedback_modules == ["transformer.h.*"]
    # The trainer places one point per block, as with the list (not one pattern per letter).
    from_string = GrapeTrainer(model=tiny_gpt2(), args=args).feedback.point_names
    from_list = GrapeTrainer(model=tiny_gpt2(), args=make_args(tmp_path, feedback_modules=["transformer.h.*"]))
    assert list(from_string) == list(from_list.feedback.point_names) == ["embeddings", "transformer.h.0",
                                                                         "transformer.h.1"]
    assert make_args(tmp_path, feedback_modules=("a", "b")).feedback_modules == ["a", "b"]


@pytest.mark.parametrize("value", [["transformer.h.*", 1], ["transformer.h.*", ""], "", 5, {"transformer.h.*": 1}])
def test_feedback_modules_refuses_non_strings(tmp_path, value):
    with pytest.raises(ValueError, match=r"^feedback_modules=.* is not valid; give a list of module names"):
        make_args(tmp_path, feedback_modules=value)


@pytest.mark.parametrize("value", [5, ""])
def test_head_module_must_be_a_name(tmp_path, value):
    with pytest.raises(ValueError, match="^" + re.escape(f"head_module={value!r}") + " is not valid; give a module name"):
        make_args(tmp_path, head_module=value)


def test_command_line_values_pass_the_checks(tmp_path):
    (args,) = HfArgumentParser(GrapeTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--report_to", "none", "--rule", "grape", "--grape_lr", "0.01",
         "--grape_update_steps", "2", "--grape_smoothing", "cma", "--bp_calibration_steps", "3",
         "--feedback_embeddings", "no", "--feedback_modules", "transformer.h.*", "--feedback_seed", "4"])
    assert (args.grape_lr, args.grape_update_steps, args.bp_calibration_steps, args.feedback_seed) == (0.01, 2, 3, 4)
    assert args.feedback_embeddings is False and args.feedback_modules == ["transformer.h.*"]
    with pytest.raises(ValueError, match=r"^grape_lr=inf must be a finite number"):
        HfArgumentParser(GrapeTrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--report_to", "none", "--grape_lr", "inf"])
