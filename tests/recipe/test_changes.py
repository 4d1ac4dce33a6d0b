"""recipe/changes.py: what a resumed run may change."""

from __future__ import annotations

from peftcli.methods import make_config
from peftcli.recipe import Recipe
from peftcli.recipe.changes import resume_changes


def recipe(**train) -> Recipe:
    r = Recipe()
    r.model.name, r.data.train = "org/model", "train.jsonl"
    r.train.learning_rate = 2e-4  # as load_recipe resolves it (the method's default)
    for key, value in train.items():
        setattr(r.train, key, value)
    return r


def test_the_budget_cadence_and_speed_ups_may_change():
    refused, allowed = resume_changes(
        recipe(max_steps=10), recipe(max_steps=20, eval_every=5, save_every=5, gradient_checkpointing=True)
    )
    assert refused == []
    assert allowed == {
        "train.max_steps": (10, 20),
        "train.eval_every": (None, 5),
        "train.save_every": (None, 5),
        "train.gradient_checkpointing": ("auto", True),
    }


def test_what_shapes_the_model_or_the_updates_is_fixed():
    new = recipe(seed=1, learning_rate=1e-3)
    new.method = make_config("lora", rank=4)
    new.data.max_length = 64
    refused, _ = resume_changes(recipe(), new)
    assert sorted(refused) == [
        "data.max_length: 512 -> 64",
        "method.rank: 8 -> 4",
        "train.learning_rate: 0.0002 -> 0.001",
        "train.seed: 42 -> 1",
    ]
    other = recipe()
    other.method = make_config("bitfit")
    assert any(
        line.startswith("method.name: 'lora' -> 'bitfit'") for line in resume_changes(recipe(), other)[0]
    )


def test_paths_compare_by_what_they_point_to(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text("{}\n")
    saved, new = recipe(), recipe()
    new.data.train = str(tmp_path / "train.jsonl")
    assert resume_changes(saved, new) == ([], {})
