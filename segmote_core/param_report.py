"""``segmote params``: trainable-parameter counts of SegMoTE's additions vs the paper's 17 M.

The paper (Tab. 3) counts 17 M trainable parameters, 10 M for MoTE and 7 M for PPT, on the
authors' IMIS-Net decoder, 768 wide. Stock SAM's decoder is 256 wide, so the same modules are
smaller here; the report also rebuilds them at 768 to show the paper's sizes are reproduced.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from torch import nn

from .config import SegMoTEConfig
from .modeling import PromptTokenizer, SegMoTEMaskDecoder

__all__ = ["ParamCounts", "count_additions", "report_lines", "register"]

PAPER = {"MoTE": 10.0, "PPT": 7.0, "total": 17.0}


def _n(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class ParamCounts:
    expert_branch: int      # expert tokens + per-token hypernetworks + HQ fusion
    router_experts: int     # gates, noise, expert FFNs and the mixing layers of both blocks
    ppt: int

    @property
    def mote(self) -> int:
        return self.expert_branch + self.router_experts

    @property
    def total(self) -> int:
        return self.mote + self.ppt


def count_additions(decoder: SegMoTEMaskDecoder, ppt: nn.Module | None) -> ParamCounts:
    routers = _n(decoder.routers) if decoder.use_experts else 0
    return ParamCounts(_n(decoder) - routers, routers, _n(ppt))


def _counts_for(dim: int, vit_dim: int, cfg: SegMoTEConfig) -> ParamCounts:
    dec = SegMoTEMaskDecoder(dim=dim, depth=2, vit_dim=vit_dim,
                             num_expert_tokens=cfg.num_expert_tokens, num_experts=cfg.num_experts,
                             top_k=cfg.top_k, rank=cfg.expert_rank, hq_fusion=cfg.hq_fusion)
    ppt = PromptTokenizer(dim=dim, num_queries=cfg.num_ppt_queries) if cfg.use_ppt else None
    return count_additions(dec, ppt)


def report_lines(model_type: str = "vit_b", sizes: tuple[int, ...] = (1024, 512)) -> list[str]:
    """Build the model at each input size and list its trainable parameters (millions)."""
    from .build import build_segmote

    lines = [f"{'model':<22}{'expert branch':>14}{'router+experts':>16}{'MoTE':>8}{'PPT':>8}"
             f"{'total':>8}{'frozen SAM':>12}"]
    for size in sizes:
        cfg = SegMoTEConfig(model_type=model_type, image_size=size)
        model = build_segmote(cfg)
        c = count_additions(model.expert_decoder, model.ppt)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        text = _n(model.text_encoder)
        if trainable != c.total + text:
            raise RuntimeError(f"trainable {trainable} != additions {c.total + text}")
        frozen = sum(p.numel() for p in model.sam.parameters())
        lines.append(_row(f"{model_type} @ {size} (C=256)", c, frozen))
    cfg = SegMoTEConfig(model_type=model_type)
    lines.append(_row("same modules, C=768", _counts_for(768, 768, cfg), None))
    lines.append(f"{'paper (IMIS, C=768)':<22}{'':>14}{'':>16}{PAPER['MoTE']:>7.2f}M"
                 f"{PAPER['PPT']:>7.2f}M{PAPER['total']:>7.2f}M")
    lines.append("Input size changes no trainable count: only the frozen encoder's position "
                 "tables shrink at 512.")
    return lines


def _row(name: str, c: ParamCounts, frozen: int | None) -> str:
    m = 1e6
    fz = f"{frozen / m:>11.2f}M" if frozen is not None else f"{'':>12}"
    return (f"{name:<22}{c.expert_branch / m:>13.2f}M{c.router_experts / m:>15.2f}M"
            f"{c.mote / m:>7.2f}M{c.ppt / m:>7.2f}M{c.total / m:>7.2f}M{fz}")


def _run(args: argparse.Namespace) -> int:
    import sys

    sys.stdout.write("\n".join(report_lines(args.model_type, tuple(args.sizes))) + "\n")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("params", help="trainable parameter report (vs the paper's 17 M)")
    p.add_argument("--model-type", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "tiny"])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 512])
    p.set_defaults(func=_run)
