"""Propagation with several prompted slices when one of them finds nothing."""

from __future__ import annotations

import numpy as np

from segmote_core.volume import SlicePrompt, SliceSegmentation, StopEvent, propagate


class BoxSegmenter:
    """Stand-in whose masks are known: the truth of slice z inside the prompt's box."""

    def __init__(self, truth: np.ndarray) -> None:
        self.truth, self.n_slices, self.shape = truth, truth.shape[0], truth.shape[1:]
        self.calls: list[int] = []

    def segment(self, z: int, prompt: SlicePrompt) -> SliceSegmentation:
        self.calls.append(z)
        x0, y0, x1, y1 = np.asarray(prompt.box).astype(int)
        region = np.zeros(self.shape, bool)
        region[y0:y1 + 1, x0:x1 + 1] = True
        return SliceSegmentation(self.truth[z] & region, 0.9)


def test_a_seed_that_finds_nothing_does_not_block_its_neighbour():
    truth = np.zeros((16, 30, 30), bool)
    truth[2:12, 8:20, 8:20] = True                          # object on slices 2..11
    box = SlicePrompt(box=np.array([8, 8, 19, 19], np.float32))
    miss = SlicePrompt(box=np.array([0, 0, 4, 4], np.float32))     # a box on background
    seg = BoxSegmenter(truth)
    res = propagate(seg, {4: box, 9: miss})
    # slices 5..8 are reached from 4 (not cut at the 4/9 midpoint); 9 stays the user's (empty)
    assert res.slices == [2, 3, 4, 5, 6, 7, 8]
    assert sorted(seg.calls) == sorted(set(seg.calls))       # no slice segmented twice
    assert seg.calls.count(9) == 1 and res.source[5:9].tolist() == [4, 4, 4, 4]
    assert StopEvent(4, 1, 9, "met") in res.stops and StopEvent(4, -1, 1, "empty") in res.stops
    assert StopEvent(9, -1, 9, "empty") in res.stops and StopEvent(9, 1, 9, "empty") in res.stops
