"""``SegMoTEPredictor``: SamPredictor's shape over SegMoTE, for 2D medical images.

``set_image`` runs the expensive encoder once; ``predict`` (numpy, one image) wraps
``predict_torch`` (batched tensors) and costs only the decoder.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .modeling import DecoderOutput, ImageFeatures, SegMoTE
from .transforms import ResizePad, normalize_to_tensor

__all__ = ["SegMoTEPredictor", "Prediction", "use_bf16", "model_signature", "encoder_signature"]


def use_bf16(model: SegMoTE, precision: str = "auto") -> bool:
    """Whether the encoder runs under bf16 autocast: ``"bf16"``, ``"fp32"`` or ``"auto"``.

    ``auto``: where the hardware computes bf16 natively (:func:`segmote_core.device.bf16_native`:
    CUDA compute capability >= 8.0, CPUs with AVX512-BF16 / AMX); on the CPU only for the
    ViT-B/L/H encoders (the small encoders gain nothing there).
    """
    from .device import bf16_native

    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
    if precision != "auto":
        return precision == "bf16"
    if model.device.type == "cpu" and model.config.model_type in ("tiny", "lite_medsam"):
        return False
    return bf16_native(model.device)


def model_signature(model: SegMoTE) -> dict[str, Any]:
    """Config + a hash of every weight: what cached embeddings and outputs are signed with."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().float().numpy().tobytes())
    return {"config": model.config.to_dict(), "weights_sha256": h.hexdigest(),
            "config_sha256": hashlib.sha256(model.config.to_json().encode()).hexdigest()}


def encoder_signature(model: SegMoTE) -> dict[str, Any]:
    """What the image encoder's outputs depend on: base, input size, the early block the HQ
    fusion reads (if any) and a hash of the encoder's weights. Fine-tuning the added parts (or
    SAM's decoder) leaves it unchanged, so cached embeddings stay valid."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.sam.image_encoder.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().float().numpy().tobytes())
    return {"model_type": model.config.model_type, "image_size": int(model.image_size),
            "interm_block": int(model.interm_block) if model.needs_interm else None,
            "weights_sha256": h.hexdigest()}


@dataclass
class Prediction:
    """One image's result. Unpacks like SamPredictor: ``masks, scores, logits = pred``."""

    masks: np.ndarray            # (M, Y, X) bool (or float logits with return_logits)
    scores: np.ndarray           # (M,)
    low_res_logits: np.ndarray   # (M, 4h, 4w)
    expert_token: int | None     # selected expert token t*
    expert: int | None           # its expert e*
    confidence: float | None     # router probability of (t*, e*)
    token_weights: np.ndarray | None  # (T,)

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter((self.masks, self.scores, self.low_res_logits))


