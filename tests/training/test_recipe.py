"""The demo recipe's run order (``python -m training.make_demo_model``): which runs a rerun
visits, and that every run's config loads."""

from __future__ import annotations

from training.make_demo_model import RECIPES, _config_path, first_needed_run
from training.train_config import load_train_config


#: three runs in a row, as a recipe may have (the shipped LiteMedSAM recipe has two)
RUNS = [("lite_medsam", "demo_lite_medsam.yaml"), ("lite_medsam_ft", "demo_lite_medsam_ft.yaml"),
        ("lite_medsam_cat", "demo_lite_medsam_cat.yaml")]


def test_a_rerun_starts_at_the_last_run_with_a_model(tmp_path):
    runs = RUNS
    assert [out for out, _ in RECIPES["lite_medsam"]["runs"]] == ["lite_medsam", "lite_medsam_ft"]
    assert first_needed_run(tmp_path, runs) == 0  # nothing yet: from the start
    (tmp_path / "lite_medsam").mkdir()
    (tmp_path / "lite_medsam" / "model.safetensors").write_bytes(b"x")
    assert first_needed_run(tmp_path, runs) == 0  # visited (skipped) and feeds the next
    (tmp_path / "lite_medsam_ft").mkdir()
    (tmp_path / "lite_medsam_ft" / "model.safetensors").write_bytes(b"x")
    assert first_needed_run(tmp_path, runs) == 1
    (tmp_path / "lite_medsam").joinpath("model.safetensors").unlink()
    assert first_needed_run(tmp_path, runs) == 1  # stage 1 is not needed for stage 3


def test_every_recipe_config_loads_and_the_category_stage_conditions_ppt_on_the_category():
    for recipe in [*RECIPES.values(), {"runs": RUNS}]:
        for _, name in recipe["runs"]:
            load_train_config(_config_path(name), {"output_dir": "unused"})
    cat = load_train_config(_config_path("demo_lite_medsam_cat.yaml"), {"output_dir": "unused"})
    assert cat.prompts.ppt_category_text > 0.5 and cat.model.model_type == "lite_medsam"


def test_the_installed_record_names_every_run_also_those_a_rerun_skipped(tmp_path):
    import json

    from training.make_demo_model import training_record

    runs = RUNS
    # stage 2 seeded from an installed model: its record carries stage 1's inside it
    (tmp_path / "lite_medsam_ft").mkdir()
    (tmp_path / "lite_medsam_ft" / "model.json").write_text(json.dumps({"training": {
        "steps_per_epoch": 45, "recipe": "old", "lite_medsam": {"steps_per_epoch": 60}}}))
    (tmp_path / "lite_medsam_cat").mkdir()
    (tmp_path / "lite_medsam_cat" / "model.json").write_text(json.dumps({"training": {
        "steps_per_epoch": 45, "epochs": 1}}))
    rec = training_record(tmp_path, runs, "lite_medsam")
    assert rec["epochs"] == 1 and rec["recipe"].endswith("--base lite_medsam")
    assert rec["lite_medsam"] == {"steps_per_epoch": 60}
    assert rec["lite_medsam_ft"] == {"steps_per_epoch": 45}
