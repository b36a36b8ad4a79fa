"""``segmote batch --skip-reviewed``: a new model re-segments only the cases nobody reviewed.

Real local Ray runs through the ``segmote`` entry point: a first model pre-labels the cohort, a
reviewer saves corrections of two cases (the core's ``save_correction``, the Review panel's
path; one case is marked ``reviewed: true`` on its labels instead), then a second model runs
with ``--skip-reviewed``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from segmote_core.cli import main as segmote_main
from segmote_core.review import read_correction, review_queue, save_correction

from tests.pipeline.helpers import attrs_of, labels_of, make_cohort, tiny_checkpoint, tree_digest



def _args(cohort: Path, out: Path, ckpt: Path, *extra: str) -> list[str]:
    return [str(cohort), str(out), "--segmote-checkpoint", str(ckpt), "--batch-size", "2",
            "--num-cpus", "2", "--no-progress", *extra]


@pytest.mark.slow  # four local Ray runs
def test_skip_reviewed_keeps_reviewed_cases_bit_identical_and_resegments_the_rest(tmp_path):
    import zarr

    cohort = tmp_path / "cohort.zarr"
    ids = make_cohort(cohort, n_cases=4, slices=2, size=32, corrupt=None)
    old = tiny_checkpoint(tmp_path / "old.safetensors", seed=0)
    new = tiny_checkpoint(tmp_path / "new.safetensors", seed=1)
    out = tmp_path / "labels.zarr"
    assert segmote_main(["batch", *_args(cohort, out, old)]) == 0
    first = labels_of(out)
    reviewed = ids[:2]
    edited = np.zeros_like(first[reviewed[0]])
    edited[..., 4:20, 6:22] = 1
    save_correction(out, reviewed[0], edited)
    arr = zarr.open_group(str(out), mode="r+")[reviewed[1]]["labels"]
    arr.attrs["reviewed"] = True                       # reviewed by another tool
    kept = {c: tree_digest(out / c) for c in reviewed}
    kept_corr = tree_digest(out / "corrections")
    old_attrs = attrs_of(out)

    # without the flag a new model over the store is refused, nothing touched
    assert segmote_main(["batch", *_args(cohort, out, new)]) == 2
    assert {c: tree_digest(out / c) for c in reviewed} == kept

    assert segmote_main(["batch", *_args(cohort, out, new, "--skip-reviewed")]) == 0
    after, attrs = labels_of(out), attrs_of(out)
    assert {c: tree_digest(out / c) for c in reviewed} == kept          # bit-identical
    assert tree_digest(out / "corrections") == kept_corr
    np.testing.assert_array_equal(read_correction(out, reviewed[0])[0], edited)
    others = [c for c in ids if c not in reviewed]
    for c in others:                                                # re-segmented, new model
        assert attrs[c]["complete"] is True
        assert attrs[c]["signature_sha256"] != old_attrs[c]["signature_sha256"]
    assert any(not np.array_equal(after[c], first[c]) for c in others)
    assert not (out / ".staging").exists()
    # the queue is rebuilt: every case, the reviewed ones marked so
    queue = {e.case: e for e in review_queue(out)}
    assert set(queue) == set(ids)
    assert queue[reviewed[0]].reviewed and not queue[others[0]].reviewed
    csv = (out / "review_queue.csv").read_text()
    assert all(c in csv for c in ids)

    # a rerun of the same command finds everything done
    assert segmote_main(["batch", *_args(cohort, out, new, "--skip-reviewed")]) == 0
    assert labels_of(out).keys() == after.keys()
    assert all(np.array_equal(labels_of(out)[c], after[c]) for c in ids)
