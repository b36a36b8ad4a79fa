"""The demo recipe's run order (``python -m training.make_demo_model``): which runs a rerun
visits, and that every run's config loads."""

from __future__ import annotations

from training.make_demo_model import RECIPES, _config_path, first_needed_run
from training.train_config import load_train_config


#: the LiteMedSAM recipe's three runs in a row
RUNS = [("lite_medsam", "demo_lite_medsam.yaml"), ("lite_medsam_ft", "demo_lite_medsam_ft.yaml"),
        ("lite_medsam_cat", "demo_lite_medsam_cat.yaml")]


def test_a_rerun_starts_at_the_last_run_with_a_model(tmp_path):
    runs = RUNS
    assert RECIPES["lite_medsam"]["runs"] == RUNS
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


def test_the_category_stage_reads_the_whole_split_with_its_own_cache_and_ablations_repeat_it(
        tmp_path):
    from training.make_demo_model import ablation_start, run_data

    recipe = RECIPES["lite_medsam"]
    thinned = {"data.cohort": "c.zarr", "data.selection": "selection_lite_medsam.json"}
    whole = {"data.cohort": "c.zarr", "data.selection": "selection.json"}
    shared = str((tmp_path / "lite_medsam" / "embeddings.safetensors").resolve())
    for out in ("lite_medsam", "lite_medsam_ft"):
        assert run_data(recipe, out, tmp_path, thinned, whole) == {**thinned, "cache_path": shared}
    assert run_data(recipe, "lite_medsam_cat", tmp_path, thinned, whole) == {
        **whole, "cache_path": str((tmp_path / "lite_medsam_cat" / "embeddings.safetensors")
                                   .resolve())}
    cat = load_train_config(_config_path("demo_lite_medsam_cat.yaml"), {"output_dir": "unused"})
    assert cat.data.max_slices_per_case == 16 and cat.prompts.ppt_absent == 0.4
    # the ablations repeat the shipped (last) stage from stage 2's model, on the same data
    ablated, config, init = ablation_start(recipe, tmp_path)
    assert (ablated, config) == ("lite_medsam_cat", "demo_lite_medsam_cat.yaml")
    assert init == {"init_checkpoint": str((tmp_path / "lite_medsam_ft" / "model.safetensors")
                                           .resolve())}
    # the tiny recipe: no thinning, no shared cache, ablations repeat its last run
    tiny = RECIPES["tiny"]
    assert run_data(tiny, "phase2", tmp_path, whole, whole) == whole
    assert ablation_start(tiny, tmp_path)[:2] == ("phase2", "demo_phase2.yaml")