class SegMoTEPredictor:
    """Interactive prompting on one 2D image at a time (points, boxes, masks, or PPT auto)."""

    def __init__(self, model: SegMoTE, precision: str = "auto") -> None:
        self.model = model.eval()
        self.transform = ResizePad(model.image_size)
        self.bf16 = use_bf16(model, precision)
        self._signature: dict[str, Any] | None = None
        self._enc_signature: dict[str, Any] | None = None
        self.reset_image()

    # ------------------------------------------------------------------ image / embedding
    def reset_image(self) -> None:
        self.features: ImageFeatures | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None
        self._last: DecoderOutput | None = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def is_image_set(self) -> bool:
        return self.features is not None

    def prepare(self, image: np.ndarray, modality: str = "auto", window=None) -> torch.Tensor:
        """Normalise, resize and pad one image -> (1, 3, S, S) encoder input; sets sizes.

        All of it runs on the model's device (the raw image crosses in its own dtype)."""
        rgb = normalize_to_tensor(image, modality, window, device=self.device)
        resized = self.transform.apply_image(rgb)
        self.original_size = tuple(int(s) for s in rgb.shape[-2:])
        self.input_size = tuple(int(s) for s in resized.shape[-2:])
        return self.model.preprocess(resized)

    @torch.inference_mode()
    def set_image(self, image: np.ndarray, modality: str = "auto", window=None) -> None:
        """Compute and keep the embedding of a (Y, X) or (Y, X, 3) image of any dtype."""
        batch = self.prepare(image, modality, window)
        self.features = self.model.encode(batch, autocast=self.bf16)
        self._last = None

    def get_embedding(self) -> dict[str, Any]:
        """The current embedding as numpy arrays (cacheable; see :meth:`set_embedding`)."""
        if self.features is None:
            raise RuntimeError("no image set: call set_image() or set_embedding() first")
        out: dict[str, Any] = {
            "image_embeddings": self.features.image_embeddings[0].cpu().numpy(),
            "original_size": self.original_size, "input_size": self.input_size,
        }
        if self.features.interm_embeddings is not None:
            out["interm_embeddings"] = self.features.interm_embeddings[0].cpu().numpy()
        return out

    def set_embedding(self, embedding: dict[str, Any]) -> None:
        """Restore an embedding from :meth:`get_embedding` without running the encoder."""
        try:
            emb = torch.as_tensor(np.asarray(embedding["image_embeddings"]), dtype=torch.float32)
            original, inp = embedding["original_size"], embedding["input_size"]
        except KeyError as exc:
            raise ValueError(f"embedding dict lacks {exc}") from exc
        c, s = self.model.config.preset.prompt_dim, self.model.config.embedding_size
        if tuple(emb.shape) != (c, s, s):
            raise ValueError(f"embedding of shape {tuple(emb.shape)} does not fit this model "
                             f"(expects {(c, s, s)})")
        interm = embedding.get("interm_embeddings")
        if self.model.needs_interm and interm is None:
            raise ValueError("this model fuses early ViT features: the embedding lacks "
                             "'interm_embeddings'")
        interm_t = (torch.as_tensor(np.asarray(interm), dtype=torch.float32)[None]
                    if interm is not None and self.model.needs_interm else None)
        self.features = ImageFeatures(emb[None], interm_t).to(self.device)
        self.original_size = tuple(int(v) for v in original)
        self.input_size = tuple(int(v) for v in inp)
        self._last = None

    @property
    def categories(self) -> tuple[str, ...]:
        """The categories ``predict(text=...)`` accepts (the model's training vocabulary)."""
        return self.model.config.vocabulary if self.model.text_encoder is not None else ()

    def category_index(self, name: str) -> int:
        if name not in self.categories:
            raise ValueError(f"unknown category {name!r}; this model knows {list(self.categories)}")
        return self.categories.index(name)

    def encoder_signature(self) -> dict[str, Any]:
        """:func:`encoder_signature` of the model plus the encoder's precision."""
        if self._enc_signature is None:
            self._enc_signature = encoder_signature(self.model)
            self._enc_signature["bf16_encoder"] = self.bf16
            # embeddings made on a GPU differ from the CPU's by rounding: never mixed
            self._enc_signature["device"] = self.device.type
        return self._enc_signature

    def model_signature(self) -> dict[str, Any]:
        if self._signature is None:
            self._signature = model_signature(self.model)
            self._signature["bf16_encoder"] = self.bf16
            self._signature["device"] = self.device.type
        return self._signature

    # ------------------------------------------------------------------ prompting
    def predict(self, point_coords: np.ndarray | None = None, point_labels: np.ndarray | None = None,
                box: np.ndarray | None = None, mask_input: np.ndarray | None = None,
                multimask_output: bool = False, auto: bool = False,
                return_logits: bool = False, text: str | None = None) -> Prediction:
        """Predict masks for prompts in original-image pixels.

        Args:
            point_coords: (P, 2) XY; point_labels: (P,) 1 foreground, 0 background.
            box: (4,) XYXY.
            mask_input: (1, 4h, 4w) low-res logits, e.g. a previous ``low_res_logits``.
            multimask_output: the expert mask (if any) followed by SAM's 3 ambiguity masks.
            auto: PPT, prompt-free (no points or box).
            return_logits: masks as float logits instead of bool.
            text: a category of the model's vocabulary (e.g. ``"white_matter"``): its text
                token joins the prompt, to say which structure a box means.
        """
        if self.features is None:
            raise RuntimeError("no image set: call set_image() or set_embedding() first")
        coords = labels = box_t = mask_t = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must accompany point_coords")
            pc = np.asarray(point_coords, dtype=np.float32).reshape(-1, 2)
            pl = np.asarray(point_labels).reshape(-1)
            if len(pc) != len(pl):
                raise ValueError(f"{len(pc)} points but {len(pl)} labels")
            coords = torch.as_tensor(self.transform.apply_coords(pc, self.original_size))[None]
            labels = torch.as_tensor(pl, dtype=torch.int64)[None]
        if box is not None:
            b = np.asarray(box, dtype=np.float32).reshape(4)
            box_t = torch.as_tensor(self.transform.apply_boxes(b, self.original_size))[None]
        if mask_input is not None:
            mask_t = torch.as_tensor(np.asarray(mask_input), dtype=torch.float32).reshape(
                1, 1, *np.asarray(mask_input).shape[-2:])
        text_ids = None if text is None else torch.tensor([self.category_index(text)])
        masks, out = self.predict_torch(coords, labels, box_t, mask_t, multimask_output, auto,
                                        return_logits, text_ids=text_ids)
        return Prediction(
            masks=masks[0].cpu().numpy(), scores=out.iou_predictions[0].float().cpu().numpy(),
            low_res_logits=out.low_res_masks[0].float().cpu().numpy(),
            expert_token=None if out.selected_token is None else int(out.selected_token[0]),
            expert=None if out.selected_expert is None else int(out.selected_expert[0]),
            confidence=None if out.confidence is None else float(out.confidence[0]),
            token_weights=None if out.token_weights is None else out.token_weights[0].cpu().numpy(),
        )

    @torch.inference_mode()
    def predict_torch(self, point_coords=None, point_labels=None, boxes=None, mask_input=None,
                      multimask_output: bool = False, auto: bool = False,
                      return_logits: bool = False, want_heatmaps: bool = False,
                      text_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, DecoderOutput]:
        """Batched prompts already in the resized frame (as SamPredictor.predict_torch).

        ``point_coords`` (N, P, 2), ``point_labels`` (N, P), ``boxes`` (N, 4), ``mask_input``
        (N, 1, 4h, 4w), ``text_ids`` (N,) vocabulary indices. Returns masks (N, M, Y, X) at the
        original size and the raw output.
        ``want_heatmaps`` also computes routing heat maps (otherwise done on demand by
        :meth:`routing_heatmaps`, keeping the prompt -> mask path lean).
        """
        if self.features is None:
            raise RuntimeError("no image set: call set_image() or set_embedding() first")
        dev = self.device
        self.model.cache_hq(self.features)
        points = None
        if point_coords is not None:
            points = (point_coords.to(dev), point_labels.to(dev))
        out = self.model.decode(
            self.features, points=points, boxes=None if boxes is None else boxes.to(dev),
            mask_inputs=None if mask_input is None else mask_input.to(dev), auto=auto,
            text_ids=text_ids,
            multimask_output=multimask_output, want_heatmaps=want_heatmaps,
            fusion_bf16=self.bf16)
        self._last = out
        self._last_call = (point_coords, point_labels, boxes, mask_input, multimask_output, auto,
                           False)
        self._last_text = text_ids
        masks = self.model.sam.postprocess_masks(out.low_res_masks, self.input_size,
                                                 self.original_size)
        return (masks if return_logits else masks > 0.0), out

    def routing_heatmaps(self) -> np.ndarray:
        """(E, Y, X) routing heat maps of the last prediction, at the original image size."""
        if self._last is None or not self.model.expert_decoder.use_experts:
            raise RuntimeError("no routing heat maps: predict() with a model that has experts first")
        if self._last.heatmaps is None:  # re-run the last prompt with attention kept
            self.predict_torch(*self._last_call, want_heatmaps=True, text_ids=self._last_text)
        heat = self._last.heatmaps[:1].float()
        s = self.model.image_size
        full = F.interpolate(heat, size=(s, s), mode="bilinear", align_corners=False)
        full = full[..., : self.input_size[0], : self.input_size[1]]
        full = F.interpolate(full, size=self.original_size, mode="bilinear", align_corners=False)
        return full[0].cpu().numpy()
