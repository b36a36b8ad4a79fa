"""Reproduce a bundled demo model from offline data, in one command:

    python -m training.make_demo_model [--base lite_medsam|tiny] [--workdir runs/demo] [--ablations]

1. ``segmote demo-data`` writes the demo cohort (MNI brain from nilearn + CT / X-ray /
   dermoscopy phantoms); ``segmote curate`` scores it and splits it 9:1 by patient.
2. ``--base lite_medsam`` (default; the paper's way): LiteMedSAM's pretrained encoder and prompt
   encoder frozen from the start (outputs pre-computed once); expert tokens + MoTE, HQ fusion,
   PPT, the text guide and SAM's decoder train (``demo_lite_medsam.yaml``, a quarter of the
   steps free boxes with LiteMedSAM's own answers as targets), then a shorter second stage
   from that model draws the thin brain structures more often (``demo_lite_medsam_ft.yaml``),
   and a third stage (``demo_lite_medsam_cat.yaml``) teaches category-conditioned PPT for
   ``segmote batch --categories`` while keeping plain PPT: it reads the whole training split
   (every CT slice, all dermoscopy and X-ray cases) with its own embedding cache.
   ``--base tiny``: no pretrained tiny SAM exists, so phase 1 (``demo_phase1.yaml``) trains a
   tiny SAM end to end, phase 2 (``demo_phase2.yaml``) the SegMoTE parts on its frozen encoder.
3. The model is written to ``segmote_core/data/demo/`` (``segmote_demo_lite_medsam`` resp.
   ``segmote_demo``), evaluated on the held-out patients and on real DICOM slices (the
   label-free real-image check), and the tables/figures go to ``docs/demo_model/[lite_medsam/]``.
4. ``--ablations``: the last stage again without MoTE (no expert tokens) and without PPT,
   from the stage before it, on the same data and encoder; a comparison table is written.

Every step is skipped when its output already exists, and a training run also when a later
run's model exists (each run only feeds the next; delete the work folder to start over); an
interrupted training resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from segmote_core.build import demo_model_path, load_segmote
from segmote_core.checkpoint import save_segmote

from .dataset import build_slice_dataset
from .evaluate import evaluate_model, tables, write_report
from .train_config import load_train_config
from .trainer import Trainer

log = logging.getLogger("training.make_demo_model")

ROOT = Path(__file__).resolve().parent.parent
ABLATIONS = {"no_mote": {"model.num_expert_tokens": 0},
             "no_ppt": {"model.num_ppt_queries": 0}}
#: Per base: the runs in order (folder, config; each run starts from the previous one's model)
#: and the run whose config the ablations repeat.
#: ``train_cases_per_dataset``: the training split thinned to at most this many cases per
#: dataset (evenly spaced; the test split is untouched): LiteMedSAM's encoder costs seconds
#: per slice on a CPU, and a pretrained base needs few examples.
#: ``shared_cache``: every run reads the first run's embedding cache (one frozen encoder; the
#: cache's signature still refuses it if the encoder or the slices differ).
#: ``whole_split``: runs that read the whole training split (not thinned) with their own
#: embedding cache in their folder (their slices differ from the shared cache's).
RECIPES = {"lite_medsam": {"runs": [("lite_medsam", "demo_lite_medsam.yaml"),
                                    ("lite_medsam_ft", "demo_lite_medsam_ft.yaml"),
                                    ("lite_medsam_cat", "demo_lite_medsam_cat.yaml")],
                           "docs": "lite_medsam", "title": "SegMoTE demo model (LiteMedSAM base)",
                           "train_cases_per_dataset": 12, "shared_cache": True,
                           "whole_split": ("lite_medsam_cat",)},
           "tiny": {"runs": [("phase1", "demo_phase1.yaml"), ("phase2", "demo_phase2.yaml")],
                    "docs": "", "title": "SegMoTE demo model (tiny)"}}


def thin_selection(source: Path, target: Path, cases_per_dataset: int) -> Path:
    """A copy of ``source`` whose training split keeps at most ``cases_per_dataset`` cases of
    each dataset (evenly spaced over the sorted case ids); dropped cases become ``unused``."""
    data = json.loads(source.read_text())
    by_dataset: dict[str, list[str]] = {}
    for case_id, entry in data["cases"].items():
        if entry.get("split") == "train":
            by_dataset.setdefault(entry.get("dataset", ""), []).append(case_id)
    keep = set()
    for ids in by_dataset.values():
        ids = sorted(ids)
        n = min(cases_per_dataset, len(ids))
        keep |= {ids[round(i * (len(ids) - 1) / max(1, n - 1))] for i in range(n)}
    for case_id, entry in data["cases"].items():
        if entry.get("split") == "train" and case_id not in keep:
            entry["split"] = "unused"
    data["splits"]["train"] = sorted(keep)
    data["splits"]["unused"] = sorted(c for c, e in data["cases"].items()
                                      if e.get("split") == "unused")
    data.setdefault("config", {})["train_cases_per_dataset"] = cases_per_dataset
    target.write_text(json.dumps(data, indent=2))
    return target


def first_needed_run(work: Path, runs: list[tuple[str, str]]) -> int:
    """Index of the first run the recipe must visit: the last one whose model exists in
    ``work`` (each run only feeds the next, so the ones before it are not needed), else 0."""
    done = [i for i, (out, _) in enumerate(runs) if (work / out / "model.safetensors").is_file()]
    return max(done) if done else 0


def training_record(work: Path, runs: list[tuple[str, str]], base: str) -> dict[str, Any]:
    """The installed model's ``training`` record: the last run's, with each earlier run's under
    its folder name (read from its ``model.json`` where the work folder has it, also for runs
    a rerun did not visit)."""
    info = json.loads((work / runs[-1][0] / "model.json").read_text())
    training = dict(info.get("training", {}),
                    recipe=f"python -m training.make_demo_model --base {base}")
    for out, _ in runs[:-1]:
        path = work / out / "model.json"
        if not path.is_file():
            continue
        rec = json.loads(path.read_text()).get("training") or {}
        for earlier, _ in runs:  # a run seeded from an installed model carries the earlier
            if earlier in rec:   # runs' records inside its own: one level, as if run here
                training.setdefault(earlier, rec.pop(earlier))
        rec.pop("recipe", None)
        training[out] = rec
    return training


def run_data(recipe: dict[str, Any], out: str, work: Path, thinned: dict[str, str],
             whole: dict[str, str]) -> dict[str, str]:
    """The data overrides of run ``out``: the thinned selection and, with ``shared_cache``, the
    first run's embedding cache; a ``whole_split`` run the whole training split and its own
    cache in its folder (its slices differ, so the shared file would not serve it)."""
    if out in recipe.get("whole_split", ()):
        return {**whole, "cache_path": str((work / out / "embeddings.safetensors").resolve())}
    if recipe.get("shared_cache"):
        first = recipe["runs"][0][0]
        return {**thinned, "cache_path": str((work / first / "embeddings.safetensors").resolve())}
    return dict(thinned)


def ablation_start(recipe: dict[str, Any], work: Path) -> tuple[str, str, dict[str, str]]:
    """The run the ablations repeat (the last), its config and the model it starts from (the
    run before it; none for a one-run recipe)."""
    runs = recipe["runs"]
    init = ({"init_checkpoint": str((work / runs[-2][0] / "model.safetensors").resolve())}
            if len(runs) > 1 else {})
    return runs[-1][0], runs[-1][1], init


def _config_path(name: str) -> Path:
    return Path(str(resources.files("training") / "configs" / name))


def _segmote_cli(*argv: str) -> None:
    from segmote_core.cli import main

    code = main(list(argv))
    if code:
        raise RuntimeError(f"'segmote {' '.join(argv)}' failed with exit code {code}")


def _train(config_name: str, work: Path, out: str, overrides: dict[str, Any]) -> Path:
    final = work / out / "model.safetensors"
    if final.is_file():
        log.info("%s exists: skipping", final)
        return final
    cfg = load_train_config(_config_path(config_name),
                            {"output_dir": str((work / out).resolve()), **overrides})
    t0 = time.perf_counter()
    result = Trainer(cfg).fit()
    log.info("%s: %.1f min", out, (time.perf_counter() - t0) / 60)
    (work / out / "minutes.txt").write_text(f"{(time.perf_counter() - t0) / 60:.2f}\n")
    return result.model_path


def _evaluate(model_path: Path, cohort: Path, selection: Path, out: Path, title: str):
    model = load_segmote(model_path)
    ds = build_slice_dataset(cohort, image_size=model.image_size, selection=selection,
                             split="test", keep_original=True)
    result = evaluate_model(model, ds)
    write_report(result, out, title=title)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="reproduce a bundled SegMoTE demo model")
    ap.add_argument("--base", choices=sorted(RECIPES), default="lite_medsam",
                    help="lite_medsam: SegMoTE on the pretrained LiteMedSAM (default); tiny: "
                         "a tiny SAM trained from scratch first")
    ap.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    ap.add_argument("--cohort", type=Path, default=None,
                    help="use this demo cohort instead of running 'segmote demo-data'")
    ap.add_argument("--selection", type=Path, default=None,
                    help="use this selection.json instead of running 'segmote curate'")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ablations", action="store_true")
    ap.add_argument("--ablation-epochs", type=int, default=None,
                    help="ablation epochs (default: as the demo)")
    ap.add_argument("--no-install", action="store_true",
                    help="do not copy the model into segmote_core/data/demo")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "demo_model")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    recipe = RECIPES[args.base]
    docs = args.docs / recipe["docs"] if recipe["docs"] else args.docs
    docs.mkdir(parents=True, exist_ok=True)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    cohort = args.cohort or work / "demo_cohort.zarr"
    if not cohort.exists():
        _segmote_cli("demo-data", str(cohort))
    selection = args.selection or work / "selection.json"
    if not selection.is_file():
        _segmote_cli("curate", str(cohort), str(selection))
    whole = {"data.cohort": str(cohort.resolve()), "data.selection": str(selection.resolve())}
    if recipe.get("train_cases_per_dataset"):
        selection = thin_selection(selection, work / f"selection_{args.base}.json",
                                   recipe["train_cases_per_dataset"])
    data = {"data.cohort": str(cohort.resolve()), "data.selection": str(selection.resolve())}
    runs = recipe["runs"]
    first = first_needed_run(work, runs)
    trains_demo = not all((work / out / "model.safetensors").is_file() for out, _ in runs[first:])
    previous: Path | None = None
    trained = {}
    for i, (out, config_name) in enumerate(runs):
        if i < first:
            log.info("%s: skipped, %s has its model", out, runs[first][0])
            continue
        init = {"init_checkpoint": str(previous.resolve())} if previous is not None else {}
        previous = trained[out] = _train(config_name, work, out,
                                         {**run_data(recipe, out, work, data, whole), **init})
    final_run = runs[-1][0]
    final = trained[final_run]
    minutes = (time.perf_counter() - t_start) / 60
    model = load_segmote(final)
    training = training_record(work, runs, args.base)
    if not args.no_install:
        target = demo_model_path(args.base)
        save_segmote(model, target, training=training)
        log.info("installed %s (%.1f MB)", target, target.stat().st_size / 2 ** 20)
    result = _evaluate(final, cohort, selection, docs, recipe["title"])
    from .real_image_check import run_real_image_check  # needs pydicom (litemedsam extra)

    run_real_image_check(model, docs, title=recipe["title"])
    rows = {"SegMoTE demo": result}
    if args.ablations:
        ablated, ablation_config, init = ablation_start(recipe, work)
        for name, change in ABLATIONS.items():
            extra = dict(change)
            if args.ablation_epochs:
                extra["optim.epochs"] = args.ablation_epochs
                extra["optim.lr_milestones"] = []
            # the same frozen encoder and data: the ablated run's embedding cache serves every
            # ablation (one without expert tokens reads its final embeddings and leaves the
            # intermediate ones)
            path = _train(ablation_config, work, f"ablation_{name}",
                          {**run_data(recipe, ablated, work, data, whole), **init, **extra})
            rows[name] = _evaluate(path, cohort, selection, work / f"eval_{name}", name)
            keep = docs / f"ablation_{name}"
            keep.mkdir(parents=True, exist_ok=True)
            for table in ("tables.md", "table_categories.csv"):
                shutil.copy(work / f"eval_{name}" / table, keep / table)
        _write_ablation(rows, docs / "ablation.md", work, final_run)
    # runs not repeated here keep their minutes; a rerun that only adds ablations keeps the
    # total of the run that trained
    kept = docs / "training_minutes.json"
    record = json.loads(kept.read_text()) if kept.is_file() else {}
    record.update({out: float((work / out / "minutes.txt").read_text()) for out, _ in runs
                   if (work / out / "minutes.txt").is_file()})
    if trains_demo:
        record["demo_total_this_run"] = round(minutes, 2)
    kept.write_text(json.dumps(record, indent=2))
    for out, _ in runs:
        if (work / out / "metrics.csv").is_file():
            shutil.copy(work / out / "metrics.csv", docs / f"{out}_metrics.csv")
    return 0


def _write_ablation(results: dict, path: Path, work: Path, final_run: str) -> None:
    """One table: mean Dice per dataset/category and mode for each variant."""
    lines = ["| variant | dataset | category | point | box | auto |", "|---|---|---|---|---|---|"]
    for name, res in results.items():
        cat = tables(res)["categories"]
        for (dataset, category), row in cat.iterrows():
            cells = [f"{row[m]:.4f}" if m in row and row[m] == row[m] else "—"
                     for m in ("point", "box", "auto")]
            lines.append(f"| {name} | {dataset} | {category} | " + " | ".join(cells) + " |")
    minutes = {}
    for name in results:
        f = work / (final_run if name == "SegMoTE demo" else f"ablation_{name}") / "minutes.txt"
        if f.is_file():
            minutes[name] = f.read_text().strip()
    lines += ["", "Training minutes (SegMoTE phase): " + ", ".join(f"{k} {v}" for k, v in minutes.items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
