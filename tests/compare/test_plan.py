"""peftcli/compare/plan.py: rows from --method flags, their recipes and learning rates, and the methods that
do not apply. Nothing trains here."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftcli.compare.plan import RowSpec, make_plan, parse_method_flag, row_name, unique_names
from peftcli.errors import UserError
from peftcli.methods import METHODS, default_learning_rate


def test_a_method_flag_is_a_method_and_its_settings_as_written():
    assert parse_method_flag("lora") == RowSpec("lora", (), "--method lora")
    spec = parse_method_flag("lora:rank=4, alpha=8")
    assert spec.settings == (("rank", "4"), ("alpha", "8"))
    spec = parse_method_flag("lora:target_modules=[q_proj, v_proj],rank=2")  # a list's comma stays in it
    assert spec.settings == (("target_modules", "[q_proj, v_proj]"), ("rank", "2"))


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("lorra", "--method lorra: unknown method 'lorra' (did you mean `lora`?); choose from lora"),
        ("lora:rank", "--method lora:rank: expected lora:key=value[,key=value...], got 'rank'"),
        ("lora:=4", "--method lora:=4: expected lora:key=value"),
        ("lora:name=x", "--method lora:name=x: the method is named before the colon"),
        ("lora:rank=4,rank=8", "--method lora:rank=4,rank=8: rank is given twice"),
    ],
)
def test_a_bad_method_flag_is_refused_naming_it(flag, message):
    with pytest.raises(UserError) as info:
        parse_method_flag(flag)
    assert str(info.value).startswith(message), str(info.value)


def test_row_names_are_safe_unique_directory_names():
    specs = [parse_method_flag(f) for f in ("lora", "lora:rank=4", "lora:rank=64", "lora:rank=4")]
    assert unique_names(specs) == ["lora", "lora-rank4", "lora-rank64", "lora-rank4-2"]
    assert (
        row_name(parse_method_flag("lora:target_modules=[q_proj, v_proj]"))
        == "lora-target_modules-q_proj-v_proj"
    )
    assert (
        row_name(parse_method_flag("lora:target_modules=../../etc,rank=2")) == "lora-target_modules-etc-rank2"
    )
    assert row_name(parse_method_flag("lora:learning_rate=1e-3")) == "lora-learning_rate1e-3"


def test_by_default_every_registered_method_is_a_row_or_says_why_not(tmp_path, bases, write_recipe):
    plan = make_plan(write_recipe(bases["llama"]), [], [])
    assert sorted([r.name for r in plan.rows] + [name for name, _ in plan.skipped]) == sorted(METHODS)
    assert dict(plan.skipped).keys() == {"bitfit"}  # a tiny Llama has no biases
    assert "no bias terms" in dict(plan.skipped)["bitfit"]
    for row in plan.rows:
        assert Path(row.recipe.output_dir) == tmp_path / "out" / row.name
        assert row.recipe.method.name == row.name
        assert 0 < row.counted.trainable < row.counted.total
        assert (row.recipe.train.max_steps, row.recipe.train.seed) == (2, 0)  # the recipe's budget


def test_learning_rates_are_the_methods_unless_the_recipe_or_the_row_sets_one(bases, write_recipe):
    plan = make_plan(
        write_recipe(bases["gpt2"]), [], ["lora", "prompt-tuning", "prefix-tuning:learning_rate=0.5"]
    )
    rates = {r.name: (r.recipe.train.learning_rate, r.learning_rate_source) for r in plan.rows}
    assert rates == {
        "lora": (default_learning_rate("lora"), "method default"),
        "prompt-tuning": (default_learning_rate("prompt-tuning"), "method default"),
        "prefix-tuning-learning_rate0.5": (0.5, "--method"),
    }
    assert default_learning_rate("prompt-tuning") > 10 * default_learning_rate("lora")
    plan = make_plan(write_recipe(bases["gpt2"], learning_rate=1e-3), [], ["lora", "prompt-tuning"])
    assert {(r.recipe.train.learning_rate, r.learning_rate_source) for r in plan.rows} == {(1e-3, "recipe")}
    plan = make_plan(write_recipe(bases["gpt2"]), ["train.learning_rate=2e-3"], ["prompt-tuning"])
    assert (plan.rows[0].recipe.train.learning_rate, plan.rows[0].learning_rate_source) == (2e-3, "recipe")


def test_the_recipes_method_section_is_where_its_own_rows_start(bases, write_recipe):
    recipe = write_recipe(bases["llama"], method={"name": "lora", "rank": 2, "target_modules": ["q_proj"]})
    plan = make_plan(recipe, ["method.alpha=3"], ["lora:rank=3", "prompt-tuning:num_virtual_tokens=2"])
    lora, prompt = (r.recipe.method for r in plan.rows)
    assert (lora.rank, lora.alpha, lora.target_modules) == (3, 3.0, ["q_proj"])
    assert prompt.num_virtual_tokens == 2 and prompt.prompt_init == type(prompt)().prompt_init


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("lora:rank=0", "--method lora:rank=0: method.rank: must be > 0, got 0"),
        ("lora:rnak=4", "--method lora:rnak=4: method.rnak: unknown key (did you mean `rank`?)"),
        ("prefix-tuning:rank=4", "--method prefix-tuning:rank=4: method.rank: unknown key"),
        ("lora:rank=[", "--method lora:rank=[: YAML syntax error"),
        ("lora:learning_rate=-1", "--method lora:learning_rate=-1: train.learning_rate: must be > 0"),
    ],
)
def test_row_settings_are_checked_like_recipe_keys_and_name_the_flag(bases, write_recipe, flag, message):
    with pytest.raises(UserError) as info:
        make_plan(write_recipe(bases["gpt2"]), [], [flag])
    assert str(info.value).startswith(message), str(info.value)


def test_when_no_method_applies_the_reasons_are_the_error(bases, write_recipe):
    with pytest.raises(UserError, match=r"no method applies to .*bitfit: .*no bias terms"):
        make_plan(write_recipe(bases["llama"]), [], ["bitfit"])


def test_a_recipe_that_starts_from_an_adapter_is_refused(tmp_path, bases, write_recipe):
    (tmp_path / "adapter").mkdir()
    recipe = write_recipe(bases["gpt2"], method={"name": "lora", "from_adapter": str(tmp_path / "adapter")})
    with pytest.raises(UserError, match="method.from_adapter: peft compare trains every method from scratch"):
        make_plan(recipe, [], [])
